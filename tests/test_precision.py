"""train.gradient_checkpointing and train.mixed_precision: same training, less memory / bf16 math."""

from __future__ import annotations

import pytest
import torch

from unlearn.objectives import GradAscent
from unlearn.trainer import TrainSettings, train


def _train(adapter, items, **kw):
    s = TrainSettings(**{"epochs": 1, "batch_size": 4, "lr": 1e-3, "max_steps": 2, **kw})
    return train(adapter, GradAscent(), items, None, s, progress=False)


def test_gradient_checkpointing_gives_the_same_steps(tiny_adapter, qa_items):
    import copy

    other = copy.deepcopy(tiny_adapter)
    plain = _train(tiny_adapter, qa_items)
    other.enable_gradient_checkpointing()
    assert getattr(other.model, "is_activation_checkpointing", None) or other.model.is_gradient_checkpointing
    ckpt = _train(other, qa_items)
    assert [h["loss"] for h in ckpt.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-6)
    for (n, p), (_, q) in zip(tiny_adapter.model.named_parameters(), other.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_bf16_autocast_trains_close_to_fp32_and_evaluates_in_fp32(tiny_adapter, qa_items):
    import copy

    other = copy.deepcopy(tiny_adapter)
    fp32 = _train(tiny_adapter, qa_items)
    bf16 = _train(other, qa_items, mixed_precision="bf16")
    l32, l16 = [h["loss"] for h in fp32.history], [h["loss"] for h in bf16.history]
    assert l16 == pytest.approx(l32, rel=5e-2) and l16 != l32  # bf16 math: close, not equal
    assert next(other.model.parameters()).dtype == torch.float32  # the weights stay in model.dtype
    b = other.collate(qa_items[:2])
    with torch.no_grad():
        assert other.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.dtype == torch.float32


def test_recipe_keys(tmp_path):
    import unlearn

    with pytest.raises(ValueError, match="train.mixed_precision"):
        unlearn.load_recipe({"name": "x", "method": {"name": "grad_ascent"}, "train": {"mixed_precision": "fp16"}})
    r = unlearn.load_recipe({"name": "x", "method": {"name": "grad_ascent"},
                             "train": {"gradient_checkpointing": True, "mixed_precision": "bf16"}})
    assert r.train.gradient_checkpointing and r.train.mixed_precision == "bf16"
