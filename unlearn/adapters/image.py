"""ImageAdapter: the only place that knows about text-to-image diffusion models.

It wraps a diffusers ``UNet2DConditionModel`` (pixel space, no VAE, for the tiny zoo), a
``transformers`` ``CLIPTextModel`` + tokenizer and a diffusers DDPM scheduler, and exposes
the contract objectives and metrics are written against
(:class:`~unlearn.adapters.base.ImageModel`, the image side of
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

``self.model`` is a ``ModuleDict({"unet", "text_encoder"})``, so parameter names read
``unet.down_blocks.0...attn2.to_k.weight`` / ``text_encoder.text_model...`` and one optimiser /
selection covers both parts.
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


class ImageAdapter(ImageModel):
    """A pixel-space text-to-image diffusion model behind the unlearning contract
    (:class:`~unlearn.adapters.base.ImageModel`).

    Args:
        unet: diffusers ``UNet2DConditionModel`` with ``in_channels == out_channels == 3``.
        text_encoder: ``transformers`` ``CLIPTextModel`` whose width is the UNet's cross-attention dim.
        tokenizer: its tokenizer (needs EOS and pad tokens); prompts are padded to ``model_max_length``.
        scheduler: a diffusers ``DDPMScheduler`` (training noise schedule; sampling uses DDIM on its config).
        timesteps_per_item: timesteps sampled per item by :meth:`collate` (the loss sums over them).
        source: where the model came from (recorded in provenance).
    """

    def __init__(self, unet, text_encoder, tokenizer, scheduler, *, timesteps_per_item: int = 1,
                 source: str = "<in-memory>") -> None:
        if unet.config.in_channels != 3 or unet.config.out_channels != 3:
            raise ValueError("ImageAdapter works in pixel space: the UNet needs in_channels == out_channels == 3, "
                             f"got {unet.config.in_channels}/{unet.config.out_channels}")
        if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
            raise ValueError(f"text encoder width {text_encoder.config.hidden_size} != UNet cross_attention_dim "
                             f"{unet.config.cross_attention_dim}: they do not belong together")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs an EOS and a pad token")
        if timesteps_per_item < 1:
            raise ValueError(f"timesteps_per_item={timesteps_per_item}: must be >= 1")
        self.model = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.timesteps_per_item = timesteps_per_item
        self.source = source
        self._fingerprint: str | None = None

    @property
    def unet(self):
        return self.model["unet"]

    @property
    def text_encoder(self):
        return self.model["text_encoder"]

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size)

    # ------------------------------------------------------------------ loading / saving
    def save(self, path: str | Path) -> None:
        """Write ``unet/`` and ``text_encoder/`` (safetensors), ``tokenizer/``, ``scheduler/`` and
        ``image_adapter.json`` to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.scheduler.save_pretrained(path / "scheduler")
        (path / ADAPTER_FILE).write_text(json.dumps({"kind": "image", "timesteps_per_item": self.timesteps_per_item},
                                                    indent=1))

    @classmethod
    def load(cls, source: str, **kwargs) -> "ImageAdapter":
        """Load a directory written by :meth:`save` (or a ``zoo:`` name that resolves to one). A
        wrapped model's directory (``wrapper.json``, e.g. SAFREE) raises ValueError: load it with
        ``unlearn.models.load_model(source, "image")``."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        if not isinstance(source, str) or not source:
            raise ValueError(f"model source must be a non-empty string, got {source!r}")
        if source.startswith("zoo:"):
            where = Path(zoo_path(source[4:]))
        else:
            where = Path(source).expanduser()
        if (where / WRAPPER_FILE).is_file():
            raise ValueError(f"{source!r} holds a wrapped model ({WRAPPER_FILE}), which ImageAdapter.load does not "
                             f"rebuild; load it with unlearn.models.load_model({source!r}, \"image\")")
        meta_file = where / ADAPTER_FILE
        if not meta_file.is_file():
            raise ValueError(f"{source!r} is not an image-model directory: {meta_file} is missing "
                             "(write one with ImageAdapter.save)")
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError as e:
            raise ValueError(f"could not read {meta_file}: {first_line(e)}; write the model again with "
                             "ImageAdapter.save") from None
        parts = {}
        for part, loader in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel),
                             ("tokenizer", AutoTokenizer), ("scheduler", DDPMScheduler)):
            try:
                parts[part] = loader.from_pretrained(where / part)
            except Exception as e:  # noqa: BLE001 -- corrupt, empty or missing files of one part
                raise ValueError(f"could not load the {part} of image model {source!r} from {where / part}: "
                                 f"{first_line(e)}; its files are missing, corrupt or incomplete -- save the model "
                                 "again") from None
        unet, te, tok, sched = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
        unet.eval()
        te.eval()
        kwargs.setdefault("timesteps_per_item", meta.get("timesteps_per_item", 1))
        return cls(unet, te, tok, sched, source=source, **kwargs)

    def reference(self) -> "ImageAdapter":
        """A frozen deep copy (eval mode, no gradients): the model "before unlearning"."""
        m = copy.deepcopy(self.model)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        ref = ImageAdapter(m["unet"], m["text_encoder"], self.tokenizer, self.scheduler,
                           timesteps_per_item=self.timesteps_per_item, source=self.source)
        ref._fingerprint = self._fingerprint
        return ref

    def fingerprint(self, refresh: bool = False) -> str:
        """sha256 (16 hex) over parameter/buffer names and bytes of the UNet and text encoder."""
        if self._fingerprint is None or refresh:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def identity(self) -> dict[str, str]:
        """The weights plus the tokenizer's fingerprint, the noise scheduler's config and the
        timesteps drawn per item."""
        sched = json.dumps({k: str(v) for k, v in dict(self.scheduler.config).items()}, sort_keys=True)
        return {**super().identity(), "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "scheduler": f"{type(self.scheduler).__name__} {sched}",
                "timesteps_per_item": str(self.timesteps_per_item)}

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
            items: dicts with ``image`` (uint8 ``(H, W, 3)``) and ``caption_key``.
            answer_key, answer_index: accepted for the text-adapter call signature; an image item
                has one target (its image), so they must be None or ``"answer"`` / None.
            indices: positions of the items in their dataset (kept as ``batch["index"]``).
            seed: with the item's caption and ``image_seed`` it seeds the item's noise and timesteps.
        Returns:
            ``{"pixel_values": (B, 3, H, W) in [-1, 1], "input_ids": (B, T), "noise": (B, K, 3, H, W),
            "timesteps": (B, K) long, "index": (B,) long}`` with K = ``timesteps_per_item``.
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
                             f"{self.image_size}")
        k, n_t = self.timesteps_per_item, self.scheduler.config.num_train_timesteps
        noise = torch.empty((len(items), k) + tuple(x0.shape[1:]))
        ts = torch.empty((len(items), k), dtype=torch.long)
        for i, it in enumerate(items):
            g = torch.Generator().manual_seed(_item_seed(seed, it))
            ts[i] = torch.randint(0, n_t, (k,), generator=g)
            noise[i] = torch.randn((k,) + tuple(x0.shape[1:]), generator=g)
        idx = torch.tensor(indices if indices is not None else list(range(len(items))), dtype=torch.long)
        return {"pixel_values": x0, "input_ids": self.tokenize([it[caption_key] for it in items]),
                "noise": noise, "timesteps": ts, "index": idx}

    # ------------------------------------------------------------------ scores
    def encode_prompts(self, input_ids: torch.Tensor, model=None) -> torch.Tensor:
        """Token ids ``(B, T)`` -> text-encoder token embeddings ``(B, T, d)`` (the UNet's condition)."""
        m = model if model is not None else self.model
        return m["text_encoder"](input_ids=input_ids.to(self.device)).last_hidden_state

    def noise_pred(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, model=None) -> torch.Tensor:
        """ε_θ(x_t, c, t): ``x_t (B, 3, H, W)``, ``t (B,)``, ``cond (B, T, d)`` -> ``(B, 3, H, W)``."""
        m = model if model is not None else self.model
        return m["unet"](x_t, t, encoder_hidden_states=cond).sample

    def item_loss(self, batch: dict[str, Any], model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-item denoising loss: ``(Σ_k mean_pixels (ε_θ(x_{t_k}, c, t_k) − ε_k)², K)``, both ``(B,)``.

        Differentiable when called in training mode with grad enabled.
        """
        x0 = batch["pixel_values"].to(self.device)  # (B, 3, H, W)
        noise, ts = batch["noise"].to(self.device), batch["timesteps"].to(self.device)  # (B, K, 3, H, W), (B, K)
        b, k = ts.shape
        cond = self.encode_prompts(batch["input_ids"], model)  # (B, T, d)
        x0k = x0.unsqueeze(1).expand(b, k, *x0.shape[1:]).reshape(b * k, *x0.shape[1:])
        eps = noise.reshape(b * k, *x0.shape[1:])
        tk = ts.reshape(b * k)
        x_t = self.scheduler.add_noise(x0k, eps, tk)  # (B*K, 3, H, W)
        pred = self.noise_pred(x_t, tk, cond.repeat_interleave(k, dim=0), model)
        mse = F.mse_loss(pred.float(), eps.float(), reduction="none").mean(dim=(1, 2, 3)).reshape(b, k)
        return mse.sum(-1), torch.full((b,), k, dtype=torch.long, device=mse.device)

    item_nll = item_loss  # the text adapter's name: objectives written against item_nll run unchanged

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int | list[int] = 0, steps: int = 20, guidance: float = 3.0,
               prompt_embeds: torch.Tensor | None = None, model=None) -> np.ndarray:
        """DDIM sampling with classifier-free guidance.

        ``ε = ε(x, ∅) + guidance · (ε(x, c) − ε(x, ∅))`` (guidance 1 = conditional only).

        Args:
            prompts: B prompts.
            seed: one seed for all (prompt i uses ``seed + i``) or a list of B seeds (the I2P
                table's per-row seeds); each prompt's start noise comes from its own seed, so an
                image does not depend on the batch it is in.
            steps: DDIM steps.
            prompt_embeds: optional ``(B, T, d)`` conditions replacing the encoded prompts
                (inference-time methods, e.g. SAFREE, pass filtered embeddings here).
        Returns:
            uint8 ``(B, H, W, 3)`` images.
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
        shape = (3, self.image_size, self.image_size)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        x = x.to(self.device) * ddim.init_noise_sigma
        both = torch.cat([uncond, cond])  # (2B, T, d)
        for t in ddim.timesteps:
            tt = torch.full((2 * n,), int(t), device=self.device, dtype=torch.long)
            e_u, e_c = self.noise_pred(torch.cat([x, x]), tt, both, m).chunk(2)
            x = ddim.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        return tensor_to_images(x)

    # ------------------------------------------------------------------ parameter groups
    _GROUPS = {
        "cross_attention_kv": r"^unet\..*attn2\.to_[kv]\.",
        "cross_attention": r"^unet\..*attn2\.",
        "self_attention": r"^unet\..*attn1\.",
        "time_embedding": r"^unet\.time_embedding\.",
        "non_cross_attention": r"^unet\.(?!.*attn2\.)",
        "unet": r"^unet\.",
        "text_encoder": r"^text_encoder\.",
    }

    def enable_gradient_checkpointing(self) -> None:
        """The UNet's gradient checkpointing (``diffusers``)."""
        self.unet.enable_gradient_checkpointing()

    def parameter_groups(self) -> dict[str, list[str]]:
        """Named parameter groups -> parameter names (of ``self.model``).

        ``cross_attention_kv`` (ESD-x-style / UCE: ``attn2.to_k`` / ``attn2.to_v``),
        ``cross_attention`` (all of ``attn2``), ``non_cross_attention`` (the UNet minus ``attn2``;
        ESD-u also leaves out ``time_embedding``), ``self_attention``, ``time_embedding``,
        ``unet`` and ``text_encoder``. ``cross_attention`` and ``non_cross_attention`` partition
        ``unet``; ``unet`` and ``text_encoder`` partition the model.
        """
        groups: dict[str, list[str]] = {k: [] for k in self._GROUPS}
        for name, _ in self.model.named_parameters():
            for g, pat in self._GROUPS.items():
                if re.search(pat, name):
                    groups[g].append(name)
        return groups
