"""Concept Ablation: make a text-to-image model draw an anchor concept when asked for the target
concept, by matching its predictions on the two prompts.

Paper: Kumari, Zhang, Wang, Shechtman, Zhang, Zhu (2023), "Ablating Concepts in Text-to-Image
Diffusion Models", ICCV 2023, arXiv:2303.13516 (the "model-based" variant).

With ``c*`` a prompt of the erased concept ("a picture of a solid red circle"), ``c_a`` its
anchor prompt (the erased word replaced by its guide: "... blue circle"), ``x`` an image of the
anchor made by the frozen original model from ``c_a`` and ``x_t`` its noised version:

    loss = ‖ε_θ(x_t, c*, t) − sg ε_θ(x_t, c_a, t)‖²  +  λ · ‖ε_θ(x_t, c_a, t) − ε‖²

The first term moves the target prompt's prediction onto the (stop-gradient) anchor prediction
of the model being trained; the second (prior preservation) keeps the anchor itself drawable.

Variants (which parameters train): ``kv`` (``attn2.to_k`` / ``to_v``; the paper's
cross-attention "Cross-Attn" setting), ``cross_attention`` (all of ``attn2``), ``unet`` (the
paper's "Full Weights"). The text encoder never trains.

Prompts: every distinct explicit forget caption containing an erase word, plus the bare word,
each paired with its anchor (the guide word in its place). Deviations from the official code:
pixel-space tiny models; anchor images from DDIM with guidance ``guidance``; AdamW with the
recipe's ``train.lr`` (tiny models need a far larger lr than the paper's 2e-6); iterations from
``train.max_steps`` when set, else ``iterations``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from unlearn.adapters.image import images_to_tensor
from unlearn.editors.base import (EditContext, Editor, EditorConfig, EditResult, image_loop_start, optimizer_step,
                                  restoring_train_state)
from unlearn.tasks.visual_task import concept_value
from unlearn.trainer import TrainLog

PAPER = ("Kumari, Zhang, Wang, Shechtman, Zhang, Zhu (2023). Ablating Concepts in Text-to-Image Diffusion Models. "
         "ICCV 2023, arXiv:2303.13516")
VARIANTS = ("kv", "cross_attention", "unet")
_GROUP = {"kv": "cross_attention_kv", "cross_attention": "cross_attention", "unet": "unet"}


@dataclass
class ConceptAblationConfig(EditorConfig):
    """Hyper-parameters of Concept Ablation (lr, clipping and weight decay come from ``train``)."""

    variant: str = field(default="kv", metadata={
        "help": "which parameters train: kv (attn2 to_k/to_v), cross_attention (attn2), unet (the whole UNet)"})
    iterations: int = field(default=200, metadata={"help": "gradient steps when train.max_steps is not set"})
    batch_size: int = field(default=8, metadata={"help": "(target, anchor) pairs per step"})
    prior_weight: float = field(default=1.0, metadata={"help": "λ of the prior-preservation term; >= 0"})
    anchor_images: int = field(default=64, metadata={"help": "anchor images the frozen model draws (cycled over "
                                                                 "the prompt pairs)"})
    sample_steps: int = field(default=20, metadata={"help": "DDIM steps of the anchor images"})
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance of the anchor images"})

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"concept_ablation.variant={self.variant!r}: must be one of {', '.join(VARIANTS)}")
        for k in ("iterations", "batch_size", "anchor_images", "sample_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"concept_ablation.{k}={v!r}: must be an integer >= 1")
        for k in ("prior_weight", "guidance"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"concept_ablation.{k}={v}: must be a finite number >= 0")


def anchor_pairs(data, who: str = "concept_ablation") -> list[tuple[str, str]]:
    """``[(target prompt, anchor prompt)]``: each erase word alone and every distinct explicit forget
    caption containing it, with the guide word in its place (erase and guide concepts pair up in order).
    ``who``: the method named in the errors."""
    erase = [concept_value(c) for c in (getattr(data, "erase", None) or [])]
    guide = [concept_value(c) for c in (getattr(data, "guide", None) or [])]
    if not erase:
        raise ValueError(f"{who} needs visual data with erase concepts (task.visual.erase)")
    if len(guide) != len(erase):
        raise ValueError(f"{who} maps each erase concept onto its anchor: task.visual.guide needs one "
                         f"concept per erase concept (erase {erase}, guide {guide})")
    pairs = list(zip(erase, guide))
    for cap in dict.fromkeys(it["caption"] for it in data.forget if it.get("phrasing", "explicit") == "explicit"):
        for e, g in zip(erase, guide):
            pat = re.compile(rf"\b{re.escape(e)}\b")
            if pat.search(cap):
                pairs.append((cap, pat.sub(g, cap)))
    return pairs


class ConceptAblation(Editor):
    """Concept Ablation as an editor: trains the variant's parameters of the target in place
    (every ``requires_grad`` flag is restored)."""

    name = "concept_ablation"
    full_parameters = "it trains the UNet in its own loop on anchor images the frozen model draws, outside accelerate"
    Config = ConceptAblationConfig
    paper = PAPER
    modalities = ("image",)

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        from tqdm.auto import tqdm

        cfg, settings = self.config, ctx.settings
        n_iter, rng, gen = image_loop_start(adapter, settings, cfg.iterations, self.name, ctx.seed)
        pairs = anchor_pairs(data)
        t0 = time.perf_counter()

        # anchor images from the frozen (unedited) model: image j belongs to pair j mod P
        idx = [j % len(pairs) for j in range(cfg.anchor_images)]
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) for _ in idx]
        with torch.no_grad():
            imgs = adapter.sample([pairs[i][1] for i in idx], seed=seeds, steps=cfg.sample_steps,
                                  guidance=cfg.guidance)
            x0 = adapter.encode_images(images_to_tensor(imgs))  # (N, C, h, w)
            ids_t = adapter.tokenize([pairs[i][0] for i in idx])
            ids_a = adapter.tokenize([pairs[i][1] for i in idx])
            cond_t = adapter.encode_prompts(ids_t)  # (N, T, d): the text encoder never trains
            cond_a = adapter.encode_prompts(ids_a)
        names = set(adapter.parameter_groups()[_GROUP[cfg.variant]])
        params = [p for n, p in adapter.model.named_parameters() if n in names]
        n_t = adapter.scheduler.config.num_train_timesteps
        log = TrainLog(seed=ctx.seed)
        with restoring_train_state(adapter):
            for n, p in adapter.model.named_parameters():
                p.requires_grad_(n in names)
            opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=getattr(settings, "weight_decay", 0.0))
            adapter.model["unet"].train()
            bar = tqdm(range(n_iter), desc=f"Concept Ablation ({cfg.variant})", disable=not ctx.progress,
                       mininterval=1)
            for it in bar:
                b = [rng.randrange(len(idx)) for _ in range(min(cfg.batch_size, len(idx)))]
                x = x0[b]
                eps = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
                t = torch.randint(0, n_t, (len(b),), generator=gen).to(x.device)
                x_t = adapter.scheduler.add_noise(x, eps, t)
                with torch.no_grad():
                    target = adapter.noise_pred(x_t, t, cond_a[b])  # sg ε_θ(x_t, c_a, t)
                ablate = F.mse_loss(adapter.noise_pred(x_t, t, cond_t[b]).float(), target.float())
                loss = ablate
                prior = None
                if cfg.prior_weight > 0:
                    prior = F.mse_loss(adapter.noise_pred(x_t, t, cond_a[b]).float(),
                                       adapter.loss_target(x, eps, t).float())
                    loss = loss + cfg.prior_weight * prior
                optimizer_step(loss, opt, params, settings.max_grad_norm,
                               f"concept_ablation at iteration {it + 1}; lower train.lr")
                log.steps += 1
                log.history.append({"step": it + 1, "loss": round(loss.item(), 6), "ablation": round(ablate.item(), 6),
                                    **({"prior": round(prior.item(), 6)} if prior is not None else {}),
                                    "lr": settings.lr})
                bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
        log.seconds = time.perf_counter() - t0
        info = {"variant": cfg.variant, "iterations": n_iter, "pairs": [list(p) for p in pairs[:8]],
                "n_pairs": len(pairs), "anchor_images": len(idx),
                "trainable_parameters": sum(p.numel() for p in params),
                "parameters_total": sum(p.numel() for p in adapter.model.parameters()),
                "losses": [h["loss"] for h in log.history[::10]], "edit_seconds": round(log.seconds, 3),
                "headline": f"Concept Ablation ({cfg.variant}): {n_iter} iterations, {log.seconds:.1f} s"}
        return EditResult(adapter=adapter, log=log, info=info)


__all__ = ["ConceptAblation", "ConceptAblationConfig", "anchor_pairs", "PAPER"]
