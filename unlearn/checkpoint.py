"""Training checkpoints, for resuming a run after a crash (``train.checkpoint_every``, ``--resume``).

A checkpoint is a directory ``<run>/.resume/step-00000040/`` inside the unfinished run
directory (``.NAME.partial-*``), holding everything that decides the rest of training:

* ``model.safetensors`` -- the trainable parameters (after the parameter selection: LoRA
  weights, or the selected full tensors), by name;
* ``optimizer.safetensors`` + the ``optimizer`` entry of ``state.json`` -- the optimizer's
  per-parameter tensors (AdamW moments, step counts) and its param groups;
* ``state.json`` -- the step, where the data order stands (the epoch, the next accumulation
  window and that epoch's batches), the scheduler's state, the trainer's ``random.Random``
  state, the training history, and the state of the training-time evaluation (its curve and
  best point; its best weights in ``train_eval.safetensors``);
* ``torch_rng.safetensors`` -- torch's CPU generator state;
* ``recipe.json`` -- the resolved recipe, so that a resume with another recipe is refused;
* ``COMPLETE`` -- written last: a checkpoint without it is ignored (it was being written
  when the process died).

A new checkpoint is written to ``step-N.tmp``, completed, renamed, and only then are the
older ones deleted, so a crash at any point leaves the last complete checkpoint intact. The
finished run does not carry ``.resume`` (it is removed before the run is committed).
Nothing is unpickled: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unlearn.runs import CHECKPOINT_COMPLETE, RESUME_DIR, atomic_write_text, latest_checkpoint

__all__ = ["TrainState", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "drop_checkpoints",
           "checkpoint_recipe"]


@dataclass
class TrainState:
    """Where training stands after an optimizer step (what :func:`unlearn.trainer.train` resumes from)."""

    step: int
    epoch: int  # the epoch of the next window
    window: int  # the index of the next accumulation window in that epoch
    batches: list[list[int]] | None  # that epoch's batches (None: the epoch has not begun; draw them)
    rng: Any  # random.Random.getstate()
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    scheduler: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # JSON state of callbacks (train-eval)


def _named_trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(obj) -> tuple:
    return (obj[0], tuple(obj[1]), obj[2])


def save_checkpoint(root: str | Path, state: TrainState, model: torch.nn.Module, optimizer, *,
                    recipe: dict[str, Any] | None = None, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint for ``state.step`` under ``root/.resume`` and delete the
    older ones (only after this one is complete). Returns its directory."""
    base = Path(root) / RESUME_DIR
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"step-{state.step:08d}"
    tmp = base / f"step-{state.step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    params = _named_trainable(model)
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(tmp / "model.safetensors"))
    # optimizer: per-parameter tensors to safetensors, scalars and param groups to JSON
    opt_sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in opt_sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if _jsonable(v) or isinstance(v, tuple)}
              for g in opt_sd["param_groups"]]
    save_file({"state": torch.get_rng_state()}, str(tmp / "torch_rng.safetensors"))
    if extra_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, str(tmp / "train_eval.safetensors"))
    doc = {"step": state.step, "epoch": state.epoch, "window": state.window, "batches": state.batches,
           "rng": _rng_to_json(state.rng), "history": state.history, "seconds": state.seconds,
           "scheduler": {k: v for k, v in state.scheduler.items() if _jsonable(v)}, "extras": state.extras,
           "optimizer": {"param_groups": groups, "scalars": scalars, "param_names": list(params)}}
    atomic_write_text(tmp / "state.json", json.dumps(doc))
    if recipe is not None:
        atomic_write_text(tmp / "recipe.json", json.dumps(recipe, sort_keys=True, default=str))
    (tmp / CHECKPOINT_COMPLETE).write_text(f"step {state.step}\n")
    os.replace(tmp, final)
    for old in base.iterdir():
        if old != final and old.name.startswith("step-"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (trainable
    parameters) and ``optimizer``, restore torch's RNG, and return the training state and the
    callbacks' tensors.

    Raises:
        ValueError: the checkpoint is incomplete, or its parameters do not match the model's
            (another model, selection or method).
    """
    path = Path(path)
    if not (path / CHECKPOINT_COMPLETE).exists():
        raise ValueError(f"checkpoint {path} is incomplete (no {CHECKPOINT_COMPLETE} marker); it cannot be resumed")
    doc = json.loads((path / "state.json").read_text())
    params = _named_trainable(model)
    saved = load_file(str(path / "model.safetensors"))
    if set(saved) != set(params) or doc["optimizer"]["param_names"] != list(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(f"checkpoint {path} does not fit this model's trainable parameters (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); the run must be resumed with the recipe that started it")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise ValueError(f"checkpoint {path}: parameter {n} has shape {tuple(saved[n].shape)}, the model's is "
                                 f"{tuple(p.shape)}")
            p.copy_(saved[n].to(p.dtype))
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in doc["optimizer"]["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    current = optimizer.state_dict()
    groups = []
    for g_saved, g_now in zip(doc["optimizer"]["param_groups"], current["param_groups"]):
        g = dict(g_now)
        g.update({k: (tuple(v) if isinstance(g_now.get(k), tuple) else v) for k, v in g_saved.items()})
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(load_file(str(path / "torch_rng.safetensors"))["state"])
    extra = load_file(str(path / "train_eval.safetensors")) if (path / "train_eval.safetensors").exists() else {}
    ts = TrainState(step=doc["step"], epoch=doc["epoch"], window=doc["window"], batches=doc["batches"],
                    rng=_rng_from_json(doc["rng"]), history=doc["history"], seconds=doc["seconds"],
                    scheduler=doc["scheduler"], extras=doc["extras"])
    return ts, extra


def checkpoint_recipe(path: str | Path) -> dict[str, Any] | None:
    """The recipe a checkpoint was written with (None if it has none)."""
    f = Path(path) / "recipe.json"
    return json.loads(f.read_text()) if f.exists() else None


def drop_checkpoints(root: str | Path) -> None:
    """Remove ``root/.resume`` (a finished run does not carry training state)."""
    shutil.rmtree(Path(root) / RESUME_DIR, ignore_errors=True)


@dataclass
class Checkpointing:
    """What :func:`unlearn.trainer.train` needs to checkpoint and resume.

    Args:
        root: the unfinished run directory (checkpoints go to ``root/.resume``).
        every: write a checkpoint after every ``every`` optimizer steps (not after the last).
        resume_from: a checkpoint to continue from (``RunDir.resume_from``), or None.
        recipe: the resolved recipe (``to_dict``), stored with each checkpoint.
        callback_state: the training callback whose state travels with the checkpoint (the
            run's :class:`~unlearn.train_eval.TrainEval`): ``state_dict() -> (json, tensors)``
            and ``load_state_dict(json, tensors)``.
    """

    root: Path
    every: int
    resume_from: Path | None = None
    recipe: dict[str, Any] | None = None
    callback_state: Any = None
