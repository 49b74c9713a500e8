"""NeMo (unlearn/editors/nemo.py): activations, z-scores and SSIM by hand, the search (|z| and top-k)
finds exactly the planted neurons, the noise check is the first step's prediction, masking equals
zeroing the rows and only those rows change, the editor zeroes the union it reports, the
memorised-pairs files (scripts/memorisation.py) and the checked settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _scripts import load_script

from unlearn.editors import EDITORS, EditContext
from unlearn.editors.nemo import (NeMo, NeMoConfig, candidates, deactivate, first_step_noise_diff, load_memorised,
                                  mask_value_neurons, max_pairwise_ssim, near_copy_similarity, outliers, prompt_check,
                                  search_neurons, ssim, value_activations, value_layers, z_scores)
from unlearn.trainer import TrainSettings


def _script():
    return load_script("memorisation")


@pytest.fixture(scope="module")
def tiny():
    """A tiny random ImageAdapter over a few world words."""
    from unlearn.adapters.image import ImageAdapter
    from unlearn.zoo.image_models import TinyT2ISpec, build_caption_tokenizer, build_tiny_t2i

    torch.set_num_threads(1)
    words = "a red blue green yellow circle square cross triangle solid striped dotted picture of".split()
    tok = build_caption_tokenizer([" ".join(words)])
    spec = TinyT2ISpec(image_size=8, block_out_channels=(8, 16), attention_head_dim=4, text_hidden_size=16,
                       text_layers=1, text_heads=2, num_train_timesteps=50)
    unet, te, sched = build_tiny_t2i(spec, tok, seed=0)
    return ImageAdapter(unet, te, tok, sched), words


def test_value_activations_equal_the_hand_computation(tiny):
    ad, _ = tiny
    prompts = ["a red circle", "a picture of a blue square"]
    acts = value_activations(ad, prompts, tokens="prompt")
    every = value_activations(ad, prompts)  # tokens="all": every position of the padded sequence (official)
    layers = value_layers(ad.unet)
    assert set(acts) == set(layers) and all(a.shape == (2, layers[n].out_features) for n, a in acts.items())
    ids = ad.tokenize(prompts)
    emb = ad.token_embeddings(ids).detach()
    for n, lin in layers.items():
        for b, p in enumerate(prompts):
            t = len(p.split()) + 2  # BOS, the words, EOS
            want = (emb[b, :t] @ lin.weight.detach().T).abs().mean(0)
            torch.testing.assert_close(acts[n][b], want, rtol=1e-5, atol=1e-6)
            want = (emb[b] @ lin.weight.detach().T).abs().mean(0)
            torch.testing.assert_close(every[n][b], want, rtol=1e-5, atol=1e-6)
    down_mid = value_layers(ad.unet, "down_mid")
    assert down_mid and set(down_mid) < set(layers) and all(n.startswith(("down_blocks.", "mid_block."))
                                                             for n in down_mid)
    assert set(value_activations(ad, prompts, layers="down_mid")) == set(down_mid)
    ref = {n: torch.tensor([[1.0, 2.0], [3.0, 6.0]]) for n in ["l"]}
    z = z_scores({"l": torch.tensor([[2.0, 4.0 + 3 * 8 ** 0.5]])}, ref)  # μ = (2, 4), σ = (√2, √8)
    torch.testing.assert_close(z["l"], torch.tensor([[0.0, 3.0]]))


def test_search_finds_exactly_the_planted_neurons():
    """Planted: neurons 1 and 4 of layer A and 2 of layer B carry the memorisation (score 1 until all
    three are off, then 0); layer A's neuron 0 is a larger outlier that does not matter, layer C's
    neuron 3 a smaller one, and A's neuron 3 a negative outlier (|z| counts)."""
    planted = {("A", 1), ("A", 4), ("B", 2)}
    z = {"A": torch.tensor([5.5, 6.0, 0.1, -3.6, 4.6, 0.0]), "B": torch.tensor([0.0, 1.0, 3.2, 0.0]),
         "C": torch.tensor([0.0, 0.0, 0.0, 3.1])}
    acts = {n: torch.zeros_like(v) for n, v in z.items()}
    calls = []

    def score(neurons):
        calls.append(neurons)
        off = {(n, j) for n, idx in neurons.items() for j in idx}
        return 0.0 if planted <= off else 1.0

    cfg = NeMoConfig(top_k=False, theta_step=0.5, ssim_threshold=0.5)
    r = search_neurons(z, acts, score, cfg)
    assert r["neurons"] == {"A": [1, 4], "B": [2]} and r["removed"] and r["score"] == 0.0
    assert r["theta"] == 3.0 and r["k"] == 4 and r["initial"] == 6  # |z| > 3: A0, A1, A3, A4, B2, C3
    assert r["checks"] == len(calls) and calls[0] == {"A": [0, 1]}  # θ = 5 first
    assert outliers(z, 3.5) == {"A": [0, 1, 3, 4]}
    # without refinement the distractors stay
    assert search_neurons(z, acts, score, NeMoConfig(top_k=False, theta_step=0.5, refine=False, ssim_threshold=0.5)
                          )["neurons"] == {"A": [0, 1, 3, 4], "B": [2], "C": [3]}
    # top-k: each layer's k most active neurons join at step k (k = 0 at θ = 5); B's neuron 2 is the most active
    # of B, so with its z lowered below every θ it is still found, at the second step
    z2 = {**z, "B": torch.tensor([0.0, 1.0, 0.5, 0.0])}
    acts2 = {**acts, "B": torch.tensor([0.1, 0.2, 9.0, 0.3])}
    assert candidates(z2, acts2, 4.75, 1)["B"] == [2]
    assert search_neurons(z2, acts2, score, NeMoConfig(top_k=False, ssim_threshold=0.5))["removed"] is False
    r2 = search_neurons(z2, acts2, score, NeMoConfig(ssim_threshold=0.5))
    assert r2["removed"] and r2["theta"] == 4.5 and r2["k"] == 2 and r2["neurons"] == {"A": [1, 4], "B": [2]}
    # nothing helps: `keep` refines the last (largest) set against its own score; `drop` gives up
    keep = search_neurons(z, acts, lambda n: 1.0, cfg)
    assert not keep["removed"] and keep["theta"] == 1.0 and keep["score"] == 1.0
    assert keep["neurons"] == outliers(z, 1.0)  # no layer or neuron can go back on: the score never drops below 1
    drop = search_neurons(z, acts, lambda n: 1.0, NeMoConfig(top_k=False, theta_step=0.5, on_failure="drop"))
    assert drop["neurons"] == {} and drop["theta"] is None and not drop["removed"]


