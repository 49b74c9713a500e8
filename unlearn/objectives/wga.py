"""WGA: weighted gradient ascent, each forget token's ascent weighted by its probability.

Loss (minimised)::

    w_t = sg(p_theta(y_t | x, y_<t))^beta                    (sg: no gradient through the weight)
    L   = gamma * ( -(1/N) * sum_t w_t * NLL_t ) + alpha * R(D_r)

``NLL_t = -log p_theta(y_t | ...)`` of answer token ``t`` and ``N`` the number of answer tokens
in the batch (a token mean over the batch, not per item). Tokens the model has already
forgotten (small ``p``) get small weights, so the ascent fades out instead of running
unbounded on a few tokens as plain gradient ascent does; ``beta = 0`` is plain gradient
ascent. ``R`` is the retain NLL or ``KL(p_ref || p_theta)`` (``retain_loss``).

This is open-unlearning's ``WGA`` (``compute_wga_loss``: weights ``exp(-CE).detach() ** beta``,
``-(w * CE)[answer tokens].mean()``, then ``gamma * forget + alpha * retain``), with its
defaults ``beta = gamma = alpha = 1``, retain NLL, lr 1e-5, 5 epochs (Llama-2-7b). The paper's
own code (tmlr-group/G-effect, loss ``wga``) has the same forget term and no retain term:
``alpha: 0`` reproduces it.

Reference: Wang et al., 2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective
and Go Beyond" (ICLR 2025, arXiv:2502.19301).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from unlearn.objectives.base import Objective, ObjectiveConfig, retain_term


@dataclass
class WGAConfig(ObjectiveConfig):
    beta: float = field(default=1.0, metadata={"help": "exponent of the token weight p^beta (0: plain gradient ascent)"})
    gamma: float = field(default=1.0, metadata={"help": "weight of the forget (weighted ascent) term"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the retain term (0: none, as in the paper's code)"})
    retain_loss: Literal["nll", "kl"] = field(default="nll", metadata={"help": "retain term: nll or kl (to the reference)"})

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError("beta must be >= 0")
        if self.gamma < 0 or self.alpha < 0:
            raise ValueError("gamma and alpha must be >= 0")


class WGA(Objective):
    name = "wga"
    Config = WGAConfig
    paper = ("Wang et al., 2025, Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond "
             "(arXiv:2502.19301)")

    def needs_retain(self):
        return self.config.alpha > 0

    def needs_reference(self):
        return self.config.retain_loss == "kl" and self.config.alpha > 0

    def setup(self, adapter, reference, forget_items):
        self.reference = reference

    def loss(self, adapter, forget, retain):
        logp, mask = adapter.token_logprobs(forget)  # (B, T-1) each; logp = 0 where masked
        nll = -logp  # (B, T-1)
        w = torch.exp(self.config.beta * logp.detach())  # p^beta, no gradient
        n = mask.sum().clamp_min(1)
        f = -(w * nll * mask).sum() / n
        loss = self.config.gamma * f
        logs = {"wga": f.item(), "forget_nll": ((nll * mask).sum() / n).item()}
        if self.config.alpha > 0:
            r = retain_term(self.config.retain_loss, adapter, getattr(self, "reference", None), retain)
            loss = loss + self.config.alpha * r
            logs[f"retain_{self.config.retain_loss}"] = r.item()
        return loss, logs
