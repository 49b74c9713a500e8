"""Helpers for tests on the shipped pixel zoo ``tiny-t2i`` (imported as ``from _zoo_t2i import ...``;
pytest puts tests/ on the path)."""

from __future__ import annotations

import torch


def visual_data(world=None):
    """The visual task (``load_visual(world)``) with the zoo's judge attached as ``.judge``; one thread."""
    from unlearn.evaluators.image_judge import ImageJudge
    from unlearn.tasks.visual_task import load_visual
    from unlearn.zoo import zoo_path

    torch.set_num_threads(1)
    d = load_visual(world) if world is not None else load_visual()
    d.judge = ImageJudge.load(zoo_path("tiny-t2i/judge"))
    return d


def zoo_target():
    """A fresh copy of ``zoo:tiny-t2i/target``."""
    from unlearn.adapters.image import ImageAdapter

    return ImageAdapter.load("zoo:tiny-t2i/target")


def concept_rate(data, model, rows, steps: int = 10) -> float:
    """Share of ``rows`` whose generation (the row's prompt and seed, ``steps`` DDIM steps) the judge reads
    as the row's erase concept: 1 - RECE's ``concept_erasure``."""
    from unlearn.editors.rece import concept_erasure

    imgs = model.sample([r["prompt"] for r in rows], seed=[int(r["seed"]) for r in rows], steps=steps)
    return 1.0 - concept_erasure(data.judge, imgs, rows)
