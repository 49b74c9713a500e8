"""Attacks that test whether forgetting is real: one family for text and text-to-image models.

An unlearned model can look clean under the standard probes and still hold what it was meant
to forget: rephrase the question, wrap it in a jailbreak, put the fact back in the prompt,
fine-tune a few steps on *other* forget data, round the weights, or invert the erased word's
embedding, and it comes back. Every attack is one class on the one contract of
:mod:`unlearn.evaluators.attack_base` (``attacked(model, original, inputs) -> Attacked``),
registered once in :data:`ATTACKS` with the kinds of model it applies to (``modalities``):

* text: ``paraphrase``, ``jailbreak_prefix``, ``jailbreak_roleplay``, ``jailbreak_reverse``,
  ``jailbreak_mc``, ``in_context`` (:mod:`unlearn.evaluators.text_attacks`);
* image: ``embedding_inversion`` (:mod:`unlearn.evaluators.image_attacks`); the optimisation
  attacks ``unlearndiffatk``, ``p4d``, ``ring_a_bell``, ``concept_inversion``
  (:mod:`unlearn.evaluators.optim_attacks`);
* text and image: ``relearn``, ``quantize_8bit``, ``quantize_4bit``
  (:mod:`unlearn.evaluators.model_attacks`).

:func:`run_attacks` builds and checks the named attacks, runs each and hands the attacked
model to a modality's scorer; the two entry points wire the scorers:

* :func:`evaluate_attacks` (text): the ``tofu`` suite's forget metrics (Prob, ROUGE-L recall,
  truth ratio) before and after on the same items, and the delta (after - before);
* :func:`run_image_attacks` (images): erasure rates and in-domain retain accuracy of the
  ``i2p`` suite before and after.

See ``docs/attacks.md`` and ``docs/images.md``.
"""

from __future__ import annotations

import time
from typing import Callable

from unlearn.evaluators.attack_base import (MODALITIES, Attack, AttackConfig, Attacked, AttackInputs, attack_config,
                                            model_modality)
from unlearn.evaluators.image_attacks import (FORGET_SPLITS, EmbeddingInversion, InversionConfig, image_inputs,
                                              image_scorer)
from unlearn.evaluators.model_attacks import (ModelAttack, Quantize4bit, Quantize8bit, QuantizeConfig, Relearn,
                                              RelearnConfig, _mean_nll, _Relearn, _trainable_copy, fake_quantize,
                                              quantize_linear_weights_)
from unlearn.evaluators.optim_attacks import (P4D, P4DK, ConceptInversion, InversionTokenConfig, RingABell,
                                              RingABellConfig, TokenAttackConfig, UnlearnDiffAtk)
from unlearn.evaluators.text_attacks import (METRICS, REVERSE_TEMPLATES, RWKU_PAPER, InContext, InContextConfig,
                                             JailbreakMC, JailbreakPrefix, JailbreakReverse, JailbreakRoleplay,
                                             MCConfig, Paraphrase, ParaphraseConfig, PrefixConfig, PromptAttack,
                                             ReverseConfig, RoleplayConfig, _Evaluator, context_prompt, text_scorer)
from unlearn.registry import Registry

# ============================================================================== registry
ATTACKS = Registry("attack")
_ORDER: list[str] = []  # registration order: the order of attack_names()


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Register an attack class under ``cls.name`` (its class attributes are checked)."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise TypeError(f"an attack must subclass unlearn.evaluators.attack_base.Attack, got {cls!r}")
    if not cls.modalities or not set(cls.modalities) <= set(MODALITIES):
        raise ValueError(f"attack {cls.name!r}: modalities must be a non-empty subset of {MODALITIES}, "
                         f"got {cls.modalities!r}")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, AttackConfig)):
        raise TypeError(f"attack {cls.name!r}: Config must be an AttackConfig dataclass, got {cls.Config!r}")
    ATTACKS.register(cls.name, cls)
    _ORDER.append(cls.name)
    return cls


register_attack(Paraphrase)
register_attack(JailbreakPrefix)
register_attack(JailbreakRoleplay)
register_attack(JailbreakReverse)
register_attack(JailbreakMC)
register_attack(InContext)
register_attack(EmbeddingInversion)
register_attack(Relearn)
register_attack(Quantize8bit)
register_attack(Quantize4bit)
register_attack(UnlearnDiffAtk)
register_attack(P4D)
register_attack(P4DK)
register_attack(RingABell)
register_attack(ConceptInversion)


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")


def attack_names(modality: str | None = None) -> tuple[str, ...]:
    """The registered attacks (in registration order) that apply to ``modality`` models
    (``"text"`` or ``"image"``; None: all)."""
    if modality is not None:
        _check_modality(modality)
    return tuple(n for n in _ORDER if modality is None or modality in ATTACKS.get(n).modalities)


