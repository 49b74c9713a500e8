"""Attacks on an erased text-to-image model: does the concept come back?

The image counterpart of :mod:`unlearn.evaluators.attacks`. Each attack builds an *attacked*
model from the erased one (never modifying it) and the ``i2p`` suite scores it on the same
prompt rows, seeds and judge as the run's own evaluation. A result holds the erasure rate on
the forget splits and the in-domain retain accuracy before (the erased model's evaluation)
and after the attack, and the delta (after − before). A falling erasure rate means the
concept came back: the erasure was shallow.

* ``embedding_inversion`` (embedding attack): RECE's closed-form adversarial embedding
  (Gong et al., 2024) used as an attack. At every token of the erased concept's word the
  prompt embedding ``c`` becomes ``c' = (Σ_l W'_lᵀW'_l + λI)⁻¹ (Σ_l W'_lᵀ W_l) c``, the input on
  which the erased model's cross-attention K/V projections ``W'`` best reproduce what the
  original projections ``W`` made of ``c``. Needs the original model. Prompts without the
  word (implicit prompts) are unchanged, so only explicit prompts can move.
* ``relearn`` (model attack): a few fine-tuning steps with the plain denoising loss on half of
  the erased concept's training renders (Lynch et al., 2024, for LLMs; the image analogue of
  the text ``relearn``).
* ``quantize_8bit`` / ``quantize_4bit`` (model attacks): every ``nn.Linear`` weight of a copy
  (UNet and text encoder) quantised per output channel and dequantised, as the text attacks do
  (:func:`~unlearn.evaluators.attacks.quantize_linear_weights_`, simulated; convolutions are
  not quantised). Zhang et al., 2024.

Entry point: :func:`run_image_attacks`; the attacks are registered in :data:`IMAGE_ATTACKS`.
See ``docs/images.md``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from unlearn.evaluators.attacks import AttackConfig, _Relearn, _trainable_copy, quantize_linear_weights_
from unlearn.evaluators.attacks import attack_config as _attack_config
from unlearn.registry import Registry

FORGET_SPLITS = ("forget_explicit", "forget_implicit")


@dataclass
class InversionConfig(AttackConfig):
    reg: float = field(default=0.1, metadata={"help": "λ > 0 of the closed form (RECE's regulariser)"})


@dataclass
class ImageRelearnConfig(AttackConfig):
    steps: int = field(default=10, metadata={"help": "optimizer steps of fine-tuning"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "renders per step"})


@dataclass
class ImageQuantizeConfig(AttackConfig):
    pass


class ImageAttack:
    """Base class. ``attacked(erased, original, data)`` -> ``(attacked model, settings, note)``;
    the attacked model needs only ``sample`` and ``fingerprint`` (the i2p suite's contract).

    Attributes: name (registry name), Config (dataclass), paper (citation), needs_original."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = AttackConfig
    paper: ClassVar[str] = ""
    needs_original: ClassVar[bool] = False

    def __init__(self, config=None, seed: int = 0) -> None:
        self.config = config if config is not None else self.Config()
        self.seed = seed

    def settings(self) -> dict:
        return {**dataclasses.asdict(self.config), "seed": self.seed}

    def attacked(self, erased, original, data) -> tuple[Any, dict, str]:
        raise NotImplementedError


class _InvertedPrompts:
    """An erased model whose prompts are encoded with the adversarial embedding at the concept
    word's tokens (shares the erased model's modules; sampling only)."""

    def __init__(self, erased, original_kv: list[torch.Tensor], words: list[str], reg: float) -> None:
        self.erased, self.original_kv, self.words, self.reg = erased, original_kv, words, reg
        self.changed_prompts = 0

    def fingerprint(self) -> str:
        return f"{self.erased.fingerprint()}+inversion"

    @torch.no_grad()
    def sample(self, prompts: list[str], seed=0, steps: int = 20, guidance: float = 3.0):
        from unlearn.editors.rece import _attack_embeds, concept_positions

        embeds = _attack_embeds(self.erased, self.original_kv, list(prompts), self.words, self.reg)  # (B, T, d)
        ids = self.erased.tokenize(list(prompts))
        self.changed_prompts += int(concept_positions(self.erased.tokenizer, ids, self.words).any(dim=1).sum())
        return self.erased.sample(prompts, seed=seed, steps=steps, guidance=guidance, prompt_embeds=embeds)


class EmbeddingInversion(ImageAttack):
    """RECE's closed-form adversarial embedding as an attack (see the module docstring)."""

    name = "embedding_inversion"
    Config = InversionConfig
    paper = "Gong et al., 2024, Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models (arXiv:2407.12383)"
    needs_original = True

    def attacked(self, erased, original, data):
        from unlearn.editors.rece import kv_weights
        from unlearn.editors.uce import concept_prompts

        if not self.config.reg > 0:
            raise ValueError(f"embedding_inversion.reg={self.config.reg}: must be > 0")
        if not hasattr(erased, "unet"):
            raise ValueError("embedding_inversion needs an image model with a UNet (its cross-attention K/V)")
        words = concept_prompts(data)[0]
        model = _InvertedPrompts(erased, kv_weights(original.unet), words, self.config.reg)
        note = (f"prompt embeddings at the tokens of {words} replaced by RECE's closed-form c' (λ={self.config.reg}) "
                "computed from the erased and the original K/V projections; prompts without the word are unchanged")
        return model, {"words": words}, note


class ImageRelearn(ImageAttack):
    """Fine-tune a copy with the denoising loss on the first half of the forget renders."""

    name = "relearn"
    Config = ImageRelearnConfig
    paper = "Lynch et al., 2024, Eight Methods to Evaluate Robust Unlearning in LLMs (arXiv:2402.16835)"

    def attacked(self, erased, original, data):
        from unlearn.trainer import TrainSettings, train

        c = self.config
        if c.steps < 1 or c.batch_size < 1 or not c.lr > 0:
            raise ValueError(f"relearn: steps ({c.steps}) and batch_size ({c.batch_size}) must be >= 1 and lr > 0")
        renders = list(data.forget or [])
        if len(renders) < 2:
            raise ValueError("relearn needs at least 2 forget renders (task.forget_split)")
        half = renders[: len(renders) // 2]
        copy = _trainable_copy(erased)
        for p in copy.model.parameters():
            p.requires_grad_(True)
        settings = TrainSettings(max_steps=c.steps, epochs=max(1, -(-c.steps * c.batch_size // len(half))), lr=c.lr,
                                 batch_size=c.batch_size, max_grad_norm=1.0)
        log = train(copy, _Relearn(), half, None, settings, seed=self.seed, progress=False)
        copy.model.eval()
        copy._fingerprint = None
        note = (f"fine-tuned a copy with the denoising loss on {len(half)} of {len(renders)} forget renders for "
                f"{log.steps} steps (lr {c.lr}, batch {c.batch_size}); evaluated on the prompt rows")
        return copy, {"trained_renders": len(half), "steps_done": log.steps}, note


class _ImageQuantize(ImageAttack):
    bits: ClassVar[int] = 8
    Config = ImageQuantizeConfig
    paper = "Zhang et al., 2024, Catastrophic Failure of LLM Unlearning via Quantization (arXiv:2410.16454)"

    def attacked(self, erased, original, data):
        copy = _trainable_copy(erased)
        info = quantize_linear_weights_(copy.model, self.bits)
        copy._fingerprint = None
        note = (f"simulated {self.bits}-bit quantisation of all {info['linear_layers']} nn.Linear weights of a copy "
                "(UNet + text encoder; per-output-channel symmetric round-to-nearest, dequantised; convolutions "
                "untouched)")
        return copy, {"bits": self.bits, **info}, note


class ImageQuantize8bit(_ImageQuantize):
    name = "quantize_8bit"
    bits = 8


class ImageQuantize4bit(_ImageQuantize):
    name = "quantize_4bit"
    bits = 4


IMAGE_ATTACKS = Registry("image attack")
for _cls in (EmbeddingInversion, ImageRelearn, ImageQuantize8bit, ImageQuantize4bit):
    IMAGE_ATTACKS.register(_cls.name, _cls)


def attack_config(cls, params: dict | None, name: str):
    """``cls.Config`` from ``params``, checked and converted as for the text attacks."""
    return _attack_config(cls, params, name, kind="image attack")


def _scores(res: dict) -> dict:
    """``{forget_explicit: erasure, forget_implicit: erasure, retain: in-domain accuracy}`` of an
    i2p evaluation (splits that were not evaluated are left out)."""
    out = {}
    for split, r in res["splits"].items():
        m = r["metrics"]
        key = "erasure_rate" if split in FORGET_SPLITS else "retain_in_domain"
        if key in m and m[key].get("value") is not None:
            out[split] = m[key]["value"]
    return out


def run_image_attacks(names: list[str], erased, original, data, splits: dict, evaluate: Callable, before: dict,
                      *, params: dict | None = None, seed: int = 0) -> dict:
    """Run the named image attacks against ``erased``.

    Args:
        names: attack names from :data:`IMAGE_ATTACKS` (all checked before anything runs).
        erased: the erased model (never modified).
        original: the model before erasure (``embedding_inversion`` needs it), or None.
        data: the run's :class:`~unlearn.tasks.visual_task.VisualData` (erase words, forget renders).
        splits: ``{split: rows}`` to score: the forget splits and ``retain`` of the run.
        evaluate: ``evaluate(model, splits) -> harness result`` with the run's i2p suite.
        before: the erased model's own harness result on those splits (the "before").
    Returns:
        ``{name: {"before", "after", "delta", "note", "settings", "paper", "seconds"}}``, each of
        before/after/delta ``{split: erasure rate (forget splits) or in-domain accuracy (retain)}``.
    """
    params = params or {}
    attacks = []
    for n in names:
        cls = IMAGE_ATTACKS.get(n)
        attacks.append(cls(attack_config(cls, dict(params.get(n) or {}), n), seed=seed))
    for a in attacks:
        if a.needs_original and original is None:
            raise ValueError(f"image attack {a.name!r} needs the model before erasure")
    fp = erased.fingerprint(refresh=True) if hasattr(erased, "fingerprint") else None
    b = _scores(before)
    out = {}
    for a in attacks:
        t0 = time.time()
        model, extra, note = a.attacked(erased, original, data)
        after = _scores(evaluate(model, splits))
        out[a.name] = {"before": b, "after": after, "delta": {k: after[k] - b[k] for k in after if k in b},
                       "note": note, "settings": {**a.settings(), **extra}, "paper": a.paper,
                       "seconds": round(time.time() - t0, 1)}
        del model
    if fp is not None and erased.fingerprint(refresh=True) != fp:
        raise RuntimeError("an image attack modified the erased model; attacks must work on copies")
    return out


__all__ = ["IMAGE_ATTACKS", "ImageAttack", "EmbeddingInversion", "ImageRelearn", "ImageQuantize8bit",
           "ImageQuantize4bit", "run_image_attacks"]
