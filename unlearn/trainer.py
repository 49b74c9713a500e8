"""The unlearning training loop, on ``accelerate`` (one process, or several: DDP).

Training runs on the accelerator's device (:func:`unlearn.distributed.use_cpu`: the GPU
accelerate gives this process when CUDA is available and the recipe does not say
``model.device: cpu``); the model and the objective's reference model move there for the
training and back to where they were afterwards, so evaluation sees them where it loaded them.

One micro-batch = one forget batch (+ one retain batch of the same size drawn at random, as
open-unlearning's forget/retain pairing does) -> ``objective.loss`` -> backward. An optimizer
step applies the mean gradient of ``grad_accum`` micro-batches; an epoch's last window may be
shorter and still steps at epoch end, as the HF Trainer does, so every epoch takes
``ceil(ceil(n / batch_size) / grad_accum)`` steps and a run that would take none is refused
before training. Clipping, optimizer and scheduler come from the recipe's ``train`` section.
A non-finite loss or gradient stops training at once with a message naming the step
(numbered from 1, as in the training history). A ``callback`` sees every optimizer step
and may end training early and cleanly by returning ``"stop"`` (the runner's evaluation
during training uses it for ``train.utility_floor``).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from unlearn.adapters import nonfinite_parameter
from unlearn.checkpoint import Checkpointing, TrainState, load_checkpoint, save_checkpoint
from unlearn.distributed import all_true, barrier, is_main, mean_over_processes, use_cpu, world


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
    mixed_precision: str = "no"  # "no" or "bf16" (autocast in training forward passes)
    device: str = "auto"  # "auto": the accelerator's device when CUDA is available; "cpu" (the recipe's model.device)
    report_to: tuple[str, ...] = ()  # accelerate trackers (tensorboard, wandb, ...)
    tracking_dir: str | None = None  # where trackers write (a run's <run>/trackers)
    tracker_config: dict[str, Any] | None = None  # hyperparameters shown by the trackers (flat scalars)
    run_name: str = "unlearn"


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
          callback: Callable[[int, dict], str | None] | None = None,
          checkpointing: Checkpointing | None = None) -> TrainLog:
    """Run the unlearning loop in place on ``adapter.model``; returns the training log.

    Args:
        adapter: the model adapter (already wrapped by the parameter selection).
        objective: a set-up :class:`~unlearn.objectives.base.Objective`.
        forget / retain: items; ``retain`` may be ``None`` when the objective needs none.
        settings: optimisation settings (from the recipe's ``train`` section).
        seed: seeds the data order and retain sampling.
        callback: called as ``callback(step, logs)`` after every optimizer step, with ``logs`` a
            copy of the step's history entry plus ``epoch_end`` (this step completes the last
            accumulation window of its epoch, or is the last step of training) and
            ``last`` (no further step follows). Returning ``"stop"`` ends training cleanly after
            this step (``TrainLog.stopped_early`` records the step); any other return value
            is ignored.
        checkpointing: write a checkpoint every ``checkpointing.every`` steps (optimizer,
            scheduler, data position, RNG states, history, the callback's state), and/or
            continue from ``checkpointing.resume_from``: the continued run takes the same
            steps, on the same batches, as an uninterrupted one (:mod:`unlearn.checkpoint`).
    Raises:
        TrainingDiverged: on a NaN/Inf loss or gradient.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration
    from transformers import get_scheduler

    if not forget:
        raise ValueError("the forget set is empty: nothing to unlearn")
    if objective.needs_retain() and not retain:
        raise ValueError(f"objective {objective.name!r} needs a retain set but none was given")
    per_epoch = math.ceil(len(forget) / settings.batch_size)  # micro-batches per epoch
    # the last accumulation window of an epoch may be short: it steps at epoch end (as the HF Trainer does)
    steps_per_epoch = math.ceil(per_epoch / settings.grad_accum)
    total_steps = steps_per_epoch * settings.epochs
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    if total_steps < 1:
        raise ValueError(f"this training would take 0 optimizer steps (train.epochs={settings.epochs}, "
                         f"train.max_steps={settings.max_steps}); set both to at least 1")
    rank, n_proc = world()
    if settings.batch_size < n_proc:
        raise ValueError(f"train.batch_size={settings.batch_size} is smaller than the {n_proc} processes: each "
                         "process takes its share of every batch (train.batch_size is the global batch)")
    # several processes: DDP; parameters outside the loss's graph (RMU's upper layers) are searched for
    unused = objective.uses_part_of_the_model()
    trackers = {}
    if settings.report_to:
        trackers = {"log_with": list(settings.report_to),
                    "project_config": ProjectConfiguration(project_dir=settings.tracking_dir,
                                                           logging_dir=settings.tracking_dir)}
    if settings.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"train.mixed_precision must be 'no' or 'bf16', got {settings.mixed_precision!r}")
    cpu = use_cpu(settings.device)
    _reset_accelerate_for(cpu, n_proc)
    acc = Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
                      **trackers)
    # bf16 autocast per call (accelerate's mixed_precision is fixed for the process; runs and attacks
    # train several times in one process)
    autocast = (lambda: torch.autocast(acc.device.type, dtype=torch.bfloat16)) \
        if settings.mixed_precision == "bf16" else contextlib.nullcontext
    if settings.report_to:
        acc.init_trackers(settings.run_name, config=settings.tracker_config or {})
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
    sched = get_scheduler(settings.scheduler, opt, num_warmup_steps=int(settings.warmup_ratio * total_steps),
                          num_training_steps=total_steps)
    home = adapter.device  # where the model was loaded; it goes back there after training
    model, opt, sched = acc.prepare(model, opt, sched)  # moves the model to acc.device
    adapter.model = model
    _move_reference(objective, acc.device)
    rng = random.Random(f"train-{seed}")
    needs_idk = objective.needs_idk()
    use_retain = retain is not None and objective.needs_retain()
    log = TrainLog(seed=seed)
    bar = tqdm(total=total_steps, desc=f"unlearn ({objective.name})", disable=not progress or rank != 0,
               mininterval=1)
    t0 = time.time()
    model.train()
    done = False
    start_epoch, skip, pending, seconds_before = 0, 0, None, 0.0
    if checkpointing is not None and checkpointing.resume_from is not None:
        ts, extra = load_checkpoint(checkpointing.resume_from, acc.unwrap_model(model), opt)
        sched.load_state_dict({**sched.state_dict(), **ts.scheduler})
        rng.setstate(ts.rng)
        log.steps, log.history, seconds_before = ts.step, ts.history, ts.seconds
        start_epoch, skip, pending = ts.epoch, ts.window, ts.batches
        if checkpointing.callback_state is not None:
            checkpointing.callback_state.load_state_dict(ts.extras.get("callback"), extra)
        bar.update(ts.step)
        done = ts.step >= total_steps
    for epoch in range(start_epoch, settings.epochs):
        if done:
            break
        batches = pending if pending is not None else _batches(len(forget), settings.batch_size, rng)
        pending = None
        windows = [batches[w: w + settings.grad_accum] for w in range(0, len(batches), settings.grad_accum)]
        for w_i, window in enumerate(windows):
            if w_i < skip:  # resumed: these windows were trained before the checkpoint
                continue
            step = log.steps + 1
            losses, window_logs = [], []
            for m_i, idx in enumerate(window):
                # one process: the whole batch; several: this process's share (the rng draws the
                # whole batch's retain items everywhere, so every process keeps the same stream)
                fb = _make_batch(adapter, forget, idx[rank::n_proc], needs_idk)
                rb = None
                if use_retain:
                    ridx = [rng.randrange(len(retain)) for _ in idx][rank::n_proc]
                    rb = adapter.collate([retain[i] for i in ridx], indices=ridx)
                # gradients of a window are summed locally and synchronised once, on its last micro-batch
                sync = contextlib.nullcontext() if m_i == len(window) - 1 else acc.no_sync(model)
                with sync, autocast():
                    loss, logs = objective.loss(adapter, fb, rb)
                    if not all_true(bool(torch.isfinite(loss))):  # every process stops, or none
                        raise TrainingDiverged(
                            f"non-finite loss ({loss.item()}) at step {step}, epoch {epoch} of {objective.name}"
                            f"{_nonfinite_weights(model)}; lower train.lr, add a retain term, or reduce epochs")
                    acc.backward(loss / len(window))  # (the mean over the window's micro-batches)
                losses.append(loss.item())
                window_logs.append(logs)
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            if bad:
                raise TrainingDiverged(
                    f"non-finite gradient in {bad[0]} (and {len(bad) - 1} more) at step {step}, epoch {epoch}; "
                    "lower train.lr (clipping cannot repair an infinite gradient)")
            if settings.max_grad_norm:
                acc.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            log.steps = step
            mean_logs = {k: sum(lg[k] for lg in window_logs) / len(window_logs) for k in window_logs[-1]}
            entry = {"step": step, "epoch": epoch, "loss": round(mean_over_processes(sum(losses) / len(losses)), 6),
                     "lr": sched.get_last_lr()[0], **{k: round(v, 6) for k, v in mean_logs.items()}}
            log.history.append(entry)
            if settings.report_to:
                acc.log({f"train/{k}": v for k, v in entry.items() if k not in ("step", "epoch")}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.3f}")
            last = step >= total_steps
            if callback is not None:
                info = {**entry, "epoch_end": w_i == len(windows) - 1 or last, "last": last}
                adapter.model = acc.unwrap_model(model)  # the callback evaluates (generates) with the bare model
                try:
                    verdict = callback(step, info)
                finally:
                    adapter.model = model
                point = callback.last_point(step) if hasattr(callback, "last_point") else None
                if settings.report_to and point:
                    acc.log({f"eval/{k}": v for k, v in point.items() if isinstance(v, (int, float))
                             and not isinstance(v, bool) and k not in ("step", "epoch")}, step=step)
                if verdict == "stop" and not last:
                    log.stopped_early = step
                    done = True
            if last:
                done = True
            if done:
                break
            if checkpointing is not None and step % checkpointing.every == 0:
                _checkpoint(checkpointing, acc.unwrap_model(model), opt, sched, rng, log,
                            (epoch, w_i + 1, batches) if w_i + 1 < len(windows) else (epoch + 1, 0, None),
                            seconds_before + time.time() - t0)
        skip = 0
        if done:
            break
    bar.close()
    if settings.report_to:
        acc.end_training()
    model.eval()
    adapter.model = acc.unwrap_model(model).to(home)
    _move_reference(objective, home)
    log.seconds = seconds_before + time.time() - t0
    return log