# Named attack sets, usable as one entry of ``eval.attacks`` (expanded in place), per modality.
# Versioned: a set's content only changes with a new name.
ATTACK_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    # robustness (v1): every attack, default settings
    "robustness": {
        "text": ("paraphrase", "jailbreak_prefix", "jailbreak_roleplay", "jailbreak_reverse", "jailbreak_mc",
                 "in_context", "relearn", "quantize_8bit", "quantize_4bit"),
        "image": ("embedding_inversion", "relearn", "quantize_8bit", "quantize_4bit"),
    },
    # optimisation (v1): the prompt-optimisation attacks on text-to-image models, default budgets
    "optimisation": {
        "image": ("unlearndiffatk", "p4d", "ring_a_bell", "concept_inversion"),
    },
}


def expand_attack_sets(names, modality: str) -> list[str]:
    """``names`` with every attack set (:data:`ATTACK_SETS`) replaced in place by its attacks for
    ``modality`` models; other names are kept as they are (and not checked here)."""
    _check_modality(modality)
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in names:
        if n in ATTACK_SETS and modality not in ATTACK_SETS[n]:
            raise ValueError(f"attack set {n!r} has no attacks for {modality} models (it is for "
                             f"{' and '.join(ATTACK_SETS[n])} models)")
        out += list(ATTACK_SETS[n][modality]) if n in ATTACK_SETS else [n]
    return out


def make_attack(name: str, params: dict | None = None, seed: int = 0, modality: str | None = None) -> Attack:
    """An attack by name with its config built from ``params`` (see :func:`attack_config`).

    Raises:
        ValueError: unknown name or setting (with a did-you-mean), a bad setting value, or an
            attack that does not apply to ``modality`` models (naming the ones that do).
    """
    cls = ATTACKS.get(name)
    if modality is not None:
        _check_modality(modality)
        if modality not in cls.modalities:
            raise ValueError(f"attack {name!r} does not apply to {modality} models (it attacks "
                             f"{' and '.join(cls.modalities)} models); attacks for {modality} models: "
                             f"{', '.join(attack_names(modality))}")
    kind = "image attack" if modality == "image" else "attack"
    return cls(attack_config(cls, params, name, kind=kind), seed=seed, modality=modality)


def run_attacks(names, model, original, inputs: AttackInputs, score: Callable[[Attack, Attacked], dict], *,
                params: dict[str, dict] | None = None, seed: int = 0, modality: str) -> dict[str, dict]:
    """Run the named attacks against ``model`` and score each attacked model.

    Args:
        names: attack names and attack sets (:data:`ATTACK_SETS`); all are built and checked
            (name, settings, modality, original model) before anything runs.
        model: the model under test (never modified: its fingerprint is checked at the end).
        original: the model before unlearning, or None (attacks with ``needs_original``
            require it).
        inputs: what the attacks read (:class:`~unlearn.evaluators.attack_base.AttackInputs`).
        score: ``score(attack, attacked) -> result dict`` (the modality's scorer).
        params: ``{attack_name: {setting: value}}``; a name there that is not an attack is an error.
        seed: seeds every attack.
        modality: ``"text"`` or ``"image"``: the kind of ``model`` (must match the adapter's
            ``modality`` where it declares one).
    Returns:
        ``{attack_name: score(...) + {"seconds": wall time of the attack and its scoring}}``.
    Raises:
        ValueError: see :func:`make_attack`; an attack that needs the original model without one.
        RuntimeError: an attack modified ``model``.
    """
    _check_modality(modality)
    declared = getattr(model, "modality", None)
    if declared in MODALITIES and declared != modality:
        raise ValueError(f"run_attacks: modality={modality!r}, but the model's modality is {declared!r}")
    params = dict(params or {})
    for n in params:
        ATTACKS.get(n)  # unknown names in params are errors too
    attacks = {n: make_attack(n, params.get(n), seed=seed, modality=modality)
               for n in expand_attack_sets(names, modality)}
    for a in attacks.values():
        if a.needs_original and original is None:
            raise ValueError(f"attack {a.name!r} needs the model before erasure or unlearning (original), got None")
    fp = model.fingerprint(refresh=True) if hasattr(model, "fingerprint") else None
    out: dict[str, dict] = {}
    for n, attack in attacks.items():
        t0 = time.time()
        att = attack.attacked(model, original, inputs)
        out[n] = {**score(attack, att), "seconds": round(time.time() - t0, 1)}
        del att
    if fp is not None and model.fingerprint(refresh=True) != fp:  # the attacks must work on copies
        raise RuntimeError("an attack modified the caller's model; attacks must work on copies or wrappers "
                           "(a bug in unlearn.evaluators)")
    return out


