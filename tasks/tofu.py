"""The ``tofu`` task: forget/retain/eval splits from the synthetic world or from real TOFU files."""

from __future__ import annotations

import random
from typing import Any

from unlearn.data import UnlearningData
from unlearn.tasks.refusals import REFUSALS
from unlearn.tasks.tofu_files import load_tofu_dir
from unlearn.tasks.tofu_world import WorldConfig, build_world

FORGET_RETAIN = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
DEFAULT_EVAL = ("forget", "retain_eval", "real_authors", "world_facts")
_world_cache: dict[Any, Any] = {}


def world_for(config: WorldConfig):
    key = tuple(sorted(vars(config).items()))
    if key not in _world_cache:
        _world_cache[key] = build_world(config)
    return _world_cache[key]


def add_idk(items: list[dict], seed: int) -> list[dict]:
    """Give each item an ``idk`` answer drawn from the refusal list (fixed per item and seed)."""
    rng = random.Random(f"idk-{seed}")
    return [{**it, "idk": rng.choice(REFUSALS)} for it in items]


def load_tofu(*, name: str = "tofu", world: WorldConfig | None = None, path: str | None = None,
              forget_split: str = "forget10", retain_split: str | None = "retain90",
              eval_splits=DEFAULT_EVAL, seed: int = 0) -> UnlearningData:
    """Build the :class:`UnlearningData` of a TOFU task.

    ``eval_splits`` names: ``forget`` (the forget split itself), ``retain_eval`` (TOFU's
    retain_perturbed), ``real_authors``, ``world_facts``, ``holdout``, or any split name.
    """
    if name == "tofu" and forget_split not in FORGET_RETAIN:
        raise ValueError(f"task.forget_split {forget_split!r} is unknown; allowed: {', '.join(FORGET_RETAIN)}")
    if retain_split is not None and forget_split in FORGET_RETAIN and retain_split != FORGET_RETAIN[forget_split]:
        raise ValueError(f"task.retain_split {retain_split!r} does not match task.forget_split {forget_split!r}; "
                         f"use {FORGET_RETAIN[forget_split]!r} (the complement) or null")
    if name == "tofu_files":
        if not path:
            raise ValueError("task.path is required for task 'tofu_files' (a directory of TOFU json/jsonl/parquet files)")
        data = load_tofu_dir(path, forget_split=forget_split, retain_split=retain_split, eval_splits=tuple(eval_splits))
        data.forget = add_idk(data.forget, seed)
        return data
    if name != "tofu":
        raise ValueError(f"task.name {name!r} is unknown; allowed: tofu, tofu_files")
    w = world_for(world or WorldConfig())
    forget = add_idk(w.split(forget_split), seed)
    retain = w.split(retain_split) if retain_split else None
    evals = {s: (forget if s == "forget" else w.split(s)) for s in eval_splits}
    return UnlearningData(forget=forget, retain=retain, eval_splits=evals, name=f"tofu/{forget_split}")
