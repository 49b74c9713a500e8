"""Gradient ascent: maximise the NLL of the forget answers.

Loss (minimised): ``-NLL(D_f)`` (answer-token mean). Unbounded below: the trainer's
non-finite guard and a small learning rate / few epochs keep it from destroying the model.
Reference: Jang et al., 2023, "Knowledge Unlearning for Mitigating Privacy Risks in Language
Models"; TOFU (Maini et al., 2024) baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from unlearn.objectives.base import Objective, ObjectiveConfig, mean_token_nll


@dataclass
class GradAscentConfig(ObjectiveConfig):
    pass


class GradAscent(Objective):
    name = "grad_ascent"
    modalities = ("text", "image")  # built on item_nll only
    Config = GradAscentConfig
    paper = "Jang et al., 2023, Knowledge Unlearning for Mitigating Privacy Risks in Language Models (arXiv:2210.01504)"

    def loss(self, adapter, forget, retain):
        nll = mean_token_nll(adapter, forget)
        return -nll, {"forget_nll": nll.item()}
