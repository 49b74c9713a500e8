"""Gradient difference: ascend on the forget set, descend on the retain set.

Loss: ``-gamma * NLL(D_f) + alpha * R(D_r)`` with ``R`` the retain NLL or
``KL(p_ref || p_theta)`` over the retain answer tokens. Defaults gamma = alpha = 1
(open-unlearning). Reference: Liu et al., 2022, "Continual Learning and Private Unlearning";
TOFU (Maini et al., 2024) baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unlearn.objectives.base import Objective, ObjectiveConfig, mean_token_nll, retain_term


@dataclass
class GradDiffConfig(ObjectiveConfig):
    gamma: float = field(default=1.0, metadata={"help": "weight of the forget (ascent) term"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the retain term"})
    retain_loss: Literal["nll", "kl"] = field(default="nll", metadata={"help": "retain term: nll or kl (to the reference)"})

    def __post_init__(self):
        if self.gamma < 0 or self.alpha < 0:
            raise ValueError("gamma and alpha must be >= 0")


class GradDiff(Objective):
    name = "grad_diff"
    modalities = ("text", "image")  # built on item_nll only (with retain_loss nll)
    Config = GradDiffConfig
    paper = "Liu et al., 2022, Continual Learning and Private Unlearning (arXiv:2203.12817)"

    def needs_retain(self):
        return self.config.alpha > 0

    def needs_reference(self):
        return self.config.retain_loss == "kl" and self.config.alpha > 0

    def setup(self, adapter, reference, forget_items):
        self.reference = reference

    def loss(self, adapter, forget, retain):
        f = mean_token_nll(adapter, forget)
        loss = -self.config.gamma * f
        logs = {"forget_nll": f.item()}
        if self.config.alpha > 0:
            r = retain_term(self.config.retain_loss, adapter, getattr(self, "reference", None), retain)
            loss = loss + self.config.alpha * r
            logs[f"retain_{self.config.retain_loss}"] = r.item()
        return loss, logs
