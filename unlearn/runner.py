"""The one run loop, for every task and modality.

``unlearn run RECIPE --set k=v`` and :func:`unlearn.run` both land in :func:`run`, which reads
like a pipeline's ``__call__``: numbered steps, each a call into the recipe's
:class:`~unlearn.task.Task` (data, models, evaluation, attacks, report sections) or into the
method (:func:`apply_method`: an objective trained through the trainer, or an editor). Nothing
here knows a benchmark or a modality. See ``docs/architecture.md`` and ``docs/harness.md``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import yaml

from unlearn import distributed
from unlearn.adapters import nonfinite_parameter
from unlearn.checkpoint import Checkpointing, checkpoint_recipe, drop_checkpoints
from unlearn.config import RecipeError, to_dict
from unlearn.editors import EditContext, Editor
from unlearn.evaluators.attacks import ATTACKS, make_attack
from unlearn.probes import make_probe, probe_after, probe_before
from unlearn.recipe import TRACKERS, Recipe, load_recipe, resolve_method
from unlearn.report import write_report
from unlearn.runs import OutputError, RunDir, atomic_write_json, atomic_write_text, provenance
from unlearn.selection import apply_selection, finalize_selection
from unlearn.train_eval import TrainEval
from unlearn.trainer import TrainingDiverged, TrainLog, TrainSettings, train


@dataclass
class RunResult:
    """What a run returns: where it wrote, the headline numbers, and every metric."""

    run_dir: Path
    summary: dict[str, Any]
    metrics: dict[str, Any] = field(repr=False)
    recipe: Any = field(repr=False, default=None)
    adapter: Any = field(repr=False, default=None)
    task: Any = field(repr=False, default=None)

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def headline_lines(self) -> list[str]:
        """The CLI's summary: one line per evaluated model, as the task formats it."""
        return [self.task.headline_text(n, self.summary[n]) for n in ("target", "unlearned", "retain")
                if n in self.summary]


@dataclass
class Applied:
    """What :func:`apply_method` returns."""

    adapter: Any  # the model to evaluate (the trained target, or what an editor returned)
    log: TrainLog
    changed: list[str]  # names of parameter tensors the method changed
    selection: Any = None  # SelectionInfo of an objective
    editor_info: dict[str, Any] | None = None
    train_eval: TrainEval | None = None
    selected: dict[str, Any] | None = None
    seconds: float = 0.0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_settings(tr, recipe=None, tracking_dir: Path | None = None) -> TrainSettings:
    """The trainer's settings from the recipe's ``train`` section (``recipe`` and
    ``tracking_dir``: what the trackers of ``train.report_to`` record, and where)."""
    trackers = {}
    if recipe is not None and tr.report_to:
        trackers = dict(report_to=tuple(tr.report_to), tracking_dir=str(tracking_dir), run_name=recipe.name,
                        tracker_config=_flat(to_dict(recipe)))
    return TrainSettings(epochs=tr.epochs, max_steps=tr.max_steps, lr=tr.lr, batch_size=tr.batch_size,
                         grad_accum=tr.grad_accum, optimizer=tr.optimizer, weight_decay=tr.weight_decay,
                         scheduler=tr.scheduler, warmup_ratio=tr.warmup_ratio, max_grad_norm=tr.max_grad_norm,
                         mixed_precision=tr.mixed_precision,
                         device=recipe.model.device if recipe is not None else "auto", **trackers)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as flat ``section.key`` scalars (lists and nulls as text), as trackers want them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def check_trackers(names) -> None:
    """Each tracker of ``train.report_to`` needs its package; say which is missing before anything runs."""
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise ValueError(f"train.report_to names {', '.join(missing)}, whose package is not installed: "
                         f"pip install {' '.join(TRACKERS[n] for n in missing)}")


