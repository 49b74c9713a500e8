"""FLAT: Forget-data-only Loss AdjustmenT (maximise an f-divergence between a template and the forget answer).

Loss (minimised)::

    L = -g(P_e) + f*(g(P_f))

* ``P_f``: mean token probability of the **forget answer** tokens ``y_f`` given the forget
  question; ``P_e``: the same for a **template answer** ``y_e`` to the same question (the
  item's ``idk`` refusal, as in the official TOFU code, which draws it from an
  "I don't know" list);
* ``g`` is the variational activation and ``f*`` the convex conjugate of the chosen
  f-divergence. The pairs (``g(x)``, ``f*(g(x))``) are those of the official code::

  divergence           g(x)                      f*(g(x))
  kl                   x                         exp(x - 1)
  reverse_kl           -exp(x)                   -1 - x
  pearson              x                         x + x^2/4
  neyman               1 - exp(x)                2 - 2*sqrt(1 - x)
  js                   log 2 - softplus(-x)      softplus(x) - log 2
  squared_hellinger    1 - exp(x)                (1 - exp(x)) / exp(x)
  total_variation      tanh(x)/2                 tanh(x)/2             (default)
  jeffrey              x                         x + x^2/4 + x^3/16

No retain set and no reference model. Minimising raises ``P_e`` and lowers ``P_f`` for
``kl``, ``pearson``, ``js``, ``total_variation`` and ``jeffrey``.

Follows the official code (UCSC-REAL/FLAT, ``dataloader.py``: ``ProbLossStable`` and
``get_contrastive_loss``) in these details:

* **probabilities, not log-probabilities**: ``P`` averages ``p_theta(y_t | ...)`` (a softmax
  probability, not its log).
* **one batch mean**: the code stacks the per-position probabilities of the whole batch and
  averages them once, so ``g`` and ``f*`` are applied to one batch-level ``P_f`` and one
  ``P_e``, not to each item's mean.
* **the official pairs are kept as written**, including three whose direction is reversed
  on ``P`` in [0, 1]: ``reverse_kl`` and ``squared_hellinger`` use ``exp(x)`` where f-GAN's
  activations use ``exp(-x)``, so minimising *lowers* ``P_e`` and *raises* ``P_f`` (it
  relearns the forget answer); ``neyman`` applies ``f*`` to ``x`` rather than ``g(x)`` and
  its template term lowers ``P_e``. Choosing one of these three warns. ``neyman`` clamps
  ``1 - x`` at 1e-12 so a batch mean of exactly 1 gives a finite gradient.

One deviation from the official code: it pads every sequence to 500 tokens and takes the
mean over all ``B * 499`` positions, counting prompt and padding positions as probability 0,
so its ``P`` is the answer-token mean scaled by (answer tokens / 499), which depends on the
padding length. We divide by the number of answer tokens in the batch, so ``P`` is the mean
answer-token probability in [0, 1], as the paper defines it.

Reference: Wang et al., 2024, "LLM Unlearning via Loss Adjustment with Only Forget Data"
(ICLR 2025, arXiv:2410.11143).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from unlearn.objectives.base import Objective, ObjectiveConfig

Divergence = Literal["kl", "reverse_kl", "pearson", "neyman", "js", "squared_hellinger", "total_variation", "jeffrey"]
LOG2 = math.log(2.0)


def _identity(x):
    return x


def _half_tanh(x):
    return torch.tanh(x) / 2


def _one_minus_exp(x):
    return 1 - torch.exp(x)


# name -> (g, f* o g), exactly as the official code's activation/conjugate pairs (see above).
DIVERGENCES: dict[str, tuple[Callable, Callable]] = {
    "kl": (_identity, lambda x: torch.exp(x - 1)),
    "reverse_kl": (lambda x: -torch.exp(x), lambda x: -1 - x),
    "pearson": (_identity, lambda x: x + x * x / 4),
    "neyman": (_one_minus_exp, lambda x: 2 - 2 * torch.sqrt((1 - x).clamp_min(1e-12))),
    "js": (lambda x: LOG2 - F.softplus(-x), lambda x: F.softplus(x) - LOG2),
    "squared_hellinger": (_one_minus_exp, lambda x: (1 - torch.exp(x)) / torch.exp(x)),
    "total_variation": (_half_tanh, _half_tanh),
    "jeffrey": (_identity, lambda x: x + x * x / 4 + x ** 3 / 16),
}
# Official pairs whose minimisation moves P_e down (and, for the first two, P_f up) on [0, 1].
REVERSED = ("reverse_kl", "squared_hellinger", "neyman")


@dataclass
class FLATConfig(ObjectiveConfig):
    divergence: Divergence = field(default="total_variation", metadata={
        "help": "f-divergence: total_variation (default), kl, js, pearson, jeffrey; reverse_kl, "
                "squared_hellinger, neyman follow the official code's pairs, which train in the wrong direction"})

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")


def mean_answer_prob(adapter, batch) -> torch.Tensor:
    """Mean probability of the answer tokens over the whole batch: ``sum p_t / #tokens`` (scalar)."""
    logp, mask = adapter.token_logprobs(batch)  # (B, T-1) each
    p = torch.exp(logp) * mask
    return p.sum() / mask.sum().clamp_min(1)


class FLAT(Objective):
    name = "flat"
    Config = FLATConfig
    paper = "Wang et al., 2024, LLM Unlearning via Loss Adjustment with Only Forget Data (arXiv:2410.11143)"

    def __init__(self, config: FLATConfig | None = None) -> None:
        super().__init__(config)
        if self.config.divergence in REVERSED:
            warnings.warn(
                f"FLAT divergence {self.config.divergence!r} uses the official code's g/f* pair, whose minimisation "
                "lowers the template answer's probability" + ("" if self.config.divergence == "neyman" else
                                                                " and raises the forget answer's")
                + "; prefer total_variation, kl, js, pearson or jeffrey", stacklevel=2)

    def needs_idk(self):
        return True

    def loss(self, adapter, forget, retain):
        g, fstar_g = DIVERGENCES[self.config.divergence]
        p_f = mean_answer_prob(adapter, forget)  # forget answers
        p_e = mean_answer_prob(adapter, forget["idk"])  # template (refusal) answers
        loss = -g(p_e) + fstar_g(p_f)
        return loss, {"flat": loss.item(), "p_forget": p_f.item(), "p_template": p_e.item()}
