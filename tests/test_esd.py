"""ESD: the target formula, the loss used inside ``apply``, which parameters each variant
trains, that training moves the model toward the target, and config validation."""

from __future__ import annotations

import pytest
import torch

from unlearn.editors.base import EditContext
from unlearn.editors.esd import ESD, ESDConfig, esd_loss, esd_prompts, esd_target, sample_xt
from unlearn.tasks.visual_task import load_visual
from unlearn.tasks.visual_world import VisualWorldConfig
from unlearn.trainer import TrainLog, TrainSettings



@pytest.fixture(scope="module")
def data():
    return load_visual(VisualWorldConfig(size=8, renders_per_concept=1, holdout_per_concept=0), eval_splits=())


@pytest.fixture
def adapter(data, make_image_adapter):
    return make_image_adapter(data.world)


def _ctx(lr=1e-2, max_steps=None, seed=0, max_grad_norm=1.0):
    return EditContext(settings=TrainSettings(lr=lr, max_steps=max_steps, max_grad_norm=max_grad_norm), seed=seed,
                       progress=False)


def _snapshot(adapter):
    return {n: p.detach().clone() for n, p in adapter.model.named_parameters()}


def _changed(adapter, before):
    return {n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])}


# ---------------------------------------------------------------------------- (a) the formula
@pytest.mark.parametrize("eta", [1.0, 2.0])
def test_esd_target_matches_hand_computation(eta):
    e_u = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    e_c = torch.tensor([[1.5, -1.0], [0.0, 3.0]])
    # ε(∅) − η (ε(c) − ε(∅)), element by element
    want = torch.tensor([[0.5 - eta * 1.0, -1.0 - eta * 0.0], [2.0 - eta * (-2.0), 0.0 - eta * 3.0]])
    torch.testing.assert_close(esd_target(e_u, e_c, eta), want)
    if eta == 1.0:  # η = 1: 2 ε(∅) − ε(c)
        torch.testing.assert_close(esd_target(e_u, e_c, eta), 2 * e_u - e_c)
    with pytest.raises(ValueError, match="must match"):
        esd_target(e_u, e_c[:1], eta)


# ---------------------------------------------------------------------------- (b) the loss in apply
def test_esd_loss_uses_reference_for_target_and_edited_model_for_prediction(adapter):
    reference = adapter.reference()
    with torch.no_grad():  # make the edited model differ from the reference
        for p in adapter.model["unet"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([10, 40])
    cond = adapter.encode_prompts(adapter.tokenize(["red", "a red circle"])).detach()
    uncond = adapter.encode_prompts(adapter.tokenize(["", ""])).detach()
    eta = 2.0
    loss = esd_loss(adapter, reference, x_t, t, cond, uncond, eta)
    with torch.no_grad():
        ru = reference.unet(x_t, t, encoder_hidden_states=uncond).sample
        rc = reference.unet(x_t, t, encoder_hidden_states=cond).sample
        pred = adapter.unet(x_t, t, encoder_hidden_states=cond).sample
        want = ((pred - (ru - eta * (rc - ru))) ** 2).mean()
        wrong = ((pred - (2 * adapter.unet(x_t, t, encoder_hidden_states=uncond).sample - pred)) ** 2).mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-7)
    assert not torch.isclose(loss.detach(), wrong)  # the target does not come from the edited model
    assert loss.requires_grad  # gradients flow into the edited model only
    loss.backward()
    assert all(p.grad is None for p in reference.model.parameters())


def test_sample_xt_is_the_guided_ddim_prefix(adapter):
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(adapter.scheduler.config)
    ddim.set_timesteps(5)
    cond = adapter.encode_prompts(adapter.tokenize(["red"])).detach()
    uncond = adapter.encode_prompts(adapter.tokenize([""])).detach()
    x0, t0 = sample_xt(adapter, ddim, cond, uncond, 0, 3.0, torch.Generator().manual_seed(7))
    torch.testing.assert_close(x0, torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(7)))
    assert t0.tolist() == [int(ddim.timesteps[0])]
    x2, t2 = sample_xt(adapter, ddim, cond, uncond, 2, 3.0, torch.Generator().manual_seed(7))
    assert t2.tolist() == [int(ddim.timesteps[2])] and not torch.allclose(x0, x2)


