"""The unlearning training loop, on ``accelerate`` (single process here; multi-process later).

One step = one forget batch (+ one retain batch of the same size drawn at random, as
open-unlearning's forget/retain pairing does) -> ``objective.loss`` -> backward. Gradient
accumulation, clipping, optimizer and scheduler come from the recipe's ``train`` section.
A non-finite loss or gradient stops training at once with a message naming the step
(numbered from 1, as in the training history). A ``callback`` sees every optimizer step
and may end training early and cleanly by returning ``"stop"`` (the runner's evaluation
during training uses it for ``train.utility_floor``).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm


class TrainingDiverged(RuntimeError):
    """Raised when the loss or a gradient becomes NaN/Inf."""


@dataclass
class TrainSettings:
    epochs: int = 5
    max_steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 16
    grad_accum: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    scheduler: str = "constant"
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0


@dataclass
class TrainLog:
    steps: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0
    stopped_early: int | None = None  # the step after which a callback asked to stop

    def to_dict(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 2), "seed": self.seed,
                "stopped_early": self.stopped_early, "history": self.history}


def _batches(n: int, bs: int, rng: random.Random) -> list[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    return [order[s: s + bs] for s in range(0, n, bs)]


def _make_batch(adapter, items: list[dict], idx: list[int], needs_idk: bool) -> dict[str, Any]:
    batch = adapter.collate([items[i] for i in idx], indices=idx)
    if needs_idk:
        batch["idk"] = adapter.collate([items[i] for i in idx], answer_key="idk", indices=idx)
    return batch


def train(adapter, objective, forget: list[dict], retain: list[dict] | None, settings: TrainSettings, *,
          seed: int = 0, progress: bool = True,
          callback: Callable[[int, dict], str | None] | None = None) -> TrainLog:
    """Run the unlearning loop in place on ``adapter.model``; returns the training log.

    Args:
        adapter: the model adapter (already wrapped by the parameter selection).
        objective: a set-up :class:`~unlearn.objectives.base.Objective`.
        forget / retain: items; ``retain`` may be ``None`` when the objective needs none.
        settings: optimisation settings (from the recipe's ``train`` section).
        seed: seeds the data order and retain sampling.
        callback: called as ``callback(step, logs)`` after every optimizer step, with ``logs`` a
            copy of the step's history entry plus ``epoch_end`` (this step completes the last
            accumulation window begun in its epoch -- with ``grad_accum`` not dividing an epoch,
            that is the first step of the next epoch -- or is the last step of training) and
            ``last`` (no further step follows). Returning ``"stop"`` ends training cleanly after
            this step (``TrainLog.stopped_early`` records the step); any other return value
            is ignored.
    Raises:
        TrainingDiverged: on a NaN/Inf loss or gradient.
    """
    from accelerate import Accelerator
    from transformers import get_scheduler

    if not forget:
        raise ValueError("the forget set is empty: nothing to unlearn")
    if objective.needs_retain() and not retain:
        raise ValueError(f"objective {objective.name!r} needs a retain set but none was given")
    acc = Accelerator(cpu=True, gradient_accumulation_steps=settings.grad_accum)
    model = adapter.model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the parameter selection froze everything")
    if settings.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    elif settings.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        raise ValueError(f"train.optimizer must be 'adamw' or 'sgd', got {settings.optimizer!r}")
    per_epoch = math.ceil(len(forget) / settings.batch_size)
    total_micro = per_epoch * settings.epochs
    if settings.max_steps is not None:
        total_micro = min(total_micro, settings.max_steps * settings.grad_accum)
    # whole accumulation windows only: a trailing partial window would never be applied
    total_micro = max(settings.grad_accum, total_micro - total_micro % settings.grad_accum)
    total_steps = max(1, total_micro // settings.grad_accum)
    sched = get_scheduler(settings.scheduler, opt, num_warmup_steps=int(settings.warmup_ratio * total_steps),
                          num_training_steps=total_steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    adapter.model = model
    rng = random.Random(f"train-{seed}")
    needs_idk = objective.needs_idk()
    use_retain = retain is not None and objective.needs_retain()
    log = TrainLog(seed=seed)
    bar = tqdm(total=total_steps, desc=f"unlearn ({objective.name})", disable=not progress, mininterval=1)
    t0 = time.time()
    model.train()
    micro = 0
    done = False
    epoch_pending = False  # an epoch ended inside an accumulation window not applied yet
    for epoch in range(settings.epochs):
        batches = _batches(len(forget), settings.batch_size, rng)
        for b_i, idx in enumerate(batches):
            fb = _make_batch(adapter, forget, idx, needs_idk)
            rb = None
            if use_retain:
                ridx = [rng.randrange(len(retain)) for _ in idx]
                rb = adapter.collate([retain[i] for i in ridx], indices=ridx)
            with acc.accumulate(model):
                loss, logs = objective.loss(adapter, fb, rb)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"non-finite loss ({loss.item()}) at step {log.steps + 1}, epoch {epoch} of {objective.name}; "
                        "lower train.lr, add a retain term, or reduce epochs"
                    )
                acc.backward(loss)
                if acc.sync_gradients:
                    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
                    if bad:
                        raise TrainingDiverged(
                            f"non-finite gradient in {bad[0]} (and {len(bad) - 1} more) at step {log.steps + 1}, epoch {epoch}; "
                            "lower train.lr (clipping cannot repair an infinite gradient)"
                        )
                    if settings.max_grad_norm:
                        acc.clip_grad_norm_(params, settings.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            micro += 1
            last_batch = b_i == len(batches) - 1
            if acc.sync_gradients:
                log.steps += 1
                entry = {"step": log.steps, "epoch": epoch, "loss": round(loss.item(), 6),
                         "lr": sched.get_last_lr()[0], **{k: round(v, 6) for k, v in logs.items()}}
                log.history.append(entry)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if callback is not None:
                    last = micro >= total_micro
                    info = {**entry, "epoch_end": last_batch or epoch_pending or last, "last": last}
                    epoch_pending = False
                    if callback(log.steps, info) == "stop" and not last:
                        log.stopped_early = log.steps
                        done = True
                        break
            elif last_batch:
                epoch_pending = True
            if micro >= total_micro:
                done = True
                break
        if done:
            break
    bar.close()
    model.eval()
    adapter.model = acc.unwrap_model(model)
    log.seconds = time.time() - t0
    return log
