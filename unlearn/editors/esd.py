"""ESD: erase a concept from a text-to-image diffusion model by fine-tuning it against its own
negatively guided noise prediction.

Paper: Gandikota, Materzynska, Fiotto-Kaufman, Bau (2023), "Erasing Concepts from Diffusion
Models", ICCV 2023, arXiv:2303.07345.

With ε* the frozen original model, c the erase concept's prompt, ∅ the empty prompt and η the
negative guidance, the edited model ε_θ is trained so that its prediction *for c* equals the
original's classifier-free guidance pushed *away* from c:

    target = ε*(x_t, ∅, t) − η · (ε*(x_t, c, t) − ε*(x_t, ∅, t))
    loss   = MSE(ε_θ(x_t, c, t), target)

Each iteration (as in the newer official code) draws a prompt c, a DDIM step index
k ∈ [0, ddim_steps), and runs the *frozen* model with guidance ``sample_guidance`` from pure
noise for k DDIM steps, giving x_t at t = the k-th DDIM timestep; then one gradient step.

Variants (which UNet parameters train; the text encoder never does):

* ``esd-x``: cross-attention only (``attn2``) -- erases the word, keeps the rest of the model;
* ``esd-u``: everything in the UNet except ``attn2`` and the time embedding -- erases the
  concept whatever the prompt says (the paper's choice for nudity);
* ``esd-all``: the whole UNet.

Deviations from the official code: the toolkit's models work in pixel space (no VAE), so x_t
is an image, not a latent; x_t is sampled with DDIM (the official SD script uses the pipeline's
scheduler); AdamW with the recipe's ``train.lr`` (tiny models need a far larger lr than SD's
1e-5..5e-5) and optional gradient clipping at ``train.max_grad_norm``; iterations come from
``train.max_steps`` when the recipe sets it, else ``iterations``; the ``captions`` prompt mode
(one of the forget items' explicit captions per iteration) is an addition.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from unlearn.editors.base import (EditContext, Editor, EditorConfig, EditResult, image_loop_start, optimizer_step,
                                  restoring_train_state)
from unlearn.tasks.visual_task import concept_value
from unlearn.trainer import TrainLog

PAPER = ("Gandikota, Materzynska, Fiotto-Kaufman, Bau (2023). Erasing Concepts from Diffusion Models. "
         "ICCV 2023, arXiv:2303.07345")

VARIANTS = ("esd-x", "esd-u", "esd-all")
PROMPT_MODES = ("concept", "captions")


@dataclass
class ESDConfig(EditorConfig):
    """Hyper-parameters of ESD (the learning rate and clipping come from the recipe's ``train``)."""

    variant: str = field(default="esd-x", metadata={
        "help": "which UNet parameters train: esd-x (cross-attention), esd-u (all but cross-attention and "
                "time embedding), esd-all (whole UNet)"})
    negative_guidance: float = field(default=1.0, metadata={
        "help": "η: how far the target is pushed away from the concept (official 1-2); >= 0"})
    iterations: int = field(default=200, metadata={
        "help": "gradient steps (one sampled x_t each) when train.max_steps is not set"})
    ddim_steps: int = field(default=20, metadata={
        "help": "DDIM steps of the schedule x_t is sampled on (x_t = after a random number of them)"})
    sample_guidance: float = field(default=3.0, metadata={
        "help": "classifier-free guidance of the frozen model when sampling x_t; >= 0"})
    prompts: str = field(default="concept", metadata={
        "help": "concept: the erase concepts' words (e.g. 'red'); captions: the forget items' explicit captions"})

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"esd.variant={self.variant!r}: must be one of {', '.join(VARIANTS)}")
        if not (math.isfinite(self.negative_guidance) and self.negative_guidance >= 0):
            raise ValueError(f"esd.negative_guidance={self.negative_guidance}: must be a finite number >= 0")
        if not (isinstance(self.iterations, int) and self.iterations >= 1):
            raise ValueError(f"esd.iterations={self.iterations!r}: must be an integer >= 1")
        if not (isinstance(self.ddim_steps, int) and self.ddim_steps >= 1):
            raise ValueError(f"esd.ddim_steps={self.ddim_steps!r}: must be an integer >= 1")
        if not (math.isfinite(self.sample_guidance) and self.sample_guidance >= 0):
            raise ValueError(f"esd.sample_guidance={self.sample_guidance}: must be a finite number >= 0")
        if self.prompts not in PROMPT_MODES:
            raise ValueError(f"esd.prompts={self.prompts!r}: must be one of {', '.join(PROMPT_MODES)}")