# ---------------------------------------------------------------------------- (c) parameter groups
@pytest.mark.parametrize("variant", ["esd-x", "esd-u", "esd-all"])
def test_only_the_variant_group_changes(adapter, data, variant):
    groups = adapter.parameter_groups()
    allowed = {"esd-x": set(groups["cross_attention"]),
               "esd-u": set(groups["non_cross_attention"]) - set(groups["time_embedding"]),
               "esd-all": set(groups["unet"])}[variant]
    adapter.model["unet"].conv_in.weight.requires_grad_(False)  # a flag the edit must restore
    flags = {n: p.requires_grad for n, p in adapter.model.named_parameters()}
    before = _snapshot(adapter)
    res = ESD(ESDConfig(variant=variant, iterations=3, ddim_steps=4)).apply(adapter, data, _ctx())
    changed = _changed(adapter, before)
    assert changed == allowed
    assert not any(n.startswith("text_encoder.") for n in changed)
    assert {n: p.requires_grad for n, p in adapter.model.named_parameters()} == flags
    assert all(p.grad is None for p in adapter.model.parameters())
    assert res.adapter is adapter and res.info["variant"] == variant and res.info["iterations"] == 3
    assert res.info["trainable_parameters"] == sum(p.numel() for n, p in adapter.model.named_parameters()
                                                   if n in allowed)


# ---------------------------------------------------------------------------- (d) training works
def test_training_moves_concept_prediction_toward_target(adapter, data):
    from diffusers import DDIMScheduler

    reference = adapter.reference()
    ddim = DDIMScheduler.from_config(adapter.scheduler.config)
    ddim.set_timesteps(5)
    cond = reference.encode_prompts(reference.tokenize(["red"]))
    uncond = reference.encode_prompts(reference.tokenize([""]))
    probes = [sample_xt(reference, ddim, cond, uncond, k, 3.0, torch.Generator().manual_seed(100 + k))
              for k in range(5)]

    def probe_loss():
        with torch.no_grad():
            return sum(esd_loss(adapter, reference, x, t, cond, uncond, 1.0).item() for x, t in probes) / len(probes)

    before = probe_loss()
    cfg = ESDConfig(variant="esd-x", iterations=999, ddim_steps=5)
    res = ESD(cfg).apply(adapter, data, _ctx(lr=1e-3, max_steps=30))
    after = probe_loss()
    assert res.info["iterations"] == 30  # train.max_steps overrides iterations
    assert after < 0.2 * before, (before, after)
    log = res.log
    assert isinstance(log, TrainLog) and log.steps == 30 and len(log.history) == 30
    first, last = log.history[0]["loss"], sum(h["loss"] for h in log.history[-10:]) / 10
    assert last < first
    assert res.info["losses"] == [h["loss"] for h in log.history[::10]]
    assert res.info["headline"].startswith("ESD-x: 30 iterations")


def test_apply_is_seed_deterministic(data, make_image_adapter):
    def run(seed):
        a = make_image_adapter(data.world)
        ESD(ESDConfig(iterations=3, ddim_steps=4, prompts="captions")).apply(a, data, _ctx(seed=seed))
        return _snapshot(a)

    s0, s0b, s1 = run(0), run(0), run(1)
    assert all(torch.equal(s0[n], s0b[n]) for n in s0)
    assert any(not torch.equal(s0[n], s1[n]) for n in s0)


def test_prompts_modes(data):
    assert esd_prompts(data, "concept") == ["red"]
    caps = esd_prompts(data, "captions")
    assert caps and len(caps) == len(set(caps)) and all("red" in c for c in caps)
    assert set(caps) == {it["caption"] for it in data.forget if it["phrasing"] == "explicit"}


def test_non_finite_loss_raises(adapter, data):
    with torch.no_grad():
        adapter.model["unet"].conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        ESD(ESDConfig(iterations=2, ddim_steps=2)).apply(adapter, data, _ctx())
    assert all(p.requires_grad for p in adapter.model.parameters())  # flags restored on failure too


# ---------------------------------------------------------------------------- (e) config checks
@pytest.mark.parametrize("field,value", [("variant", "esd-z"), ("negative_guidance", -1.0),
                                         ("negative_guidance", float("nan")), ("iterations", 0),
                                         ("ddim_steps", 0), ("sample_guidance", -0.5), ("prompts", "words")])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"esd.{field}="):
        ESDConfig(**{field: value})


def test_editor_attributes():
    assert ESD.name == "esd" and ESD.Config is ESDConfig and ESD.modalities == ("image",)
    assert "2303.07345" in ESD.paper
    cfg = ESDConfig()
    assert (cfg.variant, cfg.negative_guidance, cfg.iterations, cfg.ddim_steps, cfg.sample_guidance, cfg.prompts) \
        == ("esd-x", 1.0, 200, 20, 3.0, "concept")


