"""SPM (unlearn/editors/spm.py): the rank-1 adapter's shapes and formula, training changes only the
adapter, the prompt-dependent strength (≈1 for the concept, ≈0 for an unrelated prompt), the
adapter saved alone (safetensors) moves to a second model of the same config, mismatched
architectures and bad settings are named, and the recipe runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unlearn.editors import EDITORS, EditContext, load_wrapped
from unlearn.editors.spm import (SPM, SPMAdapter, SPMConfig, SPMNetwork, apply_spm, load_spm_file, matching_scores,
                                 strength, target_layers)
from unlearn.tasks.visual_task import load_visual
from unlearn.tasks.visual_world import VisualWorldConfig
from unlearn.trainer import TrainSettings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return load_visual(VisualWorldConfig(size=8, renders_per_concept=1, holdout_per_concept=0), eval_splits=())


def _ctx(steps=3, lr=1e-2):
    return EditContext(settings=TrainSettings(lr=lr, max_steps=steps, max_grad_norm=1.0), seed=0, progress=False)


def test_bad_settings_are_named():
    assert EDITORS.get("spm") is SPM
    with pytest.raises(ValueError, match="spm.layers='all': must be one of cross_attention_kv, cross_attention, "
                                         "transformer"):
        SPMConfig(layers="all")
    assert SPMConfig().floor == "0"  # the official γ = s by default
    with pytest.raises(ValueError, match="spm.floor='1.5': must be 'auto' or a number in"):
        SPMConfig(floor="1.5")
    with pytest.raises(ValueError, match="spm.anchor_batch=0: must be an integer >= 1"):
        SPMConfig(anchor_batch=0)
    with pytest.raises(ValueError, match="spm.scaling='off': must be one of facilitated, constant"):
        SPMConfig(scaling="off")


def test_the_adapter_is_rank_one_and_adds_gamma_u_dT_x(data, make_image_adapter):
    ad = make_image_adapter(data.world)
    layers = target_layers(ad.unet, "cross_attention_kv")
    assert len(layers) >= 2 and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in layers)
    net = SPMNetwork.for_unet(ad.unet, "cross_attention_kv", seed=0)
    for n, m in layers.items():
        assert net.down[n.replace(".", "-")].shape == (1, m.in_features)
        assert net.up[n.replace(".", "-")].shape == (m.out_features, 1)
    assert sum(p.numel() for p in net.parameters()) == sum(m.in_features + m.out_features for m in layers.values())
    with torch.no_grad():
        for p in net.up.values():
            p.normal_()
    name = next(iter(layers))
    x = torch.randn(2, 5, layers[name].in_features)
    d, u = net.down[name.replace(".", "-")], net.up[name.replace(".", "-")]
    torch.testing.assert_close(net.delta(name, x), (x @ d.T) @ u.T)  # u (dᵀ x) per row
    wrapped = SPMAdapter(ad, net, ["red"], [], SPMConfig(floor="0"))
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 60])
    cond = ad.encode_prompts(ad.tokenize(["a red circle", "a blue square"])).detach()
    with torch.no_grad():
        plain = ad.noise_pred(x_t, t, cond)
        with wrapped.fixed_strength(0.0):
            torch.testing.assert_close(wrapped.noise_pred(x_t, t, cond), plain)
        with wrapped.fixed_strength(1.0):
            on = wrapped.noise_pred(x_t, t, cond)
        # the hooks are gone afterwards: the base model is unchanged
        torch.testing.assert_close(ad.noise_pred(x_t, t, cond), plain)
    assert (on - plain).abs().max() > 1e-4


def test_scores_and_strength_by_hand():
    ids = torch.tensor([[0, 5, 6, 1], [0, 7, 8, 1]])
    c_ids = torch.tensor([[0, 6, 1, 1]])
    emb = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    c_emb = torch.tensor([[[1.0, 1.0]]])
    s = matching_scores(ids, emb, c_ids, c_emb, special={0, 1})
    # row 0 holds the concept's only word token (6): 1; row 1: cosine (0,1)·(1,1)/√2
    torch.testing.assert_close(s, torch.tensor([1.0, 2 ** -0.5]))
    torch.testing.assert_close(strength(torch.tensor([1.0, 0.5, 0.2]), 0.5), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(strength(torch.tensor([0.75]), 0.5), torch.tensor([0.5]))


def test_training_changes_only_the_adapter_and_it_transfers(data, make_image_adapter, tmp_path):
    ad = make_image_adapter(data.world, seed=0)
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in ad.model.named_parameters()}
    res = SPM(SPMConfig(layers="cross_attention", ddim_steps=4, anchor_batch=1, floor="auto")).apply(ad, data,
                                                                                                     _ctx(steps=4))
    w = res.adapter
    assert isinstance(w, SPMAdapter) and res.log.steps == 4
    assert all(torch.equal(before[k], v) for k, v in ad.model.state_dict().items())  # the target is untouched
    assert {n: p.requires_grad for n, p in ad.model.named_parameters()} == flags
    assert any(p.abs().sum() > 0 for p in w.network.up.values())  # the adapter learnt something (up starts at 0)
    assert set(w.parameter_groups()["spm"]) == {n for n, _ in w.model.named_parameters() if n.startswith("spm.")}

    # prompt-dependent strength: the concept ≈ 1, an anchor-like unrelated prompt ≈ 0
    g = w.strengths(["red", "a solid red circle", w.anchors[0]])
    assert g[0] == pytest.approx(1.0) and g[1] == pytest.approx(1.0) and g[2] == pytest.approx(0.0, abs=1e-6)

    # the adapter alone, as safetensors, onto a second model with the same config (other weights)
    f = tmp_path / "red.safetensors"
    w.save_adapter(f)
    tensors, meta = load_spm_file(f)
    assert meta["concepts"] == ["red"] and meta["layers"] == "cross_attention"
    other = make_image_adapter(data.world, seed=1)
    assert not torch.equal(other.unet.conv_in.weight, ad.unet.conv_in.weight)
    moved = apply_spm(other, f)
    for n, m in target_layers(other.unet, "cross_attention").items():
        k = n.replace(".", "-")
        assert moved.network.down[k].shape == (1, m.in_features) and moved.network.up[k].shape == (m.out_features, 1)
        torch.testing.assert_close(moved.network.up[k], w.network.up[k])
    g2 = moved.strengths(["red", "a striped blue square"])
    assert g2[0] == pytest.approx(1.0) and g2[1] < 0.5
    imgs = moved.sample(["red", "a striped blue square"], seed=0, steps=2)
    assert imgs.shape == (2, 8, 8, 3) and moved.last_strength[0] == pytest.approx(1.0)

    # saved with its base: rebuilt by the wrapper loader, same predictions
    w.save(tmp_path / "ckpt")
    back = load_wrapped(tmp_path / "ckpt")
    assert isinstance(back, SPMAdapter) and back.fingerprint() == w.fingerprint(refresh=True)


def test_a_different_architecture_is_refused(data, make_image_adapter, tmp_path):
    from unlearn.adapters.image import ImageAdapter
    from unlearn.zoo.build_t2i import world_tokenizer
    from unlearn.zoo.image_models import TinyT2ISpec, build_tiny_t2i

    ad = make_image_adapter(data.world)
    net = SPMNetwork.for_unet(ad.unet, "cross_attention_kv")
    f = tmp_path / "a.safetensors"
    SPMAdapter(ad, net, ["red"], [], SPMConfig(floor="0")).save_adapter(f)
    spec = TinyT2ISpec(image_size=8, block_out_channels=(16, 32), attention_head_dim=4, text_hidden_size=16,
                        text_layers=1, text_heads=2, num_train_timesteps=50)  # the test config, wider UNet
    tok = world_tokenizer(data.world, spec.max_length)
    unet, te, sched = build_tiny_t2i(spec, tok, 0)
    wide = ImageAdapter(unet, te, tok, sched)
    with pytest.raises(ValueError, match=r"a.safetensors.*transfers only to (a model of )?the same architecture"):
        apply_spm(wide, f)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        apply_spm(ad, tmp_path / "junk.safetensors")


def test_red_fades_on_the_zoo_and_other_colours_stay():
    """Measured (docs/editors/spm.md): 100 iterations at lr 5e-2; here 50 on the first 8 explicit red rows
    and 8 retain rows (retain prompts get strength 0, so they are drawn exactly as before)."""
    from unlearn.adapters.image import ImageAdapter
    from unlearn.editors.rece import concept_erasure
    from unlearn.evaluators.image_judge import ImageJudge
    from unlearn.zoo import zoo_path

    d = load_visual()
    judge = ImageJudge.load(zoo_path("tiny-t2i/judge"))
    ad = ImageAdapter.load("zoo:tiny-t2i/target")
    rows, keep = d.eval_splits["forget_explicit"][:8], d.eval_splits["retain"][:8]

    def draw(model, rs):
        return model.sample([r["prompt"] for r in rs], seed=[int(r["seed"]) for r in rs], steps=10)

    before, kept_before = 1.0 - concept_erasure(judge, draw(ad, rows), rows), draw(ad, keep)
    res = SPM(SPMConfig(floor="auto")).apply(ad, d, _ctx(steps=50, lr=5e-2))
    w = res.adapter
    after = 1.0 - concept_erasure(judge, draw(w, rows), rows)
    assert before >= 0.9 and after <= before - 0.5, (before, after)
    assert w.last_strength == [1.0] * 8
    kept_after = draw(w, keep)
    assert w.last_strength == [0.0] * 8 and (kept_after == kept_before).all()


def test_the_recipe_runs(tmp_path):
    import unlearn

    path = ROOT / "recipes" / "i2p-tiny-spm.yaml"
    r = unlearn.load_recipe(path)
    assert r.method.name == "spm" and r.method.params["layers"] == "cross_attention_kv"
    res = unlearn.run(path, progress=False, overrides=[f"output.dir={tmp_path / 'run'}", "train.max_steps=2",
                                                        "eval.max_items=2", "eval.sample_steps=2"])
    assert res.summary["unlearned"]["erasure_explicit"] is not None
    assert (tmp_path / "run" / "checkpoint" / "spm.safetensors").is_file()
