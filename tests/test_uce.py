"""UCE's closed form: parity with a direct least-squares solve, preserved directions, and
that only the cross-attention K/V weights of a UNet change."""

from __future__ import annotations

import pytest
import torch

from unlearn.editors.uce import UCEConfig, cross_attention_kv, uce_closed_form, uce_edit_unet, uce_factor


def _lstsq_reference(w, ce, vstar, cp, lamb, se, sp):
    """Solve min s_e‖W'C_e − V*‖² + s_p‖W'C_p − WC_p‖² + λ‖W' − W‖² as one stacked least-squares
    system (rows: sqrt-weighted equations), independently of the closed form."""
    d = w.shape[1]
    a = torch.cat([se ** 0.5 * ce, sp ** 0.5 * cp, lamb ** 0.5 * torch.eye(d, dtype=w.dtype)], dim=0)  # (k+m+d, d)
    b = torch.cat([se ** 0.5 * vstar, sp ** 0.5 * cp @ w.T, lamb ** 0.5 * w.T], dim=0)  # (k+m+d, d_out)
    return torch.linalg.lstsq(a, b).solution.T  # (d_out, d)


@pytest.mark.parametrize("lamb,se,sp", [(0.5, 1.0, 1.0), (0.1, 2.0, 0.5), (1e-3, 1.0, 10.0)])
def test_closed_form_equals_lstsq(lamb, se, sp):
    g = torch.Generator().manual_seed(0)
    d, d_out, k, m = 12, 7, 3, 5
    w = torch.randn(d_out, d, generator=g, dtype=torch.float64)
    ce = torch.randn(k, d, generator=g, dtype=torch.float64)
    vstar = torch.randn(k, d_out, generator=g, dtype=torch.float64)
    cp = torch.randn(m, d, generator=g, dtype=torch.float64)
    got = uce_closed_form(w, ce, vstar, cp, lamb=lamb, erase_scale=se, preserve_scale=sp)
    ref = _lstsq_reference(w, ce, vstar, cp, lamb, se, sp)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8)
    # and the formula as printed in the paper / DIFFUSION.md, with an explicit inverse
    num = lamb * w + se * vstar.T @ ce + sp * w @ cp.T @ cp
    den = lamb * torch.eye(d, dtype=w.dtype) + se * ce.T @ ce + sp * cp.T @ cp
    torch.testing.assert_close(got, num @ torch.linalg.inv(den), rtol=1e-8, atol=1e-8)


def test_float32_weight_keeps_dtype_and_matches():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 8, generator=g)
    ce, vstar, cp = torch.randn(2, 8, generator=g), torch.randn(2, 5, generator=g), torch.randn(3, 8, generator=g)
    got = uce_closed_form(w, ce, vstar, cp)
    assert got.dtype == torch.float32
    ref = _lstsq_reference(w.double(), ce.double(), vstar.double(), cp.double(), 0.5, 1.0, 1.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_preserved_directions_kept_and_edit_reached():
    g = torch.Generator().manual_seed(2)
    d, d_out = 10, 6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ce, cp = q[:, :2].T * 3.0, q[:, 2:6].T * 2.0  # edit and preserve embeddings span orthogonal subspaces
    w = torch.randn(d_out, d, generator=g, dtype=torch.float64)
    vstar = torch.randn(2, d_out, generator=g, dtype=torch.float64)
    new = uce_closed_form(w, ce, vstar, cp, lamb=1e-6)
    torch.testing.assert_close(new @ cp.T, w @ cp.T, rtol=0, atol=1e-10)  # preserved outputs unchanged
    other = q[:, 6:].T  # directions orthogonal to the edit keys: unchanged too
    torch.testing.assert_close(new @ other.T, w @ other.T, rtol=0, atol=1e-8)
    torch.testing.assert_close(new @ ce.T, vstar.T, rtol=0, atol=1e-5)  # edit reached (λ → 0)
    # with a large λ the edit is damped: W' stays near W
    damped = uce_closed_form(w, ce, vstar, cp, lamb=1e6)
    assert (damped - w).abs().max() < 1e-4


def test_input_errors():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="edit_values must have shape"):
        uce_closed_form(w, torch.randn(2, 6), torch.randn(2, 5))
    with pytest.raises(ValueError, match="edit_keys must have shape"):
        uce_closed_form(w, torch.randn(2, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="uce.lamb"):
        UCEConfig(lamb=0.0)


def _tiny_unet(cross_dim=16):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=4, norm_num_groups=4,
    )


