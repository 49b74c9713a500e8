"""The one attack contract, shared by attacks on text and on text-to-image models.

An attack takes the model under test (and, where it needs one, the model before unlearning)
and returns an *attacked* model -- the same object with rewritten inputs (prompt attacks), or
a copy or wrapper (model attacks) -- that the caller then scores exactly as it scores the
model itself. The caller's model is never modified.

* :class:`Attack` -- the base class: ``name``, ``Config``, ``paper``, ``modalities``,
  ``needs_original`` and the one method :meth:`Attack.attacked`.
* :class:`AttackInputs` -- what an attack may read: the forget items (text: the forget
  evaluation items; images: the forget training renders), retain items, the task's data.
* :class:`Attacked` -- what an attack returns: the attacked model, which forget positions to
  score, the rewritten items of a prompt attack, extra settings and a note.
* :func:`attack_config` -- an attack's config from ``eval.attack_params.<name>``.

The registry of every attack and the entry points live in :mod:`unlearn.evaluators.attacks`;
this module imports none of the attacks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unlearn.adapters.base import MODALITIES
from unlearn.config import from_dict
from unlearn.registry import did_you_mean


@dataclass
class AttackConfig:
    """Base class of every attack's config dataclass."""


@dataclass
class AttackInputs:
    """What an attack may use besides the models.

    Attributes:
        forget: text: the forget evaluation items (TOFU fields); images: the forget training
            renders (``VisualData.forget``: image + caption dicts).
        retain: text: retain items (scored for model attacks); unused on images.
        data: images: the run's :class:`~unlearn.tasks.visual_task.VisualData` (erase words);
            None on text.
        progress: show a progress bar where an attack trains (``relearn``).
    """

    forget: list[dict]
    retain: list[dict] | None = None
    data: Any = None
    progress: bool = False


@dataclass
class Attacked:
    """The result of :meth:`Attack.attacked`.

    Attributes:
        model: the attacked model: the caller's own model for prompt attacks, a copy or a
            wrapper for model attacks (never the caller's model changed in place).
        indices: positions in ``inputs.forget`` to score; None = all of them (text); image
            attacks leave it None (the image scorer scores the run's prompt rows).
        before_items / after_items: prompt attacks on text: the original items and their
            rewritten copies, in the order of ``indices``; None otherwise.
        info: extra settings, merged over :meth:`Attack.settings` in the result's ``settings``.
        note: what was done (and what was skipped).
    """

    model: Any
    indices: list[int] | None = None
    before_items: list[dict] | None = None
    after_items: list[dict] | None = None
    info: dict = field(default_factory=dict)
    note: str = ""


def model_modality(model) -> str:
    """The kind of ``model``: its adapter's ``modality`` (``unlearn.adapters.base``), else
    ``"image"`` for a model with a UNet and ``"text"`` otherwise. The fallback of an attack built
    without a modality (:func:`~unlearn.evaluators.attacks.make_attack` sets one)."""
    m = getattr(model, "modality", None)
    if m in MODALITIES:
        return m
    return "image" if hasattr(model, "unet") else "text"


class Attack:
    """Base class of every attack. Subclasses set the class attributes and implement :meth:`attacked`.

    Class attributes:
        name: registry name. Config: the config dataclass. paper: citation.
        modalities: the kinds of model the attack applies to, from ``("text", "image")``.
        needs_original: the attack needs the model before unlearning (``original``).

    Args:
        config: the attack's settings (``Config()`` when None).
        seed: seeds every random choice of the attack.
        modality: the kind of model it will attack (checked against ``modalities``); None:
            decided from the model where it matters (:func:`model_modality`).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = AttackConfig
    paper: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = ()
    needs_original: ClassVar[bool] = False

    def __init__(self, config: AttackConfig | None = None, seed: int = 0, modality: str | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self.seed = seed
        if modality is not None and modality not in self.modalities:
            raise ValueError(f"attack {self.name!r} does not apply to {modality} models "
                             f"(it attacks {' and '.join(self.modalities) or 'no'} models)")
        self.modality = modality
        self.validate()

    def validate(self) -> None:
        """Check the config's values (ValueError); called on construction, before anything runs."""

    def settings(self) -> dict:
        return {**dataclasses.asdict(self.config), "seed": self.seed}

    def attacked(self, model, original, inputs: AttackInputs) -> Attacked:
        """-> the attacked model and what to score. Must not modify ``model`` or ``original``."""
        raise NotImplementedError


def attack_config(cls, params: dict | None, name: str, kind: str = "attack"):
    """``cls.Config`` from ``params`` (``eval.attack_params.<name>``): an unknown setting is a
    ValueError naming it (with a did-you-mean); values are checked and converted to the field
    types (YAML reads ``1e-4`` as a string). ``kind`` names the attack in the message."""
    params = dict(params or {})
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for k in params:
        if k not in fields:
            raise ValueError(f"{kind} {name!r} has no setting {k!r}; allowed: {', '.join(sorted(fields)) or '(none)'}"
                             + did_you_mean(k, fields))
    return from_dict(cls.Config, params, f"eval.attack_params.{name}")


__all__ = ["MODALITIES", "Attack", "AttackConfig", "AttackInputs", "Attacked", "attack_config", "model_modality"]
