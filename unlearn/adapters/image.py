"""ImageAdapter: the only place that knows about text-to-image diffusion models.

It wraps a diffusers ``UNet2DConditionModel``, a ``transformers`` ``CLIPTextModel`` +
tokenizer and a diffusers DDPM scheduler -- in pixel space (no VAE, the tiny zoo) or in latent
space (an ``AutoencoderKL``: a Stable Diffusion 1.x / 2.x pipeline directory, or SDXL with its
second text encoder, pooled embedding and time ids) -- and exposes the contract objectives and
metrics are written against (:class:`~unlearn.adapters.base.ImageModel`, the image side of
:class:`~unlearn.adapters.base.Adapter`; the text adapter implements the same base):

* :meth:`collate` -- world items (``image`` uint8 ``(H, W, 3)`` + ``caption``) -> a batch with
  the noise and timesteps of each item drawn from a per-item seed (so the same item gets the
  same noise in any batch, for the current and the reference model alike);
* :meth:`item_loss` (alias :meth:`item_nll`) -- per-item denoising loss: the noise-prediction
  MSE ``‖ε_θ(x_t, c, t) − ε‖²`` (mean over pixels) summed over the item's sampled timesteps,
  and the number of timesteps: ``(loss (B,), n (B,))``, the same shape contract as the text
  adapter's ``(nll, n_tokens)``, so GradAscent / GradDiff / NPO can treat it as an NLL;
* :meth:`encode_prompts` -- text-encoder token embeddings ``(B, T, d)``;
* :meth:`noise_pred` -- ε_θ(x_t, c, t) (ESD-style objectives compose targets from it);
* :meth:`sample` -- DDIM sampling with classifier-free guidance, seeded per prompt;
* :meth:`parameter_groups`, :meth:`reference`, :meth:`save`, :meth:`load`, :meth:`fingerprint`.

``self.model`` is a ``ModuleDict({"unet", "text_encoder"})`` (SDXL: also ``"text_encoder_2"``),
so parameter names read ``unet.down_blocks.0...attn2.to_k.weight`` / ``text_encoder.text_model...``
and one optimiser / selection covers every part. The VAE (latent models) is outside
``self.model``: it is never trained, only encodes training images and decodes samples.

Latent models (``vae`` given): images are encoded to ``z = (vae.encode(x).mean − shift) ·
scaling_factor`` (the posterior mean, so an item's latent is deterministic; the noise is drawn
in latent space), the denoising loss is taken on ``z``, and samples are decoded with
``vae.decode(z / scaling_factor + shift)``. The loss target follows the scheduler's
``prediction_type``: ``epsilon`` (ε), ``v_prediction`` (the velocity, the scheduler's
``get_velocity``; SD 2.x 768) or ``sample`` (x0).

Single-file checkpoints (one ``*.safetensors`` in the original CompVis / SGM layout, e.g.
``v1-5-pruned-emaonly.safetensors``, ``sd_xl_base_1.0.safetensors``) load offline through
diffusers' ``from_single_file`` with the configs and tokenizer(s) of a pipeline directory of the
same model (by default the file's own directory); pickled ``.ckpt`` files are refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.adapters import first_line, tokenizer_fingerprint, weights_fingerprint
from unlearn.adapters.base import WRAPPER_FILE, ImageModel
from unlearn.zoo import zoo_path

ADAPTER_FILE = "image_adapter.json"
PIPELINE_FILE = "model_index.json"  # a diffusers pipeline directory
# the parts of a pipeline directory this adapter loads (SDXL adds text_encoder_2 / tokenizer_2)
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
_TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SINGLE_FILE_SUFFIXES = (".safetensors",)  # single-file checkpoints (original CompVis / SGM layout)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # refused: never unpickled


def _single_file_kind(file: Path, source: str) -> tuple[str, dict[str, int]]:
    """``("sd1" | "sd2" | "sdxl", shapes)`` of an original-layout single-file checkpoint, from its
    key names (CLIP-L ``cond_stage_model.transformer.*``: SD 1.x; OpenCLIP
    ``cond_stage_model.model.*``: SD 2.x; ``conditioner.embedders.1.model.*``: SDXL base); shapes:
    the UNet's ``cross_attention_dim`` and ``in_channels`` read from the tensors' headers."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
            kv = sorted(k for k in names if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight"))
            shapes = {"cross_attention_dim": f.get_slice(kv[0]).get_shape()[1] if kv else None,
                      "in_channels": (f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape()[1]
                                      if "model.diffusion_model.input_blocks.0.0.weight" in names else None)}
    except Exception as e:  # noqa: BLE001 -- not a safetensors file, truncated header
        raise ValueError(f"could not read the single-file checkpoint {source!r}: {first_line(e)}; the file is not a "
                         "safetensors file or is truncated -- download or convert it again") from None
    if not any(k.startswith("model.diffusion_model.") for k in names):
        raise ValueError(f"{source!r} has no model.diffusion_model.* tensors: it is not a Stable Diffusion checkpoint "
                         "in the original single-file layout (a diffusers-layout or UNet-only file? load its pipeline "
                         "directory instead)")
    if any(k.startswith("conditioner.embedders.1.model.") for k in names):
        return "sdxl", shapes
    if any(k.startswith("conditioner.embedders.0.model.") for k in names):
        raise ValueError(f"{source!r} is an SDXL refiner checkpoint (one OpenCLIP encoder): only base pipelines are "
                         "supported")
    if any(k.startswith("cond_stage_model.model.") for k in names):
        return "sd2", shapes
    if any(k.startswith("cond_stage_model.transformer.") for k in names):
        return "sd1", shapes
    raise ValueError(f"{source!r} has no text encoder (cond_stage_model.* or conditioner.embedders.*): a single-file "
                     "checkpoint here must hold the whole pipeline (UNet, VAE, text encoder(s))")


def _item_seed(seed: int, item: dict) -> int:
    """A stable 63-bit seed from the batch seed and the item's identity (caption + image seed)."""
    key = f"{seed}|{item.get('caption', '')}|{item.get('image_seed', '')}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def images_to_tensor(images) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` (array or list of ``(H, W, 3)``) -> float ``(B, 3, H, W)`` in [-1, 1]."""
    arr = np.stack([np.asarray(im) for im in images]) if isinstance(images, (list, tuple)) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float ``(B, 3, H, W)`` in [-1, 1] -> uint8 ``(B, H, W, 3)``."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _load_part(loader, where: Path, part: str, source: str, dtype: torch.dtype):
    """``loader.from_pretrained(where / part)`` (weights from safetensors only), errors named."""
    weights = part in ("unet", "vae") or part.startswith("text_encoder")
    kw = {"use_safetensors": True, "torch_dtype": dtype} if weights else {}
    try:
        return loader.from_pretrained(where / part, **kw)
    except Exception as e:  # noqa: BLE001 -- corrupt, empty or missing files of one part
        hint = (" (weights are read from *.safetensors only: convert a .bin/.ckpt checkpoint, e.g. load it once "
                "with diffusers and save_pretrained(safe_serialization=True))") if kw else ""
        raise ValueError(f"could not load the {part} of image model {source!r} from {where / part}: "
                         f"{first_line(e)}; its files are missing, corrupt or incomplete{hint} -- save the model "
                         "again") from None


class ImageAdapter(ImageModel):
    """A text-to-image diffusion model behind the unlearning contract
    (:class:`~unlearn.adapters.base.ImageModel`): pixel space (no ``vae``) or latent space.

    Args:
        unet: diffusers ``UNet2DConditionModel``; ``in_channels == out_channels == 3`` without a
            VAE, ``== vae.config.latent_channels`` with one.
        text_encoder: ``transformers`` ``CLIPTextModel`` whose width is the UNet's cross-attention
            dim (SDXL: the two encoders' widths add up to it).
        tokenizer: its tokenizer (needs EOS and pad tokens); prompts are padded to ``model_max_length``.
        scheduler: a diffusers ``DDPMScheduler`` (training noise schedule and ``prediction_type``;
            sampling uses DDIM on its config).
        vae: a diffusers ``AutoencoderKL`` (latent models), or None (pixel space).
        text_encoder_2, tokenizer_2: SDXL's second text encoder (``CLIPTextModelWithProjection``:
            its penultimate hidden states are concatenated to the first encoder's, its
            ``text_embeds`` are the pooled condition) and tokenizer (same vocabulary and length as
            ``tokenizer``; only the pad token may differ). The UNet must have
            ``addition_embed_type="text_time"``.
        pipeline_scheduler: the scheduler of the pipeline directory the model came from (e.g.
            PNDM); written back by :meth:`save` so a saved model is still a pipeline directory.
        pipeline_index: the pipeline's ``model_index.json`` (written back by :meth:`save`).
        timesteps_per_item: timesteps sampled per item by :meth:`collate` (the loss sums over them).
        source: where the model came from (recorded in provenance).
    """

    def __init__(self, unet, text_encoder, tokenizer, scheduler, *, vae=None, text_encoder_2=None,
                 tokenizer_2=None, pipeline_scheduler=None, pipeline_index: dict | None = None,
                 timesteps_per_item: int = 1, source: str = "<in-memory>") -> None:
        ucfg = unet.config
        if vae is None:
            if ucfg.in_channels != 3 or ucfg.out_channels != 3:
                raise ValueError("a UNet without a VAE works in pixel space: it needs in_channels == out_channels "
                                 f"== 3, got {ucfg.in_channels}/{ucfg.out_channels}; a latent UNet needs its vae "
                                 "(load the whole pipeline directory)")
        elif not ucfg.in_channels == ucfg.out_channels == vae.config.latent_channels:
            raise ValueError(f"the UNet takes {ucfg.in_channels} / gives {ucfg.out_channels} channels but the VAE's "
                             f"latents have {vae.config.latent_channels}: they do not belong together (an inpainting "
                             "or depth UNet is not supported)")
        if not isinstance(ucfg.sample_size, int):
            raise ValueError(f"unet.config.sample_size={ucfg.sample_size!r}: square models only (one int)")
        width = text_encoder.config.hidden_size
        if text_encoder_2 is not None:
            if tokenizer_2 is None:
                raise ValueError("text_encoder_2 needs its tokenizer_2 (the pipeline's tokenizer_2/)")
            if getattr(ucfg, "addition_embed_type", None) != "text_time":
                raise ValueError("a second text encoder is SDXL's: the UNet needs addition_embed_type='text_time', "
                                 f"got {getattr(ucfg, 'addition_embed_type', None)!r}")
            if not hasattr(text_encoder_2, "text_projection"):
                raise ValueError(f"text_encoder_2 is a {type(text_encoder_2).__name__}; SDXL's pooled condition needs "
                                 "a CLIPTextModelWithProjection")
            width += text_encoder_2.config.hidden_size
            want = 6 * ucfg.addition_time_embed_dim + text_encoder_2.config.projection_dim
            if ucfg.projection_class_embeddings_input_dim != want:
                raise ValueError(f"unet.config.projection_class_embeddings_input_dim="
                                 f"{ucfg.projection_class_embeddings_input_dim} but 6 time ids x "
                                 f"{ucfg.addition_time_embed_dim} + pooled {text_encoder_2.config.projection_dim} = "
                                 f"{want}: the UNet and text_encoder_2 do not belong together")
            if tokenizer_2.get_vocab() != tokenizer.get_vocab() or \
                    tokenizer_2.model_max_length != tokenizer.model_max_length or tokenizer_2.pad_token_id is None:
                raise ValueError("tokenizer_2 must share tokenizer's vocabulary and model_max_length (only the pad "
                                 "token may differ, as in SDXL): prompts are tokenized once")
        elif getattr(ucfg, "addition_embed_type", None) == "text_time":
            raise ValueError("the UNet has addition_embed_type='text_time' (SDXL): it needs text_encoder_2 and "
                             "tokenizer_2 (load the whole SDXL pipeline directory)")
        if width != ucfg.cross_attention_dim:
            raise ValueError(f"text encoder width {width} != UNet cross_attention_dim {ucfg.cross_attention_dim}: "
                             "they do not belong together")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs an EOS and a pad token")
        if timesteps_per_item < 1:
            raise ValueError(f"timesteps_per_item={timesteps_per_item}: must be >= 1")
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler prediction_type={scheduler.config.prediction_type!r}: epsilon, v_prediction "
                             "or sample")
        parts = {"unet": unet, "text_encoder": text_encoder}
        if text_encoder_2 is not None:
            parts["text_encoder_2"] = text_encoder_2
        self.model = torch.nn.ModuleDict(parts)
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.vae = vae
        if vae is not None:
            vae.eval()
            vae.requires_grad_(False)
        self.pipeline_scheduler = pipeline_scheduler
        self.pipeline_index = dict(pipeline_index) if pipeline_index else None
        self.timesteps_per_item = timesteps_per_item
        self.source = source
        self._fingerprint: str | None = None
        self._vae_fingerprint: str | None = None

    def parts(self) -> dict[str, Any]:
        """The constructor's arguments besides the UNet, text encoder, tokenizer and scheduler
        (wrappers that share this model's modules pass them on)."""
        return {"vae": self.vae, "text_encoder_2": self.model["text_encoder_2"] if self.is_sdxl else None,
                "tokenizer_2": self.tokenizer_2, "pipeline_scheduler": self.pipeline_scheduler,
                "pipeline_index": self.pipeline_index}

    @property
    def unet(self):
        return self.model["unet"]

    @property
    def text_encoder(self):
        return self.model["text_encoder"]

    @property
    def text_encoder_2(self):
        """SDXL's second text encoder, or None."""
        return self.model["text_encoder_2"] if self.is_sdxl else None

    @property
    def is_latent(self) -> bool:
        """True when the UNet works on VAE latents."""
        return self.vae is not None

    @property
    def is_sdxl(self) -> bool:
        """True for SDXL (two text encoders, pooled embedding and time ids)."""
        return "text_encoder_2" in self.model

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent per side (``2 ** (len(vae.block_out_channels) − 1)``; 1 in pixel space)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_size(self) -> int:
        """S: images (training renders and samples) are ``(3, S, S)`` pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of what the UNet denoises: ``(3, S, S)`` pixels, or the VAE's latents."""
        s = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), s, s)

    # ------------------------------------------------------------------ loading / saving
    def save(self, path: str | Path) -> None:
        """Write ``unet/`` and ``text_encoder/`` (safetensors), ``tokenizer/``, ``scheduler/`` and
        ``image_adapter.json`` to ``path``; a latent model also ``vae/`` (and SDXL
        ``text_encoder_2/``, ``tokenizer_2/``) and ``model_index.json``, so the directory is a
        diffusers pipeline directory (``StableDiffusionPipeline.from_pretrained`` loads it)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        (self.pipeline_scheduler or self.scheduler).save_pretrained(path / "scheduler")
        meta = {"kind": "image", "timesteps_per_item": self.timesteps_per_item}
        if self.is_latent:
            self.vae.save_pretrained(path / "vae", safe_serialization=True)
            if self.is_sdxl:
                self.text_encoder_2.save_pretrained(path / "text_encoder_2", safe_serialization=True)
                self.tokenizer_2.save_pretrained(path / "tokenizer_2")
            (path / PIPELINE_FILE).write_text(json.dumps(self._model_index(), indent=1))
            meta["latent"] = True
        (path / ADAPTER_FILE).write_text(json.dumps(meta, indent=1))

    def _model_index(self) -> dict:
        """``model_index.json`` for :meth:`save`: the loaded pipeline's, with the classes of the parts saved."""
        import diffusers

        idx = dict(self.pipeline_index or {})
        idx.setdefault("_class_name", "StableDiffusionXLPipeline" if self.is_sdxl else "StableDiffusionPipeline")
        idx["_diffusers_version"] = diffusers.__version__
        sched = self.pipeline_scheduler or self.scheduler
        idx.update(unet=["diffusers", type(self.unet).__name__], vae=["diffusers", type(self.vae).__name__],
                   text_encoder=["transformers", type(self.text_encoder).__name__],
                   tokenizer=["transformers", type(self.tokenizer).__name__],
                   scheduler=["diffusers", type(sched).__name__])
        if self.is_sdxl:
            idx.update(text_encoder_2=["transformers", type(self.text_encoder_2).__name__],
                       tokenizer_2=["transformers", type(self.tokenizer_2).__name__])
        else:
            idx.setdefault("safety_checker", [None, None])
            idx.setdefault("feature_extractor", [None, None])
            idx.setdefault("requires_safety_checker", False)
        return idx

    @classmethod
    def load(cls, source: str, dtype: str = "float32", **kwargs) -> "ImageAdapter":
        """Load a directory written by :meth:`save`, a diffusers pipeline directory
        (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
        ``scheduler/``; SDXL also ``text_encoder_2/``, ``tokenizer_2/``), a single-file Stable
        Diffusion checkpoint (``*.safetensors`` in the original CompVis / SGM layout, see
        :meth:`_load_single_file`), or a ``zoo:`` name. Weights are read from safetensors files
        only. A wrapped model's directory (``wrapper.json``, e.g. SAFREE) raises ValueError: load it
        with ``unlearn.models.load_model(source, "image")``.

        Args:
            dtype: ``"float32"`` (default; the only one tested, and the one to use on a CPU),
                ``"float16"`` or ``"bfloat16"`` (GPU).
            config: single-file checkpoints only: the pipeline directory whose configs and
                tokenizer(s) describe the checkpoint; default: the checkpoint's own directory.
        """
        if not isinstance(source, str) or not source:
            raise ValueError(f"model source must be a non-empty string, got {source!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: one of {', '.join(DTYPES)}")
        config = kwargs.pop("config", None)
        if source.startswith("zoo:"):
            where = Path(zoo_path(source[4:]))
        else:
            where = Path(source).expanduser()
        if where.is_file() or (not where.exists() and where.suffix.lower() in SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES):
            return cls._load_single_file(where, source, DTYPES[dtype], config, **kwargs)
        if config is not None:
            raise ValueError(f"config={config!r} is for single-file checkpoints, but {source!r} is not a file: a "
                             "pipeline directory carries its own configs -- drop config")
        if (where / WRAPPER_FILE).is_file():
            raise ValueError(f"{source!r} holds a wrapped model ({WRAPPER_FILE}), which ImageAdapter.load does not "
                             f"rebuild; load it with unlearn.models.load_model({source!r}, \"image\")")
        meta_file = where / ADAPTER_FILE
        meta = {}
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
            except ValueError as e:
                raise ValueError(f"could not read {meta_file}: {first_line(e)}; write the model again with "
                                 "ImageAdapter.save") from None
        elif not (where / PIPELINE_FILE).is_file():
            raise ValueError(f"{source!r} is not an image-model directory: {meta_file} is missing (write one with "
                             f"ImageAdapter.save), and so is {PIPELINE_FILE} (a diffusers pipeline directory, e.g. "
                             "a Stable Diffusion snapshot)")
        kwargs.setdefault("timesteps_per_item", meta.get("timesteps_per_item", 1))
        if (where / PIPELINE_FILE).is_file():
            return cls._load_pipeline(where, source, DTYPES[dtype], **kwargs)
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        parts = {}
        for part, loader in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel),
                             ("tokenizer", AutoTokenizer), ("scheduler", DDPMScheduler)):
            parts[part] = _load_part(loader, where, part, source, DTYPES[dtype])
        unet, te, tok, sched = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
        unet.eval()
        te.eval()
        return cls(unet, te, tok, sched, source=source, **kwargs)

    @classmethod
    def _load_pipeline(cls, where: Path, source: str, dtype: torch.dtype, **kwargs) -> "ImageAdapter":
        """A diffusers pipeline directory (SD 1.x / 2.x / SDXL) -> a latent :class:`ImageAdapter`."""
        import diffusers
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer

        try:
            index = json.loads((where / PIPELINE_FILE).read_text())
        except ValueError as e:
            raise ValueError(f"could not read {where / PIPELINE_FILE}: {first_line(e)}") from None
        listed = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        sdxl = "text_encoder_2" in listed
        need = PIPELINE_PARTS + (SDXL_PARTS if sdxl else ())
        missing = [p for p in need if p not in listed or not (where / p).is_dir()]
        if missing:
            raise ValueError(f"pipeline directory {where} has no {', '.join(p + '/' for p in missing)} (or "
                             f"{PIPELINE_FILE} does not list it): a Stable Diffusion pipeline directory needs "
                             f"{', '.join(p + '/' for p in need)} -- save the whole pipeline (e.g. "
                             "StableDiffusionPipeline.save_pretrained, or a full snapshot of the model repository)")
        if "text_encoder" not in listed and sdxl:
            raise ValueError(f"{where} has text_encoder_2/ but no text_encoder/ (an SDXL refiner?): only base "
                             "pipelines are supported")
        for part in ("text_encoder",) + (("text_encoder_2",) if sdxl else ()):
            if index[part][1] not in _TEXT_ENCODERS:
                raise ValueError(f"{where}: {part} is a {index[part][1]}; supported text encoders: "
                                 f"{', '.join(_TEXT_ENCODERS)}")
        unet = _load_part(UNet2DConditionModel, where, "unet", source, dtype)
        vae = _load_part(AutoencoderKL, where, "vae", source, dtype)
        te = _load_part(getattr(transformers, index["text_encoder"][1]), where, "text_encoder", source, dtype)
        tok = _load_part(AutoTokenizer, where, "tokenizer", source, dtype)
        pipe_sched = _load_part(getattr(diffusers, index["scheduler"][1], DDPMScheduler), where, "scheduler", source,
                                dtype)
        # training noise schedule: DDPM on the pipeline scheduler's config (betas, prediction_type)
        sched = DDPMScheduler.from_config(pipe_sched.config)
        te2 = tok2 = None
        if sdxl:
            te2 = _load_part(getattr(transformers, index["text_encoder_2"][1]), where, "text_encoder_2", source,
                             dtype)
            tok2 = _load_part(AutoTokenizer, where, "tokenizer_2", source, dtype)
            te2.eval()
        unet.eval()
        te.eval()
        return cls(unet, te, tok, sched, vae=vae, text_encoder_2=te2, tokenizer_2=tok2, pipeline_scheduler=pipe_sched,
                   pipeline_index=index, source=source, **kwargs)

    @classmethod
    def _load_single_file(cls, file: Path, source: str, dtype: torch.dtype, config: str | None,
                          **kwargs) -> "ImageAdapter":
        """A single-file Stable Diffusion checkpoint -> a latent :class:`ImageAdapter`, offline.

        ``file`` is one ``*.safetensors`` file in the original layout (``model.diffusion_model.*``,
        ``first_stage_model.*`` and ``cond_stage_model.transformer.*`` (SD 1.x, CLIP-L) /
        ``cond_stage_model.model.*`` (SD 2.x, OpenCLIP) / ``conditioner.embedders.{0,1}.*``
        (SDXL base)). Such a file has weights only: the architecture, tokenizer(s) and scheduler
        come from ``config``, a diffusers pipeline directory of the same model (``model_index.json``,
        ``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json``, ``tokenizer/``,
        ``scheduler/scheduler_config.json``; SDXL also ``text_encoder_2/config.json``,
        ``tokenizer_2/``; weight files there are not read), by default the file's own directory
        (the layout of the official model repositories, whose single file sits next to
        ``model_index.json``). diffusers' ``from_single_file(file, config=..., local_files_only=True)``
        converts the weights; an original ``.yaml`` config alone is not enough offline (the
        tokenizer is in neither file). Pickled checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``)
        are refused: they are never unpickled here.
        """
        suffix = file.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{source!r} is a pickled checkpoint ({suffix}); pickles are never loaded here (loading "
                             "one runs code from the file). Convert it to safetensors once, on a machine you trust "
                             "(e.g. safetensors.torch.save_file(torch.load(path, weights_only=True)['state_dict'], "
                             "'model.safetensors')), or download the model's .safetensors release")
        if suffix not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{source!r} is a file but not a .safetensors checkpoint; give a single-file Stable "
                             "Diffusion checkpoint (*.safetensors) or a model directory")
        if not file.is_file():
            raise ValueError(f"single-file checkpoint {source!r} does not exist")
        conf = Path(config).expanduser() if config is not None else file.parent
        if not (conf / PIPELINE_FILE).is_file():
            how = f"config={config!r}" if config is not None else f"the checkpoint's directory {conf}"
            raise ValueError(f"single-file checkpoint {source!r}: {how} has no {PIPELINE_FILE}. A single file holds "
                             "weights only; put it next to the configs of its pipeline (model_index.json, unet/, vae/, "
                             "text_encoder/, tokenizer/, scheduler/ and, for SDXL, text_encoder_2/, tokenizer_2/: "
                             "the model repository without its weight files), or pass config=<that directory>")
        kind, keys = _single_file_kind(file, source)
        try:
            index = json.loads((conf / PIPELINE_FILE).read_text())
            unet_cfg = json.loads((conf / "unet" / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"could not read the pipeline configs in {conf}: {first_line(e)}; it needs "
                             f"{PIPELINE_FILE} and unet/config.json") from None
        sdxl_conf = "text_encoder_2" in index and bool(index["text_encoder_2"][0])
        if (kind == "sdxl") != sdxl_conf:
            raise ValueError(f"{source!r} is an {'SDXL' if kind == 'sdxl' else 'SD 1.x/2.x'} checkpoint but the "
                             f"configs in {conf} are for {'SDXL' if sdxl_conf else 'SD 1.x/2.x'}: give the configs "
                             "of the checkpoint's own model")
        width = keys.get("cross_attention_dim")
        if width is not None and width != unet_cfg.get("cross_attention_dim"):
            raise ValueError(f"{source!r} has cross-attention width {width} but {conf / 'unet' / 'config.json'} "
                             f"says {unet_cfg.get('cross_attention_dim')} (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048): "
                             "the configs belong to another model")
        if keys.get("in_channels") is not None and keys["in_channels"] != unet_cfg.get("in_channels"):
            raise ValueError(f"{source!r}'s UNet takes {keys['in_channels']} input channels but {conf / 'unet'} "
                             f"says {unet_cfg.get('in_channels')} (an inpainting checkpoint is not supported)")
        import diffusers
        from diffusers import DDPMScheduler

        loader = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
        try:
            pipe = loader.from_single_file(str(file), config=str(conf), local_files_only=True, torch_dtype=dtype,
                                           safety_checker=None, feature_extractor=None)
        except Exception as e:  # noqa: BLE001 -- diffusers' conversion errors, named with the file
            raise ValueError(f"diffusers could not load the single-file checkpoint {source!r} with the configs in "
                             f"{conf}: {first_line(e)}") from None
        pipe_sched = pipe.scheduler
        te2 = getattr(pipe, "text_encoder_2", None) if kind == "sdxl" else None
        tok2 = getattr(pipe, "tokenizer_2", None) if kind == "sdxl" else None
        for m in (pipe.unet, pipe.text_encoder) + ((te2,) if te2 is not None else ()):
            m.eval()
        return cls(pipe.unet, pipe.text_encoder, pipe.tokenizer, DDPMScheduler.from_config(pipe_sched.config),
                   vae=pipe.vae, text_encoder_2=te2, tokenizer_2=tok2, pipeline_scheduler=pipe_sched,
                   pipeline_index=index, source=source, **kwargs)

    def reference(self) -> "ImageAdapter":
        """A frozen deep copy (eval mode, no gradients): the model "before unlearning". The VAE
        (never trained) is shared, not copied."""
        m = copy.deepcopy(self.model)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        ref = ImageAdapter(m["unet"], m["text_encoder"], self.tokenizer, self.scheduler,
                           **{**self.parts(), "text_encoder_2": m["text_encoder_2"] if self.is_sdxl else None},
                           timesteps_per_item=self.timesteps_per_item, source=self.source)
        ref._fingerprint = self._fingerprint
        ref._vae_fingerprint = self._vae_fingerprint
        return ref

    def fingerprint(self, refresh: bool = False) -> str:
        """sha256 (16 hex) over parameter/buffer names and bytes of the UNet and text encoder(s)."""
        if self._fingerprint is None or refresh:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def identity(self) -> dict[str, str]:
        """The weights plus the tokenizer's fingerprint, the noise scheduler's config, the
        timesteps drawn per item and (latent models) the VAE's weights."""
        sched = json.dumps({k: str(v) for k, v in dict(self.scheduler.config).items()}, sort_keys=True)
        out = {**super().identity(), "tokenizer": tokenizer_fingerprint(self.tokenizer),
               "scheduler": f"{type(self.scheduler).__name__} {sched}",
               "timesteps_per_item": str(self.timesteps_per_item)}
        if self.vae is not None:
            if self._vae_fingerprint is None:
                self._vae_fingerprint = weights_fingerprint(self.vae)
            out["vae"] = self._vae_fingerprint
        if self.is_sdxl:
            out["tokenizer_2"] = tokenizer_fingerprint(self.tokenizer_2)
        return out

    # ------------------------------------------------------------------ batches
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> ``(B, T)`` token ids, padded/truncated to the tokenizer's ``model_max_length``."""
        enc = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return enc["input_ids"]

    def collate(self, items: list[dict], answer_key: str | None = None, answer_index: int | None = None,
                indices: list[int] | None = None, caption_key: str = "caption", seed: int = 0) -> dict[str, Any]:
        """Build a batch of images, prompts, noise and timesteps.

        Args:
            items: dicts with ``image`` (uint8 ``(H, W, 3)``, H = W = :attr:`image_size`) and ``caption_key``.
            answer_key, answer_index: accepted for the text-adapter call signature; an image item
                has one target (its image), so they must be None or ``"answer"`` / None.
            indices: positions of the items in their dataset (kept as ``batch["index"]``).
            seed: with the item's caption and ``image_seed`` it seeds the item's noise and timesteps.
        Returns:
            ``{"pixel_values": (B, 3, H, W) in [-1, 1], "input_ids": (B, T), "noise": (B, K, C, h, w),
            "timesteps": (B, K) long, "index": (B,) long}`` with K = ``timesteps_per_item`` and
            ``(C, h, w)`` = :attr:`noise_shape` (pixels, or latents for a latent model).
        """
        if not items:
            raise ValueError("cannot collate an empty list of items")
        if answer_key not in (None, "answer") or answer_index is not None:
            raise ValueError(f"answer_key={answer_key!r}, answer_index={answer_index!r}: image items have one "
                             "target (the image); select another caption with caption_key")
        for it in items:
            for key in ("image", caption_key):
                if key not in it:
                    raise ValueError(f"item has no {key!r} field (fields: {sorted(it)})")
        x0 = images_to_tensor([it["image"] for it in items])  # (B, 3, H, W)
        if x0.shape[-1] != self.image_size or x0.shape[-2] != self.image_size:
            raise ValueError(f"images are {tuple(x0.shape[-2:])} but the UNet expects {self.image_size}x"
                             f"{self.image_size}" + (f" (latents of {self.noise_shape[1]} x the VAE's factor "
                                                     f"{self.vae_scale_factor})" if self.is_latent else ""))
        k, n_t = self.timesteps_per_item, self.scheduler.config.num_train_timesteps
        shape = self.noise_shape
        noise = torch.empty((len(items), k) + shape)
        ts = torch.empty((len(items), k), dtype=torch.long)
        for i, it in enumerate(items):
            g = torch.Generator().manual_seed(_item_seed(seed, it))
            ts[i] = torch.randint(0, n_t, (k,), generator=g)
            noise[i] = torch.randn((k,) + shape, generator=g)
        idx = torch.tensor(indices if indices is not None else list(range(len(items))), dtype=torch.long)
        return {"pixel_values": x0, "input_ids": self.tokenize([it[caption_key] for it in items]),
                "noise": noise, "timesteps": ts, "index": idx}

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> what the UNet denoises: the pixels themselves, or the
        latents ``(vae.encode(x).mean − shift_factor) · scaling_factor`` ``(B, C, h, w)``."""
        if self.vae is None:
            return pixels.to(self.device)
        cfg = self.vae.config
        dev = self._vae_device()
        z = self.vae.encode(pixels.to(dev, self.vae.dtype)).latent_dist.mean
        z = (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        return z.to(self.device, self.unet.dtype)

    @torch.no_grad()
    def decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode_images`: ``(B, C, h, w)`` -> pixels ``(B, 3, H, W)`` (about [-1, 1])."""
        if self.vae is None:
            return x
        cfg = self.vae.config
        dev = self._vae_device()
        z = x.to(dev, self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.decode(z).sample

    def _vae_device(self) -> torch.device:
        """The VAE follows the UNet's device (the trainer moves ``self.model`` only)."""
        dev = self.device
        if next(self.vae.parameters()).device != dev:
            self.vae.to(dev)
        return dev

    # ------------------------------------------------------------------ scores
    def encode_prompts(self, input_ids: torch.Tensor, model=None) -> torch.Tensor:
        """Token ids ``(B, T)`` -> the UNet's condition.

        SD 1.x / 2.x: the text encoder's last hidden state ``(B, T, d)``. SDXL: ``(B, T + 1, d)``:
        rows ``:T`` are both encoders' penultimate hidden states concatenated (the cross-attention
        input, ``d`` = the sum of their widths), row ``T`` is the pooled embedding
        (``text_encoder_2``'s ``text_embeds``, zero-padded to ``d``) -- one tensor, so the
        editors' batching (``cat``, ``chunk``, ``expand``) carries it; :meth:`noise_pred` splits it.
        """
        m = model if model is not None else self.model
        ids = input_ids.to(self.device)
        if not self.is_sdxl:
            return m["text_encoder"](input_ids=ids).last_hidden_state
        ids2 = self._ids_2(ids)
        h1 = m["text_encoder"](input_ids=ids, output_hidden_states=True).hidden_states[-2]  # (B, T, d1)
        out2 = m["text_encoder_2"](input_ids=ids2, output_hidden_states=True)
        h = torch.cat([h1, out2.hidden_states[-2]], dim=-1)  # (B, T, d1 + d2)
        pooled = F.pad(out2.text_embeds, (0, h.shape[-1] - out2.text_embeds.shape[-1]))  # (B, d)
        return torch.cat([h, pooled[:, None, :].to(h.dtype)], dim=1)

    def _ids_2(self, ids: torch.Tensor) -> torch.Tensor:
        """SDXL: ``tokenizer_2``'s ids from ``tokenizer``'s (same vocabulary; the positions after
        the first EOS get tokenizer_2's pad token)."""
        pad2 = self.tokenizer_2.pad_token_id
        if pad2 == self.tokenizer.pad_token_id:
            return ids
        is_eos = (ids == self.tokenizer.eos_token_id).long()
        after = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first EOS
        return torch.where(after, torch.full_like(ids, pad2), ids)

    def token_embeddings(self, input_ids: torch.Tensor, model=None) -> torch.Tensor:
        """``(B, T, d)``: the cross-attention input at each token position (what ``attn2.to_k`` /
        ``to_v`` see): :meth:`encode_prompts` without SDXL's pooled row."""
        cond = self.encode_prompts(input_ids, model)
        return cond[:, :input_ids.shape[1]]

    def noise_pred(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, model=None) -> torch.Tensor:
        """The UNet's output (ε_θ, or the velocity / x0 per ``prediction_type``) at ``x_t (B, C, h, w)``,
        ``t (B,)``, condition ``cond`` from :meth:`encode_prompts` -> ``(B, C, h, w)``. SDXL: the
        pooled row of ``cond`` and the time ids ``(S, S, 0, 0, S, S)`` (original size, crop
        top-left, target size; S = :attr:`image_size`) go in ``added_cond_kwargs``."""
        m = model if model is not None else self.model
        if not self.is_sdxl:
            return m["unet"](x_t, t, encoder_hidden_states=cond).sample
        p = m["text_encoder_2"].config.projection_dim
        s = self.image_size
        time_ids = torch.tensor([[s, s, 0, 0, s, s]], dtype=cond.dtype, device=cond.device).expand(cond.shape[0], 6)
        return m["unet"](x_t, t, encoder_hidden_states=cond[:, :-1],
                         added_cond_kwargs={"text_embeds": cond[:, -1, :p], "time_ids": time_ids}).sample

    def loss_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output at ``x_t = add_noise(x0, noise, t)``: ``noise``
        (``epsilon``), the velocity ``sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x0`` (``v_prediction``) or ``x0``
        (``sample``)."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0

    def item_loss(self, batch: dict[str, Any], model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-item denoising loss: ``(Σ_k mean (out_θ(x_{t_k}, c, t_k) − target_k)², K)``, both ``(B,)``;
        ``target`` = :meth:`loss_target` (ε for epsilon models), the mean is over pixels or latents.
        ``batch["latents"]`` ``(B, C, h, w)``, when present, stands for ``encode_images(pixel_values)``
        (a caller that sees the same images many times may encode them once).

        Differentiable when called in training mode with grad enabled.
        """
        x0 = batch.get("latents")  # precomputed encode_images(pixel_values) (the zoo build caches them)
        x0 = self.encode_images(batch["pixel_values"]) if x0 is None else x0.to(self.device)  # (B, C, h, w)
        noise, ts = batch["noise"].to(self.device), batch["timesteps"].to(self.device)  # (B, K, C, h, w), (B, K)
        b, k = ts.shape
        cond = self.encode_prompts(batch["input_ids"], model)  # (B, T, d)
        x0k = x0.unsqueeze(1).expand(b, k, *x0.shape[1:]).reshape(b * k, *x0.shape[1:])
        eps = noise.reshape(b * k, *x0.shape[1:]).to(x0.dtype)
        tk = ts.reshape(b * k)
        x_t = self.scheduler.add_noise(x0k, eps, tk)  # (B*K, C, h, w)
        target = self.loss_target(x0k, eps, tk)
        pred = self.noise_pred(x_t, tk, cond.repeat_interleave(k, dim=0), model)
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).reshape(b, k)
        return mse.sum(-1), torch.full((b,), k, dtype=torch.long, device=mse.device)

    item_nll = item_loss  # the text adapter's name: objectives written against item_nll run unchanged

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int | list[int] = 0, steps: int = 20, guidance: float = 3.0,
               prompt_embeds: torch.Tensor | None = None, model=None) -> np.ndarray:
        """DDIM sampling with classifier-free guidance (in latent space for a latent model, then
        decoded by the VAE).

        ``out = out(x, ∅) + guidance · (out(x, c) − out(x, ∅))`` (guidance 1 = conditional only;
        ``out`` is ε, or the velocity for v-prediction models: DDIM's step takes either).

        Args:
            prompts: B prompts.
            seed: one seed for all (prompt i uses ``seed + i``) or a list of B seeds (the I2P
                table's per-row seeds); each prompt's start noise comes from its own seed, so an
                image does not depend on the batch it is in.
            steps: DDIM steps.
            prompt_embeds: optional conditions (shaped as :meth:`encode_prompts` returns them)
                replacing the encoded prompts (inference-time methods, e.g. SAFREE, pass filtered
                embeddings here).
        Returns:
            uint8 ``(B, S, S, 3)`` images, S = :attr:`image_size`.
        """
        from diffusers import DDIMScheduler

        if steps < 1:
            raise ValueError(f"steps={steps}: must be >= 1")
        n = len(prompts)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(n)]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts: pass one seed or one per prompt")
        m = model if model is not None else self.model
        cond = prompt_embeds if prompt_embeds is not None else self.encode_prompts(self.tokenize(prompts), m)
        if cond.shape[0] != n:
            raise ValueError(f"prompt_embeds has {cond.shape[0]} rows for {n} prompts")
        uncond = self.encode_prompts(self.tokenize([""]), m).expand_as(cond)
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps)
        shape = self.noise_shape
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        x = x.to(self.device, cond.dtype) * ddim.init_noise_sigma
        both = torch.cat([uncond, cond])  # (2B, T, d)
        for t in ddim.timesteps:
            tt = torch.full((2 * n,), int(t), device=self.device, dtype=torch.long)
            e_u, e_c = self.noise_pred(torch.cat([x, x]), tt, both, m).chunk(2)
            x = ddim.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        return tensor_to_images(self.decode_latents(x))

    # ------------------------------------------------------------------ parameter groups
    _GROUPS = {
        "cross_attention_kv": r"^unet\..*attn2\.to_[kv]\.",
        "cross_attention": r"^unet\..*attn2\.",
        "self_attention": r"^unet\..*attn1\.",
        "time_embedding": r"^unet\.time_embedding\.",
        "non_cross_attention": r"^unet\.(?!.*attn2\.)",
        "unet": r"^unet\.",
        "text_encoder": r"^text_encoder(_2)?\.",
    }

    def enable_gradient_checkpointing(self) -> None:
        """The UNet's gradient checkpointing (``diffusers``)."""
        self.unet.enable_gradient_checkpointing()

    def parameter_groups(self) -> dict[str, list[str]]:
        """Named parameter groups -> parameter names (of ``self.model``).

        ``cross_attention_kv`` (ESD-x-style / UCE: ``attn2.to_k`` / ``attn2.to_v``; SD-1.x: 32
        matrices, 16 transformer blocks),
        ``cross_attention`` (all of ``attn2``), ``non_cross_attention`` (the UNet minus ``attn2``;
        ESD-u also leaves out ``time_embedding``), ``self_attention``, ``time_embedding``,
        ``unet`` and ``text_encoder`` (SDXL: both encoders). ``cross_attention`` and ``non_cross_attention`` partition
        ``unet``; ``unet`` and ``text_encoder`` partition the model.
        """
        groups: dict[str, list[str]] = {k: [] for k in self._GROUPS}
        for name, _ in self.model.named_parameters():
            for g, pat in self._GROUPS.items():
                if re.search(pat, name):
                    groups[g].append(name)
        return groups
