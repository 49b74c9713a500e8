"""The Task contract: a third task, defined in this file alone, runs end to end through
``unlearn.run`` -- no edit to the run loop, the report writer, the CLI or the recipe checks.

The toy task is a dict-of-strings classification: each item asks for the label of a word
("apple" -> "fruit"), with one wrong label; its metric is label accuracy (the correct label's
mean token NLL below the wrong one's), computed through the harness's teacher-forced pass.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import pytest
import yaml

import unlearn
from unlearn.cli import main as cli_main
from unlearn.config import RecipeError
from unlearn.data import UnlearningData
from unlearn.evaluators.base import MetricResult, MetricSpec
from unlearn.evaluators.harness import Metric, Suite
from unlearn.evaluators.harness import evaluate as harness_evaluate
from unlearn.evaluators.text_passes import TeacherForced
from unlearn.models import load_model
from unlearn.recipe import load_recipe
from unlearn.task import Task
from unlearn.tasks.registry import TASKS

WORDS = {"apple": "fruit", "pear": "fruit", "plum": "fruit", "fig": "fruit", "hammer": "tool", "saw": "tool",
         "drill": "tool", "chisel": "tool", "oak": "tree", "elm": "tree", "ash": "tree", "pine": "tree"}
OTHER = {"fruit": "tool", "tool": "tree", "tree": "fruit"}


def _items(words: list[str]) -> list[dict]:
    return [{"question": f"What is {w}?", "answer": WORDS[w], "wrong": [OTHER[WORDS[w]]]} for w in words]


class LabelAccuracy(Metric):
    """Share of items whose correct label has a lower mean token NLL than the wrong label."""

    spec = MetricSpec("label_accuracy", True, "1", "text", "correct label more likely than the wrong one", "")

    def requests(self, split):
        return [TeacherForced("answer"), TeacherForced("wrong", 0)]

    def compute(self, store, split):
        a, w = store.get(TeacherForced("answer")), store.get(TeacherForced("wrong", 0))
        per = [float(an / ac < wn / wc) for an, ac, wn, wc in zip(a["nll"], a["n"], w["nll"], w["n"])]
        return MetricResult("label_accuracy", float(np.mean(per)), per, True, "1")

    def extras(self, store, split):
        a = store.get(TeacherForced("answer"))
        return {"answer_nll": float(np.sum(a["nll"]) / np.sum(a["n"]))}


class ToyTask(Task):
    name = "toy"
    modality = "text"
    suites: ClassVar = ("toy",)
    select_best: ClassVar = ("retain_accuracy",)
    headline: ClassVar = (("forget_accuracy", "forget label accuracy (↓)"), ("retain_accuracy", "retain label accuracy (↑)"))
    forget_key: ClassVar = ("forget_accuracy", False)
    curve: ClassVar = (("forget_accuracy", "forget acc."), ("retain_accuracy", "retain acc."))
    curve_suite = "toy"
    curve_plots: ClassVar = (("retain_accuracy", "retain accuracy", False),)
    spec_defaults: ClassVar = {"forget_split": "fruit", "retain_split": "rest", "retain_model": None,
                               "eval_splits": ["forget", "retain"]}
    recipe_defaults: ClassVar = {"eval.suite": "toy"}

    @classmethod
    def check_spec(cls, spec) -> None:
        if spec.forget_split not in ("fruit", "tool", "tree"):
            raise RecipeError(f"recipe key 'task.forget_split' is {spec.forget_split!r}; use fruit, tool or tree")

    def load_data(self) -> UnlearningData:
        label = self.recipe.task.forget_split
        forget = _items([w for w in WORDS if WORDS[w] == label])
        retain = _items([w for w in WORDS if WORDS[w] != label])
        return UnlearningData(forget=forget, retain=retain, eval_splits={"forget": forget, "retain": retain}, name="toy")

    def load_model(self):
        return load_model(self.recipe.model.source, "text")

    def _eval(self, model, label: str) -> dict[str, Any]:
        return harness_evaluate(model, self.data.eval_splits, Suite("toy", "1", [LabelAccuracy()]), progress=False,
                                label=label, batch_size=self.recipe.eval.batch_size)

    def evaluate(self, model, label: str, *, cache: bool = True) -> dict[str, Any]:
        return self._eval(model, label)

    @staticmethod
    def _row(res: dict[str, Any]) -> dict[str, Any]:
        return {f"{s}_accuracy": res["splits"][s]["metrics"]["label_accuracy"]["value"] for s in ("forget", "retain")}

    def summarize(self, results):
        return {name: self._row(res) for name, res in results.items()}

    def train_eval_baseline(self, model):
        return self._row(self._eval(model, "target (train-eval)"))

    def train_eval_point(self, model, label):
        return self._row(self._eval(model, label))


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(TASKS._items, "toy", ToyTask)


@pytest.fixture
def model_dir(tiny_adapter, tmp_path):
    d = tmp_path / "model"
    tiny_adapter.save(d)
    return d


def _recipe(model_dir, out, **train) -> dict:
    return {"name": "toy-run", "model": {"source": str(model_dir)}, "task": {"name": "toy"},
            "method": {"name": "grad_ascent"},
            "train": {"epochs": 3, "max_steps": 3, "lr": 5.0e-2, "batch_size": 4, "save_checkpoint": False, **train},
            "eval": {"batch_size": 8}, "output": {"dir": str(out)}}


def test_unknown_task_names_the_key():
    with pytest.raises(RecipeError, match=r"recipe key 'task.name' is 'toy', not a known task; allowed: .*tofu"):
        load_recipe({"name": "x", "task": {"name": "toy"}})


def test_toy_task_recipe_defaults_and_checks(toy_registered):
    r = load_recipe({"name": "x", "task": {"name": "toy"}, "method": {"name": "grad_ascent"}})
    assert (r.task.forget_split, r.task.retain_model, r.eval.suite) == ("fruit", None, "toy")
    with pytest.raises(RecipeError, match="task.forget_split"):
        load_recipe({"name": "x", "task": {"name": "toy", "forget_split": "rock"}})
    with pytest.raises(RecipeError, match="eval.suite"):
        load_recipe({"name": "x", "task": {"name": "toy"}, "eval": {"suite": "tofu-full"}})
    with pytest.raises(RecipeError, match="train.select_best.*allowed for task 'toy': last, retain_accuracy"):
        load_recipe({"name": "x", "task": {"name": "toy"}, "train": {"eval_every": 1, "select_best": "model_utility"}})
    with pytest.raises(RecipeError, match="eval.probes"):
        load_recipe({"name": "x", "task": {"name": "toy"}, "eval": {"probes": ["linear_probe"]}})
    with pytest.raises(RecipeError, match="an attack on image models, but task 'toy' is a text task"):
        load_recipe({"name": "x", "task": {"name": "toy"}, "eval": {"attacks": ["embedding_inversion"]}})


def test_toy_task_runs_end_to_end(toy_registered, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    res = unlearn.run(_recipe(model_dir, out), progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["models"]) == {"target", "unlearned"}
    assert set(m["summary"]["unlearned"]) == {"forget_accuracy", "retain_accuracy"}
    assert m["provenance"]["task"] == "toy" and m["provenance"]["parameters_changed"] > 0
    assert m["train"]["steps"] == 3
    # gradient ascent on the forget labels makes them less likely than before
    nll = {n: m["models"][n]["splits"]["forget"]["answer_nll"] for n in m["models"]}
    assert nll["unlearned"] > nll["target"] + 0.1
    report = (out / "report.md").read_text()
    assert "| model | forget label accuracy (↓) | retain label accuracy (↑) |" in report
    assert "### `forget` (4 items)" in report and "| label_accuracy | ↑ |" in report
    assert res.headline_lines()[0].startswith("  target     forget label accuracy")
    # the CLI prints the task's headline without knowing the task
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(model_dir, tmp_path / "run2")))
    assert cli_main(["run", str(tmp_path / "r.yaml"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "unlearned  forget label accuracy" in printed and "retain label accuracy" in printed


def test_toy_task_evaluates_during_training_and_selects_the_best(toy_registered, model_dir, tmp_path):
    out = tmp_path / "run"
    res = unlearn.run(_recipe(model_dir, out, eval_every=1, select_best="retain_accuracy", lr=0.2), progress=False)
    te = res.metrics["train_eval"]
    assert [p["step"] for p in te["curve"]] == [1, 2, 3] and te["suite"] == "toy"
    best = max(te["curve"], key=lambda p: p["retain_accuracy"])  # first of the ties, as the selection keeps it
    assert te["selected"]["step"] == best["step"]
    assert res.summary["unlearned"]["retain_accuracy"] == pytest.approx(best["retain_accuracy"])
    report = (out / "report.md").read_text()
    assert "## Evaluation during training" in report and "| step | epoch | trigger | forget acc. | retain acc. |" in report