def test_optimizer_step_stops_on_a_non_finite_gradient_before_the_weights_change():
    from unlearn.editors.base import optimizer_step

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    optimizer_step((w * 2).sum(), opt, [w], None, "esd at iteration 1")
    assert torch.allclose(w.detach(), torch.full((3,), 0.8))  # one SGD step on a finite gradient
    with pytest.raises(FloatingPointError, match=r"esd at iteration 2: non-finite gradient norm"):
        # loss sqrt(w - w) = 0 is finite, its gradient 1 / (2 sqrt(0)) is not
        optimizer_step(torch.sqrt(w - w.detach()).sum(), opt, [w], 1.0, "esd at iteration 2")
    assert torch.allclose(w.detach(), torch.full((3,), 0.8))  # unchanged
    with pytest.raises(FloatingPointError, match=r"esd at iteration 3: non-finite loss \(nan\)"):
        optimizer_step(w.sum() * float("nan"), opt, [w], 1.0, "esd at iteration 3")


def test_the_shared_loop_start_checks_and_seeds(adapter):
    from unlearn.editors.base import image_loop_start

    n, rng, gen = image_loop_start(adapter, TrainSettings(max_steps=None), 7, "concept_ablation", 3)
    assert n == 7 and rng.random() == __import__("random").Random("concept-ablation-3").random()
    assert torch.equal(torch.randn(2, generator=gen), torch.randn(2, generator=torch.Generator().manual_seed(3)))
    assert image_loop_start(adapter, TrainSettings(max_steps=2), 7, "esd", 0)[0] == 2  # train.max_steps wins
    with pytest.raises(ValueError, match=r"train.max_steps=0: spm needs at least one iteration"):
        image_loop_start(adapter, TrainSettings(max_steps=0), 7, "spm", 0)
    with pytest.raises(ValueError, match="advunlearn edits text-to-image diffusion models: the adapter has no noise_pred"):
        image_loop_start(object(), TrainSettings(), 7, "advunlearn", 0)


def test_the_train_state_is_restored_after_an_error(adapter):
    from unlearn.editors.base import restoring_train_state

    adapter.model["unet"].eval()
    adapter.model["text_encoder"].train()
    adapter._fingerprint = "stale"
    with pytest.raises(RuntimeError, match="boom"), restoring_train_state(adapter):
        for p in adapter.model.parameters():
            p.requires_grad_(False)
            p.grad = torch.zeros_like(p)
        adapter.model["unet"].train()
        adapter.model["text_encoder"].eval()
        raise RuntimeError("boom")
    assert all(p.requires_grad and p.grad is None for p in adapter.model.parameters())
    assert not adapter.model["unet"].training and adapter.model["text_encoder"].training
    assert adapter._fingerprint is None


def test_a_wrapper_of_another_kind_or_with_a_changed_base_is_refused(adapter, tmp_path):
    import json

    from unlearn.editors.base import load_wrapper_base, save_wrapper_base

    with pytest.raises(ValueError, match="meta needs a 'kind'"):
        save_wrapper_base(tmp_path / "w", adapter, {})
    save_wrapper_base(tmp_path / "w", adapter, {"kind": "spm", "adapter": "spm.safetensors"})
    meta, base, _ = load_wrapper_base(tmp_path / "w", "spm")
    assert meta["adapter"] == "spm.safetensors" and base.fingerprint() == adapter.fingerprint()
    with pytest.raises(ValueError, match=r"describes a 'spm' wrapper, not 'safree'"):
        load_wrapper_base(tmp_path / "w", "safree")
    meta["base_fingerprint"] = "0" * 16
    (tmp_path / "w" / "wrapper.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="the directory is corrupt"):
        load_wrapper_base(tmp_path / "w", "spm")
    with pytest.raises(ValueError, match="is not a readable spm wrapper description"):
        load_wrapper_base(tmp_path / "nowhere", "spm")


def test_retain_captions_name_the_switch_when_there_are_none():
    from types import SimpleNamespace

    from unlearn.editors.esd import retain_captions

    items = [{"caption": "a blue square", "phrasing": "explicit"}, {"caption": "a blue square"},
             {"caption": "a box in azure", "phrasing": "synonym"}, {"caption": "a green circle"}]
    assert retain_captions(SimpleNamespace(retain=items), "x", "y") == ["a blue square", "a green circle"]
    with pytest.raises(ValueError, match=r"^spm's anchoring needs them: .* or set method.params.anchor_weight: 0\)"):
        retain_captions(SimpleNamespace(retain=[]), "spm's anchoring needs them", "method.params.anchor_weight: 0")
