"""SAFREE: the projection, the trigger test and the filtering on hand-built embeddings; the
guarded adapter on a tiny model (bit-identical without triggers, the step switch, save/load)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unlearn.adapters.image import ImageAdapter
from unlearn.editors.base import WRAPPER_FILE, EditContext
from unlearn.editors.safree import (SAFREE, SAFREEAdapter, SAFREEConfig, concept_projection, default_keywords,
                                    filtered_steps, load_safree, project_out, reattend, trigger_tokens)
from unlearn.models import load_model
from unlearn.tasks.visual_task import load_visual
from unlearn.tasks.visual_world import VisualWorldConfig

KEYWORDS = ["red", "crimson", "scarlet"]


def test_projection_is_symmetric_idempotent_and_spans_C():
    g = torch.Generator().manual_seed(0)
    C = torch.randn(10, 3, generator=g, dtype=torch.float64)
    P = concept_projection(C)
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-10)
    torch.testing.assert_close(P @ C, C, rtol=0, atol=1e-10)
    assert abs(float(torch.trace(P)) - 3) < 1e-9  # rank 3
    # rank-deficient C (a repeated column) is fine: the same projection
    torch.testing.assert_close(concept_projection(torch.cat([C, C[:, :1]], dim=1)), P, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="\\(d, K\\)"):
        concept_projection(C[:, 0])


def _additive_prompt(a=1.0, concept=5.0):
    """Pooled embedding = sum of token vectors; p_{\\i} = the sum without token i. Token 2 lies in
    the concept subspace span(e0); the others along e1, e2, e3. Position 4 is padding."""
    d = 6
    eye = torch.eye(d, dtype=torch.float64)
    v = torch.stack([a * eye[1], a * eye[2], concept * eye[0], a * eye[3], 100 * eye[4]])  # (T=5, d)
    mask = torch.tensor([[True, True, True, True, False]])
    s = v[:4].sum(0)
    masked = torch.stack([s - v[i] for i in range(5)])[None]  # (1, T, d)
    return masked, mask, concept_projection(eye[:, :1])


def test_planted_concept_token_is_the_only_trigger():
    masked, mask, P = _additive_prompt()
    trig = trigger_tokens(masked, mask, P, alpha=0.01)
    assert trig.tolist() == [[False, False, True, False, False]]
    # a large α flags nothing; a prompt with a single candidate has no trigger
    assert not trigger_tokens(masked, mask, P, alpha=1.0).any()
    one = torch.tensor([[False, False, True, False, False]])
    assert not trigger_tokens(masked, one, P, alpha=0.01).any()
    # by hand: d_i = ‖(I − P) p_{\i}‖, trigger iff d_i >= (1 + α) mean_{j≠i} d_j
    dist = [float(torch.linalg.vector_norm(masked[0, i] - P @ masked[0, i])) for i in range(4)]
    assert dist[2] == pytest.approx(3 ** 0.5) and dist[0] == pytest.approx(2 ** 0.5)
    for i in range(4):
        others = np.mean([dist[j] for j in range(4) if j != i])
        assert bool(trig[0, i]) == (dist[i] >= 1.01 * others)


def test_filtered_trigger_is_orthogonal_to_C_and_others_are_kept():
    g = torch.Generator().manual_seed(1)
    d, T = 8, 5
    C = torch.randn(d, 2, generator=g, dtype=torch.float64)
    P_C = concept_projection(C)
    span = torch.randn(d, 4, generator=g, dtype=torch.float64)
    P_M = concept_projection(span)[None]  # (1, d, d)
    emb = torch.randn(1, T, d, generator=g)  # float32
    trig = torch.tensor([[False, True, False, True, False]])
    out = project_out(emb, trig, P_C, P_M)
    assert out.dtype == emb.dtype
    assert torch.equal(out[~trig], emb[~trig])  # bit-for-bit
    filt = out[trig].double()  # (2, d)
    torch.testing.assert_close(filt @ C, torch.zeros(2, 2, dtype=torch.float64), rtol=0, atol=1e-5)
    expect = (torch.eye(d, dtype=torch.float64) - P_C) @ P_M[0] @ emb[0, 1].double()
    torch.testing.assert_close(filt[0], expect, rtol=1e-5, atol=1e-5)


def test_filtered_steps_rule():
    # round(up_t · σ(2k(10β − t0))), official constants: small β -> 0, large β -> up_t, β = t0/10 -> up_t/2
    assert filtered_steps(0.0, 10) == 0
    assert filtered_steps(1.0, 10) == 10
    assert filtered_steps(0.5333, 10) == 5
    assert filtered_steps(0.55, 10) == round(10 / (1 + np.exp(-5 * (5.5 - 5.333))))


# ---------------------------------------------------------------------------- on a tiny model
@pytest.fixture(scope="module")
def data():
    return load_visual(VisualWorldConfig(size=8, renders_per_concept=1, holdout_per_concept=0), max_prompts=6)


@pytest.fixture(scope="module")
def base(data, make_image_adapter):
    return make_image_adapter(data.world)


PROMPTS = ["a striped red circle", "a banded crimson disc", "a solid blue square"]


def test_filter_on_a_model_projects_triggers_out_of_the_keyword_subspace(base):
    g = SAFREEAdapter(base, KEYWORDS)
    f = g.filter(PROMPTS, steps=20)
    trig = f["triggers"]
    assert trig.any()
    assert not trig[:, 0].any()  # BOS, EOS and padding are never triggers
    C = g.concept_basis().double()  # (d, K)
    rows = f["filtered"][trig].double()
    assert (rows @ C).abs().max() < 1e-4 * C.norm()
    assert torch.equal(f["filtered"][~trig], f["embeds"][~trig])
    assert ((f["n_steps"] > 0) == trig.any(-1)).all() and (f["n_steps"] <= 20).all()
    g2 = SAFREEAdapter(base, KEYWORDS, SAFREEConfig(self_validation=False))
    assert (g2.filter(PROMPTS, steps=20)["n_steps"] == 20 * trig.any(-1)).all()


def test_filter_following_projects_every_position_after_the_first_trigger(base):
    f = SAFREEAdapter(base, KEYWORDS).filter(PROMPTS, steps=20)
    g = SAFREEAdapter(base, KEYWORDS, SAFREEConfig(filter_following=True)).filter(PROMPTS, steps=20)
    for i in range(len(PROMPTS)):
        row = f["triggers"][i]
        if not row.any():
            assert not g["triggers"][i].any()
            continue
        first = int(row.nonzero()[0])
        assert g["triggers"][i, first:].all() and not g["triggers"][i, :first].any()
    assert torch.equal(g["filtered"][~g["triggers"]], g["embeds"][~g["triggers"]])


def test_no_trigger_prompts_sample_bit_identical(base):
    guard = SAFREEAdapter(base, KEYWORDS, SAFREEConfig(alpha=100.0))  # nothing is a trigger
    assert np.array_equal(guard.sample(PROMPTS, seed=3, steps=3), base.sample(PROMPTS, seed=3, steps=3))
    assert guard.counts == {"prompts": 3, "triggered": 0, "trigger_tokens": 0}
    # single-word prompts have no trigger under the default α (no other token to compare with)
    guard = SAFREEAdapter(base, KEYWORDS)
    assert np.array_equal(guard.sample(["blue", "circle"], seed=1, steps=3), base.sample(["blue", "circle"], seed=1,
                                                                                          steps=3))
    # in a mixed batch the rows without triggers are bit-identical to the base model's
    mixed = ["a striped red circle", "blue"]
    out, ref = guard.sample(mixed, seed=5, steps=3), base.sample(mixed, seed=5, steps=3)
    assert guard.last_filter[0]["trigger_words"] and not guard.last_filter[1]["trigger_words"]
    assert np.array_equal(out[1], ref[1]) and not np.array_equal(out[0], ref[0])


def _ddim_by_hand(ad, filtered, original, n_steps, seeds, steps, guidance):
    """DDIM + CFG written out: prompt b is conditioned on filtered[b] for its first n_steps[b] steps."""
    from diffusers import DDIMScheduler

    from unlearn.adapters.image import tensor_to_images

    ddim = DDIMScheduler.from_config(ad.scheduler.config)
    ddim.set_timesteps(steps)
    x = torch.stack([torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = x * ddim.init_noise_sigma
    uncond = ad.encode_prompts(ad.tokenize([""])).expand_as(original)
    for i, t in enumerate(ddim.timesteps):
        cond = torch.stack([filtered[b] if i < int(n_steps[b]) else original[b] for b in range(len(seeds))])
        tt = torch.full((2 * len(seeds),), int(t), dtype=torch.long)
        e_u, e_c = ad.unet(torch.cat([x, x]), tt, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        x = ddim.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return tensor_to_images(x)


@torch.no_grad()
def test_step_switch_matches_a_hand_written_sampler(base):
    guard = SAFREEAdapter(base, KEYWORDS)
    f = guard.filter(PROMPTS[:2], steps=4)
    n = torch.tensor([1, 3])
    got = guard.sample_switched(PROMPTS[:2], f["embeds"], f["filtered"], n, seed=[7, 8], steps=4, guidance=3.0)
    ref = _ddim_by_hand(base, f["filtered"], f["embeds"], n, [7, 8], 4, 3.0)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    # all steps filtered == the base sampler on the filtered condition; none == the base sampler
    all_f = guard.sample_switched(PROMPTS[:2], f["embeds"], f["filtered"], torch.tensor([4, 4]), seed=7, steps=4)
    assert np.array_equal(all_f, base.sample(PROMPTS[:2], seed=7, steps=4, prompt_embeds=f["filtered"]))
    none = guard.sample_switched(PROMPTS[:2], f["embeds"], f["filtered"], torch.tensor([0, 0]), seed=7, steps=4)
    assert np.array_equal(none, base.sample(PROMPTS[:2], seed=7, steps=4))
    assert guard._switch is None
    # sample() uses the filter's own schedule
    guard2 = SAFREEAdapter(base, KEYWORDS)
    f20 = guard2.filter(PROMPTS, steps=4)
    assert np.array_equal(guard2.sample(PROMPTS, seed=2, steps=4),
                          guard2.sample_switched(PROMPTS, f20["embeds"], f20["filtered"], f20["n_steps"], seed=2,
                                                 steps=4))


def test_reattend_matches_a_hand_fourier_filter():
    """Low band (the 2x2 centre of the shifted 6x6 spectrum): a filtered-branch coefficient whose
    real part is >= the original's is scaled by s (official rule: set to s); the rest is kept."""
    g = torch.Generator().manual_seed(0)
    hp, ho = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, 6, 6, generator=g)
    fp = np.fft.fftshift(np.fft.fft2(hp.numpy().astype(np.float64)), axes=(-2, -1))
    fo = np.fft.fftshift(np.fft.fft2(ho.numpy().astype(np.float64)), axes=(-2, -1))
    for rule in ("scale", "official"):
        want = fp.copy()
        for r in (2, 3):
            for c in (2, 3):
                damp = (fo[..., r, c] - fp[..., r, c]).real <= 0
                new = fp[..., r, c] * 0.3 if rule == "scale" else np.full_like(fp[..., r, c], 0.3)
                want[..., r, c] = np.where(damp, new, fp[..., r, c])
        ref = np.fft.ifft2(np.fft.ifftshift(want, axes=(-2, -1))).real
        got = reattend(hp, ho, 0.3, threshold=1, rule=rule)
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    # scale 1, or an original branch stronger everywhere in the band: the features come back unchanged
    torch.testing.assert_close(reattend(hp, ho, 1.0), hp, rtol=0, atol=1e-5)
    bump = fp.copy()
    bump[..., 2:4, 2:4] += 1000.0  # every band coefficient's real part larger on the original branch
    strong = torch.from_numpy(np.fft.ifft2(np.fft.ifftshift(bump, axes=(-2, -1))).real.astype(np.float32))
    torch.testing.assert_close(reattend(hp, strong, 0.0), hp, rtol=0, atol=1e-4)
    # the same map on both branches: its low band (the mean included) is damped
    assert abs(float(reattend(hp + 5.0, hp + 5.0, 0.0).mean())) < 1e-4
    with pytest.raises(ValueError, match="one shape"):
        reattend(hp, ho[:1], 0.5)
    with pytest.raises(ValueError, match="safree.lra_scales"):
        SAFREEConfig(lra_scales=[0.9])
    with pytest.raises(ValueError, match="safree.lra_rule"):
        SAFREEConfig(lra_rule="freeu")


