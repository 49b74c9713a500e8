"""Latent diffusion pipelines (Stable Diffusion 1.x / 2.x / SDXL shapes) through the loading code.

Each fixture builds a tiny random pipeline with the real module structure (CLIP text encoder(s),
a UNet2DConditionModel with cross-attention ``attn2``, an AutoencoderKL, the pipeline's scheduler)
from configs, saves it with the diffusers pipeline's ``save_pretrained`` and loads it with
``unlearn.models.load_model(dir, "image")``. The VAE has two blocks (a factor 2): 8x8x4 latents
decode to the 16x16 images the visual world renders and the tiny judge reads.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from unlearn.models import load_model

LATENT = 8  # UNet sample_size; the VAE's factor 2 makes 16x16 images


@pytest.fixture(scope="module")
def world():
    from unlearn.tasks.visual_world import build_visual_world

    return build_visual_world()


@pytest.fixture(scope="module")
def tok(world):
    from unlearn.zoo.build_t2i import world_tokenizer

    return world_tokenizer(world, 24)


def _text_encoder(tok, hidden: int, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **({"projection_dim": projection} if projection else {}))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=2 * LATENT, scaling_factor=scaling_factor)


def build_sd(out, tok, version: str = "1"):
    """SD 1.x (epsilon, PNDM, CLIP 16-dim) or SD 2.x (v-prediction, DDIM, linear projections,
    per-block heads, 32-dim) shaped pipeline saved to ``out``."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    dim = 16 if version == "1" else 32
    te = _text_encoder(tok, dim)
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=dim, norm_num_groups=8,
        **({"attention_head_dim": 4} if version == "1"
           else {"attention_head_dim": (2, 4), "use_linear_projection": True}))
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    # from_config keeps keys the class does not take (clip_sample for PNDM), as SD-1.4's scheduler_config.json has
    sched = (PNDMScheduler.from_config({"skip_prk_steps": True, **common}) if version == "1"
             else DDIMScheduler(prediction_type="v_prediction", **common))
    pipe = StableDiffusionPipeline(vae=_vae(0.18215), text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_sdxl(out, tok):
    """SDXL-shaped pipeline: text encoders of 16 and 32 (projection 32) dims -> cross-attention 48,
    ``addition_embed_type="text_time"``, Euler scheduler; tokenizer_2 pads with another token."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    te, te2 = _text_encoder(tok, 16), _text_encoder(tok, 32, projection=32, seed=3)
    tok2 = copy.deepcopy(tok)
    tok2.pad_token = "<unk>"  # SDXL's tokenizer_2 pads with "!" instead of EOS
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=48, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=_vae(0.13025), text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def pipes(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("pipes")
    return {"sd1": build_sd(d / "sd1", tok, "1"), "sd2": build_sd(d / "sd2", tok, "2"),
            "sdxl": build_sdxl(d / "sdxl", tok)}


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, world):
    from unlearn.evaluators.image_judge import JudgeConfig, train_judge

    d = tmp_path_factory.mktemp("judge")
    judge, _ = train_judge(world.split("train"), JudgeConfig(epochs=2))
    judge.save(d)
    return d


# ---------------------------------------------------------------------------- the adapter
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_pipeline_loads_as_latent_adapter(pipes, world, kind):
    from unlearn.models import source_modality

    a = load_model(str(pipes[kind]), "image", timesteps_per_item=2)
    assert source_modality(str(pipes[kind])) == "image"
    assert a.is_latent and a.is_sdxl == (kind == "sdxl")
    assert a.image_size == 16 and a.noise_shape == (4, LATENT, LATENT) and a.vae_scale_factor == 2
    assert a.scheduler.config.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    items = world.split("train")[:3]
    batch = a.collate(items, seed=0)
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["noise"].shape == (3, 2, 4, LATENT, LATENT)
    with torch.no_grad():
        loss, n = a.item_loss(batch)
        again, _ = a.item_loss(a.collate(items[1:2], seed=0))  # same item, same noise, same latent
    assert loss.shape == (3,) and torch.isfinite(loss).all() and (loss > 0).all() and n.tolist() == [2, 2, 2]
    assert again[0] == pytest.approx(float(loss[1]), rel=1e-5)
    imgs = a.sample(["a red circle", "a blue square"], seed=0, steps=2)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8
    assert np.array_equal(imgs[1], a.sample(["a blue square"], seed=1, steps=2)[0])  # one seed per prompt
    groups = a.parameter_groups()
    kv = groups["cross_attention_kv"]
    assert kv and all(n.startswith("unet.") and (".attn2.to_k." in n or ".attn2.to_v." in n) for n in kv)
    names = {n for n, _ in a.model.named_parameters()}
    assert set(groups["unet"]) | set(groups["text_encoder"]) == names
    assert any(n.startswith("text_encoder_2.") for n in groups["text_encoder"]) == (kind == "sdxl")
    assert not any("vae" in n for n in names)  # the VAE is never trained


def test_velocity_target_for_v_prediction(pipes, world):
    """SD 2.x: the loss compares the UNet's output with the velocity, not the noise."""
    a = load_model(str(pipes["sd2"]), "image")
    batch = a.collate(world.split("train")[:2], seed=0)
    x0 = a.encode_images(batch["pixel_values"])
    eps, t = batch["noise"][:, 0], batch["timesteps"][:, 0]
    v = a.loss_target(x0, eps, t)
    ab = a.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-5)
    with torch.no_grad():
        loss, _ = a.item_loss(batch)
        pred = a.noise_pred(a.scheduler.add_noise(x0, eps, t), t, a.encode_prompts(batch["input_ids"]))
    assert loss == pytest.approx(((pred - v) ** 2).mean(dim=(1, 2, 3)), rel=1e-4)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_sample_matches_diffusers_pipeline(pipes, kind):
    """Parity: our DDIM + CFG sampler equals the diffusers pipeline's with a DDIM scheduler and
    the same start latents (SDXL: pooled embedding and time ids included)."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    a = load_model(str(pipes[kind]), "image")
    pipe = DiffusionPipeline.from_pretrained(str(pipes[kind]), use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(a.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a striped green square"]
    ours = a.sample(prompts, seed=[5, 6], steps=3, guidance=3.0)
    lat = torch.stack([torch.randn(a.noise_shape, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    out = pipe(prompts, num_inference_steps=3, guidance_scale=3.0, latents=lat, output_type="np", height=16,
               width=16).images
    theirs = np.round(out * 255).astype(np.int16)
    assert np.abs(ours.astype(np.int16) - theirs).max() <= 1


def test_save_roundtrip_is_a_pipeline_directory(pipes, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    a = load_model(str(pipes["sdxl"]), "image", timesteps_per_item=3)
    with torch.no_grad():
        a.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight.mul_(0.5)
    a.save(tmp_path / "ck")
    assert not list((tmp_path / "ck").rglob("*.bin"))  # safetensors only
    b = load_model(str(tmp_path / "ck"), "image")
    assert b.fingerprint() == a.fingerprint(refresh=True) and b.timesteps_per_item == 3
    assert b.identity()["vae"] == a.identity()["vae"]
    assert type(b.pipeline_scheduler).__name__ == "EulerDiscreteScheduler"
    assert json.loads((tmp_path / "ck" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "ck"), use_safetensors=True)  # still a pipeline
    assert np.array_equal(a.sample(["a red circle"], steps=2), b.sample(["a red circle"], steps=2))


def test_missing_part_is_named(pipes, tmp_path):
    d = tmp_path / "novae"
    shutil.copytree(pipes["sd1"], d)
    shutil.rmtree(d / "vae")
    with pytest.raises(ValueError, match=r"has no vae/.*save the whole pipeline"):
        load_model(str(d), "image")
    with pytest.raises(ValueError, match="image model"):
        load_model(str(pipes["sd1"]), "text")
    for f in (d / "unet").glob("*.safetensors"):
        f.unlink()
    shutil.copytree(pipes["sd1"] / "vae", d / "vae")
    with pytest.raises(ValueError, match=r"unet of image model.*safetensors only"):
        load_model(str(d), "image")


# ---------------------------------------------------------------------------- methods end to end
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# the shipped recipes, shrunk for a test: few steps, 2 prompt rows per split, 2 DDIM steps
SHRINK = {"esd": {"iterations": 2, "ddim_steps": 3}, "rece": {"epochs": 1, "sample_steps": 2},
          "safree": {"mask_token_id": 1}}  # 1 = <unk> in the word-level test tokenizer


def _recipe(src, judge_dir, out, method: str) -> dict:
    """``recipes/i2p-tiny-<method>.yaml`` with ``model.source`` = the pipeline directory."""
    r = yaml.safe_load((RECIPES / f"i2p-tiny-{method}.yaml").read_text())
    r["model"]["source"] = str(src)
    r["method"].setdefault("params", {}).update(SHRINK.get(method, {}))
    r["train"] = {**r.get("train", {}), "max_steps": 2, "batch_size": 2, "lr": 1e-3}
    r["eval"] = {**r.get("eval", {}), "judge": str(judge_dir), "max_items": 2, "sample_steps": 2, "batch_size": 4}
    r["output"] = {"dir": str(out)}
    return r


def _state(adapter):
    return {n: p.detach().clone() for n, p in adapter.model.named_parameters()}


def _changed(before, after_dir):
    after = _state(load_model(str(after_dir), "image"))
    return {n for n in before if not torch.equal(before[n], after[n])}


METHODS = ["uce", "esd", "rece", "safree", "npo", "grad-ascent"]


@pytest.mark.parametrize("method", METHODS)
def test_sd1_methods_end_to_end(pipes, judge_dir, tmp_path, method):
    import unlearn

    before = _state(load_model(str(pipes["sd1"]), "image"))
    res = unlearn.run(_recipe(pipes["sd1"], judge_dir, tmp_path / "run", method), progress=False)
    out = res.run_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["unlearned"]["erasure_explicit"] is not None
    ck = out / "checkpoint"
    if method == "safree":
        m = load_model(str(ck), "image")
        assert type(m).__name__ == "SAFREEAdapter" and m.base.is_latent
        assert m.sample(["a red circle"], steps=2).shape == (1, 16, 16, 3)
        assert metrics["editor"]["splits"]["forget_explicit"]["triggered"] >= 0
        return
    changed = _changed(before, ck)
    assert changed, f"{method} changed nothing"
    if method in ("uce", "rece"):
        assert changed <= {n for n in before if ".attn2.to_k." in n or ".attn2.to_v." in n}
        assert len(changed) == sum(1 for n in before if ".attn2.to_k." in n or ".attn2.to_v." in n)
    else:  # ESD-x and NPO on cross-attention: attn2 only
        assert all(".attn2." in n for n in changed)


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
@pytest.mark.parametrize("method", ["uce", "esd"])
def test_sd2_sdxl_uce_esd_end_to_end(pipes, judge_dir, tmp_path, kind, method):
    import unlearn

    before = _state(load_model(str(pipes[kind]), "image"))
    res = unlearn.run(_recipe(pipes[kind], judge_dir, tmp_path / "run", method), progress=False)
    out = res.run_dir
    changed = _changed(before, out / "checkpoint")
    assert changed and all(n.startswith("unet.") and ".attn2." in n for n in changed)


def test_rece_on_sdxl(pipes):
    """RECE's closed-form attack on SDXL replaces token rows only (the pooled row stays)."""
    from unlearn.editors.rece import rece_attack_embeds
    from unlearn.editors.uce import uce_erase

    orig = load_model(str(pipes["sdxl"]), "image")
    erased = orig.reference()
    info = uce_erase(erased, ["red"], ["blue"], ["green"])
    assert len(info["edited"]) == len(orig.parameter_groups()["cross_attention_kv"])
    emb = rece_attack_embeds(erased, orig, ["a red circle"], "red")
    plain = erased.encode_prompts(erased.tokenize(["a red circle"]))
    assert emb.shape == plain.shape and torch.equal(emb[:, -1], plain[:, -1])
    assert not torch.equal(emb[:, 2], plain[:, 2]) and torch.equal(emb[:, 1], plain[:, 1])  # "red" is token 2


