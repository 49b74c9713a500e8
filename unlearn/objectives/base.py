"""The objective contract: a loss over a forget batch and an optional retain batch.

An objective never touches a model class: it asks the adapter for per-item losses
(``adapter.item_nll``) or logits (``adapter.logits``), so GradAscent/NPO/SimNPO work on any
modality whose adapter provides a per-item loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class ObjectiveConfig:
    """Base class of every objective's config dataclass (fields carry ``metadata={"help": ...}``)."""


class Objective:
    """Base class. Subclasses set the class attributes and implement :meth:`loss`.

    Class attributes:
        name: registry name used in recipes (``method.name``).
        Config: the config dataclass; recipe ``method.params`` are validated against it.
        paper: citation shown in docs and reports.
        modalities: the model kinds the loss works on; ``("text", "image")`` for losses built only
            on the adapter's per-item ``item_nll`` (the image adapter's denoising loss).
        full_parameters: ``None``, or why the method needs the whole, unsharded parameters on every
            process (under FSDP / DeepSpeed ZeRO-3 the run then refuses it, naming this reason;
            :func:`unlearn.distributed.check_sharding`).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = ObjectiveConfig
    paper: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = ("text",)
    full_parameters: ClassVar[str | None] = None

    def __init__(self, config: ObjectiveConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    # -- what the run must provide ------------------------------------------------------------
    def needs_retain(self) -> bool:
        """True if this configuration uses the retain set (then the recipe must name one)."""
        return False

    def needs_reference(self) -> bool:
        """True if the loss uses the frozen model from before unlearning."""
        return False

    def needs_idk(self) -> bool:
        """True if forget items need an ``idk`` answer (a refusal drawn from the task's list)."""
        return False

    def uses_part_of_the_model(self) -> bool:
        """True if the loss leaves some trainable parameters out of its graph (e.g. RMU stops at
        one layer). Several processes (DDP) then look for unused parameters on every step."""
        return False

    # -- the work ---------------------------------------------------------------------------
    def setup(self, adapter, reference, forget_items: list[dict]) -> None:
        """Called once before training: precompute what depends only on the reference
        model and the forget items (e.g. reference NLLs), so it is computed once."""

    def loss(self, adapter, forget: dict[str, Any], retain: dict[str, Any] | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Return ``(scalar loss to minimise, logs)`` for one forget batch and an optional
        retain batch (batches as built by ``adapter.collate``; ``forget["index"]`` holds the
        items' positions in the forget set, for precomputed reference values)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- shared pieces
def mean_token_nll(adapter, batch, model=None) -> torch.Tensor:
    """Answer-token NLL averaged over all answer tokens of the batch (the usual LM loss)."""
    nll, n = adapter.item_nll(batch, model)
    return nll.sum() / n.sum().clamp_min(1)


def kl_to_reference(adapter, reference, batch) -> torch.Tensor:
    """KL(p_ref || p_theta) summed over the vocabulary, averaged over answer tokens.

    open-unlearning computes the KL over every position of the sequence; we restrict it to
    the answer tokens, as METHODS.md states (prompt tokens are not what unlearning changes).
    """
    logits = adapter.logits(batch)  # (B, T, V)
    with torch.no_grad():
        ref_logits = reference.logits(batch)  # (B, T, V)
    lg, _, mask = adapter.shift(logits, batch["labels"])
    rl, _, _ = adapter.shift(ref_logits, batch["labels"])
    logp = torch.log_softmax(lg.float(), -1)[mask]  # (N, V)
    ref_logp = torch.log_softmax(rl.float(), -1)[mask]  # (N, V)
    if logp.shape[0] == 0:  # no answer tokens in the batch
        return logits.sum() * 0.0
    return torch.nn.functional.kl_div(logp, ref_logp, reduction="batchmean", log_target=True)


@torch.no_grad()
def reference_item_nll(reference, items: list[dict], answer_key: str = "answer", batch_size: int = 64) -> torch.Tensor:
    """Summed answer NLL of the frozen reference for every item, in item order: (N,)."""
    out = []
    for s in range(0, len(items), batch_size):
        nll, _ = reference.item_nll(reference.collate(items[s: s + batch_size], answer_key=answer_key))
        out.append(nll.float())
    return torch.cat(out)


def retain_term(kind: str, adapter, reference, retain) -> torch.Tensor:
    """The retain regulariser R(D_r): ``"nll"`` (answer NLL) or ``"kl"`` (KL to the reference)."""
    if kind == "nll":
        return mean_token_nll(adapter, retain)
    if kind == "kl":
        if reference is None:
            raise ValueError("retain_loss='kl' needs the reference model")
        return kl_to_reference(adapter, reference, retain)
    raise ValueError(f"retain_loss must be 'nll' or 'kl', got {kind!r}")