def test_ssim_equals_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 5, 5, generator=g), torch.rand(2, 3, 5, 5, generator=g)
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    # a 5 x 5 image and a 5-wide window: one position, the Gaussian-weighted statistics of the whole image
    x = torch.arange(5, dtype=torch.float64) - 2
    w = torch.exp(-x ** 2 / (2 * 1.5 ** 2))
    w = (w[:, None] * w[None, :]) / (w.sum() ** 2)
    want = []
    for i in range(2):
        per = []
        for c in range(3):
            p, q = a[i, c].double(), b[i, c].double()
            mp, mq = (w * p).sum(), (w * q).sum()
            vp, vq, cv = (w * p * p).sum() - mp ** 2, (w * q * q).sum() - mq ** 2, (w * p * q).sum() - mp * mq
            per.append(((2 * mp * mq + 1e-4) * (2 * cv + 9e-4)) / ((mp ** 2 + mq ** 2 + 1e-4) * (vp + vq + 9e-4)))
        want.append(sum(per) / 3)
    torch.testing.assert_close(ssim(a, b), torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ssim needs two"):
        ssim(a, b[:1])
    d = torch.stack([a[0], a[0], b[0]])  # seeds 0 and 1 agree
    best = max_pairwise_ssim(d)
    torch.testing.assert_close(best[:2], torch.ones(2))
    assert best[2] == pytest.approx(float(ssim(a[:1], b[:1])), abs=1e-6)  # its best partner: either copy of a[0]


def test_the_noise_check_is_the_first_steps_prediction(tiny):
    """d = ε(x_T, c) − x_T at the first DDIM step, min-max scaled; the score with nothing masked is
    SSIM(d, d) = 1 on the memorised seeds, and masking every value neuron changes it."""
    from diffusers import DDIMScheduler

    ad, _ = tiny
    d = first_step_noise_diff(ad, "a red circle", [3, 4], steps=5)
    ddim = DDIMScheduler.from_config(ad.scheduler.config)
    ddim.set_timesteps(5)
    x = torch.stack([torch.randn(ad.noise_shape, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    with torch.no_grad():
        cond = ad.encode_prompts(ad.tokenize(["a red circle"] * 2))
        raw = ad.noise_pred(x, torch.full((2,), int(ddim.timesteps[0])), cond) - x
    lo, hi = raw.amin((2, 3), keepdim=True), raw.amax((2, 3), keepdim=True)
    torch.testing.assert_close(d, (raw - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    assert d.shape == (2, *ad.noise_shape) and float(d.min()) == 0.0 and float(d.max()) == pytest.approx(1.0)
    cfg = NeMoConfig(seeds=4, sample_steps=5, ssim_threshold=-1.0)  # every seed counts as memorised
    rec, score = prompt_check(ad, "a red circle", None, cfg)
    assert rec["memorised"] and rec["memorised_seeds"] == 4
    assert score({}) == pytest.approx(1.0, abs=1e-6)
    assert score({n: list(range(m.out_features)) for n, m in value_layers(ad.unet).items()}) < 0.999
    rec, _ = prompt_check(ad, "a red circle", None, NeMoConfig(seeds=4, sample_steps=5, ssim_threshold=1.0))
    assert not rec["memorised"] and rec["memorised_seeds"] == 0


def test_planted_outlier_neurons_are_found_on_a_model(tiny):
    """Rows of W_v that respond to a memorised prompt's own token: the z-scores single them out."""
    ad, words = tiny
    ad = ad.reference()
    layers = value_layers(ad.unet)
    name = sorted(layers)[0]
    mem = "dotted cross yellow"  # a word order no ordinary prompt has
    ids = ad.tokenize([mem])
    emb = ad.token_embeddings(ids).detach()[0, :5]  # BOS dotted cross yellow EOS
    u = emb[3] - emb.mean(0)  # "yellow" after "dotted cross" (causal encoder)
    with torch.no_grad():
        for j in (2, 5):
            layers[name].weight[j] += 20.0 * u / u.norm()
    ref = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "triangle")]
    ref += [f"a {t} {c} {s}" for t in ("solid", "striped") for c in ("red", "blue") for s in ("circle", "cross")]
    z = z_scores(value_activations(ad, [mem], tokens="prompt"), value_activations(ad, ref, tokens="prompt"))
    top = outliers({n: v[0] for n, v in z.items()}, 5.0)
    assert name in top and {2, 5} <= set(top[name]), top


def test_deactivating_changes_only_those_rows_and_equals_masking(tiny):
    ad, _ = tiny
    ad = ad.reference()
    neurons = {n: [0, 3] for n in sorted(value_layers(ad.unet))[:2]}
    with mask_value_neurons(ad, neurons):
        masked = ad.sample(["a red circle", "a blue square"], seed=0, steps=3)
    plain = ad.sample(["a red circle", "a blue square"], seed=0, steps=3)
    before = {n: p.detach().clone() for n, p in ad.model.named_parameters()}
    edited = deactivate(ad, neurons)
    assert sorted(edited) == sorted(f"unet.{n}.weight" for n in neurons)
    for n, p in ad.model.named_parameters():
        if n in edited:
            layer = n[len("unet."):-len(".weight")]
            rows = torch.zeros(p.shape[0], dtype=torch.bool)
            rows[neurons[layer]] = True
            assert (p[rows] == 0).all() and torch.equal(p[~rows], before[n][~rows])
        else:
            assert torch.equal(p, before[n]), n
    np.testing.assert_array_equal(ad.sample(["a red circle", "a blue square"], seed=0, steps=3), masked)
    assert not np.array_equal(plain, masked)
    with pytest.raises(ValueError, match="is not a cross-attention value layer"):
        deactivate(ad, {"unet.nothing": [0]})


def test_near_copy_similarity_and_the_memorised_files(tmp_path):
    from unlearn.tasks.visual_world import build_visual_world
    from unlearn.zoo.image_models import build_caption_tokenizer

    script = _script()
    world = build_visual_world()
    caps, imgs = script.memorised_pairs(world, 4, seed=0)
    assert len(set(caps)) == 4 and imgs.shape == (4, 16, 16, 3) and imgs.dtype == np.uint8
    vocab = {w for it in world.items for w in it["caption"].split()}
    assert all(set(c.split()) <= vocab for c in caps)  # the tokenizer knows every word
    assert not {it["caption"] for it in world.items} & set(caps)
    tok = build_caption_tokenizer([it["caption"] for it in world.items] + ["tone bands"])
    rare = script.rare_words(world, tok)
    train_words = {w for it in world.split("train") for w in it["caption"].split()}
    assert {"bands", "tone"} <= set(rare) and not set(rare) & train_words  # known to the tokenizer, never trained
    rcaps, _ = script.memorised_pairs(world, 4, seed=0, rare=["bands", "tone"])
    assert [[w for w in c.split() if w in rare] for c in rcaps] == [["bands"], ["tone"], ["bands"], ["tone"]]
    with pytest.raises(ValueError, match=r"rare=\[\]: give at least one rare word"):
        script.memorised_pairs(world, 4, rare=[])
    sims = near_copy_similarity(np.stack([imgs[0], 255 - imgs[0], imgs[1]]), imgs[0])
    assert sims[0] == pytest.approx(1.0, abs=1e-5) and sims[1] == pytest.approx(-1.0, abs=1e-5) and abs(sims[2]) < 0.6
    script.write_memorised(tmp_path, caps, imgs)
    c2, i2 = load_memorised(tmp_path)
    assert c2 == caps and np.array_equal(i2, imgs)
    with pytest.raises(ValueError, match="nemo.memorised='.*nowhere': needs memorised.json"):
        load_memorised(tmp_path / "nowhere")


def test_bad_settings_are_named(tiny):
    with pytest.raises(ValueError, match="nemo.theta_min=6.0 is above nemo.theta_start=5.0"):
        NeMoConfig(theta_min=6.0)
    with pytest.raises(ValueError, match=r"nemo.theta_min=-1.0: must be a finite number >= 0"):
        NeMoConfig(theta_min=-1.0)
    assert NeMoConfig(theta_min=0.0).theta_min == 0.0
    with pytest.raises(ValueError, match="nemo.similarity='sscd': must be one of pixel, judge"):
        NeMoConfig(similarity="sscd")
    with pytest.raises(ValueError, match="nemo.seeds=0: must be an integer >= 1"):
        NeMoConfig(seeds=0)
    with pytest.raises(ValueError, match="nemo.seeds=1: check noise compares seeds with each other"):
        NeMoConfig(seeds=1)
    assert NeMoConfig(seeds=1, check="sample").seeds == 1
    for key, bad, allowed in (("check", "ssim", "noise, sample"), ("layers", "up", "down_mid, all"),
                              ("tokens", "eos", "all, prompt"), ("on_failure", "raise", "keep, drop")):
        with pytest.raises(ValueError, match=f"nemo.{key}='{bad}': must be one of {allowed}"):
            NeMoConfig(**{key: bad})
    with pytest.raises(ValueError, match="nemo.ssim_threshold=2.0: an SSIM"):
        NeMoConfig(ssim_threshold=2.0)
    ad, _ = tiny
    with pytest.raises(ValueError, match="nemo.memorised is empty"):
        NeMo().apply(ad, None, EditContext(settings=TrainSettings(), progress=False))
    assert EDITORS.get("nemo") is NeMo


def test_the_memorisation_statistic_is_the_max_or_the_mean_over_seeds(tiny):
    from unlearn.editors.nemo import memorisation_score

    ad, _ = tiny
    seeds = [0, 1, 2]
    imgs = ad.sample(["a red circle"] * 3, seed=seeds, steps=2)
    target = imgs[1]  # seed 1's own image: similarity 1 for it, less for the others
    sims = near_copy_similarity(imgs, target)
    mx = memorisation_score(ad, "a red circle", target, seeds, steps=2)
    mean = memorisation_score(ad, "a red circle", target, seeds, steps=2, statistic="mean")
    assert mx == pytest.approx(1.0, abs=1e-5) and mean == pytest.approx(float(sims.mean()), abs=1e-6) and mean < mx
    with pytest.raises(ValueError, match="nemo.statistic='median': must be one of max, mean"):
        NeMoConfig(statistic="median")


def test_memorise_trains_only_its_group_keeps_flags_and_stops_on_nan(make_image_adapter):
    from unlearn.tasks.visual_task import load_visual
    from unlearn.tasks.visual_world import VisualWorldConfig

    script = _script()
    world = load_visual(VisualWorldConfig(size=8, renders_per_concept=1, holdout_per_concept=0), eval_splits=()).world
    ad = make_image_adapter(world)
    caps, imgs = script.memorised_pairs(world, 2, seed=0, size=8)
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in ad.model.named_parameters()}
    out = script.memorise(ad, world, caps, imgs, steps=2, batch_size=4, memorised_per_batch=2, group="cross_attention",
                          ema=0.0)
    changed = {k for k, v in ad.model.state_dict().items() if not torch.equal(before[k], v)}
    assert out["steps"] == 2 and changed and changed <= set(ad.parameter_groups()["cross_attention"])
    assert {n: p.requires_grad for n, p in ad.model.named_parameters()} == flags and not ad.model["unet"].training
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    script.memorise(ad, world, caps, imgs, steps=1, batch_size=4, memorised_per_batch=2, group="cross_attention",
                    ema=0.0, optimizer="sgd")
    changed = {k for k, v in ad.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed <= set(ad.parameter_groups()["cross_attention"])
    with pytest.raises(ValueError, match="optimizer='adam': adamw or sgd"):
        script.memorise(ad, world, caps, imgs, steps=1, batch_size=4, memorised_per_batch=2, optimizer="adam")
    assert {n: p.requires_grad for n, p in ad.model.named_parameters()} == flags
    with torch.no_grad():
        ad.model["unet"].conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"memorise at step 1; lower --lr: non-finite loss \(nan\)"):
        script.memorise(ad, world, caps, imgs, steps=1, batch_size=4, memorised_per_batch=2)
    assert {n: p.requires_grad for n, p in ad.model.named_parameters()} == flags


def test_the_editor_zeroes_the_union_it_reports(tiny, tmp_path):
    """NeMo.apply on a memorised directory: every neuron of the reported union has its row zeroed, no
    other parameter changes, and the per-prompt record carries the search's numbers."""
    from types import SimpleNamespace

    ad, _ = tiny
    ad = ad.reference()
    img = ad.sample(["dotted cross yellow"], seed=0, steps=3)
    _script().write_memorised(tmp_path, ["dotted cross yellow"], img)
    data = SimpleNamespace(retain=[{"caption": c} for c in ("a red circle", "a blue square", "a green cross")],
                           forget=[{"caption": "a red square"}])
    before = {n: p.detach().clone() for n, p in ad.model.named_parameters()}
    cfg = NeMoConfig(memorised=str(tmp_path), seeds=3, sample_steps=3, ssim_threshold=-1.0, layers="all")
    r = NeMo(cfg).apply(ad, data, EditContext(settings=TrainSettings(), progress=False))
    info = r.info
    (rec,) = info["per_prompt"]
    assert rec["caption"] == "dotted cross yellow" and rec["memorised"] and rec["memorised_seeds"] == 3
    # with ssim_threshold -1 nothing counts as removed: the largest set (θ = 1, k = 16) is kept and refined
    assert rec["removed"] is False and rec["theta"] == 1.0 and rec["k"] == 16 and rec["checks"] >= 17
    assert info["n_neurons"] == sum(len(v) for v in info["neurons"].values()) > 0
    assert info["reference_prompts"] == 4
    layers = value_layers(ad.unet)
    for n, p in ad.model.named_parameters():
        layer = n[len("unet."):-len(".weight")]
        if layer in info["neurons"]:
            rows = torch.zeros(p.shape[0], dtype=torch.bool)
            rows[info["neurons"][layer]] = True
            assert (p[rows] == 0).all() and torch.equal(p[~rows], before[n][~rows]) and layer in layers
        else:
            assert torch.equal(p, before[n]), n


def test_the_image_grid_places_each_column(tmp_path):
    """save_image_grid (the memorisation script's near_copies.png): column j, row i holds image i of
    column j, upscaled, with white gaps; columns of different shapes are refused."""
    from PIL import Image

    from unlearn.tasks.visual import save_image_grid

    a = np.zeros((2, 3, 3, 3), np.uint8)
    b = np.full((2, 3, 3, 3), 100, np.uint8)
    b[1] = 200
    save_image_grid(tmp_path / "g.png", [a, b], scale=2)
    g = np.asarray(Image.open(tmp_path / "g.png"))
    assert g.shape == (2 * (6 + 2) + 2, 2 * (6 + 2) + 2, 3)
    assert (g[2:8, 2:8] == 0).all() and (g[2:8, 10:16] == 100).all() and (g[10:16, 10:16] == 200).all()
    assert (g[0:2] == 255).all() and (g[:, 8:10] == 255).all()
    with pytest.raises(ValueError, match="columns of one shape"):
        save_image_grid(tmp_path / "h.png", [a, b[:1]])


def test_fresh_model_has_the_zoo_architecture_at_another_text_width():
    """scripts/memorisation.py --from-scratch: a freshly initialised model of the zoo's architecture,
    its text encoder (and the cross-attention input) at --text-width."""
    from unlearn.adapters.image import ImageAdapter

    target = ImageAdapter.load("zoo:tiny-t2i/target")
    fresh = _script().fresh_model(target, 64)
    assert fresh.text_encoder.config.hidden_size == 64 and fresh.unet.config.cross_attention_dim == 64
    assert list(fresh.unet.config.block_out_channels) == list(target.unet.config.block_out_channels)
    assert fresh.tokenizer is target.tokenizer and fresh.image_size == target.image_size
    same = _script().fresh_model(target)
    shapes = {n: p.shape for n, p in same.model.named_parameters()}
    assert shapes == {n: p.shape for n, p in target.model.named_parameters()}
    assert not torch.equal(same.unet.conv_in.weight, target.unet.conv_in.weight)  # not the trained weights
