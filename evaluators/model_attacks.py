"""Model attacks: change a copy of the model, on text and on text-to-image models alike.

* ``relearn`` -- a few fine-tuning steps with the model's own training loss (the answer NLL of
  a language model, the denoising loss of a diffusion model) on one half of the forget data.
  Text: the other half of the forget items is scored (never trained on). Images: the run's
  prompt rows are scored.
* ``quantize_8bit`` / ``quantize_4bit`` -- every ``nn.Linear`` weight of a copy quantised per
  output channel and dequantised (simulated; convolutions, embeddings and norms untouched).

Each class serves both modalities; the scoring is the caller's (see
:mod:`unlearn.evaluators.attacks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from unlearn.evaluators.attack_base import Attack, AttackConfig, Attacked, AttackInputs, model_modality
from unlearn.objectives.base import Objective, ObjectiveConfig, mean_token_nll
from unlearn.registry import did_you_mean
from unlearn.trainer import TrainSettings, train


def _trainable_copy(adapter):
    """A deep copy of ``adapter`` (never sharing weights with it) whose fingerprint is recomputed."""
    copy = adapter.reference()
    copy._fingerprint = None
    return copy


class ModelAttack(Attack):
    """An attack that changes a copy of the model (text and image models)."""

    modalities = ("text", "image")


# ============================================================================== relearn
class _Relearn(Objective):
    """Relearning loss: the mean of the adapter's per-item loss over the forget batch -- the
    answer-token NLL of a language model, the denoising loss of a diffusion model (plain
    fine-tuning either way)."""

    name = "relearn_nll"
    Config = ObjectiveConfig

    def loss(self, adapter, forget, retain):
        nll = mean_token_nll(adapter, forget)
        return nll, {"forget_nll": nll.item()}


@torch.no_grad()
def _mean_nll(adapter, items: list[dict], batch_size: int = 32) -> float:
    tot, n = 0.0, 0
    for s in range(0, len(items), batch_size):
        a, c = adapter.item_nll(adapter.collate(items[s: s + batch_size]))
        tot, n = tot + float(a.sum()), n + int(c.sum())
    return tot / max(n, 1)


SPLITS = ("first_half", "per_author")


@dataclass
class RelearnConfig(AttackConfig):
    steps: int = field(default=10, metadata={"help": "optimizer steps of fine-tuning"})
    lr: float | None = field(default=None, metadata={
        "help": "AdamW learning rate; null (default): 1e-3 on text models, 1e-4 on image models. The value "
                "used is recorded in the result's settings"})
    batch_size: int = field(default=8, metadata={"help": "forget items (text) or renders (images) per step"})
    split: str = field(default="first_half", metadata={
        "help": "'first_half': train on forget[:n//2] (text: evaluate forget[n//2:]); 'per_author' (text only): "
                "train on the first half of each author's items, evaluate the rest of each author's items"})


class Relearn(ModelAttack):
    """Relearning: fine-tune a copy of the model with its plain training loss on one half of
    the forget data for a few steps (default 10 AdamW steps, batch 8, gradient clipping 1.0,
    lr 1e-3 on text and 1e-4 on image models, via :func:`unlearn.trainer.train`).

    Text: the loss is the answer NLL, and the **other half** of the forget items -- never
    trained on -- is scored. If those held-out facts come back, the knowledge was still in the
    weights and unlearning only hid it behind a shallow change that a little fine-tuning on
    related data undoes. ``split="first_half"`` (default) halves the forget list as given (in
    TOFU order the halves are different authors); ``"per_author"`` halves each author's items
    (the held-out facts belong to authors the attack relearned).

    Images: the loss is the denoising loss on the first half of the erased concept's training
    renders; the run's prompt rows are scored (does the concept come back?). Only
    ``split="first_half"`` applies.

    Papers: Lynch et al., 2024, "Eight methods to evaluate robust unlearning in LLMs"
    (arXiv:2402.16835); Hu et al., 2024, "Jogging the memory of unlearned LLMs" (arXiv:2406.13356)."""

    name = "relearn"
    Config = RelearnConfig
    paper = ("Lynch et al., 2024, Eight Methods to Evaluate Robust Unlearning in LLMs (arXiv:2402.16835); "
             "Hu et al., 2024, Jogging the Memory of Unlearned LLMs Through Targeted Relearning Attacks (arXiv:2406.13356)")
    DEFAULT_LR: ClassVar[dict[str, float]] = {"text": 1e-3, "image": 1e-4}
    LOSS: ClassVar[dict[str, str]] = {"text": "answer NLL", "image": "denoising loss"}

    def validate(self) -> None:
        c = self.config
        if c.steps < 1 or c.batch_size < 1 or not (c.lr is None or c.lr > 0):
            raise ValueError(f"relearn needs steps >= 1, batch_size >= 1 and lr > 0 (or null), got {c}")
        if c.split not in SPLITS:
            raise ValueError(f"relearn.split must be 'first_half' or 'per_author', got {c.split!r}"
                             + did_you_mean(c.split, SPLITS))
        if self.modality is not None:
            self._check_split(self.modality)

    def _check_split(self, modality: str) -> None:
        if modality == "image" and self.config.split != "first_half":
            raise ValueError(f"relearn.split={self.config.split!r} is for text models; on image models relearn trains "
                             "on the first half of the forget renders (split 'first_half')")

    def lr_for(self, modality: str) -> float:
        """The learning rate used on a ``modality`` model: ``config.lr``, or that modality's default."""
        return self.config.lr if self.config.lr is not None else self.DEFAULT_LR[modality]

    def halves(self, forget: list[dict]) -> tuple[list[int], list[int]]:
        """-> (positions trained on, positions evaluated) of text forget items."""
        n = len(forget)
        if n < 2:
            raise ValueError(f"relearn needs at least 2 forget items (one half to train, one to evaluate), got {n}")
        if self.config.split == "first_half":
            return list(range(n // 2)), list(range(n // 2, n))
        if self.config.split == "per_author":
            by: dict[Any, list[int]] = {}
            for i, it in enumerate(forget):
                by.setdefault(it.get("author_id", it.get("author")), []).append(i)
            tr = [i for g in by.values() for i in g[: len(g) // 2]]
            if not tr:
                raise ValueError("relearn split 'per_author': no author has 2 or more items")
            trs = set(tr)
            return sorted(tr), [i for i in range(n) if i not in trs]
        raise ValueError(f"relearn.split must be 'first_half' or 'per_author', got {self.config.split!r}"
                         + did_you_mean(self.config.split, SPLITS))

    def attacked(self, model, original, inputs: AttackInputs) -> Attacked:
        c = self.config
        modality = self.modality or model_modality(model)
        self._check_split(modality)
        lr = self.lr_for(modality)
        forget = list(inputs.forget or [])
        if modality == "image":
            if len(forget) < 2:
                raise ValueError("relearn needs at least 2 forget renders (task.forget_split)")
            tr_idx, ev_idx = list(range(len(forget) // 2)), None
        else:
            tr_idx, ev_idx = self.halves(forget)
        train_items = [forget[i] for i in tr_idx]
        copy = _trainable_copy(model)
        for p in copy.model.parameters():
            p.requires_grad_(True)
        nll_before = _mean_nll(copy, train_items)
        # enough epochs for `steps` optimizer steps; max_steps stops training there
        per_epoch = math.ceil(len(train_items) / c.batch_size)
        settings = TrainSettings(epochs=math.ceil(c.steps / per_epoch), max_steps=c.steps, lr=lr,
                                 batch_size=c.batch_size, max_grad_norm=1.0)
        log = train(copy, _Relearn(), train_items, None, settings, seed=self.seed, progress=inputs.progress)
        copy.model.eval()
        for p in copy.model.parameters():
            p.requires_grad_(False)
        copy._fingerprint = None
        nll_after = _mean_nll(copy, train_items)
        info: dict[str, Any] = {"lr": lr, "optimizer": settings.optimizer, "max_grad_norm": settings.max_grad_norm,
                                "steps_done": log.steps, "trained_items": len(tr_idx)}
        if modality == "image":
            note = (f"fine-tuned a copy with the denoising loss on {len(tr_idx)} of {len(forget)} forget renders for "
                    f"{log.steps} steps (lr {lr}, batch {c.batch_size}); evaluated on the prompt rows")
        else:
            info.update(trained_indices=tr_idx, evaluated_items=len(ev_idx))
            note = (f"fine-tuned a copy with the answer NLL on {len(tr_idx)} forget items ({c.split}) for {log.steps} "
                    f"steps (lr {lr}, batch {c.batch_size}); evaluated the other {len(ev_idx)} items only")
        info["trained_half_nll"] = {"before": nll_before, "after": nll_after}
        return Attacked(model=copy, indices=ev_idx, info=info, note=note)


# ============================================================================== quantisation
def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric round-to-nearest quantisation, dequantised back to float.

    Row ``r`` of ``w`` (out, in) gets the scale ``s_r = max_j |w_rj| / (2^(bits-1) - 1)``;
    ``w'_rj = s_r * clamp(round(w_rj / s_r), -qmax, qmax)`` (all-zero rows stay zero).
    ``torch.round`` rounds halves to even. Computed in float32, returned in ``w``'s dtype.
    """
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w32 = w.detach().float()
    flat = w32.reshape(w32.shape[0], -1) if w32.dim() > 1 else w32.reshape(1, -1)
    scale = flat.abs().amax(dim=1, keepdim=True) / qmax  # (out, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(flat / scale), -qmax, qmax) * scale
    return q.reshape(w.shape).to(w.dtype)


@torch.no_grad()
def quantize_linear_weights_(model: torch.nn.Module, bits: int) -> dict:
    """Fake-quantise the weight of every ``nn.Linear`` of ``model`` in place (biases untouched).

    Returns ``{"linear_layers": n, "tied_weights": names of Linear weights shared with
    another parameter (e.g. a tied lm_head/embedding: the shared tensor is quantised)}``.
    """
    seen: set[int] = set()
    n, tied = 0, []
    shared = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            n += 1
            w = mod.weight
            if len(shared.get(id(w), [])) > 1:
                tied.append(name)
            if id(w) in seen:
                continue
            seen.add(id(w))
            w.copy_(fake_quantize(w, bits))
    return {"linear_layers": n, "tied_weights": tied}


@dataclass
class QuantizeConfig(AttackConfig):
    pass


SCHEME = "per-output-channel symmetric round-to-nearest, dequantised (simulated)"


class _Quantize(ModelAttack):
    Config = QuantizeConfig
    bits: ClassVar[int] = 8
    paper = "Zhang et al., 2024, Catastrophic Failure of LLM Unlearning via Quantization (arXiv:2410.16454)"

    def attacked(self, model, original, inputs: AttackInputs) -> Attacked:
        modality = self.modality or model_modality(model)
        copy = _trainable_copy(model)
        info = quantize_linear_weights_(copy.model, self.bits)
        copy._fingerprint = None
        info["bits"] = self.bits
        info["scheme"] = SCHEME
        image = modality == "image"
        what = "a copy's UNet and text encoder" if image else "a copy"
        note = (f"simulated {self.bits}-bit weight quantisation of all {info['linear_layers']} nn.Linear weights of "
                f"{what} (per-output-channel symmetric round-to-nearest to +-{2 ** (self.bits - 1) - 1} levels, "
                f"dequantised to float{'; convolutions untouched' if image else ''}); a simulation of bitsandbytes-style "
                "quantisation, because bitsandbytes does not run on CPU")
        return Attacked(model=copy, indices=None, info=info, note=note)


_QUANT_DOC = """Simulated {b}-bit weight quantisation: a copy of the model whose every ``nn.Linear``
    weight (a language model's; a diffusion model's UNet and text encoder) is quantised per
    output channel, symmetric, round-to-nearest to ``2^{b1} - 1 = {q}`` levels each side, and
    dequantised back to float (:func:`fake_quantize`); convolutions, embeddings and norms are
    untouched. This *simulates* bitsandbytes-style {b}-bit loading because bitsandbytes does
    not run on CPU (bitsandbytes' own {b}-bit formats differ in detail: {detail}).
    Unlearning by a tiny weight change can be undone by rounding, which maps the
    unlearned weights back onto the target's grid: Zhang et al., 2024, "Catastrophic Failure
    of LLM Unlearning via Quantization" (arXiv:2410.16454) found that 4-bit quantisation
    restores much of the forgotten knowledge. Text: scored on all forget items."""


class Quantize8bit(_Quantize):
    __doc__ = _QUANT_DOC.format(b=8, b1=7, q=127, detail="LLM.int8 is row-wise absmax with fp16 outlier columns")
    name = "quantize_8bit"
    bits = 8


class Quantize4bit(_Quantize):
    __doc__ = _QUANT_DOC.format(b=4, b1=3, q=7, detail="NF4/FP4 use non-uniform levels on blocks of 64 weights")
    name = "quantize_4bit"
    bits = 4


__all__ = ["ModelAttack", "Relearn", "RelearnConfig", "Quantize8bit", "Quantize4bit", "QuantizeConfig",
           "fake_quantize", "quantize_linear_weights_", "_trainable_copy", "_Relearn", "_mean_nll"]
