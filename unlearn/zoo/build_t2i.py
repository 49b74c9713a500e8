"""Build the tiny text-to-image family deterministically: ``judge`` and ``target``.

1. **judge** (:func:`~unlearn.evaluators.image_judge.train_judge`): the CNN that reads shape,
   colour and texture off an image, trained on the visual world's training renders and scored on
   its held-out renders.
2. **target**: the tiny pixel-space UNet + CLIP text encoder (:mod:`unlearn.zoo.image_models`)
   trained with the standard denoising objective ``E ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, c, t)‖²`` on
   every training render under all three caption phrasings (explicit, synonym, description), with
   the caption dropped (empty prompt) for ``uncond_prob`` of the items so that classifier-free
   guidance works. The saved weights are an exponential moving average (``ema``) of the
   trained ones, as in Stable Diffusion's training.

During training, every ``eval_every`` steps the EMA model samples one explicit prompt per
(shape, colour, texture) combination and the judge scores the samples; the log records the
per-attribute accuracy so a build shows when the model became recognisable.

Single-threaded, fixed seeds and a fixed data order make the build reproducible on the same
torch build. ``unlearn zoo build tiny-t2i`` runs :func:`build_t2i_zoo`: the two stages of the shipped
model (:data:`SHIPPED_STAGES`; about 5,200 CPU-seconds on one thread).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from unlearn.adapters.image import ImageAdapter, images_to_tensor
from unlearn.evaluators.image_judge import ImageJudge, JudgeConfig, judge_accuracy, train_judge
from unlearn.tasks.visual_world import ATTRIBUTES, VisualWorld, VisualWorldConfig, build_visual_world
from unlearn.zoo.image_models import TinyT2ISpec, build_caption_tokenizer, build_tiny_t2i


@dataclass
class T2IBuildSpec:
    """Everything that determines the tiny-t2i family (recorded in its manifest)."""

    world: VisualWorldConfig = field(default_factory=VisualWorldConfig)
    model: TinyT2ISpec = field(default_factory=lambda: TinyT2ISpec(block_out_channels=(32, 64)))
    seed: int = 0
    steps: int = 2500  # length of the warm-up + cosine schedule
    stop_at: int | None = None  # stop after this many steps (the schedule still spans `steps`)
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    min_lr_frac: float = 0.05  # cosine decay floor
    weight_decay: float = 0.0
    uncond_prob: float = 0.1  # caption dropout for classifier-free guidance
    ema: float = 0.995
    eval_every: int = 500
    eval_steps: int = 20  # DDIM steps of the progress samples
    eval_guidance: float = 3.0
    judge_epochs: int = 100
    final_eval: bool = True  # score every prompt-table row after training (recorded in the manifest)
    threads: int = 1  # torch threads (2 helps at batch 64 on an otherwise idle 2-core machine)
    stages: list = field(default_factory=list)  # earlier stages of a continued build (their specs and logs)
    family: str = "tiny-t2i"


def world_tokenizer(world: VisualWorld, max_length: int):
    """The word-level tokenizer over every caption and prompt of the world."""
    return build_caption_tokenizer([it["caption"] for it in world.items] + [p["prompt"] for p in world.prompts],
                                   max_length=max_length)


@torch.no_grad()
def generation_accuracy(adapter: ImageAdapter, judge, rows: list[dict], steps: int = 20, guidance: float = 3.0,
                        batch_size: int = 64) -> dict:
    """Sample each row's prompt with its seed and score the images with the judge.

    Returns ``{"shape": acc, "colour": acc, "texture": acc, "all": acc, "per_concept": {"colour:red":
    acc of the colour head on rows whose colour is red, ...}}``.
    """
    preds: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
    for s in range(0, len(rows), batch_size):
        chunk = rows[s: s + batch_size]
        imgs = adapter.sample([r["prompt"] for r in chunk], seed=[int(r["seed"]) for r in chunk], steps=steps,
                              guidance=guidance)
        p = judge.predict(imgs)
        for a in ATTRIBUTES:
            preds[a] += p[a]
    out: dict = {a: float(np.mean([p == r[a] for p, r in zip(preds[a], rows)])) for a in ATTRIBUTES}
    out["all"] = float(np.mean([all(preds[a][i] == r[a] for a in ATTRIBUTES) for i, r in enumerate(rows)]))
    out["per_concept"] = {f"{a}:{v}": float(np.mean([preds[a][i] == v for i, r in enumerate(rows) if r[a] == v]))
                          for a, vals in ATTRIBUTES.items() for v in vals if any(r[a] == v for r in rows)}
    return out


def _lr_at(step: int, spec: T2IBuildSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (spec.min_lr_frac + (1 - spec.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def build_t2i_family(out_dir: str | Path, spec: T2IBuildSpec | None = None, continue_from: str | Path | None = None,
                     vae=None, extra_manifest: dict | None = None) -> dict:
    """Train ``judge`` and ``target`` into ``out_dir``; returns (and writes) ``manifest.json``.

    ``vae``: a trained ``AutoencoderKL`` (frozen): the target is then a latent model (its UNet
    denoises the VAE's latents; saved as a diffusers pipeline directory). ``extra_manifest`` is
    merged into the manifest (e.g. the VAE's build record).

    ``continue_from``: a finished build directory; its judge is reused and its target's weights
    are trained for ``spec.steps`` more steps (a new warm-up + cosine stage; the EMA restarts from
    those weights). The manifest records every stage.
    """
    spec = spec or T2IBuildSpec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(spec.threads)
    t0 = time.time()
    world = build_visual_world(spec.world)
    train, holdout = world.split("train"), world.split("holdout")

    if continue_from is not None:
        prev = json.loads((Path(continue_from) / "manifest.json").read_text())
        judge = ImageJudge.load(Path(continue_from) / "judge")
        if Path(continue_from).resolve() != out_dir.resolve():
            judge.save(out_dir / "judge")
        spec.stages = prev["spec"].get("stages", []) + [{"spec": {k: v for k, v in prev["spec"].items() if k != "stages"},
                                                          "log": prev["log"], "build_seconds": prev["build_seconds"],
                                                          "fingerprint": prev["models"]["target"]["fingerprint"]}]
    else:
        judge, _ = train_judge(train, JudgeConfig(epochs=spec.judge_epochs, seed=spec.seed))
        judge.save(out_dir / "judge")
    judge_acc = judge_accuracy(judge, holdout)
    judge_seconds = time.time() - t0

    if continue_from is not None:
        adapter = ImageAdapter.load(str(Path(continue_from) / "target"))
        adapter.source = f"zoo:{spec.family}/target"
        tok = adapter.tokenizer
    else:
        tok = world_tokenizer(world, spec.model.max_length)
        unet, te, sched = build_tiny_t2i(spec.model, tok, spec.seed, vae=vae)
        adapter = ImageAdapter(unet, te, tok, sched, vae=vae, source=f"zoo:{spec.family}/target")
    ema_model = copy.deepcopy(adapter.model).eval()
    for p in ema_model.parameters():
        p.requires_grad_(False)
    ema = ImageAdapter(ema_model["unet"], ema_model["text_encoder"], tok, adapter.scheduler, **adapter.parts())
    opt = torch.optim.AdamW(adapter.model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    rng = random.Random(spec.seed + 1000 * len(spec.stages))
    order: list[int] = []
    rows = [r for r in world.prompt_table(kind="explicit")][::spec.world.prompts_per_combination]  # 1 per combo
    log: list[dict] = []
    # a latent model sees the same renders every epoch: encode them once (VAE mean, frozen VAE)
    latents = (torch.cat([adapter.encode_images(images_to_tensor([it["image"] for it in train[i: i + 128]]))
                          for i in range(0, len(train), 128)]) if adapter.is_latent else None)  # (N, C, h, w)
    adapter.model.train()
    run_loss, t_train = 0.0, time.time()
    n_steps = spec.stop_at or spec.steps
    for step in tqdm(range(n_steps), desc=f"{spec.family} target", mininterval=10):
        idx = []
        while len(idx) < spec.batch_size:
            if not order:
                order = list(range(len(train)))
                rng.shuffle(order)
            idx.append(order.pop())
        batch_items = [dict(train[i]) for i in idx]
        for it in batch_items:
            if rng.random() < spec.uncond_prob:
                it["caption"] = ""
        batch = adapter.collate(batch_items, indices=idx, seed=step + 1_000_000 * len(spec.stages))
        if latents is not None:
            batch["latents"] = latents[idx]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        loss = adapter.item_loss(batch)[0].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"tiny-t2i training: loss is {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(spec.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema_model.parameters(), adapter.model.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
        run_loss += float(loss.detach())
        if (step + 1) % spec.eval_every == 0 or (step + 1 == n_steps and spec.final_eval):
            acc = generation_accuracy(ema, judge, rows, steps=spec.eval_steps, guidance=spec.eval_guidance)
            rec = {"step": step + 1, "loss": run_loss / spec.eval_every, "seconds": round(time.time() - t_train, 1),
                   **{k: v for k, v in acc.items() if k != "per_concept"}}
            log.append(rec)
            tqdm.write(json.dumps(rec))
            run_loss = 0.0
            ema.save(out_dir / "target-partial")
    ema.source = f"zoo:{spec.family}/target"
    ema.save(out_dir / "target")
    import shutil

    shutil.rmtree(out_dir / "target-partial", ignore_errors=True)
    full = (generation_accuracy(ema, judge, world.prompt_table(), steps=spec.eval_steps, guidance=spec.eval_guidance)
            if spec.final_eval else None)
    manifest = {
        "family": spec.family, "spec": json.loads(json.dumps(asdict(spec), default=str)),
        "world_fingerprint": world.fingerprint(),
        "models": {"judge": {"holdout_accuracy": judge_acc, "seconds": round(judge_seconds, 1)},
                   "target": {"fingerprint": ema.fingerprint(), "generation_accuracy": full,
                              "unet_parameters": sum(p.numel() for p in ema.unet.parameters()),
                              "text_encoder_parameters": sum(p.numel() for p in ema.text_encoder.parameters())}},
        "log": log, "build_seconds": round(time.time() - t0 + sum(st["build_seconds"] for st in spec.stages), 1),
        "torch": torch.__version__,
        **(extra_manifest or {}),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# The shipped family was built in two stages: 1,500 steps of a 2,500-step schedule (stopped after
# its step-1,500 evaluation), then 3,000 more steps from those (EMA) weights with a new schedule.
SHIPPED_STAGES = ({"steps": 2500, "stop_at": 1500}, {"steps": 3000})


def build_t2i_zoo(out_dir: str | Path, stages=SHIPPED_STAGES, **common) -> dict:
    """Rebuild the shipped tiny-t2i family: every stage of ``stages`` (T2IBuildSpec fields, plus
    ``common`` ones) continues the previous one; stage k is written to ``out_dir/stage<k>``, the
    last to ``out_dir``."""
    out_dir = Path(out_dir)
    prev = None
    for k, fields in enumerate(stages):
        target = out_dir if k == len(stages) - 1 else out_dir / f"stage{k + 1}"
        man = build_t2i_family(target, T2IBuildSpec(**{**common, **fields}), continue_from=prev)
        prev = target
    return man


if __name__ == "__main__":  # python -m unlearn.zoo.build_t2i OUT [--steps N] [--continue-from DIR] [--batch-size B] ...
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=T2IBuildSpec.steps)
    ap.add_argument("--continue-from", default=None)
    ap.add_argument("--batch-size", type=int, default=T2IBuildSpec.batch_size)
    ap.add_argument("--lr", type=float, default=T2IBuildSpec.lr)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=T2IBuildSpec.eval_every)
    a = ap.parse_args()
    s = T2IBuildSpec(steps=a.steps, batch_size=a.batch_size, lr=a.lr, threads=a.threads, eval_every=a.eval_every)
    print(json.dumps(build_t2i_family(a.out, s, continue_from=a.continue_from)["models"], indent=1))
