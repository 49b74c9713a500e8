"""Checkpoint and resume: a run killed with SIGKILL mid-training, resumed with --resume,
ends where the uninterrupted run ends -- same steps, same batches, same metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import unlearn
from unlearn import cli
from unlearn.runs import latest_checkpoint

RECIPE = {
    "name": "resume", "seed": 3,
    "model": {"source": "zoo:tiny-llama/target"},
    "task": {"name": "tofu", "forget_split": "forget01", "retain_split": "retain99", "retain_model": None},
    "method": {"name": "npo", "params": {"beta": 0.1, "alpha": 1.0, "retain_loss": "nll"}},
    # 40 forget items / 8 = 5 micro-batches; grad_accum 2 -> 3 steps per epoch (windows 2, 2, 1)
    "train": {"epochs": 3, "lr": 1.0e-3, "batch_size": 8, "grad_accum": 2, "scheduler": "linear",
              "warmup_ratio": 0.2, "eval_every": 4, "select_best": "model_utility", "eval_max_items": 3,
              "checkpoint_every": 2},
    "eval": {"batch_size": 16, "max_new_tokens": 4, "max_items": 3, "n_samples": 0},
}


def _recipe(out: Path, **train) -> dict:
    return {**RECIPE, "train": {**RECIPE["train"], **train}, "output": {"dir": str(out)}}


def _killed_at(out: Path, step: int) -> None:
    """Run the recipe in a subprocess that SIGKILLs itself right after the checkpoint of ``step``."""
    code = textwrap.dedent(f"""
        import json, os, signal, sys
        import unlearn, unlearn.trainer as tr
        real = tr.save_checkpoint
        def save(root, state, *a, **k):
            path = real(root, state, *a, **k)
            if state.step == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        tr.save_checkpoint = save
        unlearn.run(json.loads(sys.argv[1]), progress=False)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code, json.dumps(_recipe(out))], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == -9, p.stderr[-2000:]


def _strip(curve):
    return [{k: v for k, v in pt.items() if k != "seconds"} for pt in curve]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    res = unlearn.run(_recipe(out), progress=False)
    assert not (out / ".resume").exists()  # a finished run carries no training state
    return json.loads((out / "metrics.json").read_text()), res


def test_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path):
    full, _ = uninterrupted
    out = tmp_path / "run"
    _killed_at(out, 4)  # after step 4: mid-epoch (epoch 1, before its second window), a train-eval point taken
    partial = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(partial) == 1 and latest_checkpoint(partial[0]).name == "step-00000004" and not out.exists()
    res = unlearn.run(_recipe(out), overrides=["output.resume=true"], progress=False)
    got = json.loads((out / "metrics.json").read_text())
    assert got["provenance"]["resumed_from"] == "step-00000004"
    assert [h["step"] for h in got["train"]["history"]] == list(range(1, 10))
    assert got["train"]["history"] == full["train"]["history"]  # same losses, lrs, step by step
    assert _strip(got["train_eval"]["curve"]) == _strip(full["train_eval"]["curve"])
    assert got["train_eval"]["selected"] == full["train_eval"]["selected"]
    for model in ("target", "unlearned"):
        assert got["summary"][model] == full["summary"][model], model
    assert res.summary["unlearned"]["forget_prob"] == pytest.approx(full["summary"]["unlearned"]["forget_prob"], abs=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and not (out / ".resume").exists()


def test_resumable_run_is_never_deleted_unasked_and_a_changed_recipe_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _killed_at(out, 2)
    args = ["run", "-q", "--set", f"output.dir={out}"]
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(_recipe(out)))
    assert cli.main([args[0], str(path), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert "has an unfinished run that can be resumed" in err and "--resume" in err
    assert latest_checkpoint(next(p for p in tmp_path.iterdir() if ".partial-" in p.name)) is not None
    assert cli.main([args[0], str(path), *args[1:], "--set", "train.lr=0.002", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the run was started with another recipe (train.lr was 0.001, now 0.002)" in err
    # overwrite discards it and starts again
    assert cli.main([args[0], str(path), *args[1:], "--set", "output.overwrite=true"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run"]


def test_resume_with_nothing_to_resume_starts_from_the_beginning(tmp_path, capsys):
    out = tmp_path / "run"
    res = unlearn.run(_recipe(out, epochs=1, eval_every=None, select_best="last", checkpoint_every=None),
                      overrides=["output.resume=true"], progress=False)
    assert "no unfinished run" in capsys.readouterr().err
    assert res.metrics["train"]["steps"] == 3 and "resumed_from" not in res.metrics["provenance"]


def test_checkpoint_every_on_an_editor_is_an_error(tmp_path):
    r = {**_recipe(tmp_path / "run", eval_every=None, select_best="last"), "method": {"name": "uld", "params": {}}}
    with pytest.raises(ValueError, match="train.checkpoint_every does not apply"):
        unlearn.run(r, progress=False)
