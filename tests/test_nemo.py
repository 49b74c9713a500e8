"""NeMo (unlearn/editors/nemo.py): activations and z-scores by hand, the search finds exactly the
planted neurons, masking equals zeroing the rows and only those rows change, the memorised-pairs
files (scripts/memorisation.py) and the checked settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from unlearn.editors import EDITORS, EditContext
from unlearn.editors.nemo import (NeMo, NeMoConfig, deactivate, load_memorised, mask_value_neurons,
                                  near_copy_similarity, outliers, search_neurons, value_activations, value_layers,
                                  z_scores)
from unlearn.trainer import TrainSettings

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("memorisation_script", ROOT / "scripts" / "memorisation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    acts = value_activations(ad, prompts)
    layers = value_layers(ad.unet)
    assert set(acts) == set(layers) and all(a.shape == (2, layers[n].out_features) for n, a in acts.items())
    ids = ad.tokenize(prompts)
    emb = ad.token_embeddings(ids).detach()
    for n, lin in layers.items():
        for b, p in enumerate(prompts):
            t = len(p.split()) + 2  # BOS, the words, EOS
            want = (emb[b, :t] @ lin.weight.detach().T).abs().mean(0)
            torch.testing.assert_close(acts[n][b], want, rtol=1e-5, atol=1e-6)
    ref = {n: torch.tensor([[1.0, 2.0], [3.0, 6.0]]) for n in ["l"]}
    z = z_scores({"l": torch.tensor([[2.0, 4.0 + 3 * 8 ** 0.5]])}, ref)  # μ = (2, 4), σ = (√2, √8)
    torch.testing.assert_close(z["l"], torch.tensor([[0.0, 3.0]]))


def test_search_finds_exactly_the_planted_neurons():
    """Planted: neurons 1 and 4 of layer A and 2 of layer B carry the memorisation (it is gone only
    when all three are off); layer A's neuron 0 is a larger outlier that does not matter, and
    layer C's neuron 3 a smaller one."""
    planted = {("A", 1), ("A", 4), ("B", 2)}
    z = {"A": torch.tensor([5.5, 6.0, 0.1, -1.0, 4.6, 0.0]), "B": torch.tensor([0.0, 1.0, 3.2, 0.0]),
         "C": torch.tensor([0.0, 0.0, 0.0, 3.1])}
    calls = []

    def is_memorised(neurons):
        calls.append(neurons)
        off = {(n, j) for n, idx in neurons.items() for j in idx}
        return not planted <= off

    r = search_neurons(z, is_memorised, NeMoConfig())
    assert r["neurons"] == {"A": [1, 4], "B": [2]}
    assert r["theta"] == 3.0 and r["initial"] == 5  # z > 3: A0, A1, A4, B2, C3
    assert r["checks"] == len(calls)
    assert outliers(z, 5.0) == {"A": [0, 1]}
    # without refinement the distractors stay; with nothing that helps the search gives up
    assert NeMoConfig(refine=False) and search_neurons(z, is_memorised, NeMoConfig(refine=False))["neurons"] == {
        "A": [0, 1, 4], "B": [2], "C": [3]}
    none = search_neurons(z, lambda n: True, NeMoConfig())
    assert none["neurons"] == {} and none["theta"] is None


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
    z = z_scores(value_activations(ad, [mem]), value_activations(ad, ref))
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
    with torch.no_grad():
        ad.model["unet"].conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"memorise at step 1; lower --lr: non-finite loss \(nan\)"):
        script.memorise(ad, world, caps, imgs, steps=1, batch_size=4, memorised_per_batch=2)
    assert {n: p.requires_grad for n, p in ad.model.named_parameters()} == flags