def apply_method(method, adapter, data, recipe, *, task=None, spill_dir: Path | None = None,
                 progress: bool = True, checkpointing: Checkpointing | None = None) -> Applied:
    """Apply an objective (through the parameter selection and the trainer, with the task's
    evaluation during training when ``train.eval_every``/``eval_every_epoch`` is set) or an
    editor (which returns the model to evaluate) to ``adapter``."""
    settings = train_settings(recipe.train, recipe, Path(spill_dir) / "trackers" if spill_dir is not None else None)
    t0 = time.time()
    if isinstance(method, Editor):
        before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
        edit = method.apply(adapter, data, EditContext(settings=settings, seed=recipe.seed, progress=progress,
                                                       eval_batch_size=recipe.eval.batch_size))
        changed = [n for n, p in adapter.model.named_parameters() if not (p == before[n]).all()]
        return Applied(adapter=edit.adapter, log=edit.log if edit.log is not None else TrainLog(seed=recipe.seed),
                       changed=changed, editor_info=edit.info, seconds=time.time() - t0)
    baseline = None
    if recipe.train.evaluates_during_training:  # the target's point, before setup may hook the model
        baseline = {"step": 0, "epoch": None, "trigger": ["target"], **task.train_eval_baseline(adapter)}
        key = task.utility_key()
        baseline["utility_ratio"] = 1.0 if key and baseline.get(key) else None
    reference = adapter.reference() if method.needs_reference() else None
    method.setup(adapter, reference, data.forget)
    if recipe.train.gradient_checkpointing:  # after the reference copy: that one only runs forward
        adapter.enable_gradient_checkpointing()
    sel = recipe.method.selection
    sel_info = apply_selection(adapter, sel.name, dict(sel.params), objective=method, forget=data.forget)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if p.requires_grad}
    train_eval = None
    if baseline is not None:
        train_eval = TrainEval(task, adapter, recipe.train, baseline=baseline, spill_dir=spill_dir)
    if checkpointing is not None:
        checkpointing.callback_state = train_eval
    log = train(adapter, method, data.forget, data.retain, settings, seed=recipe.seed, progress=progress,
                callback=train_eval, checkpointing=checkpointing)
    selected = train_eval.restore_best() if train_eval is not None else None
    changed = [n for n, p in adapter.model.named_parameters() if n in before and not (p == before[n]).all()]
    finalize_selection(adapter)
    return Applied(adapter=adapter, log=log, changed=changed, selection=sel_info, train_eval=train_eval,
                   selected=selected, seconds=time.time() - t0)


def _check_outputs_finite(adapter, data, recipe) -> None:
    """One forward pass on two forget items: finite weights can still be so large that the
    model's outputs overflow (a far too large learning rate); say so, not a NaN deep in a metric."""
    with torch.no_grad():
        nll, _ = adapter.item_nll(adapter.collate(data.forget[:2]))
    if not torch.isfinite(nll).all():
        biggest = max((float(p.detach().abs().max()) for p in adapter.model.parameters() if p.numel()), default=0.0)
        raise TrainingDiverged(f"after {recipe.method.name!r} the model's loss on the forget set is not finite "
                               f"(largest weight magnitude {biggest:.3g}); lower train.lr")


def _check_attacks(recipe, modality: str) -> bool:
    """Build every attack of ``eval.attacks`` once (its settings checked) before anything runs;
    True if one of them needs the model before unlearning."""
    needs_original = False
    for name in recipe.eval.attacks:
        try:
            make_attack(name, dict(recipe.eval.attack_params.get(name) or {}), seed=recipe.seed, modality=modality)
        except (ValueError, TypeError) as e:
            raise RecipeError(f"recipe key 'eval.attack_params.{name}' is invalid: {e}") from None
        needs_original |= bool(ATTACKS.get(name).needs_original)
    return needs_original


def _attack(task, model, original, label: str) -> dict[str, Any]:
    """``task.run_attacks``; an attack must leave the model's weights as it found them."""
    before = model.fingerprint(refresh=True)
    out = task.run_attacks(model, original, label)
    if model.fingerprint(refresh=True) != before:
        raise RuntimeError(f"an attack in eval.attacks changed the weights of the {label} model; attacks must work "
                           "on a copy")
    return out