@torch.no_grad()
def test_latent_reattention_rewrites_the_filtered_rows_skip_features(base):
    """Inside a switched sample, the skip features up_blocks[0] reads for a filtered row equal
    reattend(features under the filtered condition, features under the original condition),
    both taken from plain UNet passes here; the unconditional rows and rows past their filtered
    steps read their own features unchanged."""
    cfg = SAFREEConfig(latent_reattention=True, lra_scales=[0.0, 0.0])
    guard = SAFREEAdapter(base, KEYWORDS, cfg)
    f = guard.filter(PROMPTS[:2], steps=4)
    n = 2
    x = torch.randn(2 * n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((2 * n,), 900, dtype=torch.long)
    uncond = base.encode_prompts(base.tokenize([""])).expand_as(f["embeds"])
    cond = torch.cat([uncond, f["filtered"]])
    block = base.unet.up_blocks[0]
    seen = {}

    def grab(key):
        def hook(module, args, kwargs):
            seen[key] = kwargs["res_hidden_states_tuple"][-1].clone()
        return hook

    for key, c in (("proj", cond), ("orig", torch.cat([uncond, f["embeds"]]))):
        h = block.register_forward_pre_hook(grab(key), with_kwargs=True)
        base.noise_pred(x, t, c)
        h.remove()
    first = block.resnets[0]
    got = {}
    def res_in(module, args):  # the resnet reads cat([hidden, skip]): the skip is the last channels
        got["res"] = args[0][:, -seen["proj"].shape[1]:].clone()

    h = first.register_forward_pre_hook(res_in)
    # t_last = each prompt's smallest filtered timestep: at t=900 prompt 0 is still filtered, prompt 1 is past
    guard._switch = (f["embeds"], torch.tensor([800, 1000]))
    try:
        out = guard.noise_pred(x, t, cond)
    finally:
        guard._switch = None
        h.remove()
    want = seen["proj"].clone()
    want[3] = seen["orig"][3]  # prompt 1 (row 3) switched back to the original condition
    want[2] = reattend(seen["proj"][2:3], seen["orig"][2:3], 0.0)[0]
    torch.testing.assert_close(got["res"], want, rtol=0, atol=1e-5)
    assert not torch.allclose(want[2], seen["proj"][2], atol=1e-3)  # the filter did something
    plain = SAFREEAdapter(base, KEYWORDS)
    plain._switch = (f["embeds"], torch.tensor([800, 1000]))
    try:
        ref = plain.noise_pred(x, t, cond)
    finally:
        plain._switch = None
    keep = [0, 1, 3]  # the unconditional rows and the switched-back row
    torch.testing.assert_close(out[keep], ref[keep], rtol=0, atol=1e-6)
    assert not torch.allclose(out[2], ref[2], atol=1e-4)


def test_latent_reattention_sampling_leaves_untriggered_prompts_alone(base):
    mixed = ["a striped red circle", "blue"]
    on = SAFREEAdapter(base, KEYWORDS, SAFREEConfig(latent_reattention=True, lra_scales=[0.0, 0.0]))
    off = SAFREEAdapter(base, KEYWORDS)
    a, b = on.sample(mixed, seed=5, steps=3), off.sample(mixed, seed=5, steps=3)
    assert np.array_equal(a[1], base.sample(mixed, seed=5, steps=3)[1])
    assert not np.array_equal(a[0], b[0])
    unit = SAFREEAdapter(base, KEYWORDS, SAFREEConfig(latent_reattention=True, lra_scales=[1.0, 1.0]))
    assert np.abs(unit.sample(mixed, seed=5, steps=3).astype(int) - b.astype(int)).max() <= 1


def test_save_load_roundtrip(base, tmp_path):
    guard = SAFREEAdapter(base, KEYWORDS, SAFREEConfig(alpha=0.02))
    guard.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / WRAPPER_FILE).read_text())
    assert meta["kind"] == "safree" and meta["keywords"] == KEYWORDS and meta["config"]["alpha"] == 0.02
    back = load_safree(tmp_path / "g")
    assert isinstance(back, SAFREEAdapter) and back.fingerprint() == guard.fingerprint()
    assert back.fingerprint() != base.fingerprint()
    assert SAFREEAdapter(base, KEYWORDS, SAFREEConfig(alpha=0.03)).fingerprint() != guard.fingerprint()
    assert np.array_equal(back.sample(PROMPTS, seed=4, steps=3), guard.sample(PROMPTS, seed=4, steps=3))
    assert SAFREEAdapter.load(str(tmp_path / "g")).fingerprint() == guard.fingerprint()
    assert isinstance(load_model(str(tmp_path / "g"), "image"), SAFREEAdapter)  # load_model dispatches to the wrapper
    with pytest.raises(ValueError, match=r"wrapped model .*unlearn.models.load_model"):
        ImageAdapter.load(str(tmp_path / "g"))  # plain models only
    with pytest.raises(ValueError, match="is an image model, but a text model was asked for"):
        load_model(str(tmp_path / "g"), "text")
    ref = guard.reference()
    assert isinstance(ref, SAFREEAdapter) and ref.keywords == KEYWORDS and ref.fingerprint() == guard.fingerprint()


