"""SimNPO: NPO without a reference model, with length normalisation.

Loss: ``-(2/beta) * mean_i log sigmoid(beta * NLL_theta(x_i, y_i)/|y_i| - gamma)
+ alpha * NLL(D_r)``. Defaults beta = 4.5, gamma = 0, alpha = 1.
Reference: Fan et al., 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization
for LLM Unlearning" (arXiv:2410.07163).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F

from unlearn.objectives.base import Objective, ObjectiveConfig, retain_term


@dataclass
class SimNPOConfig(ObjectiveConfig):
    beta: float = field(default=4.5, metadata={"help": "inverse temperature"})
    gamma: float = field(default=0.0, metadata={"help": "reward margin"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the retain term (0: none)"})
    retain_loss: Literal["nll", "kl"] = "nll"

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")


class SimNPO(Objective):
    name = "simnpo"
    Config = SimNPOConfig
    paper = "Fan et al., 2024, Simplicity Prevails: Rethinking NPO for LLM Unlearning (arXiv:2410.07163)"

    def needs_retain(self):
        return self.config.alpha > 0

    def needs_reference(self):
        return self.config.retain_loss == "kl" and self.config.alpha > 0

    def setup(self, adapter, reference, forget_items):
        self.reference = reference

    def loss(self, adapter, forget, retain):
        nll, n = adapter.item_nll(forget)  # (B,), (B,)
        b, g = self.config.beta, self.config.gamma
        f = -(2.0 / b) * F.logsigmoid(b * nll / n.clamp_min(1) - g).mean()
        loss, logs = f, {"simnpo": f.item()}
        if self.config.alpha > 0:
            r = retain_term(self.config.retain_loss, adapter, getattr(self, "reference", None), retain)
            loss = loss + self.config.alpha * r
            logs[f"retain_{self.config.retain_loss}"] = r.item()
        return loss, logs
