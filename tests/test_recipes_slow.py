"""Every shipped recipe runs end to end on the zoo (slow tier: `bash scripts/test.sh -m slow`)."""

from __future__ import annotations

from pathlib import Path

import pytest

import unlearn

RECIPES = sorted(Path(__file__).resolve().parent.parent.glob("recipes/*.yaml"))


def test_every_recipe_loads():
    assert RECIPES
    for r in RECIPES:
        unlearn.load_recipe(r)


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_and_forgetting_moves(path, tmp_path):
    from unlearn import zoo

    recipe = unlearn.load_recipe(path)
    source = recipe.model.source
    if source.startswith("zoo:") and source[4:] not in zoo.available():
        pytest.skip(f"{source} is not built here (unlearn zoo build {source[4:].split('/')[0]})")
    res = unlearn.run(path, overrides=[f"output.dir={tmp_path / 'run'}", "eval.max_items=40", "train.max_steps=10"],
                      progress=False)
    s = res.summary
    # the task's forgetting number (forget Prob falls on text tasks, erasure rises on the visual one)
    assert res.task.forgetting(s["unlearned"]) > res.task.forgetting(s["target"]), res.task.forget_key
    assert (res.run_dir / "report.md").exists()
