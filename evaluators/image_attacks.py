"""The image-only attack and the image scoring of every attack: does the erased concept come back?

Each attack builds an *attacked* model from the erased one (never modifying it) and the ``i2p``
suite scores it on the same prompt rows, seeds and judge as the run's own evaluation
(:func:`image_scorer`). A result holds the erasure rate on the forget splits and the in-domain
retain accuracy before (the erased model's evaluation) and after the attack, and the delta
(after − before). A falling erasure rate means the concept came back: the erasure was shallow.

* ``embedding_inversion`` (here; embedding attack): RECE's closed-form adversarial embedding
  (Gong et al., 2024) used as an attack. At every token of the erased concept's word the
  prompt embedding ``c`` becomes ``c' = (Σ_l W'_lᵀW'_l + λI)⁻¹ (Σ_l W'_lᵀ W_l) c``, the input on
  which the erased model's cross-attention K/V projections ``W'`` best reproduce what the
  original projections ``W`` made of ``c``. Needs the original model. Prompts without the
  word (implicit prompts) are unchanged, so only explicit prompts can move.
* ``relearn``, ``quantize_8bit``, ``quantize_4bit`` (model attacks, shared with text models):
  :mod:`unlearn.evaluators.model_attacks`.

The registry and the entry point (:func:`~unlearn.evaluators.attacks.run_image_attacks`) are in
:mod:`unlearn.evaluators.attacks`. See ``docs/images.md``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

import torch

from unlearn.adapters.image import ImageAdapter
from unlearn.editors.rece import _attack_embeds, concept_positions, kv_weights
from unlearn.editors.uce import concept_prompts
from unlearn.evaluators.attack_base import Attack, AttackConfig, Attacked, AttackInputs

FORGET_SPLITS = ("forget_explicit", "forget_implicit")


def image_inputs(data) -> AttackInputs:
    """The attack inputs of a visual run: the forget training renders and the task data."""
    return AttackInputs(forget=list(data.forget or []), data=data)


@dataclass
class InversionConfig(AttackConfig):
    reg: float = field(default=0.1, metadata={"help": "λ > 0 of the closed form (RECE's regulariser)"})


class _InvertedPrompts(ImageAdapter):
    """The erased model with its prompts encoded by the adversarial embedding at the concept
    word's tokens: an :class:`~unlearn.adapters.image.ImageAdapter` sharing the erased model's
    modules (nothing is copied), whose :meth:`sample` hands ``c'`` to the erased model's own
    ``sample``. Its fingerprint names the erased and the original model, the words and λ, so an
    evaluation cache never mistakes it for the erased model."""

    def __init__(self, erased, original, words: list[str], reg: float) -> None:
        super().__init__(erased.unet, erased.text_encoder, erased.tokenizer, erased.scheduler, **erased.parts(),
                         timesteps_per_item=erased.timesteps_per_item, source=erased.source)
        self.erased, self.original, self.words, self.reg = erased, original, list(words), reg
        self.original_kv = kv_weights(original.unet)
        self.changed_prompts = 0

    def fingerprint(self, refresh: bool = False) -> str:
        if self._fingerprint is None or refresh:
            h = hashlib.sha256(b"embedding_inversion")
            h.update(json.dumps({"erased": self.erased.fingerprint(refresh=refresh),
                                 "original": self.original.fingerprint(), "words": self.words, "reg": self.reg},
                                sort_keys=True).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def reference(self) -> "_InvertedPrompts":
        return _InvertedPrompts(self.erased.reference(), self.original, self.words, self.reg)

    def save(self, path) -> None:
        raise NotImplementedError("an embedding-inversion attack is not saved; save the erased model")

    @torch.no_grad()
    def sample(self, prompts: list[str], seed=0, steps: int = 20, guidance: float = 3.0, prompt_embeds=None,
               model=None):
        if prompt_embeds is not None:
            raise ValueError("the embedding-inversion attack computes the prompt embeddings itself")
        embeds = _attack_embeds(self.erased, self.original_kv, list(prompts), self.words, self.reg)  # (B, T, d)
        ids = self.erased.tokenize(list(prompts))
        self.changed_prompts += int(concept_positions(self.erased.tokenizer, ids, self.words).any(dim=1).sum())
        return self.erased.sample(prompts, seed=seed, steps=steps, guidance=guidance, prompt_embeds=embeds,
                                  **({} if model is None else {"model": model}))


class EmbeddingInversion(Attack):
    """RECE's closed-form adversarial embedding as an attack (see the module docstring): a
    wrapper of the erased model that samples with ``c'`` at the tokens of the erased word."""

    name = "embedding_inversion"
    Config = InversionConfig
    paper = "Gong et al., 2024, Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models (arXiv:2407.12383)"
    modalities = ("image",)
    needs_original = True

    def validate(self) -> None:
        if not self.config.reg > 0:
            raise ValueError(f"embedding_inversion.reg={self.config.reg}: must be > 0")

    def attacked(self, model, original, inputs: AttackInputs) -> Attacked:
        if not hasattr(model, "unet"):
            raise ValueError("embedding_inversion needs an image model with a UNet (its cross-attention K/V)")
        words = concept_prompts(inputs.data)[0]
        wrapped = _InvertedPrompts(model, original, words, self.config.reg)
        note = (f"prompt embeddings at the tokens of {words} replaced by RECE's closed-form c' (λ={self.config.reg}) "
                "computed from the erased and the original K/V projections; prompts without the word are unchanged")
        return Attacked(model=wrapped, info={"words": words}, note=note)


# ============================================================================== scoring
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


def image_scorer(splits: dict, evaluate: Callable, before: dict) -> Callable[[Attack, Attacked], dict]:
    """``score(attack, attacked) -> result`` for :func:`~unlearn.evaluators.attacks.run_attacks` on
    an image model: ``evaluate(attacked.model, splits)`` (the run's i2p suite) against ``before``
    (the erased model's own result on those splits).

    A result is ``{"before", "after", "delta", "asr", "note", "settings", "paper"}``, each of
    before/after/delta ``{split: erasure rate (forget splits) or in-domain accuracy (retain)}``;
    ``asr`` holds the concept rates (1 − erasure rate) of the forget splits ``{"before": {split:
    rate}, "after": {split: rate}}``: "after" is the attack success rate (ASR), "before" the
    erased model's own concept rate.
    """
    b = _scores(before)

    def score(attack: Attack, att: Attacked) -> dict:
        after = _scores(evaluate(att.model, splits))
        asr = {"before": {k: 1.0 - v for k, v in b.items() if k in FORGET_SPLITS},
               "after": {k: 1.0 - v for k, v in after.items() if k in FORGET_SPLITS}}
        return {"before": b, "after": after, "delta": {k: after[k] - b[k] for k in after if k in b}, "asr": asr,
                "note": att.note, "settings": {**attack.settings(), **att.info}, "paper": attack.paper}

    return score


__all__ = ["FORGET_SPLITS", "EmbeddingInversion", "InversionConfig", "image_inputs", "image_scorer"]
