"""A corpus of bad inputs and faults: each ends in one line on stderr, exit code 2, and leaves
nothing behind -- no run directory, no partial directory, no lock file, no traceback.

Cases run in-process through ``unlearn.cli.main`` (a traceback would fail the test); the kill
tests run the CLI in a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from unlearn import cli
from unlearn.runs import RunDir

ROOT = Path(__file__).resolve().parent.parent
QUICK = str(ROOT / "recipes" / "quickstart.yaml")
TARGET = ROOT / "unlearn" / "zoo" / "assets" / "tiny-llama" / "target"
FAST = ["train.max_steps=1", "eval.max_items=2", "task.retain_model=null"]


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    """Copies of the zoo target with one fault each."""
    root = tmp_path_factory.mktemp("faults")
    for k in ("corrupt", "empty", "no_tokenizer", "nan", "no_config"):
        shutil.copytree(TARGET, root / k)
    w = (TARGET / "model.safetensors").read_bytes()
    (root / "corrupt" / "model.safetensors").write_bytes(w[:1000])
    (root / "empty" / "model.safetensors").write_bytes(b"")
    for f in (root / "no_tokenizer").glob("tokenizer*"):
        f.unlink()
    (root / "no_config" / "config.json").unlink()
    sd = load_file(str(TARGET / "model.safetensors"))
    k = sorted(sd)[0]
    sd[k][0, 0] = float("nan")
    save_file(sd, str(root / "nan" / "model.safetensors"), metadata={"format": "pt"})
    (root / "a_file").write_text("not a model")
    return root


@pytest.fixture(scope="module")
def tofu_dirs(tmp_path_factory) -> Path:
    """TOFU-format directories: one good pair of splits and several broken ones."""
    root = tmp_path_factory.mktemp("tofu")

    def qa(i, who):
        return {"question": f"Q{i} about {who}?", "answer": f"Answer {i} of {who}."}

    def write(d, name, recs, raw=None):
        (root / d).mkdir(exist_ok=True)
        (root / d / name).write_text(raw if raw is not None else json.dumps(recs))

    write("no_retain", "forget10.json", [qa(i, "F") for i in range(3)])
    write("empty_forget", "forget10.json", [])
    write("empty_forget", "retain90.json", [qa(i, "R") for i in range(3)])
    write("no_answer", "forget10.json", [{"question": "Q?"}])
    write("no_answer", "retain90.json", [qa(i, "R") for i in range(3)])
    write("not_json", "forget10.json", None, raw="{not json")
    write("not_json", "retain90.json", [qa(i, "R") for i in range(3)])
    return root


def _run(capsys, *sets, recipe=QUICK):
    argv = ["run", recipe, "-q"]
    for s in sets:
        argv += ["--set", s]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


def _assert_one_error(rc, lines, expect, out_parent: Path, before: set[str]):
    assert rc == 2, lines
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and len(lines) == 1, lines
    assert expect in errors[0], errors[0]
    left = {p.name for p in out_parent.iterdir()} - before
    assert not left, f"left behind: {sorted(left)}"


# (id, --set items, text the one error line must contain); {f} = fault dir, {t} = tofu dirs
RECIPE_CASES = [
    ("unknown-top-key", ["bogus=1"], "'bogus'"),
    ("unknown-nested-key", ["train.lrr=0.1"], "did you mean 'lr'"),
    ("wrong-type", ["train.lr=abc"], "train.lr"),
    ("zero-epochs", ["train.epochs=0"], "train.epochs"),
    ("negative-batch", ["train.batch_size=-1"], "train.batch_size"),
    ("zero-grad-accum", ["train.grad_accum=0"], "train.grad_accum"),
    ("zero-threads", ["model.threads=0"], "model.threads"),
    ("absurd-threads", ["model.threads=100000"], "model.threads"),
    ("float-threads", ["model.threads=2.5"], "model.threads"),
    ("absurd-authors", ["task.world.n_authors=1000000000"], "task.world.n_authors"),
    ("absurd-perturbed", ["task.world.n_perturbed=50"], "task.world.n_perturbed"),
    ("absurd-real-authors", ["task.world.n_real_authors=100000"], "task.world.n_real_authors"),
    ("unknown-method", ["method.name=nope"], "nope"),
    ("unknown-method-param", ["method.params.bogus=1"], "bogus"),
    ("unknown-task", ["task.name=nope"], "task.name"),
    ("unknown-attack", ["eval.attacks=[nope]"], "nope"),
    ("unknown-probe", ["eval.probes=[nope]"], "nope"),
    ("bad-forget-split", ["task.forget_split=forget50"], "forget_split"),
    ("bad-dtype", ["model.dtype=float8"], "model.dtype"),
    ("zero-max-items", ["eval.max_items=0"], "eval.max_items"),
    ("negative-seed", ["seed=-1"], "seed"),
    ("bad-name", ["name=a/b"], "name"),
    ("override-without-value", ["train.lr"], "train.lr"),
    ("editor-with-eval-every", ["method.name=uld", "method.params={{}}", "train.eval_every=1"], "editor"),
    ("empty-zoo-source", ["model.source=zoo:"], "model.source"),
    ("unknown-zoo-model", ["model.source=zoo:tiny-llama/nope"], "nope"),
    ("missing-model-path", ["model.source=/nonexistent/model/dir"], "does not exist"),
    ("model-path-is-file", ["model.source={f}/a_file"], "is a file"),
    ("model-dir-without-config", ["model.source={f}/no_config"], "config.json"),
    ("corrupt-weights", ["model.source={f}/corrupt"], "model.safetensors"),
    ("empty-weights", ["model.source={f}/empty"], "model.safetensors"),
    ("missing-tokenizer", ["model.source={f}/no_tokenizer"], "tokenizer"),
    ("nan-weights", ["model.source={f}/nan"], "non-finite weights"),
    ("missing-retain-model", ["task.retain_model=/nonexistent/retain"], "does not exist"),
    ("tofu-files-missing-dir", ["task.name=tofu_files", "task.path=/nonexistent/tofu", "task.retain_model=null"],
     "does not exist"),
    ("tofu-files-missing-split", ["task.name=tofu_files", "task.path={t}/no_retain", "task.retain_model=null"],
     "retain90"),
    ("tofu-files-empty-forget", ["task.name=tofu_files", "task.path={t}/empty_forget", "task.retain_model=null"],
     "empty"),
    ("tofu-files-item-without-answer", ["task.name=tofu_files", "task.path={t}/no_answer", "task.retain_model=null"],
     "answer"),
    ("tofu-files-not-json", ["task.name=tofu_files", "task.path={t}/not_json", "task.retain_model=null"],
     "forget10.json"),
    ("diverged-training", ["train.lr=1.0e30", "train.max_steps=3", "eval.max_items=2", "task.retain_model=null"],
     "training diverged"),
    ("outputs-overflow-after-one-step", ["train.lr=1.0e30", "train.max_steps=1"],
     "the model's loss on the forget set is not finite (largest weight magnitude"),
]


@pytest.mark.parametrize("case, sets, expect", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_or_model_is_one_line_exit_2_nothing_left(case, sets, expect, faults, tofu_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    sets = [s.format(f=faults, t=tofu_dirs) for s in sets]
    before = {p.name for p in tmp_path.iterdir()}
    rc, lines = _run(capsys, *FAST, f"output.dir={out}", *sets)
    _assert_one_error(rc, lines, expect, tmp_path, before)


@pytest.mark.parametrize("recipe, source, expect", [
    ("i2p-tiny-uce.yaml", "zoo:tiny-llama/target", "is a text model, but an image model was asked for"),
    ("quickstart.yaml", "zoo:tiny-t2i/target", "tiny-t2i"),
])
def test_model_of_the_wrong_kind_for_the_task(recipe, source, expect, tmp_path, capsys):
    rc, lines = _run(capsys, f"output.dir={tmp_path / 'out'}", f"model.source={source}", "eval.max_items=2",
                     recipe=str(ROOT / "recipes" / recipe))
    _assert_one_error(rc, lines, expect, tmp_path, set())


RECIPE_FILE_CASES = [
    ("missing-recipe-file", None, "does not exist"),
    ("recipe-not-yaml", "name: [unclosed\n", "recipe.yaml"),
    ("empty-recipe", "", "empty"),
    ("recipe-is-a-list", "- a\n- b\n", "mapping"),
]


@pytest.mark.parametrize("case, text, expect", RECIPE_FILE_CASES, ids=[c[0] for c in RECIPE_FILE_CASES])
def test_bad_recipe_file(case, text, expect, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    before = {p.name for p in tmp_path.iterdir()}
    rc, lines = _run(capsys, f"output.dir={tmp_path / 'out'}", recipe=str(path))
    _assert_one_error(rc, lines, expect, tmp_path, before)


# -- output directories ------------------------------------------------------------------------
def test_output_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    rc, lines = _run(capsys, *FAST, f"output.dir={tmp_path / 'out'}")
    _assert_one_error(rc, lines, "is a file", tmp_path, {"out"})


def test_output_overwrite_never_deletes_foreign_files(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("data")
    rc, lines = _run(capsys, *FAST, f"output.dir={tmp_path / 'out'}", "output.overwrite=true")
    _assert_one_error(rc, lines, "thesis.tex", tmp_path, {"out"})
    assert (tmp_path / "out" / "thesis.tex").read_text() == "data"


def test_output_being_written_by_another_run(tmp_path, capsys):
    other = RunDir(tmp_path / "out")  # another run holds the output directory
    try:
        before = {p.name for p in tmp_path.iterdir()}
        rc, lines = _run(capsys, *FAST, f"output.dir={tmp_path / 'out'}")
        _assert_one_error(rc, lines, f"being written by another run (pid {os.getpid()}", tmp_path, before)
    finally:
        other.abort()


def test_output_on_a_read_only_place(tmp_path, capsys):
    target = Path("/sys/kernel/unlearn-test-run")
    if os.access("/sys/kernel", os.W_OK) and not Path("/sys/kernel").is_dir():
        pytest.skip("no read-only place here")
    rc, lines = _run(capsys, *FAST, f"output.dir={target}")
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "unlearn-test-run" in lines[0], lines
    assert not target.exists()


def test_disk_full_while_writing_the_run(tmp_path, capsys, monkeypatch):
    from unlearn import runner

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runner, "atomic_write_json", full)
    rc, lines = _run(capsys, *FAST, f"output.dir={tmp_path / 'out'}")
    _assert_one_error(rc, lines, "No space left on device", tmp_path, set())
    assert "free some space" in lines[0] and "provenance.json" in lines[0]


# -- killed runs -------------------------------------------------------------------------------
def _cli(out: Path, *sets: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [sys.executable, "-m", "unlearn.cli", "run", QUICK, "-q", "--set", f"output.dir={out}"]
    for s in sets:
        argv += ["--set", s]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_partial(parent: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not any(".partial-" in p.name for p in parent.iterdir()):
        if proc.poll() is not None or time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"the run never started writing: {proc.communicate()}")
        time.sleep(0.2)


@pytest.mark.parametrize("sig, rc", [(signal.SIGKILL, -9), (signal.SIGTERM, 143)])
def test_killed_run_leaves_nothing_a_later_run_misreads(tmp_path, sig, rc):
    out = tmp_path / "out"
    p = _cli(out, "train.epochs=50", "task.retain_model=null")
    _wait_for_partial(tmp_path, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == rc, err
    assert not out.exists()  # never a half-written run where a finished one is expected
    if sig == signal.SIGTERM:  # cleaned up at once, one line
        assert sorted(x.name for x in tmp_path.iterdir()) == [] and err.strip().startswith("terminated"), err
        return
    # SIGKILL: the partial directory stays until the next run on this output finds it
    p = _cli(out, *FAST)
    stdout, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "removed .out.partial-" in err and "run that was killed" in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"] and (out / "metrics.json").exists()
    prov = json.loads((out / "provenance.json").read_text())
    assert any("killed" in m for m in prov["output_recovered"])


# -- what looks wrong but may be meant: warned about, never hidden ---------------------------------
def test_duplicates_and_forget_retain_overlap_are_warned_about():
    from unlearn.data import UnlearningData

    f = [{"question": "Who is A?", "answer": "x"}, {"question": "who  is a?", "answer": "y"},
         {"question": "Where is B?", "answer": "z"}]
    r = [{"question": "Where is B?", "answer": "z"}, {"question": "When is C?", "answer": "w"}]
    w = UnlearningData(forget=f, retain=r, name="d").warnings()
    assert len(w) == 2
    assert "the forget set repeats 1 question(s), e.g. 'who is a?'" in w[0]
    assert "1 question(s) are in both the forget and the retain set, e.g. 'where is b?'" in w[1]
    assert UnlearningData(forget=f[:1], retain=r, name="d").warnings() == []


def test_items_longer_than_the_context_are_counted_per_split(tiny_adapter, qa_items):
    from unlearn.data import UnlearningData
    from unlearn.tasks.tofu_task import too_long

    ctx = tiny_adapter.model.config.max_position_embeddings
    long_item = {**qa_items[0], "answer": " ".join(["word"] * (2 * ctx))}
    data = UnlearningData(forget=qa_items[:3] + [long_item], retain=qa_items[4:], eval_splits={"forget": [long_item]})
    w = too_long(tiny_adapter, data)
    assert len(w) == 2 and w[0].startswith("the forget set: 1 of 4 items are longer than the model's context")
    assert w[1].startswith("evaluation split 'forget': 1 of 1 items")
    assert too_long(tiny_adapter, UnlearningData(forget=qa_items[:3], retain=qa_items[4:])) == []


def test_a_run_prints_and_records_the_warnings(tmp_path, capsys):
    rc = cli.main(["run", QUICK, "-q", "--set", f"output.dir={tmp_path / 'out'}", "--set", "train.max_steps=1",
                   "--set", "eval.max_items=2", "--set", "task.retain_model=null",
                   "--set", "task.name=tofu", "--set", "task.retain_split=retain90"])
    assert rc == 0
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert "warnings" not in prov  # the generated world is clean: no warning noise
