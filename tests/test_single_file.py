"""Single-file Stable Diffusion checkpoints (``model.source: /path/to/model.safetensors``).

The tests turn the tiny SD-1.x / SD-2.x / SDXL pipelines of ``test_latent_pipelines`` into one
safetensors file in the original CompVis / SGM key layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*`` / ``conditioner.embedders.*``) with the inverse
of diffusers' key mapping (:func:`to_original_layout`, written here for the test shapes only),
load it back through ``ImageAdapter.load`` / ``load_model`` / a recipe, offline, and compare
weights and samples with the directory-loaded model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_latent_pipelines import build_sd, build_sdxl  # the tiny pipeline builders

from unlearn.models import load_model

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


# ---------------------------------------------------------------------------- diffusers -> original layout
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _unet_key(k: str, per_block: int, up_has_attn: dict[int, bool]) -> str:
    """One diffusers UNet key -> its LDM name (``input_blocks`` / ``middle_block`` / ``output_blocks``)."""
    n = per_block + 1  # LDM slots per down block: its resnets + the downsampler (up blocks: per_block + 1 resnets)
    for new, old in _UNET_FIXED.items():
        if k.startswith(new + "."):
            return old + k[len(new):]
    m = re.match(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?"
                 r"(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
    if not m:
        raise KeyError(k)
    where, b, kind, j, rest = m.group(1), int(m.group(2) or 0), m.group(3), int(m.group(4)), m.group(5)
    if kind == "resnets":
        for new, old in _RESNET:
            rest = re.sub(rf"^{new}\.", old + ".", rest)
    if where == "mid_block":
        return f"middle_block.{1 if kind == 'attentions' else 2 * j}.{rest}"
    if where == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{1 + b * n + per_block}.0.op.{rest.removeprefix('conv.')}"
        return f"input_blocks.{1 + b * n + j}.{1 if kind == 'attentions' else 0}.{rest}"
    if kind == "upsamplers":
        return f"output_blocks.{b * n + per_block}.{2 if up_has_attn[b] else 1}.{rest}"
    return f"output_blocks.{b * n + j}.{1 if kind == 'attentions' else 0}.{rest}"


def _vae_key(k: str, n_up: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM name (``encoder.down.*``, ``decoder.up.*``, ``mid.attn_1``)."""
    k = re.sub(r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block.", k)
    k = re.sub(r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample.", k)
    k = re.sub(r"\.up_blocks\.(\d+)\.resnets\.", lambda m: f".up.{n_up - 1 - int(m.group(1))}.block.", k)
    k = re.sub(r"\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f".up.{n_up - 1 - int(m.group(1))}.upsample.", k)
    k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
    k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        k = k.replace(f".attn_1.{new}.", f".attn_1.{old}.")
    return k.replace("conv_norm_out", "norm_out")


def _open_clip(sd: dict[str, torch.Tensor], prefix: str, with_projection: bool) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state dict -> OpenCLIP's (fused ``in_proj``, ``resblocks``)."""
    sd = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v for k, v in sd.items()}
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if with_projection:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        s, o = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.in_proj_{kind}"] = torch.cat([sd[s + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[o + f"attn.out_proj.{kind}"] = sd[s + f"self_attn.out_proj.{kind}"]
            for new, old in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj")):
                out[o + f"{old}.{kind}"] = sd[s + f"{new}.{kind}"]
    return out


def _clip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text model -> the original checkpoints' ``<prefix>text_model.*`` names."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
            if not k.endswith("position_ids")}


def to_original_layout(pipe_dir: Path) -> dict[str, torch.Tensor]:
    """A saved diffusers SD-1.x / SD-2.x / SDXL pipeline -> one state dict in the original layout
    (the inverse of diffusers' single-file key conversion, for the tiny test shapes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index = json.loads((pipe_dir / "model_index.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(pipe_dir / "unet")
    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae")
    up_attn = {i: hasattr(b, "attentions") for i, b in enumerate(unet.up_blocks)}
    per_block = unet.config.layers_per_block
    out = {"model.diffusion_model." + _unet_key(k, per_block, up_attn): v for k, v in unet.state_dict().items()}
    n_up = len(vae.config.up_block_types)
    for k, v in vae.state_dict().items():
        if ".attn_1." in _vae_key(k, n_up) and v.dim() == 2:
            v = v[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        out["first_stage_model." + _vae_key(k, n_up)] = v
    te = CLIPTextModel.from_pretrained(pipe_dir / "text_encoder").state_dict()
    if "text_encoder_2" in index:  # SDXL: CLIP-L layout + OpenCLIP-G layout with its projection
        out.update(_clip(te, "conditioner.embedders.0.transformer."))
        te2 = CLIPTextModelWithProjection.from_pretrained(pipe_dir / "text_encoder_2").state_dict()
        out.update(_open_clip(te2, "conditioner.embedders.1.model.", with_projection=True))
    elif unet.config.cross_attention_dim == 16:  # the SD-1.x test shape: CLIP-L layout
        out.update(_clip(te, "cond_stage_model.transformer."))
    else:  # SD-2.x: OpenCLIP-H layout
        out.update(_open_clip(te, "cond_stage_model.model.", with_projection=False))
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    from unlearn.tasks.visual_world import build_visual_world
    from unlearn.zoo.build_t2i import world_tokenizer

    return world_tokenizer(build_visual_world(), 24)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tok):
    """``{kind: (pipeline directory, checkpoint)}``: each checkpoint is an original-layout
    ``.safetensors`` file inside a copy of its pipeline directory without the weight files (the
    layout of a hub snapshot with only the single file downloaded)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("single")
    out = {}
    for kind, build in (("sd1", lambda p: build_sd(p, tok, "1")), ("sd2", lambda p: build_sd(p, tok, "2")),
                        ("sdxl", lambda p: build_sdxl(p, tok))):
        pipe = build(d / kind)
        conf = d / f"{kind}-configs"
        shutil.copytree(pipe, conf, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(to_original_layout(pipe), str(conf / f"{kind}.safetensors"))
        out[kind] = (pipe, conf / f"{kind}.safetensors")
    return out


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_single_file_equals_the_pipeline_directory(single, kind):
    """The single file next to its configs loads (offline) to the directory-loaded model: same
    weights (UNet, text encoder(s), VAE), scheduler and samples."""
    from unlearn.adapters.image import ImageAdapter

    pipe, file = single[kind]
    assert not list(file.parent.rglob("*/*.safetensors"))  # no weights besides the single file
    a, b = load_model(str(pipe), "image"), ImageAdapter.load(str(file))
    assert b.is_latent and b.is_sdxl == (kind == "sdxl") and b.source == str(file)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.fingerprint() == a.fingerprint() and b.identity() == a.identity()  # VAE, scheduler, tokenizers too
    assert type(b.pipeline_scheduler) is type(a.pipeline_scheduler)
    assert b.scheduler.config.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    prompts = ["a red circle", "a striped blue square"]
    assert np.array_equal(b.sample(prompts, seed=3, steps=2), a.sample(prompts, seed=3, steps=2))


def test_config_elsewhere_dtype_and_save(single, tmp_path):
    """``config=`` names the configs when the file lies elsewhere (load_model passes it on); a
    loaded single file saves as a pipeline directory."""
    from unlearn.adapters.image import ImageAdapter

    pipe, file = single["sd1"]
    alone = tmp_path / "models" / "sd1.safetensors"
    alone.parent.mkdir()
    shutil.copy(file, alone)
    with pytest.raises(ValueError, match=r"has no model_index.json.*put it next to the configs.*config="):
        ImageAdapter.load(str(alone))
    m = load_model(str(alone), "image", config=str(file.parent), timesteps_per_item=2)
    assert m.fingerprint() == load_model(str(pipe), "image").fingerprint() and m.timesteps_per_item == 2
    half = ImageAdapter.load(str(alone), dtype="bfloat16", config=str(file.parent))
    assert half.unet.dtype == half.text_encoder.dtype == half.vae.dtype == torch.bfloat16
    m.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert load_model(str(tmp_path / "saved"), "image").fingerprint() == m.fingerprint()
    with pytest.raises(ValueError, match=r"config=.*single-file checkpoints.*drop config"):
        ImageAdapter.load(str(pipe), config=str(file.parent))
    # the recipe key model.config does the same for a run or an evaluation
    from test_latent_pipelines import _recipe

    from unlearn.recipe import load_recipe

    rec = _recipe(alone, tmp_path / "no-judge", tmp_path / "run", "uce")
    r = load_recipe(rec, [f"model.config={file.parent}"])
    assert r.model.config == str(file.parent)
    assert r.task.task_class(r, progress=False).load_model().fingerprint() == m.fingerprint()
    with pytest.raises(ValueError, match=r"has no model_index.json"):
        r0 = load_recipe(rec)
        r0.task.task_class(r0, progress=False).load_model()
    with pytest.raises(ValueError, match=r"model.config.*is for single-file checkpoints and model.source .* is not a "
                                         r"\*.safetensors file.*drop model.config"):
        load_recipe(rec, [f"model.source={pipe}", f"model.config={file.parent}"])


def test_single_file_errors_name_the_file_and_the_fix(single, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from unlearn.adapters.image import ImageAdapter
    from unlearn.config import RecipeError
    from unlearn.recipe import load_recipe

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    ckpt = tmp_path / "v1-5-pruned.ckpt"
    ckpt.write_bytes(b"not read")
    for bad in (ckpt, tmp_path / "missing.pt"):
        with pytest.raises(ValueError, match=rf"{bad.name}.*pickled checkpoint.*Convert it to safetensors"):
            ImageAdapter.load(str(bad))
    with pytest.raises(RecipeError, match=r"'model.source'.*pickled checkpoint.*\.safetensors"):
        load_recipe(RECIPES / "i2p-tiny-uce.yaml", [f"model.source={ckpt}"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt.*not a \.safetensors checkpoint"):
        ImageAdapter.load(str(tmp_path / "notes.txt"))
    # an SDXL file beside SD-1.x configs, an SD-1.x file beside SD-2.x configs
    (_, sdxl_file), (_, sd1_file), (_, sd2_file) = single["sdxl"], single["sd1"], single["sd2"]
    with pytest.raises(ValueError, match=r"sdxl.safetensors' is an SDXL checkpoint but the configs .* SD 1.x/2.x"):
        ImageAdapter.load(str(sdxl_file), config=str(sd1_file.parent))
    with pytest.raises(ValueError, match=r"cross-attention width 16 but .*unet.config\.json says 32"):
        ImageAdapter.load(str(sd1_file), config=str(sd2_file.parent))
    # a file of other tensors, a truncated file, a file without the text encoder
    save_file({"unet.conv_in.weight": torch.zeros(2)}, str(tmp_path / "unet-only.safetensors"))
    with pytest.raises(ValueError, match=r"no model.diffusion_model.\* tensors.*original single-file layout"):
        ImageAdapter.load(str(tmp_path / "unet-only.safetensors"), config=str(sd1_file.parent))
    (tmp_path / "cut.safetensors").write_bytes(sd1_file.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut.safetensors.*not a safetensors file or is truncated"):
        ImageAdapter.load(str(tmp_path / "cut.safetensors"), config=str(sd1_file.parent))
    from safetensors.torch import load_file

    sd = {k: v for k, v in load_file(str(sd1_file)).items() if not k.startswith("cond_stage_model.")}
    save_file(sd, str(tmp_path / "no-text.safetensors"))
    with pytest.raises(ValueError, match=r"no text encoder.*whole pipeline"):
        ImageAdapter.load(str(tmp_path / "no-text.safetensors"), config=str(sd1_file.parent))


def test_single_file_recipe_end_to_end(single, tmp_path):
    """``model.source: <file>.safetensors`` in a recipe: UCE edits exactly the cross-attention
    K/V of the single-file model, and the run's checkpoint is a pipeline directory."""
    import unlearn
    from test_latent_pipelines import _recipe

    from unlearn.evaluators.image_judge import JudgeConfig, train_judge
    from unlearn.tasks.visual_world import build_visual_world

    pipe, file = single["sd1"]
    judge, _ = train_judge(build_visual_world().split("train"), JudgeConfig(epochs=1))
    judge.save(tmp_path / "judge")
    res = unlearn.run(_recipe(file, tmp_path / "judge", tmp_path / "run", "uce"), progress=False)
    assert res.recipe.model.source == str(file)
    before = load_model(str(pipe), "image").model.state_dict()
    after = load_model(str(res.run_dir / "checkpoint"), "image").model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    kv = {n for n in before if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert changed == kv


def test_unlearn_eval_takes_a_single_file(single, tmp_path, capsys):
    """``unlearn eval <file>.safetensors`` evaluates the single-file model (an image model, the visual
    task) exactly like its pipeline directory: same fingerprint, same numbers."""
    from test_latent_pipelines import _recipe

    from unlearn.cli import main
    from unlearn.evaluation import check_source, evaluate
    from unlearn.evaluators.image_judge import JudgeConfig, train_judge
    from unlearn.tasks.visual_world import build_visual_world

    pipe, file = single["sd1"]
    assert check_source(str(file)) == "image"
    judge, _ = train_judge(build_visual_world().split("train"), JudgeConfig(epochs=1))
    judge.save(tmp_path / "judge")
    rec = _recipe(file, tmp_path / "judge", tmp_path / "run", "uce")
    over = ["eval.max_items=4"]
    a, b = evaluate(str(file), recipe=rec, overrides=over, progress=False), evaluate(str(pipe), recipe=rec,
                                                                                     overrides=over, progress=False)
    assert a.recipe.task.name == "visual" and a.summary["model"] == b.summary["model"]
    assert a.metrics["provenance"]["model"]["fingerprint"] == b.metrics["provenance"]["model"]["fingerprint"]
    (tmp_path / "notes.txt").write_text("x")
    assert main(["eval", str(tmp_path / "notes.txt")]) == 2
    assert "is a file; give the directory the model was saved in (or a single-file" in capsys.readouterr().err
