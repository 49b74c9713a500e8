"""Build the ``tiny-passages`` family: tiny Llama models trained on the passages world.

* ``target``: trained from scratch on :meth:`PassagesWorld.training_items` -- the passages,
  level-1/2 probe forms of every known entity, level-3 forms of the non-targets, the general
  facts;
* ``retain``: the same recipe (same initialisation, epochs, learning rate and data order
  rule) on the same items minus everything about the ``n_targets`` targets: the model that
  never learned them (MUSE's retain model; the reference of PrivLeak).

The tokenizer is trained first on every string of the world (holdout entities included) and
shared by both. Single-threaded, seeded and with a fixed data order, so the build is
reproducible on the same torch build. Build with::

    python -m unlearn.zoo.build_passages --part tokenizer
    python -m unlearn.zoo.build_passages --part target &   # the two parts are independent
    python -m unlearn.zoo.build_passages --part retain
    python -m unlearn.zoo.build_passages --part manifest

(``--out DIR``, default ``~/.cache/unlearn/zoo/tiny-passages``; ``--part all`` runs them in turn).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unlearn.adapters.text import TextAdapter
from unlearn.tasks.passages_world import PassagesWorldConfig, build_world
from unlearn.zoo import cache_dir
from unlearn.zoo.build import _train, merge_part_records, new_manifest
from unlearn.zoo.models import TinyLlamaSpec, build_tiny_llama, train_tokenizer

PARTS = ("tokenizer", "target", "retain")


@dataclass
class PassagesBuildSpec:
    """Everything that determines the tiny-passages family (recorded in its manifest)."""

    world: PassagesWorldConfig = field(default_factory=PassagesWorldConfig)
    model: TinyLlamaSpec = field(default_factory=TinyLlamaSpec)
    seed: int = 0
    batch_size: int = 32
    epochs: int = 40
    lr: float = 3e-3
    family: str = "tiny-passages"


def build_part(part: str, out_dir: str | Path, spec: PassagesBuildSpec | None = None) -> dict:
    """Build one part (``tokenizer``, ``target`` or ``retain``) into ``out_dir``."""
    from transformers import AutoTokenizer

    spec = spec or PassagesBuildSpec()
    out_dir = Path(out_dir)
    t0 = time.time()
    world = build_world(spec.world)
    models: dict = {}
    log: list = []
    if part == "tokenizer":
        tok = train_tokenizer(world.texts(), spec.model.vocab_size)
        tok.save_pretrained(out_dir / "tokenizer")
    elif part in ("target", "retain"):
        if not (out_dir / "tokenizer").exists():
            raise ValueError(f"zoo build: {out_dir / 'tokenizer'} is missing; build the 'tokenizer' part first")
        tok = AutoTokenizer.from_pretrained(out_dir / "tokenizer")
        exclude = {t["name"] for t in world.targets} if part == "retain" else set()
        items = world.training_items(exclude)
        ad = TextAdapter(build_tiny_llama(spec.model, tok, spec.seed), tok, source="zoo-build")
        _train(ad, items, spec.epochs, spec.lr, spec.batch_size, spec.seed, "passages", log)
        ad.save(out_dir / part)
        models[part] = {"fingerprint": ad.fingerprint(refresh=True), "n_items": len(items),
                        "targets_seen": part == "target"}
    else:
        raise ValueError(f"unknown part {part!r}; parts: {', '.join(PARTS)}, manifest, all")
    for entry in log:
        entry["stage"] = part
    rec = {"part": part, "models": models, "log": log, "seconds": round(time.time() - t0, 1)}
    (out_dir / f"part-{part}.json").write_text(json.dumps(rec, indent=1))
    return rec


def write_manifest(out_dir: str | Path, spec: PassagesBuildSpec | None = None) -> dict:
    spec = spec or PassagesBuildSpec()
    out_dir = Path(out_dir)
    manifest = merge_part_records(out_dir, PARTS, new_manifest(spec, build_world(spec.world)), "zoo build: part")
    import shutil

    shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)  # each model directory has its own copy
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unlearn.zoo.build_passages", description=__doc__.split("\n")[0])
    p.add_argument("--part", default="all", choices=[*PARTS, "manifest", "all"])
    p.add_argument("--out", default=str(cache_dir() / "zoo" / "tiny-passages"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = [*PARTS, "manifest"] if args.part == "all" else [args.part]
    for part in parts:
        rec = write_manifest(args.out) if part == "manifest" else build_part(part, args.out)
        print(json.dumps({"part": part, "seconds": rec.get("seconds", rec.get("build_seconds"))}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
