"""All but One: erase a concept by surgically replacing its classifier-free guidance term with a
surrogate concept's, while the unconditional prediction is held in place.

Paper: Hong, Lee, Woo (2024), "All but One: Surgical Concept Erasing with Model Preservation in
Text-to-Image Diffusion Models", AAAI 2024.

With ε* the frozen original model, c_e the erase concept's prompt, c_s the same prompt with the
surrogate (guide) concept in its place and ∅ the empty prompt, the *guidance term* of a prompt is
what classifier-free guidance adds to the unconditional prediction, ``g(c) = ε(x_t, c) − ε(x_t, ∅)``.
The edited model ε_θ is trained so that the erase prompt's guidance term becomes the surrogate's
under the original model, and so that its unconditional prediction does not drift:

    L = ‖ (ε_θ(x_t, c_e) − ε_θ(x_t, ∅)) − (ε*(x_t, c_s) − ε*(x_t, ∅)) ‖²  +  λ ‖ ε_θ(x_t, ∅) − ε*(x_t, ∅) ‖²

ESD's target for c_e (``ε*(∅) − η·g*(c_e)``) pushes away from the concept and leaves the model to
draw whatever lies there; Concept Ablation matches the full prediction for c_e to the anchor's; here
only the guidance term moves, onto the surrogate's, and the second term keeps the unconditional
score (everything a prompt does not ask for) where the original had it: the "model preservation"
of the title.

x_t: as in ESD, each iteration draws a (c_e, c_s) pair and a DDIM step index k ∈ [0, ddim_steps) and
runs the frozen model with guidance ``sample_guidance`` from pure noise for k DDIM steps, at c_e.
The pairs are Concept Ablation's (:func:`~unlearn.editors.concept_ablation.anchor_pairs`): each erase
word alone and each explicit forget caption, with the guide word in its place.

Deviation: the loss above is reconstructed from the paper's abstract and method summary (as
``DIFFUSION.md`` records), not from official code (none was available here); the trainable
parameters (``params``: cross-attention by default, as ESD-x) and the sampling of x_t are ESD's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from unlearn.editors.base import (EditContext, Editor, EditorConfig, EditResult, image_loop_start, optimizer_step,
                                  restoring_train_state)
from unlearn.editors.concept_ablation import anchor_pairs
from unlearn.editors.esd import sample_xt, trainable_names
from unlearn.trainer import TrainLog

PAPER = ("Hong, Lee, Woo (2024). All but One: Surgical Concept Erasing with Model Preservation in Text-to-Image "
         "Diffusion Models. AAAI 2024")

PARAMS = {"cross_attention": "esd-x", "non_cross_attention": "esd-u", "unet": "esd-all"}


@dataclass
class AllButOneConfig(EditorConfig):
    """Hyper-parameters of All but One (the learning rate and clipping come from the recipe's ``train``)."""

    params: str = field(default="cross_attention", metadata={
        "help": "which UNet parameters train: cross_attention, non_cross_attention (all but cross-attention and "
                "time embedding) or unet"})
    preserve_weight: float = field(default=1.0, metadata={
        "help": "λ: weight of the unconditional-drift term ‖ε_θ(x_t, ∅) − ε*(x_t, ∅)‖²; >= 0"})
    iterations: int = field(default=200, metadata={
        "help": "gradient steps (one sampled x_t each) when train.max_steps is not set"})
    ddim_steps: int = field(default=20, metadata={
        "help": "DDIM steps of the schedule x_t is sampled on (x_t = after a random number of them)"})
    sample_guidance: float = field(default=3.0, metadata={
        "help": "classifier-free guidance of the frozen model when sampling x_t; >= 0"})

    def __post_init__(self) -> None:
        if self.params not in PARAMS:
            raise ValueError(f"all_but_one.params={self.params!r}: must be one of {', '.join(PARAMS)}")
        for k in ("preserve_weight", "sample_guidance"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"all_but_one.{k}={v!r}: must be a finite number >= 0")
        for k in ("iterations", "ddim_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"all_but_one.{k}={v!r}: must be an integer >= 1")


# ---------------------------------------------------------------------------- the objective
def all_but_one_loss(adapter, reference, x_t: torch.Tensor, t: torch.Tensor, cond_e: torch.Tensor,
                     cond_s: torch.Tensor, uncond: torch.Tensor, preserve_weight: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's loss -> ``(loss, guidance term, preservation term)`` (scalars).

    Args:
        adapter: the model being edited (ε_θ; differentiable).
        reference: the frozen original (ε*; evaluated without gradients).
        x_t: ``(B, C, h, w)`` noisy images or latents; t: ``(B,)`` timesteps.
        cond_e, cond_s, uncond: ``(B, T, d)`` embeddings of the erase prompt, the surrogate prompt and ``""``.
    """
    with torch.no_grad():
        e_u, e_s = reference.noise_pred(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                        torch.cat([uncond, cond_s])).chunk(2)  # (B, C, h, w) each
    p_u, p_e = adapter.noise_pred(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                  torch.cat([uncond, cond_e])).chunk(2)  # (B, C, h, w) each
    guide = F.mse_loss((p_e - p_u).float(), (e_s - e_u).float())
    keep = F.mse_loss(p_u.float(), e_u.float())
    return guide + preserve_weight * keep, guide, keep


# ---------------------------------------------------------------------------- the editor
class AllButOne(Editor):
    """All but One as an editor: fine-tunes ``params`` of the target's UNet in place (every other
    parameter is frozen during the edit; every ``requires_grad`` flag and module mode is restored)."""

    name = "all_but_one"
    full_parameters = "it trains the UNet in its own loop against a frozen copy, outside accelerate"
    Config = AllButOneConfig
    paper = PAPER
    modalities = ("image",)

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        from diffusers import DDIMScheduler
        from tqdm.auto import tqdm

        cfg, settings = self.config, ctx.settings
        n_iter, rng, gen = image_loop_start(adapter, settings, cfg.iterations, self.name, ctx.seed)
        pairs = anchor_pairs(data, self.name)

        reference = adapter.reference()  # ε*: frozen deep copy of the unedited model
        ddim = DDIMScheduler.from_config(adapter.scheduler.config)
        ddim.set_timesteps(cfg.ddim_steps)
        with torch.no_grad():  # the text encoder never trains: embed every prompt once
            conds_e = reference.encode_prompts(reference.tokenize([e for e, _ in pairs]))  # (P, T, d)
            conds_s = reference.encode_prompts(reference.tokenize([s for _, s in pairs]))  # (P, T, d)
            uncond = reference.encode_prompts(reference.tokenize([""]))  # (1, T, d)

        names = set(trainable_names(adapter, PARAMS[cfg.params]))
        params = [p for n, p in adapter.model.named_parameters() if n in names]
        log = TrainLog(seed=ctx.seed)
        t0 = time.perf_counter()
        with restoring_train_state(adapter):
            for n, p in adapter.model.named_parameters():
                p.requires_grad_(n in names)
            opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=getattr(settings, "weight_decay", 0.0))
            adapter.model["unet"].train()
            bar = tqdm(range(n_iter), desc=f"All but One ({cfg.params})", disable=not ctx.progress, mininterval=1)
            for it in bar:
                p_i = rng.randrange(len(pairs))
                k = rng.randrange(cfg.ddim_steps)
                cond_e, cond_s = conds_e[p_i:p_i + 1], conds_s[p_i:p_i + 1]  # (1, T, d)
                x_t, t = sample_xt(reference, ddim, cond_e, uncond, k, cfg.sample_guidance, gen)
                loss, guide, keep = all_but_one_loss(adapter, reference, x_t, t, cond_e, cond_s, uncond,
                                                     cfg.preserve_weight)
                optimizer_step(loss, opt, params, settings.max_grad_norm,
                               f"all_but_one at iteration {it + 1} (prompt {pairs[p_i][0]!r}, t={int(t[0])}); "
                               "lower train.lr")
                log.steps += 1
                log.history.append({"step": it + 1, "loss": round(loss.item(), 6), "guidance": round(guide.item(), 6),
                                    "preserve": round(keep.item(), 8), "t": int(t[0]), "prompt": pairs[p_i][0],
                                    "lr": settings.lr})
                bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
        log.seconds = time.perf_counter() - t0

        info = {
            "params": cfg.params,
            "iterations": n_iter,
            "pairs": [list(p) for p in pairs[:8]],
            "n_pairs": len(pairs),
            "trainable_parameters": sum(p.numel() for p in params),
            "parameters_total": sum(p.numel() for p in adapter.model.parameters()),
            "losses": [h["loss"] for h in log.history[::10]],
            "edit_seconds": round(log.seconds, 3),
            "headline": f"All but One ({cfg.params}): {n_iter} iterations, {log.seconds:.1f} s",
        }
        return EditResult(adapter=adapter, log=log, info=info)


__all__ = ["AllButOne", "AllButOneConfig", "PAPER", "all_but_one_loss"]
