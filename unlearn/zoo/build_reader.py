"""Build the ``tiny-reader`` family: tiny-llama models that can also answer from a context.

The tiny-llama zoo was trained on bare question/answer pairs. It cannot use facts placed in its
prompt, so the ``in_context`` attack (Shumailov et al., 2024, "UnUnlearning", arXiv:2407.00106)
measures nothing on it: a context even wrecks the target's answers. ``tiny-reader`` continues
each tiny-llama model with a **reading stage**:

* half of each batch (``read_frac``) are reading items about *fresh* random authors who are not
  in the world (:func:`~unlearn.tasks.tofu_world.practice_author`), in exactly the attack's
  format (:func:`~unlearn.evaluators.attacks.context_prompt`)::

      Question: Context: <fact> <fact> <fact>\\n<question about one of them>\\nAnswer: <that fact>

  with 1..4 facts of that author in a random order. Every item is new, so the facts cannot be
  memorised: the only way to lower the loss is to find the asked fact in the context and copy it;
* the other half replay the model's own training data (its QA split + the pretraining facts),
  so it keeps what it knew.

``target`` continues ``tiny-llama/target`` (replaying all 200 authors) and ``retain90`` continues
``tiny-llama/retain90`` (replaying only its 180 authors), with the same schedule and the same
reading items, so retain90 stays the gold-standard model for forget10. The stage is
``steps`` AdamW steps (warmup, cosine decay to 0.1x), single-threaded and seeded.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unlearn.adapters.text import TextAdapter
from unlearn.tasks.tofu_world import World, WorldConfig, build_world, practice_author
from unlearn.zoo import zoo_path
from unlearn.zoo.build import _train, merge_part_records, new_manifest


@dataclass
class ReaderBuildSpec:
    """Everything that determines the tiny-reader family (recorded in its manifest)."""

    world: WorldConfig = field(default_factory=WorldConfig)
    base_family: str = "tiny-llama"
    models: dict = field(default_factory=lambda: {"target": "full", "retain90": "retain90"})  # name -> replay split
    steps: int = 2000
    lr: float = 2e-3
    batch_size: int = 32
    read_frac: float = 0.5  # share of reading items in the stage
    context_facts: tuple = (1, 4)  # facts per context, inclusive range
    seed: int = 0
    eval_items: int = 200  # items per column of the manifest's reading check
    family: str = "tiny-reader"


def reading_item(world: World, rng: random.Random, context_facts: tuple = (1, 4)) -> dict:
    """One reading item: a fresh author's facts as context, a question about one of them.

    Returns ``{"question": "Context: <facts>\\n<question>", "answer": <the asked fact>,
    "value": <its value>, "context": [facts], "plain_question": <question>}``."""
    # lazy: the attack registry pulls transformers and every editor/objective into this module's import
    from unlearn.evaluators.attacks import context_prompt

    lo, hi = context_facts
    if not 1 <= lo <= hi <= 20:
        raise ValueError(f"context_facts must be 1 <= lo <= hi <= 20, got {context_facts}")
    facts = rng.sample(practice_author(world, rng), rng.randint(lo, hi))  # already in random order
    asked = rng.choice(facts)
    ctx = [f["answer"] for f in facts]
    return dict(question=context_prompt(ctx, asked["question"]), answer=asked["answer"], value=asked["value"],
                context=ctx, plain_question=asked["question"])


def stage_items(world: World, spec: ReaderBuildSpec, replay_split: str) -> list[dict]:
    """The reading stage's training items (one pass, in ``_train``'s shuffled order):
    ``steps * batch_size * read_frac`` reading items + replayed items drawn with replacement."""
    n = spec.steps * spec.batch_size
    n_read = int(round(n * spec.read_frac))
    rng = random.Random(f"reader-{spec.seed}-reading")  # the same reading items for every model
    reading = [reading_item(world, rng, tuple(spec.context_facts)) for _ in range(n_read)]
    own = world.split(replay_split) + world.pretrain_text
    rrng = random.Random(f"reader-{spec.seed}-replay-{replay_split}")
    return reading + [rrng.choice(own) for _ in range(n - n_read)]


@torch.no_grad()
def value_accuracy(adapter: TextAdapter, questions: list[str], values: list[str], *, batch_size: int = 50,
                   max_new_tokens: int = 24) -> float:
    """Share of greedy generations that contain the expected value (a quick reading check)."""
    if len(questions) != len(values) or not questions:
        raise ValueError("value_accuracy needs as many values as questions, and at least one")
    gens = adapter.generate(questions, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sum(v in g for v, g in zip(values, gens)) / len(values)


def reading_report(adapter: TextAdapter, world: World, n: int = 200, seed: int = 1) -> dict:
    """Value accuracy of a model on ``n`` held-out reading items (fresh authors no build saw: a
    different seed), and on every 4th forget10 question (``n`` at most), bare and under the
    ``in_context`` attack (own fact + 2 other facts of its author, attack seed 0)."""
    # lazy: the attack registry pulls transformers and every editor/objective into this module's import
    from unlearn.evaluators.attacks import InContext

    rng = random.Random(f"reader-eval-{seed}")
    read = [reading_item(world, rng) for _ in range(n)]
    _, bare, attacked, _ = InContext(seed=0).rewrite(world.split("forget10"))  # every item has other facts
    bare, attacked = bare[::4][:n], attacked[::4][:n]
    vals = [it["value"] for it in bare]
    return {
        "reading_fresh": value_accuracy(adapter, [x["question"] for x in read], [x["value"] for x in read]),
        "forget10_bare": value_accuracy(adapter, [x["question"] for x in bare], vals),
        "forget10_in_context": value_accuracy(adapter, [x["question"] for x in attacked], vals),
        "items": n,
    }


def build_reader_model(name: str, out_dir: str | Path, spec: ReaderBuildSpec | None = None) -> dict:
    """Continue ``<base_family>/<name>`` with the reading stage and save it to ``out_dir/<name>``;
    writes ``out_dir/part-<name>.json`` (models can be built in parallel, then merged by
    :func:`write_reader_manifest`)."""
    spec = spec or ReaderBuildSpec()
    if name not in spec.models:
        raise ValueError(f"unknown tiny-reader model {name!r}; known: {', '.join(spec.models)}")
    out_dir = Path(out_dir)
    t0 = time.time()
    torch.manual_seed(spec.seed)
    world = build_world(spec.world)
    ad = TextAdapter.load(str(zoo_path(f"{spec.base_family}/{name}")))
    ad.source = "zoo-build"
    for p in ad.model.parameters():
        p.requires_grad_(True)
    items = stage_items(world, spec, spec.models[name])
    log: list = []
    _train(ad, items, 1, spec.lr, spec.batch_size, spec.seed, f"reading-{name}", log)
    ad.save(out_dir / name)
    rec = {"models": {name: {"fingerprint": ad.fingerprint(refresh=True), "continued_from": f"{spec.base_family}/{name}",
                             "replay_split": spec.models[name], "eval": reading_report(ad, world, n=spec.eval_items)}},
           "log": log, "seconds": round(time.time() - t0, 1)}
    (out_dir / f"part-{name}.json").write_text(json.dumps(rec, indent=1))
    return rec


def write_reader_manifest(out_dir: str | Path, spec: ReaderBuildSpec | None = None) -> dict:
    """Merge the per-model records into ``out_dir/manifest.json``."""
    spec = spec or ReaderBuildSpec()
    out_dir = Path(out_dir)
    manifest = merge_part_records(out_dir, spec.models, new_manifest(spec, build_world(spec.world)),
                                  "tiny-reader build: model")
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out_dir / "manifest.json")
    return manifest


def build_reader_zoo(out_dir: str | Path, spec: ReaderBuildSpec | None = None) -> dict:
    """Build every tiny-reader model (sequentially) and write the manifest."""
    spec = spec or ReaderBuildSpec()
    for name in spec.models:
        build_reader_model(name, out_dir, spec)
    return write_reader_manifest(out_dir, spec)
