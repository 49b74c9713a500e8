"""Negative Preference Optimization (NPO).

Loss: ``-(2/beta) * mean_i log sigmoid(beta * (NLL_theta(x_i, y_i) - NLL_ref(x_i, y_i)))
+ alpha * R(D_r)``, NLL = summed answer-token NLL, ref = the model before unlearning.
Defaults beta = 0.1, alpha = 1, retain term NLL (open-unlearning). The reference NLLs of the
forget items are fixed, so they are computed once in :meth:`setup`.
Reference: Zhang et al., 2024, "Negative Preference Optimization: From Catastrophic Collapse
to Effective Unlearning" (arXiv:2404.05868).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F

from unlearn.objectives.base import Objective, ObjectiveConfig, reference_item_nll, retain_term


@dataclass
class NPOConfig(ObjectiveConfig):
    beta: float = field(default=0.1, metadata={"help": "inverse temperature"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the retain term (0: none)"})
    retain_loss: Literal["nll", "kl"] = "nll"

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")


class NPO(Objective):
    name = "npo"
    modalities = ("text", "image")  # built on item_nll only (with retain_loss nll)
    Config = NPOConfig
    paper = "Zhang et al., 2024, Negative Preference Optimization (arXiv:2404.05868)"

    def needs_retain(self):
        return self.config.alpha > 0

    def needs_reference(self):
        return True

    def setup(self, adapter, reference, forget_items):
        self.reference = reference
        self.ref_nll = reference_item_nll(reference, forget_items)  # (N_forget,) computed once

    def loss(self, adapter, forget, retain):
        nll, _ = adapter.item_nll(forget)  # (B,)
        ref = self.ref_nll[forget["index"]].to(nll.device)  # (B,)
        b = self.config.beta
        f = -(2.0 / b) * F.logsigmoid(b * (nll - ref)).mean()
        loss, logs = f, {"npo": f.item(), "forget_nll": nll.mean().item()}
        if self.config.alpha > 0:
            r = retain_term(self.config.retain_loss, adapter, self.reference, retain)
            loss = loss + self.config.alpha * r
            logs[f"retain_{self.config.retain_loss}"] = r.item()
        return loss, logs