def _reset_accelerate_for(cpu: bool, n_proc: int) -> None:
    """accelerate keeps one device per process; one process may train several times (a run, then
    a relearning attack) with different ``device`` settings: forget the state made for the other
    device. Never with several processes (their group is set up once, by ``distributed.init``)."""
    from accelerate.state import AcceleratorState, PartialState

    dev = PartialState._shared_state.get("device")
    if n_proc == 1 and dev is not None and (dev.type == "cpu") != cpu:
        AcceleratorState._reset_state(reset_partial_state=True)


def _move_reference(objective, device) -> None:
    """The objective's frozen reference model (NPO, GradDiff-KL, UNDIAL, RMU hold one as
    ``objective.reference``) runs where the trained model runs; precomputed reference values
    are moved per batch by the objectives themselves."""
    ref = getattr(objective, "reference", None)
    if ref is not None and isinstance(getattr(ref, "model", None), torch.nn.Module):
        ref.model.to(device)


def _checkpoint(ck: Checkpointing, model, opt, sched, rng, log: TrainLog, position, seconds: float) -> None:
    """Write the state after ``log.steps`` (``position``: epoch, window, batches of the next window)."""
    cb_json, cb_tensors = ck.callback_state.state_dict() if ck.callback_state is not None else (None, {})
    epoch, window, batches = position
    ts = TrainState(step=log.steps, epoch=epoch, window=window, batches=batches, rng=rng.getstate(),
                    history=log.history, seconds=seconds, scheduler=sched.state_dict(), extras={"callback": cb_json})
    if is_main():  # several processes hold the same weights and optimizer state (DDP): one writes
        save_checkpoint(ck.root, ts, model, opt, recipe=ck.recipe, extra_tensors=cb_tensors)
    barrier()


def _nonfinite_weights(model) -> str:
    """``" (weights already non-finite: NAME)"`` for the first parameter holding NaN/Inf, else ``""``."""
    bad = nonfinite_parameter(model)
    return f" (weights already non-finite: {bad})" if bad else ""
