"""``unlearn eval`` (a model on a task's suite, without unlearning) and ``unlearn list`` (the
registries), through ``unlearn.cli.main`` and the Python API.

Evaluations are cut to a few items (``eval.max_items``) and skip the retain model
(``task.retain_model=null``); the numbers are compared with what ``unlearn.run`` reports for
the target and the unlearned model of the same settings, exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import unlearn
from unlearn import cli, zoo
from unlearn.editors import EDITORS
from unlearn.evaluators import attacks as attacks_mod
from unlearn.evaluators.suites import SUITES
from unlearn.objectives import OBJECTIVES
from unlearn.objectives.grad_ascent import GradAscent
from unlearn.probes import PROBES
from unlearn.recipe import load_recipe
from unlearn.selection import SELECTIONS
from unlearn.task import Task
from unlearn.tasks.registry import TASKS

ROOT = Path(__file__).resolve().parent.parent
QUICK = str(ROOT / "recipes" / "quickstart.yaml")
SAFREE = str(ROOT / "recipes" / "i2p-tiny-safree.yaml")
FAST = ["eval.max_items=3", "task.retain_model=null"]
IMAGE_FAST = ["eval.max_items=2", "eval.sample_steps=2"]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _eval(capsys, *args: str) -> tuple[int, str, list[str]]:
    rc = cli.main(["eval", *args])
    out, err = capsys.readouterr()
    return rc, out, [ln for ln in err.splitlines() if ln.strip()]


def _printed_summary(out: str) -> dict:
    """The JSON summary ``unlearn eval`` prints after the headline."""
    return json.loads(out[out.index("\n{") + 1:])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """The quickstart recipe for one step, evaluated on 3 items per split, with its checkpoint."""
    out = tmp_path_factory.mktemp("runs") / "quick"
    return unlearn.run(QUICK, ["train.max_steps=1", *FAST, f"output.dir={out}"], progress=False)


# ---------------------------------------------------------------------------- unlearn eval, text
def test_eval_of_the_zoo_target_equals_the_runs_target(text_run, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))  # computed afresh, not read from the run's cache
    rc, out, err = _eval(capsys, "zoo:tiny-llama/target", "-q", *_sets(FAST))
    assert rc == 0, err
    assert out.splitlines()[0] == "evaluated zoo:tiny-llama/target on task tofu"
    assert out.splitlines()[1].startswith("  model ")
    summary = _printed_summary(out)
    target = text_run.summary["target"]
    assert summary["model"]["forget_prob"] == target["forget_prob"]
    assert summary["model"] == target  # model utility and forget ROUGE too
    assert "retain model" in summary["note"] and "model" in summary and "retain" not in summary


def test_eval_out_writes_metrics_with_provenance_and_fingerprint(text_run, capsys, tmp_path):
    out_dir = tmp_path / "eval"
    rc, out, err = _eval(capsys, "zoo:tiny-llama/target", "-q", *_sets(FAST), "--out", str(out_dir))
    assert rc == 0, err
    assert f"metrics: {out_dir / 'metrics.json'}" in out and "{" not in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics) == {"summary", "models", "recipe", "provenance"}
    prov = metrics["provenance"]
    assert prov["command"] == "eval" and prov["task"] == "tofu" and prov["modality"] == "text"
    assert prov["libraries"]["torch"] and "commit" in prov["git"] and prov["data"]["eval/forget"]
    model = prov["model"]
    assert model["source"] == "zoo:tiny-llama/target"
    # the same weights the run started from, and the identity that keys the evaluation cache
    assert model["fingerprint"] == text_run.metrics["provenance"]["model"]["fingerprint_before"]
    assert model["identity"]["weights"] == model["fingerprint"] and model["identity"]["tokenizer"]
    assert metrics["summary"]["model"] == text_run.summary["target"]
    assert metrics["models"]["model"]["splits"]["forget"]["metrics"]["prob"]["per_item"]
    assert json.loads((out_dir / "provenance.json").read_text()) == prov
    again = load_recipe(metrics["recipe"])  # the resolved recipe loads back as it was
    assert again.model.source == "zoo:tiny-llama/target" and again.eval.max_items == 3
    assert (out_dir / ".unlearn-run").is_file()
    # a finished evaluation is replaced only with output.overwrite, like a run
    before = (out_dir / "metrics.json").read_text()
    rc, _, err = _eval(capsys, "zoo:tiny-llama/target", "-q", *_sets(FAST), "--out", str(out_dir))
    assert rc == 2 and len(err) == 1 and "already holds a finished run" in err[0]
    assert (out_dir / "metrics.json").read_text() == before
    rc, _, err = _eval(capsys, "zoo:tiny-llama/target", "-q", *_sets([*FAST, "output.overwrite=true"]),
                       "--out", str(out_dir))
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no partial directory, no lock left


def test_eval_refuses_a_directory_that_is_not_a_run(capsys, tmp_path):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    rc, _, err = _eval(capsys, "zoo:tiny-llama/target", "-q", *_sets(FAST), "--out", str(out_dir))
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "not a finished unlearn run" in err[0]
    assert [p.name for p in out_dir.iterdir()] == ["notes.txt"]


def test_eval_of_a_runs_checkpoint_equals_the_runs_unlearned_numbers(text_run, capsys):
    ckpt = text_run.run_dir / "checkpoint"
    rc, out, err = _eval(capsys, str(ckpt), "--recipe", QUICK, "-q", *_sets(FAST))
    assert rc == 0, err
    assert _printed_summary(out)["model"] == text_run.summary["unlearned"]
    res = unlearn.evaluate(str(ckpt), recipe=QUICK, overrides=FAST, progress=False)
    assert res.summary["model"] == text_run.summary["unlearned"]
    assert res.metrics["provenance"]["model"]["fingerprint"] == text_run.metrics["provenance"]["model"]["fingerprint_after"]
    assert res.recipe.method.name == "npo"  # the recipe's method is recorded, never applied
    assert res.out_dir is None


@pytest.mark.parametrize("args, needle", [
    (["/no/such/model"], "does not exist"),
    (["README.md"], "is a file"),
    (["zoo:tiny-t2i/target", "--task", "tofu"], "is an image model, but task 'tofu' evaluates text models"),
    (["zoo:tiny-llama/target", "--task", "visual"], "is a text model, but task 'visual' evaluates image models"),
    (["zoo:tiny-llama/target", "--task", "tofuu"], "did you mean 'tofu'"),
    (["zoo:tiny-llama/targt"], "unknown zoo model"),
    (["zoo:tiny-llama/target", "--set", "eval.max_itemz=3"], "eval.max_itemz"),
    (["zoo:tiny-llama/target", "--recipe", "no-such-recipe.yaml"], "does not exist"),
])
def test_eval_input_errors_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(ROOT)
    out_dir = tmp_path / "out"
    rc, out, err = _eval(capsys, *args, "-q", "--out", str(out_dir))
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out and not list(tmp_path.iterdir())  # nothing written, no lock or partial directory


def test_api_is_exported_lazily_and_stays_callable():
    code = ("import sys, unlearn; assert 'torch' not in sys.modules, 'import unlearn loaded torch'; "
            "import unlearn.evaluation; assert callable(unlearn.evaluate), unlearn.evaluate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------------------- unlearn eval, images
@pytest.mark.skipif("tiny-t2i/target" not in zoo.available() or "tiny-t2i/judge" not in zoo.available(),
                    reason="the tiny-t2i zoo is not on this machine (unlearn zoo build tiny-t2i)")
def test_eval_of_image_models_and_a_wrapped_checkpoint(capsys, tmp_path):
    run = unlearn.run(SAFREE, [*IMAGE_FAST, f"output.dir={tmp_path / 'run'}"], progress=False)
    # no --task: the model's files say image, so the task is visual
    rc, out, err = _eval(capsys, "zoo:tiny-t2i/target", "-q", *_sets(IMAGE_FAST))
    assert rc == 0, err
    assert out.splitlines()[0] == "evaluated zoo:tiny-t2i/target on task visual"
    assert _printed_summary(out)["model"] == run.summary["target"]
    # SAFREE saves a wrapped model (wrapper.json): it evaluates to the run's numbers
    ckpt = run.run_dir / "checkpoint"
    assert (ckpt / "wrapper.json").is_file()
    rc, out, err = _eval(capsys, str(ckpt), "--recipe", SAFREE, "-q", *_sets(IMAGE_FAST),
                         "--out", str(tmp_path / "eval"))
    assert rc == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["summary"]["model"] == run.summary["unlearned"]
    assert metrics["provenance"]["modality"] == "image" and metrics["provenance"]["judge"]["fingerprint"]
    assert metrics["provenance"]["model"]["fingerprint"] == run.metrics["provenance"]["model"]["fingerprint_after"]


# ---------------------------------------------------------------------------- unlearn list
def _list(capsys, *args: str) -> tuple[int, str]:
    rc = cli.main(["list", *args])
    out, err = capsys.readouterr()
    assert not err
    return rc, out


def _names(section: list[dict], **where) -> list[str]:
    return [e["name"] for e in section if all(e.get(k) == v for k, v in where.items())]


def test_list_json_holds_exactly_the_registries(capsys):
    rc, out = _list(capsys, "--json")
    assert rc == 0
    cat = json.loads(out)
    assert list(cat) == ["methods", "selections", "suites", "attacks", "probes", "tasks", "zoo"]
    assert _names(cat["methods"], kind="objective") == OBJECTIVES.names()
    assert _names(cat["methods"], kind="editor") == EDITORS.names()
    ga = next(e for e in cat["methods"] if e["name"] == "grad_ascent")
    assert ga["modalities"] == list(GradAscent.modalities) and ga["paper"] == GradAscent.paper
    assert _names(cat["selections"]) == list(SELECTIONS)
    registered = [SUITES.get(n)() for n in SUITES.names()]
    assert [(e["name"], e["version"]) for e in cat["suites"][:len(registered)]] == [(s.name, s.version) for s in registered]
    task_suites = {s for n in TASKS.names() for s in TASKS.get(n).suites}
    assert set(_names(cat["suites"])) == {s.name for s in registered} | task_suites
    assert all(e["version"] for e in cat["suites"])  # i2p's comes from its task
    assert _names(cat["attacks"], kind="attack") == list(attacks_mod.attack_names())
    assert _names(cat["attacks"], kind="set") == list(attacks_mod.ATTACK_SETS)
    for e in cat["attacks"]:
        if e["kind"] == "attack":
            assert e["modalities"] == list(attacks_mod.ATTACKS.get(e["name"]).modalities)
    assert _names(cat["probes"]) == PROBES.names()
    assert [(e["name"], e["modality"], e["suites"]) for e in cat["tasks"]] == \
        [(n, TASKS.get(n).modality, list(TASKS.get(n).suites)) for n in TASKS.names()]
    assert _names(cat["zoo"]) == [f"zoo:{f}/{m}" for f, i in zoo.FAMILIES.items() for m in i["models"]]


def test_list_prints_every_registered_name_including_new_ones(capsys, monkeypatch):
    class ToyForget(GradAscent):
        name = "toy_forget"
        paper = "Toy et al., 2026, A Registered Objective"

    class ToyTask(Task):
        """A task registered at run time."""

        name = "toy_task"
        modality = "text"
        suites = ("tofu",)

    monkeypatch.setitem(OBJECTIVES._items, ToyForget.name, ToyForget)
    monkeypatch.setitem(TASKS._items, ToyTask.name, ToyTask)
    rc, out = _list(capsys)
    assert rc == 0
    for section in ("methods:", "selections:", "suites:", "attacks:", "probes:", "tasks:", "zoo:"):
        assert section in out.splitlines()
    words = set(out.replace(",", " ").split())
    names = [*OBJECTIVES.names(), *EDITORS.names(), *SELECTIONS, *attacks_mod.attack_names(),
             *attacks_mod.ATTACK_SETS, *PROBES.names(), *TASKS.names(), *(SUITES.get(n)().name for n in SUITES.names())]
    assert "toy_forget" in names and "toy_task" in names
    assert [n for n in names if n not in words] == []
    assert "Toy et al., 2026, A Registered Objective" in out and "A task registered at run time." in out
    # one section; --json of it parses
    rc, out = _list(capsys, "methods", "--json")
    cat = json.loads(out)
    assert list(cat) == ["methods"] and "toy_forget" in _names(cat["methods"], kind="objective")


def test_list_zoo_shows_what_zoo_list_shows(capsys, monkeypatch):
    assert cli.main(["zoo", "list"]) == 0
    zoo_list = capsys.readouterr().out.splitlines()
    rc, out = _list(capsys, "zoo")
    assert rc == 0 and out.splitlines() == ["zoo:", *("  " + ln for ln in zoo_list)]
    for name in zoo.available():
        assert f"zoo:{name} " in out
    # a model that is not built is listed with the command that builds it, in both forms
    monkeypatch.setattr(zoo, "available", lambda: {})
    rc, out = _list(capsys, "zoo")
    assert "    zoo:tiny-llama/target     (not built: unlearn zoo build tiny-llama)" in out.splitlines()
    rc, out = _list(capsys, "zoo", "--json")
    assert {e["path"] for e in json.loads(out)["zoo"]} == {None}


def test_list_unknown_section_is_one_line_and_exit_2(capsys):
    rc = cli.main(["list", "method"])
    out, err = capsys.readouterr()
    assert rc == 2 and not out
    assert err.strip().splitlines() == [
        "error: unknown section 'method' for unlearn list; sections: methods, selections, suites, attacks, probes, "
        "tasks, zoo; did you mean 'methods'?"]