def test_editor_wraps_without_changing_weights(base, data):
    before = base.fingerprint(refresh=True)
    assert default_keywords(data) == ["red", "crimson", "scarlet"]
    res = SAFREE().apply(base, data, EditContext(settings=None, progress=False, eval_batch_size=4))
    assert isinstance(res.adapter, SAFREEAdapter) and res.adapter.keywords == KEYWORDS
    assert base.fingerprint(refresh=True) == before
    assert set(res.info["splits"]) == set(data.eval_splits)
    for v in res.info["splits"].values():
        assert 0 <= v["triggered"] <= 1 and 0 <= v["filtered_share"] <= 1
    res = SAFREE(SAFREEConfig(keywords=["red"])).apply(base, data, EditContext(settings=None, progress=False))
    assert res.adapter.keywords == ["red"]
    with pytest.raises(ValueError, match="already SAFREE-guarded"):
        SAFREEAdapter(res.adapter, KEYWORDS)
    with pytest.raises(ValueError, match="safree.keywords"):
        SAFREEConfig(keywords="red")


# ---------------------------------------------------------------------------- SDXL (two text encoders)
@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from test_latent_pipelines import build_sdxl  # the tiny SDXL-shaped pipeline of the latent tests

    from unlearn.tasks.visual_world import build_visual_world
    from unlearn.zoo.build_t2i import world_tokenizer

    return build_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe", world_tokenizer(build_visual_world(), 24))


