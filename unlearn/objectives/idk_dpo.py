"""IdkDPO: DPO with the refusal as the preferred answer and the forget answer as rejected.

Loss: ``-(2/beta) * mean log sigmoid(beta * [(log pi_theta - log pi_ref)(x, y_idk)
- (log pi_theta - log pi_ref)(x, y_f)]) + alpha * NLL(D_r)``, log pi = minus the summed
answer NLL. Defaults beta = 0.1, alpha = 1 (open-unlearning ``DPO`` on TOFU's idk data).
The reference log-probs of both answers are fixed, so they are computed once.
Reference: Rafailov et al., 2023 (DPO); Maini et al., 2024 (TOFU, IdkDPO baseline);
Zhang et al., 2024 (NPO paper, the 2/beta scaling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from unlearn.objectives.base import Objective, ObjectiveConfig, mean_token_nll, reference_item_nll


@dataclass
class IdkDPOConfig(ObjectiveConfig):
    beta: float = field(default=0.1, metadata={"help": "inverse temperature"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the retain NLL (0: none)"})

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")


class IdkDPO(Objective):
    name = "idk_dpo"
    Config = IdkDPOConfig
    paper = "Rafailov et al., 2023, Direct Preference Optimization (arXiv:2305.18290); TOFU IdkDPO baseline"

    def needs_retain(self):
        return self.config.alpha > 0

    def needs_reference(self):
        return True

    def needs_idk(self):
        return True

    def setup(self, adapter, reference, forget_items):
        self.ref_forget = reference_item_nll(reference, forget_items, "answer")  # (N,)
        self.ref_idk = reference_item_nll(reference, forget_items, "idk")  # (N,)

    def loss(self, adapter, forget, retain):
        idx = forget["index"]
        nll_f, _ = adapter.item_nll(forget)  # (B,) rejected
        nll_i, _ = adapter.item_nll(forget["idk"])  # (B,) chosen
        # log-ratio = log pi_theta - log pi_ref = -(NLL_theta - NLL_ref)
        chosen = -(nll_i - self.ref_idk[idx].to(nll_i.device))
        rejected = -(nll_f - self.ref_forget[idx].to(nll_f.device))
        b = self.config.beta
        f = -(2.0 / b) * F.logsigmoid(b * (chosen - rejected)).mean()
        loss, logs = f, {"dpo": f.item()}
        if self.config.alpha > 0:
            r = mean_token_nll(adapter, retain)
            loss = loss + self.config.alpha * r
            logs["retain_nll"] = r.item()
        return loss, logs