def test_unet_edit_changes_only_cross_attention_kv_and_matches_closed_form():
    unet = _tiny_unet()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    g = torch.Generator().manual_seed(3)
    ce, cg, cp = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g), torch.randn(4, 16, generator=g)
    cfg = UCEConfig(lamb=0.5)
    info = uce_edit_unet(unet, ce, cg, cp, cfg)
    kv = {f"{n}.weight" for n in cross_attention_kv(unet)}
    assert set(info["edited"]) == kv and len(kv) == 2 * 4  # 1 down + 1 mid + 2 up transformer blocks
    for n, p in unet.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in kv), n
    for n in kv:  # each edited weight equals the pure closed form with v* = W c_guide
        w = before[n]
        torch.testing.assert_close(dict(unet.named_parameters())[n], uce_closed_form(w, ce, cg @ w.T, cp),
                                   rtol=1e-5, atol=1e-6)
    factor = uce_factor(ce, cp)
    assert factor.shape == (16, 2)


def test_uce_erase_on_image_adapter_maps_concept_to_guide():
    """On a tiny ImageAdapter: after UCE red→blue, every K/V output of "red"'s embedding is
    (nearly) the original output of "blue"'s, preserved prompts keep theirs, and only the
    cross-attention K/V parameters change."""
    from unlearn.adapters.image import ImageAdapter
    from unlearn.editors.uce import concept_token_embeddings, uce_erase
    from unlearn.zoo.image_models import TinyT2ISpec, build_caption_tokenizer, build_tiny_t2i

    tok = build_caption_tokenizer(["a red circle", "a blue square", "a green cross", "a yellow triangle"])
    spec = TinyT2ISpec(image_size=8, block_out_channels=(8, 16), attention_head_dim=4, text_hidden_size=16,
                       text_layers=1, text_heads=2, num_train_timesteps=50)
    unet, te, sched = build_tiny_t2i(spec, tok, seed=0)
    ad = ImageAdapter(unet, te, tok, sched)
    before = {n: p.detach().clone() for n, p in ad.model.named_parameters()}
    fp = ad.fingerprint()
    emb = {w: concept_token_embeddings(te, tok, [w]) for w in ("red", "blue", "green", "")}
    info = uce_erase(ad, ["red"], ["blue"], ["green", "yellow"], UCEConfig(lamb=1e-3))
    assert info["n_edit"] == 1 and info["n_preserve"] == 3  # "" added to the preserve set
    kv = set(ad.parameter_groups()["cross_attention_kv"])
    assert set(info["edited"]) == kv
    for n, p in ad.model.named_parameters():
        assert (not torch.equal(p, before[n])) == (n in kv), n
    assert ad.fingerprint() != fp
    for n in kv:
        w_old, w_new = before[n], dict(ad.model.named_parameters())[n]
        target = emb["blue"] @ w_old.T
        assert (emb["red"] @ w_new.T - target).norm() < 0.05 * (emb["red"] @ w_old.T - target).norm()
        for keep in ("green", ""):  # without the preserve set "green" moves by ~0.5
            torch.testing.assert_close(emb[keep] @ w_new.T, emb[keep] @ w_old.T, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="one guide prompt per erase prompt"):
        uce_erase(ad, ["red"], [], [])
