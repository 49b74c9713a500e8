"""Build the tiny text zoo deterministically: tokenizer -> base -> retain90 -> retain95 -> retain99 -> target.

One curriculum passes through every model of the TOFU-style world (see DESIGN.md):

1. **base**: pretrain on the world facts and the famous ("real") authors.
2. **retain90**: fine-tune on the 180 authors of retain90 (+ replay of the pretraining facts).
3. **retain95 / retain99 / target**: each stage adds the next group of forget authors
   (forget10\\forget05, forget05\\forget01, forget01) and trains on them together with a
   replay of everything seen before.

Each saved model never saw the forget authors of its split, so it is the gold-standard
"retain model" for that split; ``target`` has seen all 200 authors. Single-threaded,
fixed seeds and a fixed data order make the build reproducible on the same torch build.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unlearn.adapters.text import TextAdapter
from unlearn.tasks.tofu_world import World, WorldConfig, build_world, corpus
from unlearn.zoo.models import TinyLlamaSpec, build_tiny_llama, train_tokenizer


@dataclass
class StageSpec:
    epochs: int
    lr: float
    replay_factor: float  # replayed old items per new item


@dataclass
class ZooBuildSpec:
    """Everything that determines the tiny-llama family (recorded in its manifest)."""

    world: WorldConfig = field(default_factory=WorldConfig)
    model: TinyLlamaSpec = field(default_factory=TinyLlamaSpec)
    seed: int = 0
    batch_size: int = 32
    pretrain: StageSpec = field(default_factory=lambda: StageSpec(epochs=30, lr=3e-3, replay_factor=0.0))
    retain90: StageSpec = field(default_factory=lambda: StageSpec(epochs=14, lr=3e-3, replay_factor=0.0))
    add_stage: StageSpec = field(default_factory=lambda: StageSpec(epochs=14, lr=2e-3, replay_factor=3.0))
    pretrain_replay: float = 0.1  # fraction of pretraining facts mixed into each fine-tuning epoch
    tokenization: str = "split"


def _train(adapter: TextAdapter, items: list[dict], epochs: int, lr: float, batch_size: int,
           seed: int, desc: str, log: list, verbose: bool = True) -> None:
    """Answer-only next-token training with AdamW, warmup + cosine decay."""
    model = adapter.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(items) / batch_size)
    total = steps_per_epoch * epochs
    warm = min(50, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    rng = random.Random(f"{seed}-{desc}")
    bar = tqdm(total=total, desc=desc, leave=False, mininterval=2)
    for ep in range(epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        tot = cnt = 0.0
        for s in range(0, len(order), batch_size):
            batch = adapter.collate([items[i] for i in order[s: s + batch_size]])
            nll, n = adapter.item_nll(batch)
            loss = nll.sum() / n.sum()
            if not torch.isfinite(loss):
                raise RuntimeError(f"zoo build: non-finite loss in stage {desc}, epoch {ep}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tot += loss.item()
            cnt += 1
            bar.update(1)
        log.append({"stage": desc, "epoch": ep, "loss": round(tot / cnt, 5)})
        if verbose:
            print(f"[zoo] {desc} epoch {ep + 1}/{epochs} loss {tot / cnt:.4f}", flush=True)
        bar.set_postfix(loss=f"{tot / cnt:.3f}")
    bar.close()
    model.eval()


def _mix(rng: random.Random, new: list[dict], old: list[dict], factor: float, pre: list[dict], pre_frac: float) -> list[dict]:
    k = min(len(old), int(len(new) * factor))
    mixed = list(new) + (rng.sample(old, k) if k else [])
    m = int(len(mixed) * pre_frac)
    return mixed + (rng.sample(pre, min(m, len(pre))) if m else [])


def build_family(out_dir: str | Path, spec: ZooBuildSpec | None = None, *, stages=("retain90", "retain95", "retain99", "target"),
                 save_base: bool = False) -> dict:
    """Train the tiny-llama family into ``out_dir/<name>``; returns the manifest."""
    spec = spec or ZooBuildSpec()
    torch.manual_seed(spec.seed)
    out_dir = Path(out_dir)
    t0 = time.time()
    world: World = build_world(spec.world)
    tok = train_tokenizer(corpus(world), spec.model.vocab_size)
    model = build_tiny_llama(spec.model, tok, spec.seed)
    ad = TextAdapter(model, tok, tokenization=spec.tokenization, source="zoo-build")
    log: list = []
    rng = random.Random(f"zoo-{spec.seed}")
    pre = world.pretrain_text
    _train(ad, pre, spec.pretrain.epochs, spec.pretrain.lr, spec.batch_size, spec.seed, "pretrain", log)
    if save_base:
        ad.save(out_dir / "base")
    manifest = {"family": "tiny-llama", "spec": _jsonable(asdict(spec)), "world_fingerprint": world.fingerprint(),
                "models": {}, "log": log}
    retain90 = world.split("retain90")
    items = _mix(rng, retain90, [], 0, pre, spec.pretrain_replay)
    _train(ad, items, spec.retain90.epochs, spec.retain90.lr, spec.batch_size, spec.seed, "retain90", log)
    seen = list(retain90)
    groups = {  # new authors added at each stage (TOFU's forget splits are nested)
        "retain95": set(world.forget_authors(10)) - set(world.forget_authors(5)),
        "retain99": set(world.forget_authors(5)) - set(world.forget_authors(1)),
        "target": set(world.forget_authors(1)),
    }
    for name in ("retain90", "retain95", "retain99", "target"):
        if name != "retain90":
            new = [q for q in world.qa if q["author_id"] in groups[name]]
            items = _mix(rng, new, seen, spec.add_stage.replay_factor, pre, spec.pretrain_replay)
            _train(ad, items, spec.add_stage.epochs, spec.add_stage.lr, spec.batch_size, spec.seed, name, log)
            seen += new
        if name in stages:
            ad.save(out_dir / name)
            manifest["models"][name] = {"fingerprint": ad.fingerprint(refresh=True),
                                       "n_authors_seen": len({q["author_id"] for q in seen})}
    manifest["build_seconds"] = round(time.time() - t0, 1)
    manifest["torch"] = torch.__version__
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))
