"""UNDIAL: self-distillation toward the reference's logits with the true token pushed down.

Loss (minimised)::

    q_t = softmax(z_ref,t - beta * onehot(y_t))              target at answer position t
    L   = gamma * mean_t CE(p_theta,t, q_t) + alpha * R(D_r)
        = gamma * mean_t [ -sum_v q_t(v) log p_theta,t(v) ] + alpha * R(D_r)

``z_ref,t`` are the frozen reference's logits at position ``t`` of the forget sequence and
``y_t`` the forget answer's token there. Lowering only the true token's logit by ``beta``
keeps the rest of the teacher distribution, so the student forgets the answer without the
unbounded collapse of gradient ascent (the loss is a cross-entropy, bounded below by the
entropy of ``q``). ``mean_t`` runs over every answer token of the batch. ``R`` is the retain
NLL or ``KL(p_ref || p_theta)`` (``retain_loss``).

Defaults: ``beta = 10``, ``gamma = 1``, ``alpha = 0`` (no retain term), as open-unlearning's
``UNDIAL`` (contributed by the paper's authors; the paper uses no retain set). Paper: LoRA
(r 8, alpha 16), lr 1e-4, beta in {3, 10, 30}.

The reference logits are computed per batch, without gradients (one extra forward pass of the
frozen model). Caching them would take ``N_tokens * V`` floats, too much for real vocabularies.

Deviation from open-unlearning's ``compute_undial_loss``: it averages the cross-entropy over
**every** position of the padded sequence, prompt and padding included, and at those positions
(label -100) ``onehot(-100)`` wraps around to vocabulary entry ``V - 100``, whose logit is
lowered instead. We score the answer positions only, as the paper defines the objective on
the tokens to be forgotten.

Reference: Dong et al., 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust
Unlearning in Large Language Models" (NAACL 2025, arXiv:2402.10052).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from unlearn.objectives.base import Objective, ObjectiveConfig, retain_term


@dataclass
class UNDIALConfig(ObjectiveConfig):
    beta: float = field(default=10.0, metadata={"help": "how far the true token's reference logit is lowered (paper: 3-30)"})
    gamma: float = field(default=1.0, metadata={"help": "weight of the forget (self-distillation) term"})
    alpha: float = field(default=0.0, metadata={"help": "weight of the retain term (0: none, as in the paper)"})
    retain_loss: Literal["nll", "kl"] = field(default="nll", metadata={"help": "retain term: nll or kl (to the reference)"})

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError("beta must be >= 0")
        if self.gamma < 0 or self.alpha < 0:
            raise ValueError("gamma and alpha must be >= 0")


def undial_forget_loss(adapter, reference, batch, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean CE to the adjusted teacher, mean answer-token NLL (detached))`` over the batch's answer tokens."""
    logits = adapter.logits(batch)  # (B, T, V)
    with torch.no_grad():
        ref_logits = reference.logits(batch)  # (B, T, V)
    lg, lb, mask = adapter.shift(logits, batch["labels"])  # (B, T-1, V), (B, T-1), (B, T-1)
    rl, _, _ = adapter.shift(ref_logits, batch["labels"])
    if not mask.any():  # no answer tokens in the batch
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    logp = torch.log_softmax(lg.float()[mask], -1)  # (N, V)
    y = lb[mask]  # (N,)
    with torch.no_grad():
        adjusted = rl.float()[mask].to(logp.device)  # (N, V)
        adjusted.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(adjusted[:, :1], -beta))
        target = torch.softmax(adjusted, -1)  # (N, V)
    ce = -(target * logp).sum(-1)  # (N,)
    nll = -logp.detach().gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (N,)
    return ce.mean(), nll.mean()


class UNDIAL(Objective):
    name = "undial"
    Config = UNDIALConfig
    paper = ("Dong et al., 2024, UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning "
             "in Large Language Models (arXiv:2402.10052)")

    def needs_retain(self):
        return self.config.alpha > 0

    def needs_reference(self):
        return True

    def setup(self, adapter, reference, forget_items):
        self.reference = reference

    def loss(self, adapter, forget, retain):
        if getattr(self, "reference", None) is None:
            raise ValueError("UNDIAL needs the reference model: call setup(adapter, reference, ...) first")
        f, nll = undial_forget_loss(adapter, self.reference, forget, self.config.beta)
        loss = self.config.gamma * f
        logs = {"undial": f.item(), "forget_nll": nll.item()}
        if self.config.alpha > 0:
            r = retain_term(self.config.retain_loss, adapter, self.reference, retain)
            loss = loss + self.config.alpha * r
            logs[f"retain_{self.config.retain_loss}"] = r.item()
        return loss, logs