# ---------------------------------------------------------------------------- the objective
def esd_target(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's training target ``ε(∅) − η (ε(c) − ε(∅))`` from the frozen model's predictions
    (any matching shapes, e.g. ``(B, 3, H, W)``)."""
    if eps_uncond.shape != eps_cond.shape:
        raise ValueError(f"eps_uncond {tuple(eps_uncond.shape)} and eps_cond {tuple(eps_cond.shape)} must match")
    return eps_uncond - eta * (eps_cond - eps_uncond)


def esd_loss(adapter, reference, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
             eta: float) -> torch.Tensor:
    """One ESD step's loss ``MSE(ε_θ(x_t, c, t), esd_target(ε*(x_t, ∅, t), ε*(x_t, c, t), η))``.

    Args:
        adapter: the model being edited (ε_θ; differentiable).
        reference: the frozen original (ε*; evaluated without gradients).
        x_t: ``(B, C, h, w)`` noisy images (pixels, or a latent model's latents); t: ``(B,)`` timesteps.
        cond, uncond: ``(B, T, d)`` text-encoder embeddings of the concept prompt and of ``""``.
    Returns:
        the scalar loss (mean over all pixels and the batch).
    """
    with torch.no_grad():
        e_u = reference.noise_pred(x_t, t, uncond)  # (B, 3, H, W)
        e_c = reference.noise_pred(x_t, t, cond)  # (B, 3, H, W)
        target = esd_target(e_u, e_c, eta)
    pred = adapter.noise_pred(x_t, t, cond)  # (B, 3, H, W)
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def sample_xt(reference, ddim, cond: torch.Tensor, uncond: torch.Tensor, n_steps: int, guidance: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen model's guided DDIM from pure noise for ``n_steps`` steps.

    Args:
        ddim: a ``DDIMScheduler`` with ``set_timesteps`` called; ``n_steps < len(ddim.timesteps)``.
        cond, uncond: ``(B, T, d)`` prompt and empty-prompt embeddings.
    Returns:
        ``(x_t (B, *reference.noise_shape), t (B,) long)`` with ``t = ddim.timesteps[n_steps]`` (the timestep
        x_t is at, where the ESD loss is taken).
    """
    b, dev = cond.shape[0], reference.device
    shape = tuple(getattr(reference, "noise_shape", (3, reference.image_size, reference.image_size)))
    x = torch.randn((b,) + shape, generator=generator).to(dev, cond.dtype) * ddim.init_noise_sigma  # pixels or latents
    both = torch.cat([uncond, cond])  # (2B, T, d)
    for t in ddim.timesteps[:n_steps]:
        tt = torch.full((2 * b,), int(t), device=dev, dtype=torch.long)
        e_u, e_c = reference.noise_pred(torch.cat([x, x]), tt, both).chunk(2)
        x = ddim.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    t_k = torch.full((b,), int(ddim.timesteps[n_steps]), device=dev, dtype=torch.long)
    return x, t_k


# ---------------------------------------------------------------------------- helpers
def trainable_names(adapter, variant: str) -> list[str]:
    """Names (in ``adapter.model``) of the parameters a variant trains."""
    groups = adapter.parameter_groups()
    if variant == "esd-x":
        return list(groups["cross_attention"])
    if variant == "esd-u":
        skip = set(groups["time_embedding"])
        return [n for n in groups["non_cross_attention"] if n not in skip]
    if variant == "esd-all":
        return list(groups["unet"])
    raise ValueError(f"esd.variant={variant!r}: must be one of {', '.join(VARIANTS)}")


def retain_captions(data, needs: str, off: str) -> list[str]:
    """The distinct explicit captions of the task's retain items (the other concepts of the world), for
    the editors whose extra term keeps them (AdvUnlearn's retain term, SPM's anchoring). ``needs`` and
    ``off`` complete the error when there are none: "<needs>: ... (name task.retain_split, or set <off>)"."""
    caps = [it["caption"] for it in (getattr(data, "retain", None) or []) if it.get("phrasing", "explicit") == "explicit"]
    if not caps:
        raise ValueError(f"{needs}: the task has no retain items with explicit captions (name task.retain_split, "
                         f"or set {off})")
    return list(dict.fromkeys(caps))


def esd_prompts(data, mode: str) -> list[str]:
    """The prompts ESD erases: the erase concepts' words (``concept``) or the distinct explicit
    captions of the forget items (``captions``)."""
    if mode == "concept":
        erase = getattr(data, "erase", None)
        if not erase:
            raise ValueError("esd.prompts='concept' needs visual data with erase concepts (data.erase is empty "
                             "or missing)")
        return [concept_value(c) for c in erase]
    if mode == "captions":
        caps = [it["caption"] for it in data.forget if it.get("phrasing", "explicit") == "explicit"]
        if not caps:
            raise ValueError("esd.prompts='captions': the forget set has no explicit captions")
        return list(dict.fromkeys(caps))
    raise ValueError(f"esd.prompts={mode!r}: must be one of {', '.join(PROMPT_MODES)}")


# ---------------------------------------------------------------------------- the editor
class ESD(Editor):
    """ESD as an editor: fine-tunes the variant's UNet parameters of the target in place (the
    other parameters are frozen during the edit; every ``requires_grad`` flag is restored)."""

    name = "esd"
    full_parameters = "it trains the UNet in its own loop against a frozen copy, outside accelerate"
    Config = ESDConfig
    paper = PAPER
    modalities = ("image",)

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        from diffusers import DDIMScheduler
        from tqdm.auto import tqdm

        cfg, settings = self.config, ctx.settings
        n_iter, rng, gen = image_loop_start(adapter, settings, cfg.iterations, self.name, ctx.seed)
        prompts = esd_prompts(data, cfg.prompts)

        reference = adapter.reference()  # ε*: frozen deep copy of the unedited model
        ddim = DDIMScheduler.from_config(adapter.scheduler.config)
        ddim.set_timesteps(cfg.ddim_steps)
        with torch.no_grad():  # the text encoder is never trained: embed every prompt once
            conds = reference.encode_prompts(reference.tokenize(prompts))  # (P, T, d)
            uncond = reference.encode_prompts(reference.tokenize([""]))  # (1, T, d)

        names = set(trainable_names(adapter, cfg.variant))
        params = [p for n, p in adapter.model.named_parameters() if n in names]
        log = TrainLog(seed=ctx.seed)
        t0 = time.perf_counter()
        with restoring_train_state(adapter):
            for n, p in adapter.model.named_parameters():
                p.requires_grad_(n in names)
            opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=getattr(settings, "weight_decay", 0.0))
            adapter.model["unet"].train()
            bar = tqdm(range(n_iter), desc=f"ESD ({cfg.variant})", disable=not ctx.progress, mininterval=1)
            for it in bar:
                p_i = rng.randrange(len(prompts))
                k = rng.randrange(cfg.ddim_steps)
                cond = conds[p_i:p_i + 1]  # (1, T, d)
                x_t, t = sample_xt(reference, ddim, cond, uncond, k, cfg.sample_guidance, gen)
                loss = esd_loss(adapter, reference, x_t, t, cond, uncond, cfg.negative_guidance)
                optimizer_step(loss, opt, params, settings.max_grad_norm,
                               f"ESD at iteration {it + 1} (prompt {prompts[p_i]!r}, t={int(t[0])}); lower train.lr or "
                               "esd.negative_guidance")
                log.steps += 1
                log.history.append({"step": it + 1, "loss": round(loss.item(), 6), "lr": settings.lr,
                                    "t": int(t[0]), "prompt": prompts[p_i]})
                bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
        log.seconds = time.perf_counter() - t0

        label = {"esd-x": "ESD-x", "esd-u": "ESD-u", "esd-all": "ESD-all"}[cfg.variant]
        info = {
            "variant": cfg.variant,
            "iterations": n_iter,
            "prompts": prompts,
            "trainable_parameters": sum(p.numel() for p in params),
            "parameters_total": sum(p.numel() for p in adapter.model.parameters()),
            "losses": [h["loss"] for h in log.history[::10]],
            "edit_seconds": round(log.seconds, 3),
            "headline": f"{label}: {n_iter} iterations, {log.seconds:.1f} s",
        }
        return EditResult(adapter=adapter, log=log, info=info)