def _probe(probes: list, adapter, data, progress: bool, before: dict | None = None):
    """Probe the target (``before=None``: the results) or the unlearned model (the compared
    results for ``metrics["probes"]``); probes only read the model."""
    if not probes:
        return None
    if progress:
        print(f"probes ({'unlearned' if before is not None else 'target'}): {', '.join(p.name for p in probes)}")
    fp = adapter.fingerprint(refresh=True)
    out = probe_before(probes, adapter, data) if before is None else probe_after(probes, adapter, data, before)
    if adapter.fingerprint(refresh=True) != fp:
        raise RuntimeError("a probe in eval.probes changed the model's weights; probes must only read them")
    return out


def _comparable(recipe_dict: dict[str, Any]) -> dict[str, Any]:
    """The recipe as a resume must match it: all but ``output`` and ``model.threads``."""
    out = {k: v for k, v in recipe_dict.items() if k != "output"}
    out["model"] = {k: v for k, v in out.get("model", {}).items() if k != "threads"}
    return out


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if a == b else f"{path} was {a!r}, now {b!r}"


def _checkpointing(recipe, rd) -> Checkpointing | None:
    """The trainer's checkpointing for this run (None when the recipe asks for none and nothing
    is resumed); a resume with a recipe other than the one that started the run is refused.
    With several processes the main one decides (it holds the run directory) and every process
    resumes from the same checkpoint; only the main one writes them."""
    wanted = _comparable(json.loads(json.dumps(to_dict(recipe), default=str)))
    error = None
    if rd.resume_from is not None:
        saved = checkpoint_recipe(rd.resume_from)
        diff = _first_difference(_comparable(saved), wanted) if saved is not None else None
        if diff:
            error = (f"cannot resume {rd.resume_from}: the run was started with another recipe ({diff}); "
                     "resume with the recipe that started it, or start again with output.overwrite=true")
    shared = distributed.broadcast({"error": error, "resume_from": str(rd.resume_from) if rd.resume_from else None})
    if shared["error"]:
        raise ValueError(shared["error"])
    resume_from = Path(shared["resume_from"]) if shared["resume_from"] else None
    every = recipe.train.checkpoint_every
    if every is None and resume_from is None:
        return None
    return Checkpointing(root=rd.path, every=every or 10 ** 12, resume_from=resume_from, recipe=wanted)