# ============================================================================== entry points
def evaluate_attacks(adapter, forget: list[dict], retain: list[dict] | None, names: list[str], *,
                     batch_size: int = 32, max_new_tokens: int = 48, seed: int = 0, progress: bool = True,
                     params: dict[str, dict] | None = None) -> dict[str, dict]:
    """Run the named attacks against a language model ``adapter`` on the ``forget`` items.

    Args:
        adapter: a :class:`~unlearn.adapters.text.TextAdapter` (never modified).
        forget: the forget items (TOFU fields).
        retain: optional retain items; model attacks then also report Prob on the first 32
            of them before/after (``"retain"``), to show what the attack does to kept knowledge.
        names: attack names for text models (:func:`attack_names` ``("text")``) or attack sets;
            all are checked before anything runs.
        params: optional ``{attack_name: {setting: value}}`` for the attacks' configs.
    Returns:
        ``{attack_name: {"before": {"prob", "rouge", "truth_ratio"}, "after": {...},
        "delta": {... after - before ...}, "items": n, "indices": positions in forget of
        the evaluated items, "note": what was done, "settings": {...}, "paper": str,
        "examples": up to 3 (question, answer, generation) before/after, "seconds": float}}``.
    Raises:
        ValueError: unknown attack name or setting (with a did-you-mean), an image-only attack,
            empty forget set.
    """
    if not forget:
        raise ValueError("evaluate_attacks: the forget set is empty")
    ev = _Evaluator(adapter, batch_size, max_new_tokens, progress)
    return run_attacks(names, adapter, None, AttackInputs(forget=forget, retain=retain, progress=progress),
                       text_scorer(ev, forget, retain), params=params, seed=seed, modality="text")


def run_image_attacks(names: list[str], erased, original, data, splits: dict, evaluate: Callable, before: dict,
                      *, params: dict | None = None, seed: int = 0) -> dict:
    """Run the named attacks against an erased text-to-image model.

    Args:
        names: attack names for image models (:func:`attack_names` ``("image")``) or attack
            sets; all checked before anything runs.
        erased: the erased model (never modified).
        original: the model before erasure (``embedding_inversion`` needs it), or None.
        data: the run's :class:`~unlearn.tasks.visual_task.VisualData` (erase words, forget renders).
        splits: ``{split: rows}`` to score: the forget splits and ``retain`` of the run.
        evaluate: ``evaluate(model, splits) -> harness result`` with the run's i2p suite.
        before: the erased model's own harness result on those splits (the "before").
    Returns:
        ``{name: {"before", "after", "delta", "asr", "note", "settings", "paper", "seconds"}}``, each of
        before/after/delta ``{split: erasure rate (forget splits) or in-domain accuracy (retain)}``;
        ``asr`` ``{"before": {split: concept rate}, "after": {...}}`` on the forget splits (concept
        rate = 1 − erasure rate; "after" is the attack success rate).
    """
    return run_attacks(names, erased, original, image_inputs(data), image_scorer(splits, evaluate, before),
                       params=params, seed=seed, modality="image")


__all__ = [
    # registry and entry points
    "ATTACKS", "ATTACK_SETS", "MODALITIES", "attack_names", "expand_attack_sets", "make_attack", "register_attack",
    "run_attacks", "evaluate_attacks", "run_image_attacks",
    # the contract
    "Attack", "AttackConfig", "AttackInputs", "Attacked", "attack_config", "model_modality",
    # text
    "METRICS", "RWKU_PAPER", "REVERSE_TEMPLATES", "PromptAttack", "Paraphrase", "ParaphraseConfig", "JailbreakPrefix",
    "PrefixConfig", "JailbreakRoleplay", "RoleplayConfig", "JailbreakReverse", "ReverseConfig", "JailbreakMC",
    "MCConfig", "InContext", "InContextConfig", "context_prompt", "text_scorer",
    # text and image
    "ModelAttack", "Relearn", "RelearnConfig", "Quantize8bit", "Quantize4bit", "QuantizeConfig", "fake_quantize",
    "quantize_linear_weights_", "_trainable_copy", "_Relearn", "_mean_nll",
    # image
    "UnlearnDiffAtk", "P4D", "P4DK", "RingABell", "ConceptInversion", "TokenAttackConfig", "RingABellConfig",
    "InversionTokenConfig", "FORGET_SPLITS", "EmbeddingInversion", "InversionConfig", "image_inputs", "image_scorer",
]
