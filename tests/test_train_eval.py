"""Evaluation during training (curve, best-state selection, utility floor), attacks in a run,
and the report's new sections -- end to end on a tiny model saved to disk.

The tiny model is first fitted for a few steps on the items the runs evaluate (the first 4
of every split), so that its model utility is well above zero and a utility floor means
something.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import unlearn
from unlearn.config import RecipeError
from unlearn.recipe import load_recipe
from unlearn.tasks import tofu_task

N_ITEMS = 4


@pytest.fixture(scope="module")
def fitted_model_dir(tmp_path_factory) -> Path:
    import torch

    from unlearn.adapters.text import TextAdapter
    from unlearn.objectives.base import mean_token_nll
    from unlearn.tasks.tofu import load_tofu
    from unlearn.tasks.tofu_world import build_world, corpus
    from unlearn.zoo.models import TinyLlamaSpec, build_tiny_llama, train_tokenizer

    w = build_world()
    tok = train_tokenizer(corpus(w)[:4000], 400)
    m = build_tiny_llama(TinyLlamaSpec(vocab_size=400, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2), tok, seed=0)
    ad = TextAdapter(m, tok)
    data = load_tofu(forget_split="forget01", retain_split="retain99",
                     eval_splits=["forget", "retain_eval", "real_authors", "world_facts", "holdout"])
    items = [it for v in data.eval_splits.values() for it in v[:N_ITEMS]]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(45):
        loss = mean_token_nll(ad, ad.collate(items))
        loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    d = tmp_path_factory.mktemp("models") / "fitted"
    ad.save(d)
    return d


@pytest.fixture(scope="module", autouse=True)
def private_eval_cache(tmp_path_factory):
    """Cached evaluations go to a folder of this module (shared by its runs, not the user's)."""
    from unlearn.evaluators import cache as eval_cache

    cache = tmp_path_factory.mktemp("eval-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval_cache, "default_cache_dir", lambda: cache)
        yield cache


def _recipe(model_dir: Path, out: Path, **over) -> dict:
    r = {
        "name": "te",
        "seed": 0,
        "model": {"source": str(model_dir)},
        "task": {"name": "tofu", "forget_split": "forget01", "retain_split": "retain99", "retain_model": str(model_dir)},
        "method": {"name": "grad_diff", "params": {"gamma": 1.0, "alpha": 1.0}},
        "train": {"epochs": 1, "max_steps": 3, "lr": 1.0e-3, "batch_size": 4, "save_checkpoint": False},
        "eval": {"batch_size": 8, "max_new_tokens": 8, "max_items": N_ITEMS, "n_samples": 1},
        "output": {"dir": str(out)},
    }
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


# -- the trainer's side ------------------------------------------------------------------------
def test_callback_sees_epoch_ends_and_can_stop(tiny_adapter, qa_items):
    from unlearn.objectives import GradAscent
    from unlearn.trainer import TrainSettings, train

    seen = []

    def cb(step, info):
        seen.append((step, info["epoch"], info["epoch_end"], info["last"]))
        return "stop" if step == 3 else None

    s = TrainSettings(epochs=3, lr=1e-3, batch_size=4)  # 8 items: 2 steps per epoch
    log = train(tiny_adapter, GradAscent(), qa_items, None, s, progress=False, callback=cb)
    assert seen == [(1, 0, False, False), (2, 0, True, False), (3, 1, False, False)]
    assert log.steps == 3 and log.stopped_early == 3 and log.to_dict()["stopped_early"] == 3
    assert "epoch_end" not in log.history[0]  # the history itself is unchanged

    # grad_accum 3 over 2 batches per epoch: each epoch's short window steps at its end
    seen.clear()
    s = TrainSettings(epochs=3, lr=1e-3, batch_size=4, grad_accum=3)
    log = train(tiny_adapter, GradAscent(), qa_items, None, s, progress=False, callback=lambda st, i: seen.append(
        (st, i["epoch"], i["epoch_end"], i["last"])))
    assert seen == [(1, 0, True, False), (2, 1, True, False), (3, 2, True, True)] and log.stopped_early is None


# -- evaluation during training ------------------------------------------------------------------
def test_select_best_model_utility_records_the_curve_and_restores_the_best(fitted_model_dir, tmp_path):
    out = tmp_path / "run"
    res = unlearn.run(_recipe(fitted_model_dir, out, train={"eval_every": 1, "select_best": "model_utility",
                                                            "eval_max_items": N_ITEMS, "lr": 3e-2}), progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    te = metrics["train_eval"]
    curve = te["curve"]
    assert [p["step"] for p in curve] == [1, 2, 3]
    mus = [p["model_utility"] for p in curve]
    assert all(mu is not None for mu in mus)
    best = curve[int(np.argmax(mus))]
    assert te["selected"]["step"] == best["step"] and te["selected"]["criterion"] == "model_utility"
    assert te["selected"]["reason"] and res.summary["selected_step"] == best["step"]
    assert te["baseline"]["step"] == 0 and te["target_model_utility"] == pytest.approx(te["baseline"]["model_utility"])
    for key in ("forget_quality", "forget_prob", "retain_prob", "epoch", "loss"):
        assert key in curve[0]
    # the run's final evaluation (same items, same suite) is of the selected state
    assert res.summary["unlearned"]["model_utility"] == pytest.approx(best["model_utility"])
    assert res.summary["unlearned"]["forget_quality"] == pytest.approx(best["forget_quality"])
    report = (out / "report.md").read_text()
    for png in ("fq_vs_mu.png", "train_eval.png"):
        assert f"]({png})" in report and (out / png).stat().st_size > 0
    assert "Evaluation during training" in report
    assert not list(out.glob(".train_eval_best*"))


def test_utility_floor_stops_training_early(fitted_model_dir, tmp_path):
    out = tmp_path / "run"
    r = _recipe(fitted_model_dir, out, method={"name": "grad_ascent", "params": {}},
                task={"retain_split": None},
                train={"max_steps": 6, "lr": 0.1, "eval_every": 1, "utility_floor": 0.99, "eval_max_items": N_ITEMS})
    res = unlearn.run(r, progress=False)
    te = res.metrics["train_eval"]
    assert te["stopped_early"] is not None and te["stopped_early"]["step"] < 6
    assert res.metrics["train"]["steps"] == te["stopped_early"]["step"] == res.metrics["train"]["stopped_early"]
    assert te["curve"][-1]["below_floor"] and te["curve"][-1]["utility_ratio"] < 0.99
    assert "utility_floor" in te["stopped_early"]["reason"]
    report = (out / "report.md").read_text()
    assert "Stopped early" in report and (out / "metrics.json").exists()


@pytest.mark.parametrize("train, task, needle", [
    ({"select_best": "model_utility"}, {}, "train.select_best"),
    ({"select_best": "forget_quality", "eval_every": 2}, {"retain_model": None}, "train.select_best"),
    ({"select_best": "fq_mu_mean", "eval_every_epoch": True}, {"retain_model": None}, "train.select_best"),
    ({"utility_floor": 0.0, "eval_every": 1}, {}, "train.utility_floor"),
    ({"utility_floor": 1.5, "eval_every": 1}, {}, "train.utility_floor"),
    ({"utility_floor": 0.8}, {}, "train.utility_floor"),
    ({"utility_floor": 0.8, "eval_every": 1}, {"eval_splits": ["forget", "retain_eval"]}, "train.utility_floor"),
    ({"eval_max_items": 0}, {}, "train.eval_max_items"),
])
def test_bad_train_eval_combinations_name_the_key(train, task, needle):
    with pytest.raises(RecipeError) as info:
        load_recipe({"name": "x", "train": train, "task": task})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_good_train_eval_combinations_load():
    r = load_recipe({"name": "x", "train": {"eval_every_epoch": True, "select_best": "fq_mu_mean",
                                            "utility_floor": 1.0, "eval_max_items": None}})
    assert r.train.select_best == "fq_mu_mean" and r.train.utility_floor == 1.0
    assert load_recipe({"name": "x"}).train.eval_max_items == 100


@pytest.mark.parametrize("ev, needle", [
    ({"attacks": ["paraphrse"]}, "eval.attacks[0]"),
    ({"attacks": ["relearn", "relearn"]}, "eval.attacks[1]"),
    ({"attacks": ["relearn"], "attack_params": {"relearnn": {}}}, "eval.attack_params.relearnn"),
    ({"attacks": ["relearn"], "attack_params": {"paraphrase": {}}}, "eval.attack_params.paraphrase"),
])
def test_bad_attacks_name_the_key(ev, needle):
    with pytest.raises(RecipeError) as info:
        load_recipe({"name": "x", "eval": ev})
    assert needle in str(info.value)
    if "paraphrse" in str(ev):
        assert "did you mean 'paraphrase'" in str(info.value)


# -- attacks -------------------------------------------------------------------------------------
def _fake_attacks(calls: list, *, mutate: bool = False):
    def evaluate_attacks(adapter, forget, retain, names, *, batch_size=32, max_new_tokens=48, seed=0,
                         progress=True, params=None):
        calls.append({"n_forget": len(forget), "n_retain": None if retain is None else len(retain), "names": names,
                      "params": params, "batch_size": batch_size, "seed": seed})
        if mutate:
            import torch

            with torch.no_grad():
                next(adapter.model.parameters()).add_(1.0)
        before = {"prob": 0.1, "rouge": 0.2, "truth_ratio": 0.5}
        after = {"prob": 0.3, "rouge": 0.5, "truth_ratio": 0.6}
        return {n: {"before": before, "after": after, "delta": {k: after[k] - before[k] for k in before},
                    "items": len(forget), "note": "stand-in | test", "settings": dict((params or {}).get(n, {}))}
                for n in names}

    return evaluate_attacks


def test_attacks_and_mia_in_a_run(fitted_model_dir, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(tofu_task, "evaluate_attacks", _fake_attacks(calls))
    out = tmp_path / "run"
    r = _recipe(fitted_model_dir, out,
                task={"eval_splits": ["forget", "retain_eval", "real_authors", "world_facts", "holdout"]},
                eval={"suite": "tofu-full", "attacks": ["paraphrase", "relearn"],
                      "attack_params": {"relearn": {"steps": 2}}})
    res = unlearn.run(r, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["attacks"]) == {"target", "unlearned"}  # compare_target: both models
    assert metrics["attacks"]["unlearned"]["paraphrase"]["delta"]["rouge"] == pytest.approx(0.3)
    assert len(calls) == 2 and all(c["n_forget"] == N_ITEMS and c["n_retain"] == N_ITEMS for c in calls)
    assert calls[0]["names"] == ["paraphrase", "relearn"] and calls[0]["params"] == {"relearn": {"steps": 2}}
    report = (out / "report.md").read_text()
    assert "## Attacks on the forget split" in report and "| paraphrase |" in report
    assert "stand-in \\| test" in report  # a pipe in a note does not break the table
    assert (out / "attacks_rouge_delta.png").stat().st_size > 0
    # MIA: section, AUC per attack for every model, ROC curves
    assert "## Membership inference" in report and "| mia_min_k |" in report and "| privleak |" in report
    assert "](mia_roc.png)" in report and (out / "mia_roc.png").stat().st_size > 0
    assert "](fq_vs_mu.png)" in report and (out / "fq_vs_mu.png").exists()
    assert res.metrics["models"]["unlearned"]["multi"]["mia_loss"]["split_sizes"] == {"forget": N_ITEMS,
                                                                                       "holdout": N_ITEMS}


def test_an_attack_that_changes_the_weights_fails_the_run(fitted_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tofu_task, "evaluate_attacks", _fake_attacks([], mutate=True))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="changed the weights of the target"):
        unlearn.run(_recipe(fitted_model_dir, out, eval={"attacks": ["paraphrase"]}), progress=False)
    assert not out.exists()


def test_attack_params_are_checked_against_the_attack_before_the_run(fitted_model_dir, tmp_path):
    pytest.importorskip("unlearn.evaluators.attacks")
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=r"eval\.attack_params\.relearn.*stepz"):
        unlearn.run(_recipe(fitted_model_dir, out, eval={"attacks": ["relearn"], "attack_params": {"relearn": {"stepz": 1}}}),
                    progress=False)
    assert not out.exists()


def test_real_attacks_module_paraphrase(fitted_model_dir, tmp_path):
    try:
        from unlearn.evaluators.attacks import evaluate_attacks  # noqa: F401
    except ImportError:
        pytest.skip("unlearn.evaluators.attacks is not there yet")
    out = tmp_path / "run"
    unlearn.run(_recipe(fitted_model_dir, out, train={"max_steps": 1},
                        eval={"attacks": ["paraphrase"], "compare_target": False}), progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    r = metrics["attacks"]["unlearned"]["paraphrase"]
    assert {"before", "after", "delta"} <= set(r)
    assert "| paraphrase |" in (out / "report.md").read_text()