@torch.no_grad()
def test_sdxl_projects_the_second_encoders_tokens_out_of_its_concept_subspace(sdxl_dir):
    """SDXL: triggers from text_encoder_2's pooled projection; a trigger's text_encoder_2 columns
    become (I − P_C) P_M e, computed here by hand from masked prompts; the text_encoder columns and
    the pooled row are kept (the official SDXL pipeline); sdxl_encoders=both also projects those."""
    base = load_model(str(sdxl_dir), "image")
    d1 = base.text_encoder.config.hidden_size
    cfg = SAFREEConfig(mask_token_id=1)  # 1 = <unk> in the word-level test tokenizer
    g = SAFREEAdapter(base, KEYWORDS, cfg)
    assert g.trigger_encoder == "text_encoder_2" and g.segments() == [("text_encoder_2", slice(d1, d1 + 32))]
    f = g.filter(PROMPTS, steps=20)
    trig, emb, out = f["triggers"], f["embeds"], f["filtered"]
    assert emb.shape == out.shape == (3, 25, 48) and trig.shape == (3, 24) and trig.any()
    assert torch.equal(out[:, :, :d1], emb[:, :, :d1]) and torch.equal(out[:, -1], emb[:, -1])
    assert torch.equal(out[:, :24][~trig], emb[:, :24][~trig])
    te2 = base.text_encoder_2
    C = te2(input_ids=base._ids_2(base.tokenize(KEYWORDS))).text_embeds.double().T  # (32, K)
    assert (out[:, :24][trig][:, d1:].double() @ C).abs().max() < 1e-4 * C.norm()
    # by hand for the first trigger of prompt 0: P_M from text_encoder_2's pooled masked prompts
    ids = base.tokenize(PROMPTS[:1])
    n_words = int((ids[0] == base.tokenizer.eos_token_id).nonzero()[0]) - 1
    masked = ids.repeat(n_words, 1)
    masked[torch.arange(n_words), torch.arange(1, n_words + 1)] = 1
    M = te2(input_ids=base._ids_2(masked)).text_embeds.double().T  # (32, n_words)
    P_M = M @ torch.linalg.pinv(M.T @ M) @ M.T
    P_C = C @ torch.linalg.pinv(C.T @ C) @ C.T
    i = int(trig[0].nonzero()[0])
    e = emb[0, i, d1:].double()
    assert torch.allclose(out[0, i, d1:].double(), (torch.eye(32, dtype=torch.float64) - P_C) @ P_M @ e, atol=1e-5)
    # both encoders: the same triggers; text_encoder's columns leave its own keyword subspace
    both = SAFREEAdapter(base, KEYWORDS, SAFREEConfig(mask_token_id=1, sdxl_encoders="both")).filter(PROMPTS, 20)
    assert torch.equal(both["triggers"], trig) and torch.equal(both["filtered"][:, :, d1:], out[:, :, d1:])
    C1 = base.text_encoder(input_ids=base.tokenize(KEYWORDS)).pooler_output.double().T  # (16, K)
    rows = both["filtered"][:, :24][trig][:, :d1].double()
    assert (rows @ C1).abs().max() < 1e-4 * C1.norm() and not torch.equal(rows, emb[:, :24][trig][:, :d1].double())
    with pytest.raises(ValueError, match="safree.sdxl_encoders"):
        SAFREEConfig(sdxl_encoders="first")