class ScratchDir:
    """What a process other than the main one has instead of a :class:`RunDir`: a private
    scratch directory (for spilled training states), removed at the end; it writes no run."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.path = Path(tempfile.mkdtemp(prefix="unlearn-rank-"))
        self.recovered: list[str] = []
        self.resume_from = None

    def commit(self) -> Path:
        distributed.barrier()  # returns once the main process has written the run
        shutil.rmtree(self.path, ignore_errors=True)
        return self.final

    def abort(self, keep_resumable: bool = False):
        shutil.rmtree(self.path, ignore_errors=True)
        return None


def open_run_dir(final: Path, *, overwrite: bool, resume: bool):
    """The run directory: a :class:`RunDir` on the main process, a :class:`ScratchDir` on the
    others. With several processes, a refusal on the main process is raised on every one."""
    if distributed.world()[1] == 1:
        return RunDir(final, overwrite=overwrite, resume=resume)
    rd, err = None, None
    if distributed.is_main():
        try:
            rd = RunDir(final, overwrite=overwrite, resume=resume)
        except (ValueError, OSError) as e:
            err = e
    msg = distributed.broadcast(None if err is None else str(err))
    if err is not None:
        raise err
    if msg is not None:
        raise OutputError(msg)
    return rd if rd is not None else ScratchDir(final)


def finish_run(rd, recipe, adapter, metrics: dict[str, Any], prov: dict[str, Any], write) -> Path:
    """Write a finished run into its temporary directory -- the resolved ``recipe.yaml``,
    ``provenance.json``, the checkpoint (``train.save_checkpoint``), the report (``write()``)
    and ``metrics.json`` last (it marks the run finished) -- and move it into place."""
    if isinstance(rd, ScratchDir):  # not the main process: the main one writes
        return rd.commit()
    drop_checkpoints(rd.path)  # a finished run does not carry training state
    atomic_write_text(rd.path / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    atomic_write_json(rd.path / "provenance.json", prov)
    if recipe.train.save_checkpoint:
        adapter.save(rd.path / "checkpoint")
    write()
    atomic_write_json(rd.path / "metrics.json", metrics)
    final = rd.commit()
    distributed.barrier()  # the other processes return once the run is written
    return final


def run(recipe, overrides=(), *, progress: bool = True, keep_model: bool = False) -> RunResult:
    """Run a recipe (path, dict or Recipe -- validated again, edits in Python included) with
    optional ``--set``-style overrides."""
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # a Recipe object is validated again: it may have been edited in Python since it was loaded
    recipe = load_recipe(recipe, list(overrides))
    distributed.init(recipe.model.device)  # several processes under accelerate launch: join them (one: nothing)
    progress = progress and distributed.is_main()
    # 0. the method and the task; everything a recipe can get wrong is checked before any model loads
    method_cls, method_config = resolve_method(recipe)
    method = method_cls(method_config)
    distributed.check_sharding(method)  # launched with FSDP / DeepSpeed: refused, naming the method and the fix
    if isinstance(method, Editor) and recipe.train.evaluates_during_training:
        raise ValueError(f"method {recipe.method.name!r} is an editor (it returns a model rather than training the "
                         "target step by step): train.eval_every / train.eval_every_epoch / train.select_best do not "
                         "apply; remove them")
    if isinstance(method, Editor) and recipe.train.checkpoint_every is not None:
        raise ValueError(f"method {recipe.method.name!r} is an editor (it returns a model rather than training the "
                         "target step by step): train.checkpoint_every does not apply; remove it")
    check_trackers(recipe.train.report_to)
    if recipe.train.report_to:
        os.environ.setdefault("WANDB_MODE", "offline")  # offline machines; set WANDB_MODE=online to sync
    task = recipe.task.task_class(recipe, progress=progress)
    needs_original = _check_attacks(recipe, task.modality)
    probes = [make_probe(n, dict(recipe.eval.probe_params.get(n, {}))) for n in recipe.eval.probes]
    torch.set_num_threads(recipe.model.threads)
    set_seed(recipe.seed)
    t_start = time.time()
    rd = open_run_dir(recipe.output_dir, overwrite=recipe.output.overwrite, resume=recipe.output.resume)
    for msg in rd.recovered:
        print(f"note: {msg}", file=sys.stderr)
    try:
        checkpointing = _checkpointing(recipe, rd)
        # 1. data, the model, and what evaluation needs besides it (reference models, judges)
        data = task.load_data()
        if method.needs_retain() and data.retain is None:
            raise ValueError(f"method {recipe.method.name!r} needs task.retain_split")
        adapter = task.load_model()
        target_fp = adapter.fingerprint()
        task.prepare(data, adapter)
        for msg in task.warnings if distributed.is_main() else ():
            print(f"warning: {msg}", file=sys.stderr)

        # 2. the target, before anything changes: evaluation, what the report shows, attacks, probes
        target_res = task.evaluate(adapter, "target") if recipe.eval.compare_target else None
        task.observe(adapter, "target")
        original = adapter.reference() if needs_original else None
        attacks: dict[str, Any] = {}
        if recipe.eval.attacks and recipe.eval.compare_target:
            attacks["target"] = _attack(task, adapter, original if original is not None else adapter, "target")
        probes_before = _probe(probes, adapter, data, progress)  # before the method's setup touches weights

        # 3. unlearn: an objective through the trainer (with evaluation during training), or an editor
        applied = apply_method(method, adapter, data, recipe, task=task, spill_dir=rd.path, progress=progress,
                               checkpointing=checkpointing)
        adapter = applied.adapter
        bad = nonfinite_parameter(adapter.model)
        if bad is not None:  # an editor's closed form can diverge too; never evaluate or save such weights
            raise TrainingDiverged(f"method {recipe.method.name!r} left non-finite weights in {bad}")
        _check_outputs_finite(adapter, data, recipe)

        # 4. the unlearned model: evaluation, what the report shows, probes, attacks
        adapter.fingerprint(refresh=True)
        unl_res = task.evaluate(adapter, "unlearned", cache=False)
        fingerprint_after = adapter.fingerprint()
        task.observe(adapter, "unlearned")
        probe_res = _probe(probes, adapter, data, progress, before=probes_before) if probes else None
        if recipe.eval.attacks:
            attacks["unlearned"] = _attack(task, adapter, original, "unlearned")
        del original

        # 5. results: summary, provenance, metrics, report -- written atomically
        models = {"unlearned": unl_res, **({"target": target_res} if target_res is not None else {}),
                  **task.references()}
        summary: dict[str, Any] = dict(task.summarize(models))
        if task.summary_note():
            summary["note"] = task.summary_note()
        log, te = applied.log, applied.train_eval
        if te is not None:
            summary["selected_step"] = applied.selected["step"]
            summary["stopped_early"] = te.stop["step"] if te.stop else None
            summary["train_eval_seconds"] = round(te.seconds, 1)  # included in train_seconds
        summary["edit_seconds"] = round(applied.seconds, 2)
        summary["wall_seconds"] = round(time.time() - t_start, 1)
        summary["train_seconds"] = round(log.seconds, 1)
        prov = provenance(
            recipe_name=recipe.name, seed=recipe.seed, task=recipe.task.name, modality=task.modality,
            model={"source": recipe.model.source, "fingerprint_before": target_fp, "fingerprint_after": fingerprint_after},
            **task.provenance(),
            objective={"name": method.name, "paper": method.paper,
                       "kind": "editor" if isinstance(method, Editor) else "objective"},
            selection=applied.selection.to_dict() if applied.selection is not None else None,
            parameters_changed=len(applied.changed),
            **({"resumed_from": rd.resume_from.name} if rd.resume_from is not None else {}),
            **({"output_recovered": rd.recovered} if rd.recovered else {}),
            **({"warnings": task.warnings} if task.warnings else {}),
        )
        # every result file carries what reproduces it: the resolved recipe and the provenance
        metrics: dict[str, Any] = {"summary": summary, "models": models, "train": log.to_dict(),
                                   "recipe": to_dict(recipe), "provenance": prov,
                                   "changed_parameters": sorted(applied.changed)}
        if te is not None:
            metrics["train_eval"] = te.record(applied.selected)
        if probe_res is not None:
            metrics["probes"] = probe_res
        if attacks:
            metrics["attacks"] = attacks
        if applied.editor_info is not None:
            metrics["editor"] = applied.editor_info
        final = finish_run(rd, recipe, adapter, metrics, prov,
                           lambda: write_report(rd.path, recipe, task, metrics, prov))
    except TrainingDiverged as e:
        rd.abort()
        raise TrainingDiverged(f"{e}; nothing was written to {str(recipe.output_dir)!r}") from None
    except Exception:
        rd.abort()
        raise
    except BaseException:  # Ctrl-C, SIGTERM: keep a complete training checkpoint for --resume
        kept = rd.abort(keep_resumable=True)
        if kept is not None:
            print(f"note: stopped; continue from {kept.name} with --resume (output.resume=true)", file=sys.stderr)
        raise
    return RunResult(run_dir=final, summary=summary, metrics=metrics, recipe=recipe,
                     adapter=adapter if keep_model else None, task=task)