def test_esd_variants_and_groups_on_the_real_block_structure(pipes):
    """ESD-x trains attn2; ESD-u the UNet minus attn2 and time_embedding (SDXL's add_embedding stays
    trainable); with the time embedding they partition the UNet on the real block structure."""
    from unlearn.editors.esd import trainable_names

    for kind in ("sd1", "sdxl"):
        a = load_model(str(pipes[kind]), "image")
        x, u = trainable_names(a, "esd-x"), trainable_names(a, "esd-u")
        assert x and all(".attn2." in n for n in x)
        assert u and not any(".attn2." in n or n.startswith("unet.time_embedding.") for n in u)
        assert set(x) | set(u) | set(a.parameter_groups()["time_embedding"]) == set(a.parameter_groups()["unet"])


def test_load_options_are_checked(pipes, world):
    with pytest.raises(ValueError, match="dtype='fp8'"):
        load_model(str(pipes["sd1"]), "image", dtype="fp8")
    a = load_model(str(pipes["sd1"]), "image")
    small = [dict(it, image=it["image"][:8, :8]) for it in world.split("train")[:1]]
    with pytest.raises(ValueError, match=r"UNet expects 16x16 \(latents of 8 x the VAE's factor 2\)"):
        a.collate(small)


def test_attacks_on_a_latent_model(pipes, judge_dir, tmp_path):
    """The image attacks (closed-form inversion, relearning on VAE latents, quantisation) on UCE-erased SD-1.x."""
    import unlearn

    r = _recipe(pipes["sd1"], judge_dir, tmp_path / "run", "uce")
    r["eval"].update(attacks=["embedding_inversion", "relearn", "quantize_8bit"], compare_target=False,
                     attack_params={"relearn": {"steps": 2, "batch_size": 2}})
    m = json.loads((unlearn.run(r, progress=False).run_dir / "metrics.json").read_text())
    assert set(m["attacks"]["unlearned"]) == {"embedding_inversion", "relearn", "quantize_8bit"}
    nll = m["attacks"]["unlearned"]["relearn"]["settings"]["trained_half_nll"]
    assert np.isfinite(nll["before"]) and np.isfinite(nll["after"]) and nll["before"] != nll["after"]
