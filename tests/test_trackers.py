"""train.report_to: the loss and the evaluations during training reach the trackers (TensorBoard
event files under <run>/trackers, read back here)."""

from __future__ import annotations

import pytest

import unlearn

RECIPE = {
    "name": "tracked", "seed": 0,
    "model": {"source": "zoo:tiny-llama/target"},
    "task": {"name": "tofu", "forget_split": "forget01", "retain_split": "retain99", "retain_model": None},
    "method": {"name": "grad_diff"},
    "train": {"epochs": 1, "max_steps": 3, "batch_size": 8, "eval_every": 2, "eval_max_items": 3,
              "report_to": ["tensorboard"]},
    "eval": {"batch_size": 16, "max_new_tokens": 4, "max_items": 3, "n_samples": 0},
}


def test_tensorboard_gets_the_loss_and_the_training_time_evaluations(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    res = unlearn.run({**RECIPE, "output": {"dir": str(out)}}, progress=False)
    logdir = out / "trackers" / "tracked"  # <run>/trackers/<recipe name>
    assert list(logdir.glob("events.out.tfevents.*")), sorted(p.name for p in (out / "trackers").rglob("*"))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in res.metrics["train"]["history"]], rel=1e-6)
    mu = acc.Scalars("eval/model_utility")
    assert [e.step for e in mu] == [2, 3]  # every 2 steps, and the last
    assert mu[0].value == pytest.approx(res.metrics["train_eval"]["curve"][0]["model_utility"], rel=1e-6)
    assert "train/lr" in tags


def test_unknown_tracker_and_missing_package_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"train.report_to\[0\].*'tensorbord'.*did you mean 'tensorboard'"):
        unlearn.load_recipe({**RECIPE, "train": {**RECIPE["train"], "report_to": ["tensorbord"]}})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    r = {**RECIPE, "train": {**RECIPE["train"], "report_to": ["wandb"]}, "output": {"dir": str(tmp_path / "w")}}
    with pytest.raises(ValueError, match="train.report_to names wandb, whose package is not installed: pip install wandb"):
        unlearn.run(r, progress=False)
    assert not (tmp_path / "w").exists()