def test_sdxl_guard_samples_and_leaves_untriggered_prompts_alone(sdxl_dir):
    base = load_model(str(sdxl_dir), "image")
    guard = SAFREEAdapter(base, KEYWORDS, SAFREEConfig(mask_token_id=1, self_validation=False))
    mixed = ["a striped red circle", "blue"]  # a one-word prompt has no trigger
    out, ref = guard.sample(mixed, seed=5, steps=2), base.sample(mixed, seed=5, steps=2)
    assert guard.last_filter[0]["trigger_words"] and not guard.last_filter[1]["trigger_words"]
    assert np.array_equal(out[1], ref[1]) and not np.array_equal(out[0], ref[0])
    f = guard.filter(mixed[:1], steps=2)
    assert np.array_equal(out[:1], base.sample(mixed[:1], seed=5, steps=2, prompt_embeds=f["filtered"]))
    # latent re-attention on SDXL's UNet (pooled condition in added_cond_kwargs): triggered rows change,
    # the untriggered one does not
    lra = SAFREEAdapter(base, KEYWORDS, SAFREEConfig(mask_token_id=1, self_validation=False, latent_reattention=True,
                                                     lra_scales=[0.0, 0.0]))
    out2 = lra.sample(mixed, seed=5, steps=2)
    assert np.array_equal(out2[1], ref[1]) and not np.array_equal(out2[0], out[0])


