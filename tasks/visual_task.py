"""The visual world as an unlearning task: forget / retain training items and the I2P-style
evaluation splits, in the modality-free :class:`~unlearn.data.UnlearningData` model.

* ``forget`` -- training renders that depict an erase concept, each under its three caption
  phrasings (what GradAscent / NPO train on, and what ESD's prompts come from);
* ``retain`` -- the other training renders (GradDiff's and NPO's retain term);
* evaluation splits are **prompt-table rows** (I2P format: ``prompt``, ``seed``, ``guidance``,
  ``categories`` and the true ``shape`` / ``colour`` / ``texture``), not renders: the harness
  samples one image per row and the judge reads it.

  | split | rows |
  | --- | --- |
  | ``forget_explicit`` | prompts that name an erase concept ("a striped red circle") |
  | ``forget_implicit`` | prompts that depict it without its word ("a banded crimson disc") |
  | ``retain`` | prompts of every other combination, explicit and implicit |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unlearn.data import UnlearningData
from unlearn.tasks.visual_world import ATTRIBUTES, VisualWorld, VisualWorldConfig, build_visual_world

VISUAL_FORGET_SPLITS = ("forget", "forget_explicit", "forget_implicit")
VISUAL_EVAL_SPLITS = ("forget_explicit", "forget_implicit", "retain")


def concept_value(concept: str) -> str:
    """``"colour:red"`` -> ``"red"`` (the word a prompt names the concept by)."""
    return concept.split(":", 1)[1]


def concept_attribute(concept: str) -> str:
    """``"colour:red"`` -> ``"colour"`` (the judge head that reads it)."""
    return concept.split(":", 1)[0]


@dataclass
class VisualData(UnlearningData):
    """:class:`UnlearningData` plus the world it came from (editors read its erase/guide concepts)."""

    world: VisualWorld | None = field(default=None, repr=False)
    judge: object = field(default=None, repr=False)  # the ImageJudge the run evaluates with (RECE validates with it)

    @property
    def erase(self) -> list[str]:
        """Erase concepts, ``attribute:value`` each (e.g. ``["colour:red"]``)."""
        return self.world.erase_concepts

    @property
    def guide(self) -> list[str]:
        """One guide / anchor concept per erase concept (e.g. ``["colour:blue"]``)."""
        return self.world.guide_concepts

    def preserve_words(self) -> list[str]:
        """Every attribute value of the world except the erase concepts' (UCE's preserve set)."""
        erased = {concept_value(c) for c in self.erase}
        return [v for vals in ATTRIBUTES.values() for v in vals if v not in erased]


def eval_split(world: VisualWorld, name: str) -> list[dict]:
    """Prompt-table rows of an evaluation split (see the module docstring)."""
    if name == "forget_explicit":
        return world.prompt_table(kind="explicit", target=True)
    if name == "forget_implicit":
        return world.prompt_table(kind="implicit", target=True)
    if name == "retain":
        return world.prompt_table(target=False)
    raise ValueError(f"unknown visual evaluation split {name!r}; available: {', '.join(VISUAL_EVAL_SPLITS)}")


def load_visual(world: VisualWorldConfig | None = None, forget_split: str = "forget",
                retain_split: str | None = "retain", eval_splits=VISUAL_EVAL_SPLITS,
                max_prompts: int | None = None) -> VisualData:
    """Build the world and its splits.

    Args:
        world: the world's config (seed, size, erase and guide concepts).
        forget_split: ``forget`` (all phrasings), ``forget_explicit`` or ``forget_implicit``.
        retain_split: ``retain`` or ``None``.
        eval_splits: names from :data:`VISUAL_EVAL_SPLITS`.
        max_prompts: keep only the first N rows of each evaluation split (smoke runs).
    """
    w = build_visual_world(world)
    if forget_split not in VISUAL_FORGET_SPLITS:
        raise ValueError(f"unknown visual forget split {forget_split!r}; available: {', '.join(VISUAL_FORGET_SPLITS)}")
    if retain_split not in (None, "retain"):
        raise ValueError(f"unknown visual retain split {retain_split!r}; use 'retain' or null")
    splits = {}
    for name in eval_splits:
        rows = eval_split(w, name)
        splits[name] = rows[:max_prompts] if max_prompts else rows
    return VisualData(forget=w.split(forget_split), retain=w.split("retain") if retain_split else None,
                      eval_splits=splits, name=f"visual[{','.join(w.erase_concepts)}]", world=w)
