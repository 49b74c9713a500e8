"""Evaluation during training, for every task: the ``callback`` the run loop gives
:func:`unlearn.trainer.train`.

At the chosen steps (``train.eval_every`` steps, ``train.eval_every_epoch``, and always the
last step) it asks the task for a curve point on small evaluation splits
(:meth:`unlearn.task.Task.train_eval_point`), keeps a copy of the best trainable weights by
``train.select_best`` (scored by :meth:`unlearn.task.Task.score`; higher is better) and asks
training to stop when the task's utility number falls below ``train.utility_floor`` x the
target's. The last state competes with the earlier ones. See ``docs/harness.md``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# Above this many bytes of trainable weights, the best training state is kept on disk.
BEST_STATE_IN_MEMORY_BYTES = 2 * 1024 ** 3


class TrainEval:
    """The training-time evaluation of one run (see the module docstring).

    Args:
        task: the run's :class:`~unlearn.task.Task` (already prepared, baseline taken).
        adapter: the model being trained (its trainable parameters are snapshotted).
        train_spec: the recipe's ``train`` section.
        baseline: the target's curve point (step 0), from ``task.train_eval_baseline``.
        spill_dir: where a large best state is written (a hidden file, removed afterwards).
    """

    def __init__(self, task, adapter, train_spec, *, baseline: dict[str, Any] | None, spill_dir: Path) -> None:
        self.task, self.adapter, self.tr, self.baseline = task, adapter, train_spec, baseline
        self.utility_key = task.utility_key()
        self.target_utility = None if baseline is None or self.utility_key is None else baseline.get(self.utility_key)
        self.params = [p for p in adapter.model.parameters() if p.requires_grad]
        self.spill_path = Path(spill_dir) / ".train_eval_best.safetensors"
        self.curve: list[dict[str, Any]] = []
        self.best_index: int | None = None
        self.best_state: list | None = None  # in memory; or None with the state in spill_path
        self.stop: dict[str, Any] | None = None
        self.seconds = 0.0

    # -- the callback ------------------------------------------------------------------------
    def __call__(self, step: int, info: dict[str, Any]) -> str | None:
        triggers = []
        if self.tr.eval_every is not None and step % self.tr.eval_every == 0:
            triggers.append("every")
        if self.tr.eval_every_epoch and info.get("epoch_end"):
            triggers.append("epoch")
        if info.get("last"):
            triggers.append("last")
        if not triggers:
            return None
        t0 = time.time()
        model = self.adapter.model
        was_training = model.training
        model.eval()
        try:
            numbers = self.task.train_eval_point(self.adapter, f"step {step}")
        finally:
            model.train(was_training)
        point = {"step": step, "epoch": info.get("epoch"), "trigger": triggers, "loss": info.get("loss"), **numbers}
        u = point.get(self.utility_key) if self.utility_key else None
        floor = self.tr.utility_floor
        point["utility_ratio"] = (u / self.target_utility) if (u is not None and self.target_utility) else None
        below = floor is not None and point["utility_ratio"] is not None and point["utility_ratio"] < floor
        point["below_floor"] = below
        self.seconds += time.time() - t0
        point["seconds"] = round(time.time() - t0, 2)
        self.curve.append(point)
        if self.tr.select_best != "last" and not below:
            score = self.task.score(point, self.tr.select_best)
            best = None if self.best_index is None else self.task.score(self.curve[self.best_index], self.tr.select_best)
            if score is not None and (best is None or score > best):
                self._snapshot(len(self.curve) - 1)
        if below and not info.get("last"):
            self.stop = {"step": step, "reason": f"{self.utility_key} {u:.4g} is {point['utility_ratio']:.3f} of the "
                                                 f"target's {self.target_utility:.4g}, below train.utility_floor {floor}"}
            return "stop"
        return None

    def last_point(self, step: int) -> dict[str, Any] | None:
        """The curve point taken at ``step`` (for the trackers), or None."""
        return self.curve[-1] if self.curve and self.curve[-1]["step"] == step else None

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON state, tensors) for a training checkpoint: the curve, the best point and its
        weights (when in memory; a spilled best state stays in the run directory's spill file)."""
        doc = {"curve": self.curve, "best_index": self.best_index, "stop": self.stop, "seconds": self.seconds,
               "spilled": self.best_index is not None and self.best_state is None}
        tensors = {f"best.{i}": t for i, t in enumerate(self.best_state)} if self.best_state is not None else {}
        return doc, tensors

    def load_state_dict(self, doc: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s state (a resumed run)."""
        if not doc:
            return
        self.curve, self.best_index, self.stop, self.seconds = doc["curve"], doc["best_index"], doc["stop"], doc["seconds"]
        if self.best_index is not None and not doc.get("spilled"):
            self.best_state = [tensors[f"best.{i}"].to(p.dtype) for i, p in enumerate(self.params)]
        elif self.best_index is not None and not self.spill_path.exists():
            raise ValueError(f"the checkpoint's best training state was spilled to {self.spill_path}, which is gone; "
                             "the run cannot be resumed -- start it again with output.overwrite=true")

    # -- best state --------------------------------------------------------------------------
    def _snapshot(self, index: int) -> None:
        state = [p.detach().clone() for p in self.params]
        self.best_index = index
        if sum(t.numel() * t.element_size() for t in state) > BEST_STATE_IN_MEMORY_BYTES:
            save_file({str(i): t.contiguous() for i, t in enumerate(state)}, str(self.spill_path))
            self.best_state = None
        else:
            self.best_state = state

    def restore_best(self) -> dict[str, Any]:
        """Load the selected state into the model (before LoRA merging); returns ``selected``."""
        final = self.curve[-1] if self.curve else None
        crit = self.tr.select_best
        if crit == "last" or self.best_index is None:
            why = ("train.select_best is 'last'" if crit == "last" else
                   f"no evaluated state had a {crit} value" + (" at or above the utility floor" if self.tr.utility_floor else "")
                   + "; kept the last state")
            sel = {"step": None if final is None else final["step"], "criterion": crit, "value": None, "reason": why}
            self._drop()
            return sel
        best = self.curve[self.best_index]
        value = self.task.score(best, crit)
        if best is not final:
            state = self.best_state
            if state is None:
                loaded = load_file(str(self.spill_path))
                state = [loaded[str(i)] for i in range(len(self.params))]
            with torch.no_grad():
                for p, v in zip(self.params, state):
                    p.copy_(v)
        n = sum(1 for pt in self.curve if self.task.score(pt, crit) is not None)
        why = (f"highest {crit} ({value:.4g}) of {n} evaluated states"
               + (f" at or above {self.tr.utility_floor} x the target's {self.utility_key}" if self.tr.utility_floor else "")
               + ("; the last state" if best is final else f"; restored over the last state (step {final['step']})"))
        self._drop()
        return {"step": best["step"], "epoch": best["epoch"], "criterion": crit, "value": value, "reason": why}

    def _drop(self) -> None:
        self.best_state = None
        self.spill_path.unlink(missing_ok=True)

    def record(self, selected: dict[str, Any]) -> dict[str, Any]:
        """``metrics["train_eval"]``: settings, the baseline, the curve, the selection."""
        return {"suite": self.task.curve_suite,
                "items_per_split": self.task.train_eval_items(),
                "eval_every": self.tr.eval_every, "eval_every_epoch": self.tr.eval_every_epoch,
                "select_best": self.tr.select_best, "utility_floor": self.tr.utility_floor,
                "utility_key": self.utility_key, "target_utility": self.target_utility,
                "target_model_utility": self.target_utility if self.utility_key == "model_utility" else None,
                "columns": [list(c) for c in self.task.curve],
                "baseline": self.baseline, "curve": self.curve,
                "selected": selected, "stopped_early": self.stop, "seconds": round(self.seconds, 2)}
