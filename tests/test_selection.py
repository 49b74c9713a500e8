"""Parameter selection: "parameter has changed" / "has not changed" after real optimizer steps."""

from __future__ import annotations

import pytest
import torch

from unlearn.objectives import GradAscent
from unlearn.selection import apply_selection, changed_parameters, finalize_selection, validate_selection
from unlearn.trainer import TrainSettings, train


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sgd_step(adapter, items, lr=0.1):
    """One gradient-ascent step with plain SGD on the parameters that require grad."""
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    adapter.model.train()
    loss, _ = GradAscent().loss(adapter, adapter.collate(items), None)
    loss.backward()
    opt.step()
    adapter.model.eval()


def test_full_trains_every_parameter(tiny_adapter, qa_items):
    info = apply_selection(tiny_adapter, "full")
    names = [n for n, _ in tiny_adapter.model.named_parameters()]
    assert info.fraction == 1.0 and info.trainable == info.total
    before = snapshot(tiny_adapter.model)
    sgd_step(tiny_adapter, qa_items[:4])
    assert sorted(changed_parameters(before, tiny_adapter.model)) == sorted(names)


def test_regex_trains_only_the_matching_parameter(tiny_adapter, qa_items):
    info = apply_selection(tiny_adapter, "regex", {"pattern": r"layers\.0\.mlp\.down_proj"})
    target = "model.layers.0.mlp.down_proj.weight"
    params = dict(tiny_adapter.model.named_parameters())
    assert [n for n, p in params.items() if p.requires_grad] == [target]
    assert info.trainable == params[target].numel() and info.fraction < 1
    assert info.to_dict()["params"] == {"pattern": r"layers\.0\.mlp\.down_proj"}
    before = snapshot(tiny_adapter.model)
    sgd_step(tiny_adapter, qa_items[:4])
    assert changed_parameters(before, tiny_adapter.model) == [target]


def test_regex_matching_nothing_is_an_error(tiny_adapter):
    with pytest.raises(ValueError, match=r"'layers\\\\.9\\\\.' matches no parameter"):
        apply_selection(tiny_adapter, "regex", {"pattern": r"layers\.9\."})


def test_lora_trains_only_adapters_and_merges(tiny_adapter, qa_items):
    from peft import PeftModel

    original = snapshot(tiny_adapter.model)
    info = apply_selection(tiny_adapter, "lora", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    assert isinstance(tiny_adapter.model, PeftModel)
    assert 0 < info.fraction < 1 and info.params["r"] == 4
    trainable = [n for n, p in tiny_adapter.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 3 * tiny_adapter.model.config.num_hidden_layers  # A and B per target
    assert info.trainable == sum(p.numel() for p in tiny_adapter.model.parameters() if p.requires_grad)

    before = snapshot(tiny_adapter.model)
    settings = TrainSettings(epochs=1, max_steps=3, batch_size=2, lr=1e-2, optimizer="adamw")
    log = train(tiny_adapter, GradAscent(), qa_items, None, settings, progress=False)
    assert log.steps == 3 and isinstance(tiny_adapter.model, PeftModel)
    changed = changed_parameters(before, tiny_adapter.model)
    assert sorted(changed) == sorted(trainable)  # every adapter moved (A from step 2 on: B starts at 0) ...
    base = [n for n in before if "lora_" not in n]
    assert base and not [n for n in base if n in changed]  # ... and no base weight did

    batch = tiny_adapter.collate(qa_items[:4])
    with torch.no_grad():
        peft_logits = tiny_adapter.logits(batch)
    finalize_selection(tiny_adapter)
    assert not isinstance(tiny_adapter.model, PeftModel)
    merged = tiny_adapter.model.state_dict()
    assert sorted(merged) == sorted(original)
    assert not any(p.requires_grad for p in tiny_adapter.model.parameters())
    with torch.no_grad():
        assert torch.allclose(tiny_adapter.logits(batch), peft_logits, atol=1e-5)
    moved = {n for n in original if not torch.equal(original[n], merged[n])}
    assert moved == {f"model.layers.{i}.{m}.weight" for i in range(2)
                     for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}


def test_finalize_refreshes_the_fingerprint(tiny_adapter, qa_items):
    fp = tiny_adapter.fingerprint()
    apply_selection(tiny_adapter, "full")
    sgd_step(tiny_adapter, qa_items[:2])
    assert tiny_adapter.fingerprint() == fp  # cached
    finalize_selection(tiny_adapter)
    assert tiny_adapter.fingerprint() != fp


@pytest.mark.parametrize("name, params, match", [
    ("regex", {}, r"method\.selection\.params\.pattern is required"),
    ("regex", {"pattern": ""}, r"method\.selection\.params\.pattern is required"),
    ("regex", {"pattern": "layers.(0"}, r"method\.selection\.params\.pattern 'layers\.\(0' is not a valid regex"),
    ("regex", {"pattern": "x", "flags": 1}, r"method\.selection\.params\.flags is unknown for 'regex'"),
    ("lora", {"rank": 4}, r"method\.selection\.params\.rank is unknown for 'lora'; allowed: r, alpha"),
    ("lora", {"r": "8"}, r"method\.selection\.params\.r has the wrong type \(str\)"),
    ("lora", {"r": True}, r"method\.selection\.params\.r has the wrong type \(bool\)"),
    ("full", {"r": 4}, r"method\.selection\.params must be empty for 'full', got keys \['r'\]"),
    ("prune", {}, r"method\.selection\.name 'prune' is unknown; allowed: full, lora, regex"),
])
def test_validation_errors_name_the_key(name, params, match):
    with pytest.raises(ValueError, match=match):
        validate_selection(name, params)


def test_apply_selection_validates_before_touching_the_model(tiny_adapter):
    model = tiny_adapter.model
    with pytest.raises(ValueError, match=r"params\.rank"):
        apply_selection(tiny_adapter, "lora", {"rank": 4})
    assert tiny_adapter.model is model
