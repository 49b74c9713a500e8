"""AdvUnlearn: erase a concept by adversarial training -- ESD's loss taken at the prompt an
attacker finds, with a retain term -- on the text encoder (by default) of a text-to-image model.

Paper: Zhang, Chen, Jia, Zhang, Liu, Ding, Hong, Liu (2024), "Defensive Unlearning with
Adversarial Training for Robust Concept Erasure in Diffusion Models", NeurIPS 2024,
arXiv:2405.15234.

With ε* the frozen original model, ε_θ the model being edited, E_θ / E* their text encoders, c
the erase concept's prompt, ∅ the empty prompt, η the negative guidance, δ ``tokens`` soft
prefix token embeddings (input-embedding space of the text encoder) and ``δ ⊕ c`` the prompt
``[BOS] δ c [EOS]``, training is a min-max problem:

    inner (attack):  δ* = argmin_δ  ‖ε_θ(x_t, E_θ(δ ⊕ c), t) − ε*(x_t, E*(c), t)‖²
    outer (defence): min_θ  ‖ε_θ(x_t, E_θ(δ* ⊕ c), t) − [ε*(x_t, ∅, t) − η (ε*(x_t, E*(c), t) − ε*(x_t, ∅, t))]‖²
                          + γ · mean_r ‖ε_θ(x^r_t, E_θ(r), t) − ε*(x^r_t, E*(r), t)‖²

The inner problem is the soft-prompt attack (UnlearnDiffAtk's threat model, continuous): the
prefix that makes the *current* model predict what the original predicts for the concept,
i.e. brings the concept back. The outer problem is ESD's loss at that adversarial prompt (the
model must push the concept away even when attacked) plus a utility-retaining regulariser on
retain prompts ``r`` (other concepts of the world): their predictions stay the original's. ``x_t``
(and ``x^r_t``) are drawn, as in ESD, by running the frozen model's guided DDIM from noise for a
random number of the ``ddim_steps`` steps with the concept (retain) prompt.

The paper's finding is that the text encoder is the module to train for robustness (and it is
then a plug-in for other diffusion models); ``module`` picks it (``text_encoder``: the encoder
layers, the official ``text_encoder_full`` -- token/position embeddings and the final layer norm
stay) or the UNet's ``cross_attention_kv`` (``attn2.to_k`` / ``to_v``) for comparison.

Schedule (official): the first ``warmup`` iterations are plain ESD + retain (no attack); then
every ``attack_every`` iterations the prefix is re-optimised for ``attack_steps`` Adam steps at
``attack_lr``, starting from the previous prefix (``attack_init: latest``) or from random
vocabulary tokens (``random``).

Deviations from the official code (``docs/editors/advunlearn.md``): the attack and the outer
step share one sampled ``x_t`` per iteration (official: the attack samples its own); the retain
term is the "reg" form (added to each step's loss, retain ``x^r_t`` sampled from the retain
prompts) rather than the default "iter" form (a separate retain step after each update); Adam
for the text encoder with the recipe's ``train.lr``; pixel-space or latent models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from unlearn.editors.base import (EditContext, Editor, EditorConfig, EditResult, image_loop_start, optimizer_step,
                                  restoring_train_state)
from unlearn.editors.esd import esd_prompts, esd_target, retain_captions, sample_xt
from unlearn.trainer import TrainLog

PAPER = ("Zhang, Chen, Jia, Zhang, Liu, Ding, Hong, Liu (2024). Defensive Unlearning with Adversarial Training for "
         "Robust Concept Erasure in Diffusion Models. NeurIPS 2024, arXiv:2405.15234")

MODULES = ("text_encoder", "cross_attention_kv")
ATTACK_INITS = ("latest", "random")
PROMPT_MODES = ("concept", "captions")
# text-encoder parameters the official text_encoder_full setting leaves alone
_TE_FROZEN = ("embeddings.", "final_layer_norm.")


@dataclass
class AdvUnlearnConfig(EditorConfig):
    """Hyper-parameters of AdvUnlearn (the outer learning rate and clipping come from ``train``).

    Official SD-1.4 values (code defaults) in brackets; the defaults here are for the tiny zoo."""

    module: str = field(default="text_encoder", metadata={
        "help": "what trains: text_encoder (its encoder layers; the paper's choice) or cross_attention_kv "
                "(UNet attn2 to_k/to_v)"})
    iterations: int = field(default=200, metadata={
        "help": "outer steps when train.max_steps is not set [official 300; paper 1000]"})
    warmup: int = field(default=20, metadata={"help": "outer steps before the first attack [200]"})
    tokens: int = field(default=1, metadata={"help": "soft prefix tokens of the attack [1]"})
    attack_steps: int = field(default=10, metadata={"help": "inner (attack) optimisation steps per attack [30]"})
    attack_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the attack [1e-3]"})
    attack_every: int = field(default=1, metadata={"help": "outer steps between two attacks [1]"})
    attack_init: str = field(default="latest", metadata={
        "help": "latest (warm-start from the previous prefix) or random (random vocabulary tokens) [latest]"})
    retain_weight: float = field(default=1.0, metadata={"help": "γ of the retain term [1.0; 0.3 in the run script]"})
    retain_batch: int = field(default=2, metadata={"help": "retain prompts per step [1; 5 in the paper]"})
    negative_guidance: float = field(default=1.0, metadata={"help": "η of the ESD target [1.0]"})
    ddim_steps: int = field(default=20, metadata={"help": "DDIM steps x_t is sampled on [50]"})
    sample_guidance: float = field(default=3.0, metadata={"help": "guidance when sampling x_t [3.0]"})
    prompts: str = field(default="concept", metadata={
        "help": "concept: the erase words ('red'); captions: the forget items' explicit captions"})

    def __post_init__(self) -> None:
        if self.module not in MODULES:
            raise ValueError(f"advunlearn.module={self.module!r}: must be one of {', '.join(MODULES)}")
        if self.attack_init not in ATTACK_INITS:
            raise ValueError(f"advunlearn.attack_init={self.attack_init!r}: must be one of {', '.join(ATTACK_INITS)}")
        if self.prompts not in PROMPT_MODES:
            raise ValueError(f"advunlearn.prompts={self.prompts!r}: must be one of {', '.join(PROMPT_MODES)}")
        for k in ("iterations", "tokens", "attack_every", "retain_batch", "ddim_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"advunlearn.{k}={v!r}: must be an integer >= 1")
        for k in ("warmup", "attack_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"advunlearn.{k}={v!r}: must be an integer >= 0")
        for k in ("attack_lr", "retain_weight", "negative_guidance", "sample_guidance"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"advunlearn.{k}={v!r}: must be a finite number >= 0")


# ---------------------------------------------------------------------------- pieces
def trainable_names(adapter, module: str) -> list[str]:
    """Names (in ``adapter.model``) of the parameters ``module`` trains."""
    groups = adapter.parameter_groups()
    if module == "text_encoder":
        return [n for n in groups["text_encoder"] if not any(f".{s}" in n for s in _TE_FROZEN)]
    if module == "cross_attention_kv":
        return list(groups["cross_attention_kv"])
    raise ValueError(f"advunlearn.module={module!r}: must be one of {', '.join(MODULES)}")


def retain_prompts(data) -> list[str]:
    """The distinct explicit captions of the retain items (other concepts of the world)."""
    return retain_captions(data, "advunlearn's retain term needs retain prompts", "method.params.retain_weight: 0")


def adversarial_condition(adapter, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """``E_θ(δ ⊕ c)`` ``(B, T, d)``: the edited model's condition for token ids ``ids`` ``(B, T)`` whose
    ``mask`` ``(B, T)`` slots hold the soft prefix ``prefix`` ``(n, d_in)`` (differentiable in it and in
    the text encoder)."""
    from unlearn.evaluators.optim_attacks import soft_tokens

    full = torch.zeros(ids.shape[0], ids.shape[1], prefix.shape[-1], dtype=prefix.dtype, device=prefix.device)
    full = full.masked_scatter(mask[..., None].to(full.device), prefix.expand(ids.shape[0], -1, -1))  # (B, T, d_in)
    with soft_tokens(adapter, mask, full):
        return adapter.encode_prompts(ids)


def soft_prompt_attack(adapter, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor, x_t: torch.Tensor,
                       t: torch.Tensor, target: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """The inner problem: ``steps`` Adam steps on the soft prefix ``prefix`` ``(n, d_in)`` minimising
    ``‖ε_θ(x_t, E_θ(δ ⊕ c), t) − target‖²`` (``target`` = ε*(x_t, E*(c), t), ``(B, C, h, w)``).
    Gradients go to the prefix only (the model's ``.grad`` are untouched).

    Returns the optimised prefix (detached) and the loss at each step (before its update)."""
    delta = prefix.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    losses = []
    for _ in range(steps):
        cond = adversarial_condition(adapter, ids, mask, delta)
        loss = F.mse_loss(adapter.noise_pred(x_t, t, cond).float(), target.float())
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 6))
    return delta.detach(), losses


# ---------------------------------------------------------------------------- the editor
class AdvUnlearn(Editor):
    """AdvUnlearn as an editor: trains ``module`` of the target in place (every other parameter is
    frozen during the edit; every ``requires_grad`` flag is restored)."""

    name = "advunlearn"
    full_parameters = "it trains the text encoder (or attn2 K/V) in its own min-max loop against a frozen copy"
    Config = AdvUnlearnConfig
    paper = PAPER
    modalities = ("image",)

    def needs_retain(self) -> bool:
        return self.config.retain_weight > 0

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        from diffusers import DDIMScheduler
        from tqdm.auto import tqdm

        from unlearn.evaluators.optim_attacks import _check_model, allowed_tokens, prompt_ids, token_table

        cfg, settings = self.config, ctx.settings
        n_iter, rng, gen = image_loop_start(adapter, settings, cfg.iterations, self.name, ctx.seed)
        _check_model(adapter, "advunlearn")
        prompts = esd_prompts(data, cfg.prompts)
        retain = retain_prompts(data) if cfg.retain_weight > 0 else []
        reference = adapter.reference()  # ε*, E*: frozen deep copy of the unedited model
        ddim = DDIMScheduler.from_config(adapter.scheduler.config)
        ddim.set_timesteps(cfg.ddim_steps)
        with torch.no_grad():  # the frozen model's conditions, once
            conds = reference.encode_prompts(reference.tokenize(prompts))  # (P, T, d)
            uncond = reference.encode_prompts(reference.tokenize([""]))  # (1, T, d)
            r_conds = reference.encode_prompts(reference.tokenize(retain)) if retain else None  # (R, T, d)
        # prompt ids with `tokens` prefix slots: [BOS] δ c [EOS] (P, T), mask (P, T)
        adv_ids, adv_mask, _ = prompt_ids(adapter, prompts, prefix=cfg.tokens)
        plain_ids = adapter.tokenize(prompts)  # (P, T)
        r_ids = adapter.tokenize(retain) if retain else None
        table = token_table(adapter).clone()  # (V, d_in) input token embeddings at the start
        allowed = allowed_tokens(adapter, []).nonzero().flatten()

        def random_prefix() -> torch.Tensor:
            pick = torch.randint(len(allowed), (cfg.tokens,), generator=gen)
            return table[allowed[pick]].clone().float()  # (n, d_in)

        names = set(trainable_names(adapter, cfg.module))
        params = [p for n, p in adapter.model.named_parameters() if n in names]
        log = TrainLog(seed=ctx.seed)
        prefix: torch.Tensor | None = None
        attacks = attack_steps_done = 0
        t0 = time.perf_counter()
        with restoring_train_state(adapter):
            for n, p in adapter.model.named_parameters():
                p.requires_grad_(n in names)
            opt = torch.optim.Adam(params, lr=settings.lr, weight_decay=getattr(settings, "weight_decay", 0.0))
            trained = "text_encoder" if cfg.module == "text_encoder" else "unet"
            for k, m in adapter.model.items():  # dropout off everywhere but in the trained module
                m.train(k == trained)
            bar = tqdm(range(n_iter), desc="AdvUnlearn", disable=not ctx.progress, mininterval=1)
            for it in bar:
                p_i = rng.randrange(len(prompts))
                k = rng.randrange(cfg.ddim_steps)
                r_idx = [rng.randrange(len(retain)) for _ in range(cfg.retain_batch)] if retain else []
                # x_t for the concept prompt and the retain prompts, from the frozen model, one batch
                c_all = torch.cat([conds[p_i:p_i + 1]] + ([r_conds[r_idx]] if retain else []))  # (1+R, T, d)
                x_all, t_all = sample_xt(reference, ddim, c_all, uncond.expand(len(c_all), -1, -1), k,
                                         cfg.sample_guidance, gen)
                x_t, t = x_all[:1], t_all[:1]  # (1, C, h, w), (1,)
                with torch.no_grad():
                    e_u = reference.noise_pred(x_t, t, uncond)  # ε*(x_t, ∅)
                    e_c = reference.noise_pred(x_t, t, conds[p_i:p_i + 1])  # ε*(x_t, c)
                    target = esd_target(e_u, e_c, cfg.negative_guidance)
                ids, mask = adv_ids[p_i:p_i + 1], adv_mask[p_i:p_i + 1]
                attack_loss = None
                if it >= cfg.warmup and (it - cfg.warmup) % cfg.attack_every == 0:
                    if prefix is None or cfg.attack_init == "random":
                        prefix = random_prefix()
                    for m in adapter.model.values():
                        m.eval()
                    prefix, a_losses = soft_prompt_attack(adapter, ids, mask, prefix, x_t, t, e_c,
                                                          cfg.attack_steps, cfg.attack_lr)
                    adapter.model[trained].train()
                    attacks += 1
                    attack_steps_done += len(a_losses)
                    attack_loss = a_losses[-1] if a_losses else None
                if prefix is not None:  # the outer loss at the adversarial prompt
                    cond = adversarial_condition(adapter, ids, mask, prefix)
                else:  # warm-up: at the plain prompt
                    cond = adapter.encode_prompts(plain_ids[p_i:p_i + 1])
                erase = F.mse_loss(adapter.noise_pred(x_t, t, cond).float(), target.float())
                loss = erase
                keep = None
                if retain:
                    xr, tr = x_all[1:], t_all[1:]  # (R, C, h, w), (R,)
                    with torch.no_grad():
                        er = reference.noise_pred(xr, tr, r_conds[r_idx])
                    keep = F.mse_loss(adapter.noise_pred(xr, tr, adapter.encode_prompts(r_ids[r_idx])).float(),
                                      er.float())
                    loss = erase + cfg.retain_weight * keep
                optimizer_step(loss, opt, params, settings.max_grad_norm,
                               f"advunlearn at iteration {it + 1}; lower train.lr or advunlearn.attack_lr")
                log.steps += 1
                entry = {"step": it + 1, "loss": round(loss.item(), 6), "erase": round(erase.item(), 6),
                         "t": int(t[0]), "prompt": prompts[p_i], "lr": settings.lr}
                if keep is not None:
                    entry["retain"] = round(keep.item(), 6)
                if attack_loss is not None:  # only at iterations with an attack
                    entry["attack_loss"] = attack_loss
                log.history.append(entry)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
        log.seconds = time.perf_counter() - t0

        adv_words = None
        if prefix is not None:
            from unlearn.evaluators.optim_attacks import nearest_tokens

            near = nearest_tokens(prefix, token_table(adapter), allowed_tokens(adapter, []))
            adv_words = adapter.tokenizer.convert_ids_to_tokens(near.tolist())
        info = {
            "module": cfg.module,
            "iterations": n_iter,
            "prompts": prompts,
            "retain_prompts": len(retain),
            "attacks": attacks,
            "attack_steps_done": attack_steps_done,
            "prefix_tokens": cfg.tokens,
            "last_prefix_nearest_tokens": adv_words,
            "trainable_parameters": sum(p.numel() for p in params),
            "parameters_total": sum(p.numel() for p in adapter.model.parameters()),
            "losses": [h["loss"] for h in log.history[::10]],
            "edit_seconds": round(log.seconds, 3),
            "headline": f"AdvUnlearn ({cfg.module}): {n_iter} iterations, {attacks} attacks x {cfg.attack_steps} "
                        f"steps, {log.seconds:.1f} s",
        }
        return EditResult(adapter=adapter, log=log, info=info)


__all__ = ["AdvUnlearn", "AdvUnlearnConfig", "soft_prompt_attack", "adversarial_condition", "trainable_names",
           "retain_prompts"]
