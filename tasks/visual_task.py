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
    # from a prompt file (task.visual.prompts): its concepts and preserve words replace the world's
    prompt_concepts: tuple[list[str], list[str], list[str]] | None = field(default=None, repr=False)

    @property
    def erase(self) -> list[str]:
        """Erase concepts, ``attribute:value`` each (e.g. ``["colour:red"]``)."""
        return list(self.prompt_concepts[0]) if self.prompt_concepts else self.world.erase_concepts

    @property
    def guide(self) -> list[str]:
        """One guide / anchor concept per erase concept (e.g. ``["colour:blue"]``)."""
        return list(self.prompt_concepts[1]) if self.prompt_concepts else self.world.guide_concepts

    def preserve_words(self) -> list[str]:
        """Every attribute value of the world except the erase concepts' (UCE's preserve set); with a
        prompt file, its ``preserve`` words."""
        if self.prompt_concepts:
            return list(self.prompt_concepts[2])
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


SEED_COLUMNS = ("sd_seed", "evaluation_seed", "seed")
GUIDANCE_COLUMNS = ("sd_guidance_scale", "evaluation_guidance", "guidance")
DEFAULT_GUIDANCE = 7.5  # Stable Diffusion's default, for prompt files without a guidance column


def read_prompt_file(path: str, key: str, concepts: list[str], categories: list[str] | None = None,
                     label_attributes: list[str] | None = None) -> list[dict]:
    """Rows of a prompt CSV (``task.visual.prompts`` / ``retain_prompts``) as prompt-table rows.

    Columns: ``prompt`` (required); a seed (``sd_seed``, ``evaluation_seed`` or ``seed``; default:
    the row number); a guidance scale (``sd_guidance_scale``, ``evaluation_guidance`` or
    ``guidance``; default 7.5); optional ``case_number``; I2P's ``categories`` (filtered by
    ``categories`` when given). Forget rows get ``categories`` = ``concepts``; retain rows
    (``label_attributes``) take each attribute's true value from the column of that name. When
    the file has a column named like an erase attribute (UCE's ``imagenette.csv``: ``class``),
    forget rows are those whose value is an erase value and retain rows the others, so one file
    serves both.
    """
    import csv
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"recipe key '{key}' is {path!r}, which does not exist; give a CSV with a 'prompt' column "
                         "(e.g. I2P's i2p_benchmark.csv)")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = list(reader.fieldnames or [])
        raw = list(reader)
    need = ["prompt"] + (["categories"] if categories else []) + list(label_attributes or [])
    missing = [c for c in need if c not in cols]
    if missing:
        raise ValueError(f"recipe key '{key}': {p.name} has no column {missing[0]!r} (columns: {', '.join(cols)})")
    seed_col = next((c for c in SEED_COLUMNS if c in cols), None)
    guid_col = next((c for c in GUIDANCE_COLUMNS if c in cols), None)
    erased: dict[str, set[str]] = {}
    for c in concepts:
        erased.setdefault(concept_attribute(c), set()).add(concept_value(c))
    by_column = {a: v for a, v in erased.items() if a in cols}
    rows = []
    for i, r in enumerate(raw):
        prompt = (r.get("prompt") or "").strip()
        if not prompt:
            continue
        if categories and not any(c in (r.get("categories") or "") for c in categories):
            continue
        hit = any((r.get(a) or "").strip() in v for a, v in by_column.items())
        if by_column and hit == bool(label_attributes):  # forget keeps the erased values, retain the rest
            continue
        try:
            seed = int(float(r[seed_col])) if seed_col else i
            guidance = float(r[guid_col]) if guid_col else DEFAULT_GUIDANCE
        except ValueError:
            raise ValueError(f"recipe key '{key}': {p.name} row {i + 1} has seed {r.get(seed_col)!r} / guidance "
                             f"{r.get(guid_col)!r}; both must be numbers") from None
        row = {"case_number": r.get("case_number") or str(i), "prompt": prompt, "seed": seed, "guidance": guidance,
               "categories": [] if label_attributes else list(concepts), "kind": "explicit",
               "hard": int(float(r["hard"])) if (r.get("hard") or "").strip() else None}
        for a in label_attributes or []:
            row[a] = r[a].strip()
        rows.append(row)
    if not rows:
        raise ValueError(f"recipe key '{key}': {p.name} has no row with a prompt"
                         + (f" whose categories name one of {categories}" if categories else ""))
    return rows


def load_visual(world: VisualWorldConfig | None = None, forget_split: str = "forget",
                retain_split: str | None = "retain", eval_splits=VISUAL_EVAL_SPLITS,
                max_prompts: int | None = None, prompts=None) -> VisualData:
    """Build the world and its splits.

    Args:
        world: the world's config (seed, size, erase and guide concepts).
        forget_split: ``forget`` (all phrasings), ``forget_explicit`` or ``forget_implicit``.
        retain_split: ``retain`` or ``None``.
        eval_splits: names from :data:`VISUAL_EVAL_SPLITS`.
        max_prompts: keep only the first N rows of each evaluation split (smoke runs).
        prompts: a :class:`~unlearn.recipe.VisualSpec` with ``prompts`` set: the evaluation rows
            come from its prompt files (``forget_explicit`` from ``prompts``, ``retain`` from
            ``retain_prompts``) and its erase / guide / preserve replace the world's concepts.
    """
    w = build_visual_world(world)
    if prompts is not None and prompts.prompts is not None:
        erase, guide = list(prompts.erase), list(prompts.guide)
        splits = {}
        for name in eval_splits:
            if name == "forget_explicit":
                rows = read_prompt_file(prompts.prompts, "task.visual.prompts", erase, prompts.prompt_categories)
            elif name == "retain":
                rows = read_prompt_file(prompts.retain_prompts, "task.visual.retain_prompts", erase,
                                        label_attributes=sorted({concept_attribute(c) for c in erase}))
            else:
                raise ValueError(f"evaluation split {name!r} is not read from a prompt file; with task.visual.prompts "
                                 "use forget_explicit and (with retain_prompts) retain")
            splits[name] = rows[:max_prompts] if max_prompts else rows
        # the world's renders do not depict the prompt file's concepts: the forget set is one image-free
        # item per erase concept (what image-free editors read), and there is no retain set
        forget = [{"caption": concept_value(c), "concept": c} for c in erase]
        return VisualData(forget=forget, retain=None, eval_splits=splits,
                          name=f"visual-prompts[{','.join(erase)}]", world=w,
                          prompt_concepts=(erase, guide, list(prompts.preserve)))
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
