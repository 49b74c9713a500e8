"""UOE: unlearn one expert of a mixture-of-experts model, with a router anchor.

Zhuang et al., 2025, "UOE: Unlearning One Expert Is Enough for Mixture-of-experts LLMs"
(arXiv:2411.18797). Unlearning an MoE with a dense method shifts the routing: the router sends
forget tokens to other experts, so the knowledge is bypassed rather than removed and utility
drops. UOE instead

1. **attributes** the forget set to one expert: for every MoE layer ``l`` and routed expert
   ``e`` the affinity ``s_e^l = mean over forget tokens of g_e^l(x_t)`` (router probability,
   :func:`~unlearn.probes.expert_attribution.top_expert`), and takes the top-1 (layer, expert);
2. **trains only that expert's FFN and that layer's router** (the ``uoe`` parameter selection,
   ``method.selection: {name: uoe}``);
3. adds a **router anchor** that keeps the forget tokens routed to that expert while it is
   unlearned::

       L = L_base(D_f, D_r) + anchor_alpha * mean_t || g^l(x_t) - onehot(e) ||^2

   ``L_base`` is any objective of this package (``base``, e.g. ``grad_diff`` = the paper's
   ``L_unlearn + lambda * L_retain``; ``npo``), ``g^l(x_t)`` (E,) the router probabilities of
   layer ``l`` on forget token ``t`` (``tokens``: all tokens of the question + answer, or only
   the answer tokens), mean over the read tokens of the forget batch.

No official code is public; this follows the paper's description. The anchor needs one extra
forward pass over the forget batch (read with a hook on the router of layer ``l``).

Inputs/outputs: :meth:`UOE.loss` takes the forget / retain batches of ``adapter.collate`` and
returns ``(scalar loss, logs)`` with the base objective's logs plus ``anchor`` (the mean squared
distance, before ``anchor_alpha``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from unlearn.config import from_dict
from unlearn.objectives.base import Objective, ObjectiveConfig
from unlearn.probes.expert_attribution import moe_blocks, router_logits, router_probs, token_mask, top_expert
from unlearn.registry import Registry

# The objectives a UOE may train on the expert (its ``base``). ``unlearn.objectives`` hands its
# registry over with :func:`set_base_objectives` once every objective is registered; this module
# does not import the package, which imports it.
_BASES: Registry | None = None


def set_base_objectives(registry: Registry) -> None:
    """Name the registry ``UOEConfig.base`` is looked up in (``unlearn.objectives.OBJECTIVES``)."""
    global _BASES
    _BASES = registry


def _base_objectives() -> Registry:
    if _BASES is None:
        raise RuntimeError("uoe has no base objectives: import it through the unlearn.objectives package")
    return _BASES


@dataclass
class UOEConfig(ObjectiveConfig):
    base: str = field(default="grad_diff", metadata={
        "help": "the unlearning objective trained on the chosen expert (any objective name except uoe)"})
    base_params: dict[str, Any] = field(default_factory=dict, metadata={"help": "the base objective's params"})
    anchor_alpha: float = field(default=1.0, metadata={"help": "weight alpha of the router anchor term (0: off)"})
    layer: int | None = field(default=None, metadata={
        "help": "MoE layer of the unlearned expert; null (with expert null): chosen by expert attribution"})
    expert: int | None = field(default=None, metadata={"help": "index of the unlearned expert in that layer; null: chosen"})
    tokens: Literal["all", "answer"] = field(default="all", metadata={
        "help": "tokens used for the attribution and the anchor: all of question + answer, or the answer tokens"})

    def __post_init__(self) -> None:
        OBJECTIVES = _base_objectives()
        if self.base == "uoe":
            raise ValueError("method.params.base cannot be 'uoe'; name the objective trained on the expert, e.g. grad_diff")
        if self.base not in OBJECTIVES.names():
            raise ValueError(f"method.params.base {self.base!r} is not a known objective; allowed: "
                             f"{', '.join(n for n in OBJECTIVES.names() if n != 'uoe')}")
        if self.anchor_alpha < 0:
            raise ValueError(f"method.params.anchor_alpha must be >= 0, got {self.anchor_alpha}")
        if (self.layer is None) != (self.expert is None):
            raise ValueError("method.params.layer and method.params.expert: give both, or neither (expert attribution)")
        if (self.layer is not None and self.layer < 0) or (self.expert is not None and self.expert < 0):
            raise ValueError(f"method.params.layer/expert must be >= 0, got {self.layer}/{self.expert}")
        cls = OBJECTIVES.get(self.base)
        self.base_config = from_dict(cls.Config, dict(self.base_params), "method.params.base_params")


def anchor_loss(model, batch: dict[str, torch.Tensor], layer: int, expert: int, tokens: str = "all") -> torch.Tensor:
    """Router anchor ``mean_t || g^l(x_t) - onehot(e) ||^2`` over the read tokens of ``batch``
    (scalar, differentiable; 0 when the batch has no read token)."""
    lg = router_logits(model, batch["input_ids"], batch["attention_mask"], [layer])[layer]  # (B, T, E)
    g = router_probs(moe_blocks(model)[layer].gate, lg)[token_mask(batch, tokens).to(lg.device)]  # (N, E)
    if g.shape[0] == 0:
        return lg.sum() * 0.0
    onehot = torch.zeros_like(g)
    onehot[:, expert] = 1.0
    return ((g - onehot) ** 2).sum(-1).mean()


class UOE(Objective):
    name = "uoe"
    full_parameters = "it reads one MoE layer's router and trains one expert through a parametrization of its weights"
    Config = UOEConfig
    paper = ("Zhuang et al., 2025, UOE: Unlearning One Expert Is Enough for Mixture-of-experts LLMs "
             "(arXiv:2411.18797)")

    def __init__(self, config: UOEConfig | None = None) -> None:
        super().__init__(config)
        self.base = _base_objectives().get(self.config.base)(self.config.base_config)
        self.target: tuple[int, int] | None = (None if self.config.layer is None
                                               else (self.config.layer, self.config.expert))
        self.attribution: list | None = None

    def needs_retain(self) -> bool:
        return self.base.needs_retain()

    def needs_reference(self) -> bool:
        return self.base.needs_reference()

    def needs_idk(self) -> bool:
        return self.base.needs_idk()

    def setup(self, adapter, reference, forget_items):
        """Set up the base objective; pick (layer, expert) by expert attribution unless given."""
        self.base.setup(adapter, reference, forget_items)
        blocks = moe_blocks(adapter.model)
        if self.target is None:
            layer, expert, score = top_expert(adapter, forget_items, self.config.tokens)
            self.target = (layer, expert)
            self.attribution = score.tolist()
        layer, expert = self.target
        if layer not in blocks or not 0 <= expert < blocks[layer].gate.weight.shape[0]:
            raise ValueError(f"method.params layer {layer} / expert {expert} is not an expert of this model (MoE layers "
                             f"{sorted(blocks)}, {blocks[min(blocks)].gate.weight.shape[0]} experts each)")

    def expert_target(self) -> tuple[int, int]:
        """``(layer, expert)`` chosen in :meth:`setup` (for the ``uoe`` selection)."""
        if self.target is None:
            raise ValueError("uoe picks its expert in setup(); call objective.setup(adapter, reference, forget) first")
        return self.target

    def loss(self, adapter, forget, retain):
        loss, logs = self.base.loss(adapter, forget, retain)
        if self.config.anchor_alpha > 0:
            layer, expert = self.expert_target()
            a = anchor_loss(adapter.model, forget, layer, expert, self.config.tokens)
            loss = loss + self.config.anchor_alpha * a
            logs = {**logs, "anchor": a.item()}
        return loss, logs
