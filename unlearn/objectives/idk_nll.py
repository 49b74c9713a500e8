"""IdkNLL: teach the model to refuse on the forget questions.

Loss: ``NLL(x_f, y_idk) + alpha * NLL(D_r)``, y_idk = a refusal ("I don't know ...") drawn
per forget item from the task's list (fixed per item and seed). Reference: TOFU (Maini et al.,
2024), "I don't know" baseline; open-unlearning ``IdkNLL``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unlearn.objectives.base import Objective, ObjectiveConfig, mean_token_nll


@dataclass
class IdkNLLConfig(ObjectiveConfig):
    alpha: float = field(default=1.0, metadata={"help": "weight of the retain NLL (0: none)"})

    def __post_init__(self):
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")


class IdkNLL(Objective):
    name = "idk_nll"
    Config = IdkNLLConfig
    paper = "Maini et al., 2024, TOFU: A Task of Fictitious Unlearning for LLMs (arXiv:2401.06121)"

    def needs_retain(self):
        return self.config.alpha > 0

    def needs_idk(self):
        return True

    def loss(self, adapter, forget, retain):
        idk = mean_token_nll(adapter, forget["idk"])
        loss, logs = idk, {"idk_nll": idk.item()}
        if self.config.alpha > 0:
            r = mean_token_nll(adapter, retain)
            loss = loss + self.config.alpha * r
            logs["retain_nll"] = r.item()
        return loss, logs
