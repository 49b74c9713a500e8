"""Run a recipe end to end: load -> evaluate target/retain -> unlearn -> evaluate -> report.

``unlearn run RECIPE --set k=v`` and :func:`unlearn.run` both land here.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RunResult:
    """What a run returns: where it wrote, the headline numbers, and every metric."""

    run_dir: Path
    summary: dict[str, Any]
    metrics: dict[str, Any] = field(repr=False)
    recipe: Any = field(repr=False, default=None)
    adapter: Any = field(repr=False, default=None)

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _eval_cache_dir() -> Path:
    from unlearn.zoo import cache_dir

    return cache_dir() / "eval"


def run(recipe, overrides=(), *, progress: bool = True, keep_model: bool = False) -> RunResult:
    """Run a recipe (path, dict or Recipe) with optional ``--set``-style overrides."""
    import torch

    from unlearn.adapters.text import TextAdapter
    from unlearn.config import to_dict
    from unlearn.evaluators import tofu_suite
    from unlearn.recipe import Recipe, load_recipe, resolve_method
    from unlearn.report import write_report
    from unlearn.runs import RunDir, atomic_write_json, atomic_write_text, provenance
    from unlearn.selection import apply_selection, finalize_selection
    from unlearn.tasks.tofu import load_tofu
    from unlearn.tasks.tofu_world import WorldConfig
    from unlearn.trainer import TrainSettings, train

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if not isinstance(recipe, Recipe) or overrides:
        recipe = load_recipe(recipe if not isinstance(recipe, Recipe) else to_dict(recipe), list(overrides))
    objective_cls, obj_config = resolve_method(recipe)
    torch.set_num_threads(recipe.model.threads)
    set_seed(recipe.seed)
    t_start = time.time()

    out_dir = Path(recipe.output.dir or f"runs/{recipe.name}")
    rd = RunDir(out_dir, overwrite=recipe.output.overwrite)
    try:
        # ---- data -------------------------------------------------------------------------
        t = recipe.task
        world = WorldConfig(**vars(t.world)) if t.name == "tofu" else None
        data = load_tofu(name=t.name, world=world, path=t.path, forget_split=t.forget_split,
                         retain_split=t.retain_split, eval_splits=t.eval_splits, seed=recipe.seed)
        objective = objective_cls(obj_config)
        if objective.needs_retain() and data.retain is None:
            raise ValueError(f"objective {objective.name!r} needs task.retain_split")

        # ---- models -----------------------------------------------------------------------
        kw = dict(prompt_template=t.prompt_template, tokenization=t.tokenization)
        adapter = TextAdapter.load(recipe.model.source, dtype=recipe.model.dtype, **kw)
        retain_adapter = TextAdapter.load(t.retain_model, **kw) if t.retain_model else None
        if retain_adapter is not None and retain_adapter.tokenizer.get_vocab() != adapter.tokenizer.get_vocab():
            raise ValueError(f"task.retain_model {t.retain_model!r} uses a different tokenizer than model.source "
                             f"{recipe.model.source!r}; the retain model must share the target's tokenizer")
        ev = dict(batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens, suite=recipe.eval.suite,
                  cache_dir=_eval_cache_dir(), progress=progress)
        splits = data.eval_splits
        if recipe.eval.max_items:
            splits = {k: v[: recipe.eval.max_items] for k, v in splits.items()}
            data.eval_splits = splits
        target_fp = adapter.fingerprint()
        retain_res = tofu_suite.evaluate(retain_adapter, splits, label="retain model", **ev) if retain_adapter else None
        target_res = tofu_suite.evaluate(adapter, splits, label="target", **ev) if recipe.eval.compare_target else None

        # ---- unlearn ----------------------------------------------------------------------
        reference = adapter.reference() if objective.needs_reference() else None
        objective.setup(adapter, reference, data.forget)
        sel = recipe.method.selection
        sel_info = apply_selection(adapter, sel.name, dict(sel.params))
        before = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if p.requires_grad}
        tr = recipe.train
        settings = TrainSettings(epochs=tr.epochs, max_steps=tr.max_steps, lr=tr.lr, batch_size=tr.batch_size,
                                 grad_accum=tr.grad_accum, optimizer=tr.optimizer, weight_decay=tr.weight_decay,
                                 scheduler=tr.scheduler, warmup_ratio=tr.warmup_ratio, max_grad_norm=tr.max_grad_norm)
        log = train(adapter, objective, data.forget, data.retain, settings, seed=recipe.seed, progress=progress)
        n_changed = sum(1 for n, p in adapter.model.named_parameters() if n in before and not (p == before[n]).all())
        finalize_selection(adapter)
        del reference
        unl_res = tofu_suite.evaluate(adapter, splits, label="unlearned", **{**ev, "cache_dir": None})

        # ---- results ----------------------------------------------------------------------
        models = {"unlearned": unl_res}
        if target_res is not None:
            models["target"] = target_res
        if retain_res is not None:
            models["retain"] = retain_res
        summary: dict[str, Any] = {}
        for name, res in models.items():
            s = tofu_suite.summarize(res, retain_res)
            res["summary"] = s
            summary[name] = {"forget_quality": s["forget_quality"]["value"], "model_utility": s["model_utility"]["value"],
                             "forget_prob": res["splits"]["forget"]["metrics"]["prob"]["value"] if "forget" in res["splits"] else None,
                             "forget_rouge": res["splits"]["forget"]["metrics"].get("rouge", {}).get("value") if "forget" in res["splits"] else None}
        if retain_res is None:
            summary["note"] = "forget quality not computable: no retain model (task.retain_model is null)"
        summary["wall_seconds"] = round(time.time() - t_start, 1)
        summary["train_seconds"] = round(log.seconds, 1)
        prov = provenance(
            recipe_name=recipe.name, seed=recipe.seed,
            model={"source": recipe.model.source, "fingerprint_before": target_fp, "fingerprint_after": adapter.fingerprint()},
            retain_model={"source": t.retain_model, "fingerprint": retain_adapter.fingerprint()} if retain_adapter else None,
            data=data.fingerprints(), tokenization=t.tokenization, prompt_template=t.prompt_template,
            objective={"name": objective.name, "paper": objective.paper}, selection=sel_info.to_dict(),
            parameters_changed=n_changed,
        )
        metrics = {"summary": summary, "models": models, "train": log.to_dict()}
        import yaml

        atomic_write_text(rd.path / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
        atomic_write_json(rd.path / "provenance.json", prov)
        if recipe.train.save_checkpoint:
            adapter.save(rd.path / "checkpoint")
        write_report(rd.path, recipe, metrics, prov, data, n_samples=recipe.eval.n_samples)
        atomic_write_json(rd.path / "metrics.json", metrics)  # written last: marks the run finished
        final = rd.commit()
    except BaseException:
        rd.abort()
        raise
    return RunResult(run_dir=final, summary=summary, metrics=metrics, recipe=recipe,
                     adapter=adapter if keep_model else None)
