"""Evaluate a model on a task's suite without unlearning it: ``unlearn eval SOURCE``.

:func:`evaluate` takes any model source the toolkit loads -- a zoo name, a local directory, a
hub id, or a saved wrapped model such as a run's ``checkpoint/`` -- builds a recipe around it
(from a recipe file or mapping, else a minimal one for the task) and goes through the
:class:`~unlearn.task.Task` contract only: ``load_data``, ``load_model``, ``prepare``,
``evaluate`` and ``summarize``, exactly as the run loop evaluates its target. The numbers are
the ones ``unlearn run`` reports for the same model and settings (the same suite, items and
evaluation cache).

With ``output`` the results go to a directory -- ``recipe.yaml``, ``provenance.json`` and
``metrics.json`` -- written like a run directory (:class:`~unlearn.runs.RunDir`: assembled
aside and moved into place, only a finished run replaced and only with
``output.overwrite=true``, one writer at a time). See ``docs/cli.md``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import transformers
import yaml

from unlearn import distributed
from unlearn.config import to_dict
from unlearn.models import source_modality
from unlearn.objectives import OBJECTIVES
from unlearn.recipe import Recipe, load_recipe, method_modalities
from unlearn.registry import did_you_mean
from unlearn.runner import open_run_dir, set_seed
from unlearn.runs import RunDir, atomic_write_json, atomic_write_text, provenance
from unlearn.tasks.registry import TASKS

# The label of the evaluated model in results and summaries.
LABEL = "model"
# The method a minimal recipe names: evaluation never applies it, but a recipe must name one
# that fits its task (this one works on every modality and needs no retain set).
PLACEHOLDER_METHOD = "grad_ascent"
# Tasks preferred when the task is chosen from the model's modality.
PREFERRED_TASKS = ("tofu",)


@dataclass
class EvalResult:
    """What :func:`evaluate` returns: the headline numbers, every metric, and where they were written."""

    summary: dict[str, Any]
    metrics: dict[str, Any] = field(repr=False)
    out_dir: Path | None = None
    recipe: Any = field(repr=False, default=None)
    task: Any = field(repr=False, default=None)

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def headline_lines(self) -> list[str]:
        """One line per evaluated model (the model first, then the task's reference models)."""
        return [self.task.headline_text(name, row) for name, row in self.summary.items() if isinstance(row, dict)]


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source in (".", "..") or Path(source).expanduser().exists()


def check_source(source: str) -> str | None:
    """Check ``source`` before anything loads; returns its modality when the files tell it.

    Raises:
        ValueError: an empty source, a path that does not exist or is a file other than a
            single-file ``*.safetensors`` checkpoint (an image model), an unknown or unbuilt zoo model.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"model source must be a non-empty string, got {source!r}")
    if not source.startswith("zoo:") and _looks_like_path(source):
        p = Path(source).expanduser()
        if not p.exists():
            raise ValueError(f"model {source!r} does not exist; give a directory holding a saved model (e.g. a "
                             "run's checkpoint/), a zoo name (zoo:tiny-llama/target) or a hub id")
        if not p.is_dir():
            if p.suffix.lower() == ".safetensors":  # a single-file Stable Diffusion checkpoint
                return "image"
            raise ValueError(f"model {source!r} is a file; give the directory the model was saved in (or a "
                             "single-file Stable Diffusion checkpoint, *.safetensors next to its pipeline's configs)")
    return source_modality(source)


def default_task(modality: str | None) -> str:
    """The task for a model of ``modality`` (None: unknown, treated as text): the preferred task
    of that modality, else its only registered task."""
    modality = modality or "text"
    fits = [n for n in TASKS.names() if TASKS.get(n).modality == modality]
    for name in PREFERRED_TASKS:
        if name in fits:
            return name
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(f"no task evaluates {modality} models; tasks: {', '.join(TASKS.names())}")
    raise ValueError(f"several tasks evaluate {modality} models ({', '.join(fits)}); choose one with --task")


def placeholder_method(task: str) -> str:
    """A method name that fits ``task`` (a recipe must name one; evaluation does not apply it)."""
    modality = TASKS.get(task).modality
    for name in (PLACEHOLDER_METHOD, *OBJECTIVES.names()):
        if name in OBJECTIVES and modality in method_modalities(OBJECTIVES.get(name)):
            return name
    raise ValueError(f"no objective works on {modality} models, so no recipe for task {task!r} can be built")


def _yaml_value(value: Any) -> str:
    """``value`` as an override's right-hand side that YAML reads back unchanged (a string stays a string)."""
    return json.dumps(value)


def eval_recipe(source: str, task: str | None = None, *, recipe=None, overrides: Iterable[str] = (),
                output: str | Path | None = None) -> Recipe:
    """The recipe :func:`evaluate` runs: ``recipe`` (a YAML path, a mapping or a
    :class:`~unlearn.recipe.Recipe`) or a minimal one for ``task``, with ``model.source`` set to
    ``source``, ``task.name`` to ``task`` when given, ``output.dir`` to ``output`` when given,
    then ``overrides`` (``--set`` items) on top."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS.names())}" + did_you_mean(task, TASKS.names()))
    over = [f"model.source={_yaml_value(source)}"]
    if task is not None:
        over.append(f"task.name={_yaml_value(task)}")
    if output is not None:
        over.append(f"output.dir={_yaml_value(str(output))}")
    over += list(overrides)
    if recipe is None:
        name = task or default_task(source_modality(source))
        recipe = {"name": "eval", "task": {"name": name}, "method": {"name": placeholder_method(name)}}
    return load_recipe(recipe, over)


def evaluate(source: str, task: str | None = None, *, recipe=None, overrides: Iterable[str] = (),
             output: str | Path | None = None, progress: bool = True) -> EvalResult:
    """Evaluate the model at ``source`` on a task's suite, without unlearning it.

    Args:
        source: ``zoo:<family>/<name>``, a local directory (a saved model, a run's
            ``checkpoint/``, a wrapped model with ``wrapper.json``), a single-file Stable
            Diffusion checkpoint (``*.safetensors`` next to its pipeline's configs) or a hub id.
        task: the task's name (``tofu``, ``tofu_files``, ``visual``, ...). None: the recipe's
            task when ``recipe`` is given, else the task for the model's modality (an image
            model: ``visual``), else ``tofu``.
        recipe: a recipe (YAML path, mapping or Recipe) whose task, evaluation and model
            settings to use; its ``method`` and ``train`` sections are not applied.
        overrides: ``--set`` items (``eval.max_items=3``, ``task.retain_model=null``, ...).
        output: a directory to write ``metrics.json`` (with the summary, the results, the
            resolved recipe and the provenance), ``provenance.json`` and ``recipe.yaml`` to;
            None: nothing is written. An existing finished run there is replaced only with
            ``output.overwrite=true``.
        progress: progress bars on stderr.

    Returns:
        :class:`EvalResult`: ``summary`` is ``{"model": headline numbers, <reference>: ...,
        "wall_seconds": ...}`` as the task summarises (TOFU adds the retain model, and ``note``
        when forget quality cannot be computed).

    Raises:
        ValueError: a bad source, task, recipe, override or output directory, or a model of
            another modality than the task's -- one line naming the problem.
        OSError: the output directory cannot be written.
    """
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    distributed.init()  # under torchrun: the passes are shared between the processes, the main one writes
    main = distributed.is_main()
    progress = progress and main
    modality = check_source(source)
    recipe = eval_recipe(source, task, recipe=recipe, overrides=overrides, output=output)
    task_cls = recipe.task.task_class
    if modality is not None and modality != task_cls.modality:
        fits = [n for n in TASKS.names() if TASKS.get(n).modality == modality]
        raise ValueError(f"model {source!r} is {_a(modality)} model, but task {recipe.task.name!r} evaluates "
                         f"{task_cls.modality} models; tasks for {modality} models: {', '.join(fits) or 'none'}"
                         + (f" (--task {fits[0]})" if fits else ""))
    skipped = [k for k, on in (("eval.attacks", recipe.eval.attacks), ("eval.probes", recipe.eval.probes)) if on]
    if skipped and main:
        print(f"note: {' and '.join(skipped)} are not run by unlearn eval (the task's suite only)", file=sys.stderr)
    tsk = task_cls(recipe, progress=progress)
    torch.set_num_threads(recipe.model.threads)
    set_seed(recipe.seed)
    t_start = time.time()
    rd = open_run_dir(recipe.output_dir, overwrite=recipe.output.overwrite, resume=False) if output is not None else None
    if rd is not None:
        for msg in rd.recovered:
            print(f"note: {msg}", file=sys.stderr)
    try:
        data = tsk.load_data()
        model = tsk.load_model()
        fingerprint = model.fingerprint()
        tsk.prepare(data, model)
        for msg in tsk.warnings if main else ():
            print(f"warning: {msg}", file=sys.stderr)
        res = tsk.evaluate(model, LABEL)
        models = {LABEL: res, **tsk.references()}
        summary: dict[str, Any] = dict(tsk.summarize(models))
        if tsk.summary_note():
            summary["note"] = tsk.summary_note()
        summary["wall_seconds"] = round(time.time() - t_start, 1)
        prov = provenance(recipe_name=recipe.name, command="eval", seed=recipe.seed, task=recipe.task.name,
                          modality=tsk.modality,
                          model={"source": recipe.model.source, "fingerprint": fingerprint,
                                 "identity": model.identity()},
                          **tsk.provenance(),
                          **({"output_recovered": rd.recovered} if rd is not None and rd.recovered else {}),
                          **({"warnings": tsk.warnings} if tsk.warnings else {}))
        metrics: dict[str, Any] = {"summary": summary, "models": models, "recipe": to_dict(recipe), "provenance": prov}
        out_dir = None
        if isinstance(rd, RunDir):
            atomic_write_text(rd.path / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
            atomic_write_json(rd.path / "provenance.json", prov)
            atomic_write_json(rd.path / "metrics.json", metrics)  # last: it marks the directory finished
            out_dir = rd.commit()
            distributed.barrier()  # the other processes return once it is written
        elif rd is not None:  # not the main process
            out_dir = rd.commit()
    except BaseException:
        if rd is not None:
            rd.abort()
        raise
    return EvalResult(summary=summary, metrics=metrics, out_dir=out_dir, recipe=recipe, task=tsk)


def _a(modality: str) -> str:
    return ("an " if modality[0] in "aeiou" else "a ") + modality


__all__ = ["EvalResult", "evaluate", "eval_recipe", "check_source", "default_task", "placeholder_method"]
