"""Build the tiny text zoo deterministically: tokenizer -> base -> {retain90 -> retain95 -> retain99, target}.

1. **base**: pretrain on the world facts and the famous ("real") authors.
2. **target**: fine-tune base on all 200 authors (+ a replay of the pretraining facts).
3. **retain90**: fine-tune base on the 180 authors of retain90 *exactly as the target* (same
   epochs, learning rate, replay): the gold standard for forget10.
4. **retain95 / retain99**: a curriculum continues from retain90, each stage adding the next
   group of forget authors (forget10\\forget05, then forget05\\forget01) trained together with
   a replay of everything seen before (TOFU's forget splits are nested).

**tiny-moe** (:data:`MOE_SPEC`, ``unlearn zoo build tiny-moe``): the same world and stages with
a Mixtral-style mixture-of-experts model (:class:`~unlearn.zoo.models.TinyMoESpec`), the
tokenizer of the shipped ``tiny-llama`` family (so the two families share token ids), the
router load-balancing loss added to the NLL during training, and only ``target`` and
``retain90`` (the retain part stops after retain90).

Each saved model never saw the forget authors of its split, so it is the gold-standard
"retain model" for that split. (A first version also reached the target through the
curriculum; its late-added authors were learned less well -- forget10 ROUGE-L 0.88 -- and its
retain-set knowledge drifted, so the target is now trained like retain90.) Single-threaded,
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
from unlearn.probes.expert_attribution import moe_blocks
from unlearn.tasks.tofu_world import World, WorldConfig, build_world, corpus
from unlearn.zoo import zoo_path
from unlearn.zoo.models import TinyLlamaSpec, TinyMoESpec, build_tiny_llama, build_tiny_moe, train_tokenizer


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
    finetune: StageSpec = field(default_factory=lambda: StageSpec(epochs=14, lr=3e-3, replay_factor=0.0))
    add_stage: StageSpec = field(default_factory=lambda: StageSpec(epochs=10, lr=1e-3, replay_factor=6.0))
    pretrain_replay: float = 0.1  # fraction of pretraining facts mixed into each fine-tuning epoch
    tokenization: str = "split"
    family: str = "tiny-llama"


@dataclass
class MoEZooBuildSpec(ZooBuildSpec):
    """The tiny-moe family: ZooBuildSpec with the MoE model and only target + retain90."""

    model: TinyMoESpec = field(default_factory=TinyMoESpec)
    family: str = "tiny-moe"
    tokenizer_from: str = "tiny-llama/target"  # zoo model whose tokenizer is reused


def spec_for(family: str) -> ZooBuildSpec:
    """The build spec of a zoo family (``tiny-llama`` or ``tiny-moe``)."""
    specs = {"tiny-llama": ZooBuildSpec, "tiny-moe": MoEZooBuildSpec}
    if family not in specs:
        from unlearn.zoo import FAMILIES

        how = FAMILIES.get(family, {}).get("build")
        raise ValueError(f"no build spec for zoo family {family!r}; known: {', '.join(specs)}"
                         + (f"; {family} is built with `{how}`" if how else ""))
    return specs[family]()


def _moe_aux(model):
    """For an MoE model: ``(captured router logits list, hook handles, num_experts, top_k, coef)``
    with hooks on every router; None for a dense model."""
    try:
        blocks = moe_blocks(model)
    except ValueError:
        return None
    got: list = []
    handles = [b.gate.register_forward_hook(lambda _m, _i, out: got.append(out[0])) for b in blocks.values()]
    c = model.config
    return got, handles, c.num_local_experts, c.num_experts_per_tok, float(c.router_aux_loss_coef)


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
    moe = _moe_aux(model)  # MoE: add the router load-balancing loss (Switch/Mixtral)
    bar = tqdm(total=total, desc=desc, leave=False, mininterval=2)
    for ep in range(epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        tot = cnt = 0.0
        for s in range(0, len(order), batch_size):
            batch = adapter.collate([items[i] for i in order[s: s + batch_size]])
            if moe:
                moe[0].clear()
            nll, n = adapter.item_nll(batch)
            loss = nll.sum() / n.sum()
            if moe and moe[4] > 0:
                from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

                loss = loss + moe[4] * load_balancing_loss_func(tuple(moe[0]), moe[2], moe[3], batch["attention_mask"])
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
    for h in (moe[1] if moe else []):
        h.remove()
    model.eval()


def _mix(rng: random.Random, new: list[dict], old: list[dict], factor: float, pre: list[dict], pre_frac: float) -> list[dict]:
    k = min(len(old), int(len(new) * factor))
    mixed = list(new) + (rng.sample(old, k) if k else [])
    m = int(len(mixed) * pre_frac)
    return mixed + (rng.sample(pre, min(m, len(pre))) if m else [])


PARTS = ("base", "retain", "target")


def _load_base(out_dir: Path) -> TextAdapter:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = out_dir / "base"
    if not (base / "model.safetensors").exists():
        raise ValueError(f"zoo build: {base} is missing; build the 'base' part first")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return TextAdapter(model, tok, source="zoo-build")


def build_part(part: str, out_dir: str | Path, spec: ZooBuildSpec | None = None) -> dict:
    """Build one independent part of the family (so the parts can run in parallel):

    * ``base``: tokenizer + pretraining on world facts and famous authors -> ``out_dir/base``;
    * ``retain``: base -> retain90 -> retain95 -> retain99 (each adds the next forget group);
    * ``target``: base -> all 200 authors, trained exactly like retain90 on its own data.
    """
    spec = spec or ZooBuildSpec()
    out_dir = Path(out_dir)
    t0 = time.time()
    torch.manual_seed(spec.seed)
    world: World = build_world(spec.world)
    pre = world.pretrain_text
    log: list = []
    models: dict = {}
    if part == "base" and isinstance(spec, MoEZooBuildSpec):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(zoo_path(spec.tokenizer_from))
        ad = TextAdapter(build_tiny_moe(spec.model, tok, spec.seed), tok, source="zoo-build")
        _train(ad, pre, spec.pretrain.epochs, spec.pretrain.lr, spec.batch_size, spec.seed, "pretrain", log)
        ad.save(out_dir / "base")
        models["base"] = {"fingerprint": ad.fingerprint(refresh=True), "n_authors_seen": 0}
    elif part == "base":
        tok = train_tokenizer(corpus(world), spec.model.vocab_size)
        ad = TextAdapter(build_tiny_llama(spec.model, tok, spec.seed), tok, source="zoo-build")
        _train(ad, pre, spec.pretrain.epochs, spec.pretrain.lr, spec.batch_size, spec.seed, "pretrain", log)
        ad.save(out_dir / "base")
        models["base"] = {"fingerprint": ad.fingerprint(refresh=True), "n_authors_seen": 0}
    elif part == "target":
        ad = _load_base(out_dir)
        items = _mix(random.Random(f"zoo-{spec.seed}-target"), world.split("full"), [], 0, pre, spec.pretrain_replay)
        _train(ad, items, spec.finetune.epochs, spec.finetune.lr, spec.batch_size, spec.seed, "target", log)
        ad.save(out_dir / "target")
        models["target"] = {"fingerprint": ad.fingerprint(refresh=True), "n_authors_seen": spec.world.n_authors}
    elif part == "retain":
        ad = _load_base(out_dir)
        seen = world.split("retain90")
        items = _mix(random.Random(f"zoo-{spec.seed}-retain90"), seen, [], 0, pre, spec.pretrain_replay)
        _train(ad, items, spec.finetune.epochs, spec.finetune.lr, spec.batch_size, spec.seed, "retain90", log)
        ad.save(out_dir / "retain90")
        models["retain90"] = {"fingerprint": ad.fingerprint(refresh=True), "n_authors_seen": len({q["author_id"] for q in seen})}
        groups = {  # new authors added at each stage (TOFU's forget splits are nested)
            "retain95": set(world.forget_authors(10)) - set(world.forget_authors(5)),
            "retain99": set(world.forget_authors(5)) - set(world.forget_authors(1)),
        } if not isinstance(spec, MoEZooBuildSpec) else {}
        for name, authors in groups.items():
            new = [q for q in world.qa if q["author_id"] in authors]
            items = _mix(random.Random(f"zoo-{spec.seed}-{name}"), new, seen, spec.add_stage.replay_factor, pre,
                         spec.pretrain_replay)
            _train(ad, items, spec.add_stage.epochs, spec.add_stage.lr, spec.batch_size, spec.seed, name, log)
            seen = seen + new
            ad.save(out_dir / name)
            models[name] = {"fingerprint": ad.fingerprint(refresh=True), "n_authors_seen": len({q["author_id"] for q in seen})}
    else:
        raise ValueError(f"unknown zoo build part {part!r}; parts: {', '.join(PARTS)}")
    rec = {"part": part, "models": models, "log": log, "seconds": round(time.time() - t0, 1)}
    (out_dir / f"part-{part}.json").write_text(json.dumps(rec, indent=1))
    return rec


def write_manifest(out_dir: str | Path, spec: ZooBuildSpec | None = None) -> dict:
    """Merge the parts' records into ``manifest.json`` (and drop the intermediate base)."""
    import shutil

    spec = spec or ZooBuildSpec()
    out_dir = Path(out_dir)
    world = build_world(spec.world)
    manifest = merge_part_records(out_dir, PARTS, new_manifest(spec, world), "zoo build: part")
    manifest["models"].pop("base", None)
    shutil.rmtree(out_dir / "base", ignore_errors=True)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def new_manifest(spec, world: World) -> dict:
    """An empty manifest for a family built from ``spec`` (a dataclass with ``family``) on ``world``."""
    return {"family": spec.family, "spec": _jsonable(asdict(spec)), "world_fingerprint": world.fingerprint(),
            "torch": torch.__version__, "models": {}, "log": [], "build_seconds": 0.0, "parts": {}}


def merge_part_records(out_dir: Path, parts, manifest: dict, what: str) -> dict:
    """Fold each ``out_dir/part-<part>.json`` (models, log, seconds) into ``manifest`` and delete
    it; a missing part raises ``ValueError`` ("<what> '<part>' has not been built in ...")."""
    for part in parts:
        p = out_dir / f"part-{part}.json"
        if not p.exists():
            raise ValueError(f"{what} {part!r} has not been built in {out_dir}")
        rec = json.loads(p.read_text())
        manifest["models"].update(rec["models"])
        manifest["log"] += rec["log"]
        manifest["parts"][part] = rec["seconds"]
        manifest["build_seconds"] += rec["seconds"]
        p.unlink()
    return manifest


def build_family(out_dir: str | Path, spec: ZooBuildSpec | None = None) -> dict:
    """Train the whole tiny-llama family into ``out_dir/<name>`` (sequentially); returns the manifest."""
    for part in PARTS:
        build_part(part, out_dir, spec)
    return write_manifest(out_dir, spec)


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))
