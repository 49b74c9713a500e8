"""SalUn on the shipped tiny-t2i zoo: the saliency mask (a parameter selection) keeps the requested
fraction of entries, only masked entries change after training (weight decay included), any
objective trains through it, and SalUn's random-label objective runs from a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unlearn.selection import MaskedDelta, apply_selection, finalize_selection, salun_masks, validate_selection
from unlearn.trainer import TrainSettings, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data():
    from unlearn.tasks.visual_task import load_visual

    torch.set_num_threads(1)
    return load_visual()


def _adapter():
    from unlearn.adapters.image import ImageAdapter

    return ImageAdapter.load("zoo:tiny-t2i/target")


def _masks(model) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` of the salun parametrizations of ``model``."""
    out = {}
    for name, mod in model.named_modules():
        for attr, plist in getattr(mod, "parametrizations", {}).items():
            for f in plist:
                if isinstance(f, MaskedDelta):
                    out[f"{name}.{attr}"] = f.mask.bool().clone()
    return out


def test_global_top_fraction_is_exact():
    scores = {"a": torch.tensor([[0.1, 0.9], [0.5, 0.3]]), "b": torch.tensor([0.7, 0.2, 0.8])}
    m = salun_masks(scores, 3 / 7)
    assert m["a"].tolist() == [[False, True], [False, False]] and m["b"].tolist() == [True, False, True]
    assert sum(int(v.sum()) for v in salun_masks(scores, 1e-6).values()) == 1  # at least one entry


@pytest.mark.parametrize("fraction", [0.5, 0.1])
def test_the_mask_keeps_the_requested_fraction(data, fraction):
    ad = _adapter()
    unet = [n for n, _ in ad.model.named_parameters() if n.startswith("unet.")]
    n_unet = sum(p.numel() for n, p in ad.model.named_parameters() if n.startswith("unet."))
    info = apply_selection(ad, "salun", {"fraction": fraction, "group": "unet", "items": 8}, forget=data.forget)
    masks = _masks(ad.model)
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs(kept - fraction * n_unet) <= 1 and info.trainable == kept == info.params["kept"]
    assert info.params["in_scope"] == n_unet and info.params["forget_items"] == 8
    assert set(masks) <= set(unet) and not any(n.startswith("text_encoder") for n in masks)
    # only the deltas train
    trainable = [n for n, p in ad.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta") for n in trainable)


def test_only_masked_entries_change_after_training(data):
    from unlearn.objectives.salun import SalUn

    ad = _adapter()
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    obj = SalUn()
    obj.setup(ad, None, data.forget)
    apply_selection(ad, "salun", {"fraction": 0.3, "group": "unet", "items": 8}, forget=data.forget)
    masks = _masks(ad.model)
    log = train(ad, obj, data.forget[:32], data.retain[:32],
                TrainSettings(epochs=1, max_steps=3, lr=1e-3, batch_size=8, weight_decay=0.1), progress=False)
    finalize_selection(ad)
    assert log.steps == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in log.history)
    after = ad.model.state_dict()
    assert set(after) == set(before)  # merged back: the plain parameter names
    moved = 0
    for k in before:
        diff = before[k] != after[k]
        if k in masks:
            assert not (diff & ~masks[k]).any(), f"{k}: an entry outside the saliency mask changed"
            moved += int(diff.sum())
        else:
            assert not diff.any(), f"{k} is outside the mask's scope but changed"
    assert moved > 0


def test_any_objective_trains_through_the_mask(data):
    from unlearn.objectives import OBJECTIVES

    ad = _adapter()
    obj = OBJECTIVES.get("grad_ascent")()
    obj.setup(ad, None, data.forget)
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    apply_selection(ad, "salun", {"fraction": 0.05, "pattern": r"attn2\.to_[kv]", "items": 4}, forget=data.forget)
    masks = _masks(ad.model)
    assert masks and all("attn2.to_" in n for n in masks)
    train(ad, obj, data.forget[:8], None, TrainSettings(epochs=1, max_steps=1, lr=1e-3, batch_size=4), progress=False)
    finalize_selection(ad)
    after = ad.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and set(changed) <= set(masks)


def test_bad_salun_settings_are_named(data):
    with pytest.raises(ValueError, match=r"method.selection.params.fraction must be in \(0, 1\]"):
        validate_selection("salun", {"fraction": 0.0})
    with pytest.raises(ValueError, match="method.selection.params.frac is unknown for 'salun'"):
        validate_selection("salun", {"frac": 0.5})
    with pytest.raises(ValueError, match="give group or pattern, not both"):
        validate_selection("salun", {"group": "unet", "pattern": "x"})
    with pytest.raises(ValueError, match="got no forget items"):
        apply_selection(_adapter(), "salun", {"fraction": 0.5})
    with pytest.raises(ValueError, match="group 'unte' is unknown"):
        apply_selection(_adapter(), "salun", {"group": "unte"}, forget=data.forget[:2])
    from unlearn.recipe import RecipeError, load_recipe

    with pytest.raises((RecipeError, ValueError), match="fraction"):
        load_recipe({"name": "x", "task": {"name": "visual"}, "method": {
            "name": "salun", "selection": {"name": "salun", "params": {"fraction": 1.5}}}})


def test_salun_runs_from_its_recipe(tmp_path):
    import unlearn

    path = ROOT / "recipes" / "i2p-tiny-salun.yaml"
    r = unlearn.load_recipe(path)
    assert r.method.name == "salun" and r.method.selection.name == "salun"
    res = unlearn.run(path, progress=False, overrides=[f"output.dir={tmp_path / 'run'}", "train.max_steps=2",
                                                        "eval.max_items=2", "eval.sample_steps=2"])
    m = json.loads((res.run_dir / "metrics.json").read_text())
    sel = json.dumps(m)
    assert '"salun"' in sel and res.summary["unlearned"]["erasure_explicit"] is not None
