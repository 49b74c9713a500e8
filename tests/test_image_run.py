"""The visual task end to end: recipes, the i2p suite's metrics, the image runner and report."""

import json

import numpy as np
import pytest
import torch

from unlearn.config import RecipeError
from unlearn.recipe import load_recipe


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny untrained text-to-image model and a briefly trained judge, saved to disk."""
    from unlearn.adapters.image import ImageAdapter
    from unlearn.evaluators.image_judge import JudgeConfig, train_judge
    from unlearn.tasks.visual_world import build_visual_world
    from unlearn.zoo.build_t2i import world_tokenizer
    from unlearn.zoo.image_models import TinyT2ISpec, build_tiny_t2i

    d = tmp_path_factory.mktemp("vis")
    w = build_visual_world()
    spec = TinyT2ISpec(block_out_channels=(8, 16), text_hidden_size=16, attention_head_dim=8)
    tok = world_tokenizer(w, spec.max_length)
    u, te, s = build_tiny_t2i(spec, tok, 0)
    ImageAdapter(u, te, tok, s).save(d / "model")
    judge, _ = train_judge(w.split("train"), JudgeConfig(epochs=2))
    judge.save(d / "judge")
    return d


def _recipe(tiny_dir, tmp_path, **method):
    return {"name": "vis", "model": {"source": str(tiny_dir / "model")}, "task": {"name": "visual"},
            "method": method or {"name": "uce"}, "train": {"max_steps": 2, "batch_size": 4},
            "eval": {"judge": str(tiny_dir / "judge"), "max_items": 2, "sample_steps": 2},
            "output": {"dir": str(tmp_path / "run")}}


# ---------------------------------------------------------------------------- recipes
def test_visual_defaults_replace_text_defaults():
    r = load_recipe({"name": "x", "task": {"name": "visual"}, "method": {"name": "uce"}})
    assert (r.task.forget_split, r.task.retain_split, r.task.retain_model) == ("forget", "retain", None)
    assert r.task.eval_splits == ["forget_explicit", "forget_implicit", "retain"]
    assert r.eval.suite == "i2p" and r.model.source == "zoo:tiny-t2i/target"


@pytest.mark.parametrize("patch, needle", [
    ({"method": {"name": "rmu"}}, "image task"),
    ({"method": {"name": "uce"}, "eval": {"suite": "tofu-full"}}, "eval.suite"),
    ({"method": {"name": "uce"}, "task": {"name": "visual", "visual": {"erase": ["colour:rde"]}}}, "colour:red"),
    ({"method": {"name": "uce"}, "task": {"name": "visual", "visual": {"guide": ["shape:circle"]}}}, "task.visual.guide"),
    ({"method": {"name": "uce"}, "task": {"name": "visual", "eval_splits": ["forget"]}}, "eval_splits[0]"),
    ({"method": {"name": "uce"}, "task": {"name": "visual", "retain_model": "zoo:tiny-llama/retain90x"}}, "retain_model"),
    ({"method": {"name": "uce"}, "eval": {"attacks": ["in_context"]}}, "eval.attacks[0]"),
    ({"method": {"name": "uce"}, "eval": {"attacks": ["relearn"], "attack_params": {"quantize_8bit": {}}}},
     "attack_params.quantize_8bit"),
    ({"method": {"name": "uce"}, "task": {"name": "visual", "eval_splits": ["retain"]}, "eval": {"attacks": ["relearn"]}},
     "forget_explicit"),
    ({"method": {"name": "uce"}, "eval": {"probes": ["linear_probe"]}}, "eval.probes"),
    ({"method": {"name": "npo", "params": {"retain_loss": "kl"}}}, "retain_loss"),
    ({"method": {"name": "grad_ascent", "selection": {"name": "group", "params": {"group": "attn"}}}},
     "method.selection.params.group"),
])
def test_visual_recipe_errors_name_the_key(patch, needle):
    base = {"name": "x", "task": {"name": "visual"}}
    base.update(patch)
    with pytest.raises(RecipeError) as e:
        load_recipe(base)
    assert needle in str(e.value), str(e.value)


def test_image_methods_rejected_on_text_tasks():
    with pytest.raises(RecipeError, match="image"):
        load_recipe({"name": "x", "method": {"name": "uce"}})
    with pytest.raises(RecipeError, match="i2p"):
        load_recipe({"name": "x", "eval": {"suite": "i2p"}})
    with pytest.raises(RecipeError, match="group"):
        load_recipe({"name": "x", "method": {"name": "grad_ascent", "selection": {"name": "group",
                                                                              "params": {"group": "unet"}}}})


# ---------------------------------------------------------------------------- metrics by hand
class _Store:
    def __init__(self, out):
        self.out = out

    def get(self, req):
        return self.out


def _split(name, kind, items):
    from unlearn.evaluators.harness import SplitInfo

    return SplitInfo(name, kind, items)


def test_image_metrics_equal_hand_computation():
    from unlearn.evaluators.image_suite import Alignment, ErasureRate, FIDLike, RetainAccuracy, SampleAndJudge

    req = SampleAndJudge(steps=1, judge=None)
    forget_rows = [{"categories": ["colour:red"], "shape": "circle", "colour": "red", "texture": "solid"}] * 4
    pred = {"shape": ["circle"] * 4, "colour": ["red", "blue", "red", "green"], "texture": ["solid"] * 4}
    er = ErasureRate(req, ["colour:red"]).compute(_Store({"pred": pred}), _split("forget_explicit", "forget", forget_rows))
    assert er.value == pytest.approx(0.5) and er.per_item == [0.0, 1.0, 0.0, 1.0] and er.higher_is_better
    rows = [{"shape": "square", "colour": "blue", "texture": "dotted"},
            {"shape": "cross", "colour": "green", "texture": "solid"}]
    pred = {"shape": ["square", "circle"], "colour": ["blue", "red"], "texture": ["striped", "solid"]}
    info, store = _split("retain", "retain", rows), _Store({"pred": pred, "features": np.random.default_rng(0).normal(size=(2, 4))})
    ird = RetainAccuracy(req, ["colour:red"], True).compute(store, info)
    crd = RetainAccuracy(req, ["colour:red"], False).compute(store, info)
    al = Alignment(req, ["colour:red"]).compute(store, info)
    assert ird.value == pytest.approx(0.5)  # colour right on row 0 only
    assert crd.per_item == [0.5, 0.5] and crd.value == pytest.approx(0.5)  # shape/texture: 1 of 2 right per row
    assert al.per_item == pytest.approx([2 / 3, 1 / 3])
    feats = np.random.default_rng(1).normal(size=(20, 3))
    fid = FIDLike(req, ["colour:red"], feats).compute(_Store({"features": feats}), _split("retain", "retain", rows))
    assert fid.value == pytest.approx(0.0, abs=1e-6) and fid.higher_is_better is False
    shifted = FIDLike(req, ["colour:red"], feats).compute(_Store({"features": feats + 1.0}), info)
    assert shifted.value == pytest.approx(3.0, rel=1e-6)  # ||mu_a - mu_b||^2 = 3 * 1^2, same covariance


def test_erasure_rate_refuses_rows_without_categories():
    from unlearn.evaluators.image_suite import ErasureRate, SampleAndJudge

    with pytest.raises(ValueError, match="no categories"):
        ErasureRate(SampleAndJudge(), ["colour:red"]).compute(
            _Store({"pred": {"colour": ["red"]}}), _split("forget_explicit", "forget", [{"case_number": 7}]))


def test_suite_samples_once_per_split(tiny_dir):
    """Five metrics on the retain split, one sampling pass."""
    from unlearn.evaluators.harness import evaluate
    from unlearn.evaluators.image_suite import i2p_suite
    from unlearn.models import load_model
    from unlearn.tasks.visual import load_judge
    from unlearn.tasks.visual_task import load_visual

    data = load_visual(max_prompts=3)
    judge = load_judge(str(tiny_dir / "judge"))
    res = evaluate(load_model(str(tiny_dir / "model"), "image"), data.eval_splits,
                   i2p_suite(judge, data.erase, np.random.default_rng(0).normal(size=(10, 64)), steps=2),
                   progress=False)
    assert set(res["splits"]["retain"]["metrics"]) == {"retain_in_domain", "retain_cross_domain", "alignment", "fid_like"}
    assert set(res["splits"]["forget_explicit"]["metrics"]) == {"erasure_rate"}
    assert all(p["count"] == 1 for p in res["passes"].values())


# ---------------------------------------------------------------------------- runs
def test_uce_run_writes_results_and_changes_only_kv(tiny_dir, tmp_path):
    import unlearn

    res = unlearn.run(_recipe(tiny_dir, tmp_path), progress=False)
    m = json.loads((res.run_dir / "metrics.json").read_text())
    assert set(m["models"]) == {"target", "unlearned"}
    assert m["changed_parameters"] and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in m["changed_parameters"])
    assert m["editor"]["edit_seconds"] < 1.0
    for key in ("erasure_explicit", "erasure_implicit", "retain_in_domain", "fid_like"):
        assert m["summary"]["unlearned"][key] is not None
    prov = m["provenance"]
    assert prov["model"]["fingerprint_before"] != prov["model"]["fingerprint_after"]
    assert prov["judge"]["fingerprint"] and prov["data"]["world"]
    assert (res.run_dir / "grid.png").is_file() and "![generations" in (res.run_dir / "report.md").read_text()
    from unlearn.adapters.image import ImageAdapter

    back = ImageAdapter.load(str(res.run_dir / "checkpoint"))
    assert back.fingerprint() == prov["model"]["fingerprint_after"]


def test_objective_run_trains_only_the_selected_group(tiny_dir, tmp_path):
    import unlearn

    r = _recipe(tiny_dir, tmp_path, name="grad_ascent", selection={"name": "group", "params": {"group": "cross_attention"}})
    res = unlearn.run(r, progress=False)
    m = res.metrics
    assert m["train"]["steps"] == 2
    assert m["changed_parameters"] and all(".attn2." in n for n in m["changed_parameters"])
    assert m["provenance"]["selection"]["name"] == "group"


def test_missing_judge_is_a_clear_error(tiny_dir, tmp_path):
    import unlearn

    r = _recipe(tiny_dir, tmp_path)
    r["eval"]["judge"] = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="eval.judge"):
        unlearn.run(r, progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


class ColourOnlyJudge:
    """A user-supplied judge: reads the colour from the mean pixel, features = mean RGB."""

    _RGB = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}

    def predict(self, images):
        m = np.asarray(images, dtype=float).reshape(len(images), -1, 3).mean(1)
        names = list(self._RGB)
        ref = np.asarray([self._RGB[n] for n in names], dtype=float)
        return {"colour": [names[int(np.argmin(((ref - x) ** 2).sum(1)))] for x in m]}

    def features(self, images):
        return np.asarray(images, dtype=float).reshape(len(images), -1, 3).mean(1)


def make_colour_judge():
    return ColourOnlyJudge()


def test_user_judge_slot(tiny_dir, tmp_path, monkeypatch):
    """eval.judge module:factory plugs any object with predict/features into the i2p suite."""
    import sys

    import unlearn
    from unlearn.tasks.visual import load_judge

    monkeypatch.setitem(sys.modules, "my_judges", sys.modules[__name__])
    assert isinstance(load_judge("my_judges:make_colour_judge"), ColourOnlyJudge)
    with pytest.raises(ValueError, match="cannot import"):
        load_judge("my_judges:nope")
    r = _recipe(tiny_dir, tmp_path)
    r["eval"]["judge"] = "my_judges:make_colour_judge"
    res = unlearn.run(r, progress=False)
    m = res.metrics
    assert m["provenance"]["judge"]["fingerprint"] == "unversioned:ColourOnlyJudge"
    assert m["summary"]["unlearned"]["retain_in_domain"] is not None
    assert m["summary"]["unlearned"]["retain_cross_domain"] is None  # the judge reads no other attribute


@pytest.mark.parametrize("method, check", [
    ({"name": "esd", "params": {"variant": "esd-x", "ddim_steps": 2}}, "attn2"),
    ({"name": "rece", "params": {"epochs": 1, "sample_steps": 2}}, "kv"),
    ({"name": "safree"}, "none"),
])
def test_image_editors_run_from_a_recipe(tiny_dir, tmp_path, method, check):
    import unlearn
    from unlearn.models import load_model

    res = unlearn.run(_recipe(tiny_dir, tmp_path, **method), progress=False)
    changed = res.metrics["changed_parameters"]
    if check == "attn2":
        assert changed and all(".attn2." in n for n in changed)
    elif check == "kv":
        assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    else:  # SAFREE wraps: no weight changes, the saved checkpoint rebuilds the wrapper
        assert not changed
        back = load_model(str(res.run_dir / "checkpoint"), "image")
        assert type(back).__name__ == "SAFREEAdapter"
        assert back.fingerprint() == res.metrics["provenance"]["model"]["fingerprint_after"]
    assert res.metrics["editor"]["headline"]


def test_image_attacks_run_from_a_recipe_and_show_in_the_report(tiny_dir, tmp_path):
    """eval.attacks on a visual run: every attack scores the forget splits and retain before and
    after; the erased model's own evaluation is the "before"; the report has the table; an
    unknown setting is named before anything is trained."""
    import unlearn

    r = _recipe(tiny_dir, tmp_path)
    r["eval"]["attacks"] = ["embedding_inversion", "relearn", "quantize_4bit"]
    r["eval"]["attack_params"] = {"relearn": {"steps": 2, "batch_size": 2}}
    res = unlearn.run(r, progress=False)
    att = res.metrics["attacks"]["unlearned"]
    assert list(att) == ["embedding_inversion", "relearn", "quantize_4bit"]
    unl = res.metrics["models"]["unlearned"]["splits"]
    for a in att.values():
        assert set(a["after"]) == {"forget_explicit", "forget_implicit", "retain"}
        assert a["before"]["forget_explicit"] == unl["forget_explicit"]["metrics"]["erasure_rate"]["value"]
        assert a["delta"]["retain"] == pytest.approx(a["after"]["retain"] - a["before"]["retain"])
    assert att["relearn"]["settings"]["steps_done"] == 2
    assert att["embedding_inversion"]["settings"]["words"] == ["red"]
    assert "## Attacks on the erased model" in (res.run_dir / "report.md").read_text()
    # the saved checkpoint is the erased model, not an attacked copy
    from unlearn.adapters.image import ImageAdapter

    assert ImageAdapter.load(str(res.run_dir / "checkpoint")).fingerprint() == \
        res.metrics["provenance"]["model"]["fingerprint_after"]
    r2 = _recipe(tiny_dir, tmp_path / "bad")
    r2["eval"]["attacks"] = ["relearn"]
    r2["eval"]["attack_params"] = {"relearn": {"stesp": 2}}
    with pytest.raises(ValueError, match="image attack 'relearn' has no setting 'stesp'; allowed: .*steps"):
        unlearn.run(r2, progress=False)
    assert not (tmp_path / "bad" / "run").exists()


def test_visual_recipe_evaluates_during_training_and_selects_by_erasure_and_retain(tiny_dir, tmp_path):
    """train.eval_every on a visual run: a curve of erasure/retain points, the best state by
    erasure_retain_mean restored, and the run's final evaluation is of that state."""
    import unlearn

    r = _recipe(tiny_dir, tmp_path, name="grad_ascent")
    r["train"] = {"max_steps": 3, "epochs": 3, "batch_size": 4, "lr": 0.05, "eval_every": 1,
                  "select_best": "erasure_retain_mean", "eval_max_items": 2, "save_checkpoint": False}
    res = unlearn.run(r, progress=False)
    te = res.metrics["train_eval"]
    assert te["suite"] == "i2p" and [p["step"] for p in te["curve"]] == [1, 2, 3]
    assert te["items_per_split"] == {"forget_explicit": 2, "forget_implicit": 2, "retain": 2}
    scores = [p["erasure_retain_mean"] for p in te["curve"]]
    best = te["curve"][int(np.argmax(scores))]
    assert te["selected"]["step"] == best["step"] and te["selected"]["criterion"] == "erasure_retain_mean"
    assert te["baseline"]["step"] == 0 and te["baseline"]["utility_ratio"] in (1.0, None)
    s = res.summary["unlearned"]
    assert s["erasure_explicit"] == pytest.approx(best["erasure_explicit"])
    assert s["retain_in_domain"] == pytest.approx(best["retain_in_domain"])
    report = (res.run_dir / "report.md").read_text()
    assert "## Evaluation during training" in report and "Suite `i2p`" in report
    assert (res.run_dir / "train_eval.png").stat().st_size > 0
    with pytest.raises(RecipeError, match="train.select_best.*allowed for task 'visual'"):
        load_recipe({**r, "train": {**r["train"], "select_best": "model_utility"}})


def test_i2p_evaluation_is_cached_like_the_text_suites(tiny_dir, tmp_path, monkeypatch):
    """The target's i2p evaluation is cached by model, judge, protocol and rows: a second run of
    the same evaluation samples nothing; another sample_steps is another key."""
    import unlearn
    from unlearn.evaluators import cache as eval_cache
    from unlearn.tasks import visual

    monkeypatch.setattr(eval_cache, "default_cache_dir", lambda: tmp_path / "cache")
    calls = []
    real = visual.harness_evaluate
    monkeypatch.setattr(visual, "harness_evaluate", lambda *a, **k: calls.append(k["label"]) or real(*a, **k))
    first = unlearn.run(_recipe(tiny_dir, tmp_path / "a"), progress=False)
    assert calls == ["target", "unlearned"]
    calls.clear()
    second = unlearn.run(_recipe(tiny_dir, tmp_path / "b"), progress=False)
    assert calls == ["unlearned"]  # the target came from the cache
    assert second.metrics["models"]["target"] == first.metrics["models"]["target"]
    calls.clear()
    r = _recipe(tiny_dir, tmp_path / "c")
    r["eval"]["sample_steps"] = 3
    unlearn.run(r, progress=False)
    assert calls == ["target", "unlearned"]