def test_sdxl_safree_recipe_end_to_end(sdxl_dir, tmp_path):
    """recipes/i2p-tiny-safree.yaml on the tiny SDXL pipeline: the run's checkpoint is a guard
    around the unchanged SDXL model, and the forget prompts are found to carry triggers."""
    import unlearn
    from test_latent_pipelines import _recipe

    from unlearn.evaluators.image_judge import JudgeConfig, train_judge
    from unlearn.tasks.visual_world import build_visual_world

    judge, _ = train_judge(build_visual_world().split("train"), JudgeConfig(epochs=1))
    judge.save(tmp_path / "judge")
    r = _recipe(sdxl_dir, tmp_path / "judge", tmp_path / "run", "safree")
    res = unlearn.run(r, progress=False)
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    assert metrics["summary"]["unlearned"]["erasure_explicit"] is not None
    assert metrics["editor"]["splits"]["forget_explicit"]["triggered"] > 0
    m = load_model(str(res.run_dir / "checkpoint"), "image")
    assert isinstance(m, SAFREEAdapter) and m.is_sdxl and m.base.is_sdxl
    assert m.base.fingerprint() == load_model(str(sdxl_dir), "image").fingerprint()
    assert m.sample(["a red circle"], steps=2).shape == (1, 16, 16, 3)
