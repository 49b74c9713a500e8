"""ImageAdapter on a tiny randomly initialised pixel-space text-to-image model (built in the test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn.adapters.base import Adapter, ImageModel, TextModel
from unlearn.adapters.image import ImageAdapter, images_to_tensor, tensor_to_images
from unlearn.models import load_model
from unlearn.tasks.visual_world import VisualWorldConfig, build_visual_world
from unlearn.zoo.image_models import TinyT2ISpec, build_caption_tokenizer, build_tiny_t2i

SPEC = dict(image_size=8, block_out_channels=(8, 16), attention_head_dim=4, text_hidden_size=16, text_layers=1,
            text_heads=2, num_train_timesteps=50)


@pytest.fixture(scope="module")
def world():
    return build_visual_world(VisualWorldConfig(size=8, renders_per_concept=1, holdout_per_concept=0))


@pytest.fixture(scope="module")
def tok(world):
    return build_caption_tokenizer([it["caption"] for it in world.items] + [r["prompt"] for r in world.prompts])


@pytest.fixture
def adapter(tok):
    unet, te, sched = build_tiny_t2i(TinyT2ISpec(**SPEC), tok, seed=0)
    unet.eval()
    te.eval()
    return ImageAdapter(unet, te, tok, sched, timesteps_per_item=2)


def test_tokenizer_frames_and_pads(tok):
    ids = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length)["input_ids"][0]
    assert ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id and ids[5:] == [tok.pad_token_id] * (len(ids) - 5)
    assert tok.eos_token_id != 2  # CLIPTextModel's legacy pooling path
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["a", "red", "circle"]


def test_image_tensor_roundtrip(world):
    imgs = np.stack([it["image"] for it in world.items[:3]])
    x = images_to_tensor(imgs)
    assert x.shape == (3, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(tensor_to_images(x), imgs)


def test_loss_finite_and_seed_deterministic(adapter, world):
    items = world.split("train")[:4]
    with torch.no_grad():
        l0, n0 = adapter.item_loss(adapter.collate(items, seed=0))
        l0b, _ = adapter.item_loss(adapter.collate(items, seed=0))
        l1, _ = adapter.item_loss(adapter.collate(items, seed=1))
        # an item's noise does not depend on its batch: the same item alone gives the same loss
        solo, _ = adapter.item_loss(adapter.collate(items[2:3], seed=0))
    assert l0.shape == (4,) and torch.isfinite(l0).all() and (l0 > 0).all()
    assert n0.tolist() == [2, 2, 2, 2]
    assert torch.equal(l0, l0b)
    assert not torch.allclose(l0, l1)
    torch.testing.assert_close(solo[0], l0[2], rtol=1e-5, atol=1e-6)


def test_loss_equals_hand_computation(adapter, world):
    """item_loss == Σ_k mean((ε_θ(sqrt(ᾱ_t) x0 + sqrt(1−ᾱ_t) ε, c, t) − ε)²) computed by hand."""
    items = world.split("train")[:2]
    batch = adapter.collate(items, seed=5)
    with torch.no_grad():
        loss, _ = adapter.item_loss(batch)
        acp = adapter.scheduler.alphas_cumprod
        cond = adapter.text_encoder(input_ids=batch["input_ids"]).last_hidden_state
        for i in range(2):
            tot = 0.0
            for k in range(2):
                t = batch["timesteps"][i, k]
                eps = batch["noise"][i, k]
                x_t = acp[t].sqrt() * batch["pixel_values"][i] + (1 - acp[t]).sqrt() * eps
                pred = adapter.unet(x_t[None], t[None], encoder_hidden_states=cond[i:i + 1]).sample[0]
                tot += ((pred - eps) ** 2).mean()
            torch.testing.assert_close(loss[i], tot, rtol=1e-5, atol=1e-6)


def test_loss_is_differentiable(adapter, world):
    adapter.model.train()
    loss, _ = adapter.item_loss(adapter.collate(world.split("train")[:2]))
    loss.mean().backward()
    grads = {n: p.grad for n, p in adapter.model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "attn2.to_k" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("text_encoder."))


def test_parameter_groups_disjoint_and_named(adapter):
    g = adapter.parameter_groups()
    allp = {n for n, _ in adapter.model.named_parameters()}
    kv, ca, nca = set(g["cross_attention_kv"]), set(g["cross_attention"]), set(g["non_cross_attention"])
    unet, te = set(g["unet"]), set(g["text_encoder"])
    assert kv and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in kv)
    assert len(kv) == 2 * 4  # 1 down + 1 mid + 2 up cross-attention layers, K and V each
    assert kv < ca and all(".attn2." in n for n in ca)
    assert not ca & nca and ca | nca == unet
    assert not unet & te and unet | te == allp
    assert all(n.startswith("text_encoder.") for n in te) and te
    assert set(g["time_embedding"]) <= nca and g["time_embedding"]


def test_reference_is_frozen_copy(adapter, world):
    ref = adapter.reference()
    assert all(not p.requires_grad for p in ref.model.parameters())
    assert ref.fingerprint() == adapter.fingerprint()
    with torch.no_grad():
        next(adapter.model.parameters()).add_(1.0)
    assert adapter.fingerprint(refresh=True) != ref.fingerprint(refresh=True)


def test_save_load_roundtrip(adapter, world, tmp_path):
    adapter.save(tmp_path / "m")
    assert list((tmp_path / "m" / "unet").glob("*.safetensors"))
    assert list((tmp_path / "m" / "text_encoder").glob("*.safetensors"))
    assert not list((tmp_path / "m").rglob("*.bin"))
    back = ImageAdapter.load(str(tmp_path / "m"))
    assert back.fingerprint() == adapter.fingerprint() and back.timesteps_per_item == 2
    items = world.split("train")[:3]
    with torch.no_grad():
        a, _ = adapter.item_loss(adapter.collate(items, seed=3))
        b, _ = back.item_loss(back.collate(items, seed=3))
    assert torch.equal(a, b)
    assert np.array_equal(adapter.sample(["a red circle"], seed=1, steps=3),
                          back.sample(["a red circle"], seed=1, steps=3))
    with pytest.raises(ValueError, match="image_adapter.json is missing"):
        ImageAdapter.load(str(tmp_path))
    via = load_model(str(tmp_path / "m"), "image", timesteps_per_item=3)  # the one entry point, same model
    assert type(via) is ImageAdapter and via.fingerprint() == adapter.fingerprint() and via.timesteps_per_item == 3
    with pytest.raises(ValueError, match="is an image model, but a text model was asked for"):
        load_model(str(tmp_path / "m"), "text")
    with pytest.raises(ValueError, match="image_adapter.json is missing"):
        load_model(str(tmp_path), "image")


def test_image_adapter_implements_the_image_contract(adapter):
    assert isinstance(adapter, ImageModel) and isinstance(adapter, Adapter) and not isinstance(adapter, TextModel)
    assert adapter.modality == "image" and not ImageAdapter.__abstractmethods__
    assert ImageAdapter.item_nll is ImageAdapter.item_loss  # the contract name and the image name agree
    assert isinstance(adapter.reference(), ImageAdapter)


def test_sample_shape_and_determinism(adapter):
    prompts = ["a red circle", "a blue square", ""]
    a = adapter.sample(prompts, seed=[7, 8, 9], steps=4, guidance=3.0)
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a, adapter.sample(prompts, seed=[7, 8, 9], steps=4, guidance=3.0))
    # per-prompt seeds: the first image does not depend on the rest of the batch
    assert np.array_equal(a[:1], adapter.sample(prompts[:1], seed=[7], steps=4, guidance=3.0))
    assert not np.array_equal(a[:1], adapter.sample(prompts[:1], seed=[70], steps=4, guidance=3.0))
    # guidance matters (the conditional and unconditional predictions differ)
    assert not np.array_equal(a[:1], adapter.sample(prompts[:1], seed=[7], steps=4, guidance=0.0))
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        adapter.sample(prompts, seed=[1, 2])


def test_collate_errors(adapter, world):
    with pytest.raises(ValueError, match="empty"):
        adapter.collate([])
    with pytest.raises(ValueError, match="no 'caption' field"):
        adapter.collate([{"image": world.items[0]["image"]}])
    with pytest.raises(ValueError, match="one target"):
        adapter.collate(world.items[:1], answer_key="paraphrased_answer")
    big = build_visual_world(VisualWorldConfig(size=16, renders_per_concept=1, holdout_per_concept=0))
    with pytest.raises(ValueError, match="UNet expects 8x8"):
        adapter.collate(big.items[:1])


@pytest.mark.parametrize("objective", ["grad_ascent", "grad_diff", "npo"])
def test_core_objectives_run_unchanged(objective, tok, world):
    """GradAscent / GradDiff / NPO and the trainer work on the image adapter as written for text:
    three epochs raise the forget items' denoising loss."""
    from unlearn.objectives.grad_ascent import GradAscent
    from unlearn.objectives.grad_diff import GradDiff
    from unlearn.objectives.npo import NPO
    from unlearn.trainer import TrainSettings, train

    obj = {"grad_ascent": GradAscent, "grad_diff": GradDiff, "npo": NPO}[objective]()
    unet, te, sched = build_tiny_t2i(TinyT2ISpec(**SPEC), tok, seed=0)
    ad = ImageAdapter(unet, te, tok, sched)
    forget, retain = world.split("forget")[:16], world.split("retain")[:16]
    obj.setup(ad, ad.reference(), forget)
    batch = ad.collate(forget[:8], indices=list(range(8)))
    with torch.no_grad():
        before, _ = ad.item_loss(batch)
    log = train(ad, obj, forget, retain, TrainSettings(epochs=3, lr=1e-3, batch_size=8), progress=False)
    with torch.no_grad():
        after, _ = ad.item_loss(batch)
    assert log.steps == 6 and after.mean() > before.mean() * 1.05
