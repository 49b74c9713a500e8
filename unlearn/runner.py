"""Run a recipe end to end: load -> evaluate target/retain (+ attacks on the target) -> unlearn
(with optional evaluation during training: curve, best-state selection, utility floor) ->
evaluate -> attacks on the unlearned model -> report. See docs/harness.md.

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


# Above this many bytes of trainable weights, the best training state is kept on disk.
BEST_STATE_IN_MEMORY_BYTES = 2 * 1024 ** 3


def _point(res: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one evaluation that the training curve records."""
    def metric(split: str, name: str) -> float | None:
        return res["splits"].get(split, {}).get("metrics", {}).get(name, {}).get("value")

    return {"forget_quality": summary["forget_quality"]["value"], "model_utility": summary["model_utility"]["value"],
            "forget_prob": metric("forget", "prob"), "forget_rouge": metric("forget", "rouge"),
            "forget_truth_ratio": metric("forget", "truth_ratio"),
            "retain_prob": metric("retain_eval", "prob"), "retain_rouge": metric("retain_eval", "rouge")}


def _score(point: dict[str, Any], criterion: str) -> float | None:
    fq, mu = point.get("forget_quality"), point.get("model_utility")
    if criterion == "forget_quality":
        return fq
    if criterion == "model_utility":
        return mu
    if criterion == "fq_mu_mean":
        return None if fq is None or mu is None else (fq + mu) / 2
    return None


class TrainEval:
    """Evaluation during training: the ``callback`` the runner gives :func:`unlearn.trainer.train`.

    At the chosen steps it evaluates the current weights with the ``tofu`` suite on small
    eval splits, records a curve point (forget quality against the retain model's results on
    the same items, model utility, forget/retain Prob and ROUGE), keeps a copy of the best
    trainable weights by ``train.select_best`` and asks training to stop when model utility
    falls below ``train.utility_floor`` x the target's. The final step is always evaluated,
    so the last state competes with the earlier ones.
    """

    def __init__(self, adapter, splits: dict[str, list[dict]], train_spec, *, retain_res: dict | None,
                 baseline: dict[str, Any] | None, ev: dict[str, Any], spill_dir: Path) -> None:
        self.adapter, self.splits, self.tr, self.ev = adapter, splits, train_spec, ev
        self.retain_res, self.baseline = retain_res, baseline
        self.target_mu = None if baseline is None else baseline.get("model_utility")
        self.params = [p for p in adapter.model.parameters() if p.requires_grad]
        self.spill_path = spill_dir / ".train_eval_best.safetensors"
        self.curve: list[dict[str, Any]] = []
        self.best_index: int | None = None
        self.best_state: list | None = None  # in memory; or None with the state in spill_path
        self.stop: dict[str, Any] | None = None
        self.seconds = 0.0

    # -- the callback ------------------------------------------------------------------------
    def __call__(self, step: int, info: dict[str, Any]) -> str | None:
        from unlearn.evaluators import tofu_suite

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
            res = tofu_suite.evaluate(self.adapter, self.splits, label=f"step {step}", **self.ev)
        finally:
            model.train(was_training)
        point = {"step": step, "epoch": info.get("epoch"), "trigger": triggers, "loss": info.get("loss"),
                 **_point(res, tofu_suite.summarize(res, self.retain_res))}
        mu = point["model_utility"]
        floor = self.tr.utility_floor
        point["utility_ratio"] = (mu / self.target_mu) if (mu is not None and self.target_mu) else None
        below = floor is not None and point["utility_ratio"] is not None and point["utility_ratio"] < floor
        point["below_floor"] = below
        self.seconds += time.time() - t0
        point["seconds"] = round(time.time() - t0, 2)
        self.curve.append(point)
        if self.tr.select_best != "last" and not below:
            score = _score(point, self.tr.select_best)
            best = None if self.best_index is None else _score(self.curve[self.best_index], self.tr.select_best)
            if score is not None and (best is None or score > best):
                self._snapshot(len(self.curve) - 1)
        if below and not info.get("last"):
            self.stop = {"step": step, "reason": f"model utility {mu:.4g} is {point['utility_ratio']:.3f} of the "
                                                 f"target's {self.target_mu:.4g}, below train.utility_floor {floor}"}
            return "stop"
        return None

    # -- best state --------------------------------------------------------------------------
    def _snapshot(self, index: int) -> None:
        state = [p.detach().clone() for p in self.params]
        self.best_index = index
        if sum(t.numel() * t.element_size() for t in state) > BEST_STATE_IN_MEMORY_BYTES:
            from safetensors.torch import save_file

            save_file({str(i): t.contiguous() for i, t in enumerate(state)}, str(self.spill_path))
            self.best_state = None
        else:
            self.best_state = state

    def restore_best(self) -> dict[str, Any]:
        """Load the selected state into the model (before LoRA merging); returns ``selected``."""
        import torch

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
        value = _score(best, crit)
        if best is not final:
            state = self.best_state
            if state is None:
                from safetensors.torch import load_file

                loaded = load_file(str(self.spill_path))
                state = [loaded[str(i)] for i in range(len(self.params))]
            with torch.no_grad():
                for p, v in zip(self.params, state):
                    p.copy_(v)
        n = sum(1 for pt in self.curve if _score(pt, crit) is not None)
        why = (f"highest {crit} ({value:.4g}) of {n} evaluated states"
               + (f" at or above {self.tr.utility_floor} x the target's model utility" if self.tr.utility_floor else "")
               + ("; the last state" if best is final else f"; restored over the last state (step {final['step']})"))
        self._drop()
        return {"step": best["step"], "epoch": best["epoch"], "criterion": crit, "value": value, "reason": why}

    def _drop(self) -> None:
        self.best_state = None
        self.spill_path.unlink(missing_ok=True)

    def record(self, selected: dict[str, Any]) -> dict[str, Any]:
        return {"suite": "tofu", "items_per_split": {k: len(v) for k, v in self.splits.items()},
                "eval_every": self.tr.eval_every, "eval_every_epoch": self.tr.eval_every_epoch,
                "select_best": self.tr.select_best, "utility_floor": self.tr.utility_floor,
                "target_model_utility": self.target_mu, "baseline": self.baseline, "curve": self.curve,
                "selected": selected, "stopped_early": self.stop, "seconds": round(self.seconds, 2)}


def _attack_fn(recipe):
    """``evaluate_attacks`` of :mod:`unlearn.evaluators.attacks` (imported lazily), after checking
    every ``eval.attack_params`` entry against its attack's settings -- before anything runs."""
    from unlearn.config import RecipeError

    import importlib

    try:
        mod = importlib.import_module("unlearn.evaluators.attacks")
    except ImportError as e:
        raise RecipeError(f"recipe key 'eval.attacks' needs unlearn.evaluators.attacks, which cannot be imported "
                          f"({e})") from e
    make = getattr(mod, "make_attack", None)
    if make is not None:
        for name in recipe.eval.attacks:
            try:
                make(name, dict(recipe.eval.attack_params.get(name, {})), seed=recipe.seed)
            except (ValueError, TypeError) as e:
                raise RecipeError(f"recipe key 'eval.attack_params.{name}' is invalid: {e}") from None
    return mod.evaluate_attacks


def _run_attacks(fn, adapter, recipe, forget: list[dict], retain: list[dict] | None, progress: bool,
                 label: str) -> dict[str, Any]:
    """Run ``eval.attacks`` on ``adapter``; an attack must leave the model's weights as it found them."""
    before = adapter.fingerprint()
    out = fn(adapter, forget, retain, list(recipe.eval.attacks), batch_size=recipe.eval.batch_size,
             max_new_tokens=recipe.eval.max_new_tokens, seed=recipe.seed, progress=progress,
             params={k: dict(v) for k, v in recipe.eval.attack_params.items()} or None)
    if adapter.fingerprint(refresh=True) != before:
        raise RuntimeError(f"an attack in eval.attacks changed the weights of the {label} model; "
                           "attacks must work on a copy")
    return out


def _make_probes(recipe) -> list:
    """The probes of ``eval.probes``, their ``eval.probe_params`` checked before anything runs."""
    if not recipe.eval.probes:
        return []
    from unlearn.probes import make_probe

    return [make_probe(n, dict(recipe.eval.probe_params.get(n, {}))) for n in recipe.eval.probes]


def _probe_run(probes: list, adapter, data, progress: bool, before: dict | None = None):
    """Probe the target (``before=None``: the results) or the unlearned model (the compared
    results for ``metrics["probes"]``); probes only read the model."""
    if not probes:
        return None
    from unlearn.probes import probe_after, probe_before

    if progress:
        print(f"probes ({'unlearned' if before is not None else 'target'}): {', '.join(p.name for p in probes)}")
    fp = adapter.fingerprint(refresh=True)
    out = probe_before(probes, adapter, data) if before is None else probe_after(probes, adapter, data, before)
    if adapter.fingerprint(refresh=True) != fp:
        raise RuntimeError("a probe in eval.probes changed the model's weights; probes must only read them")
    return out


def finish_run(rd, recipe, adapter, metrics: dict[str, Any], prov: dict[str, Any], write_report) -> Path:
    """Write a finished run into its temporary directory -- the resolved ``recipe.yaml``,
    ``provenance.json``, the checkpoint (``train.save_checkpoint``), the report (``write_report()``)
    and ``metrics.json`` last (it marks the run finished) -- and move it into place."""
    import yaml

    from unlearn.config import to_dict
    from unlearn.runs import atomic_write_json, atomic_write_text

    atomic_write_text(rd.path / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    atomic_write_json(rd.path / "provenance.json", prov)
    if recipe.train.save_checkpoint:
        adapter.save(rd.path / "checkpoint")
    write_report()
    atomic_write_json(rd.path / "metrics.json", metrics)
    return rd.commit()


def run(recipe, overrides=(), *, progress: bool = True, keep_model: bool = False) -> RunResult:
    """Run a recipe (path, dict or Recipe) with optional ``--set``-style overrides."""
    import torch

    from unlearn.adapters.text import TextAdapter
    from unlearn.config import to_dict
    from unlearn.evaluators import tofu_suite
    from unlearn.recipe import Recipe, load_recipe, resolve_method
    from unlearn.report import write_report
    from unlearn.runs import RunDir, provenance
    from unlearn.selection import apply_selection, finalize_selection
    from unlearn.tasks.tofu import load_tofu
    from unlearn.tasks.tofu_world import WorldConfig
    from unlearn.trainer import TrainLog, TrainSettings, train

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if not isinstance(recipe, Recipe) or overrides:
        recipe = load_recipe(recipe if not isinstance(recipe, Recipe) else to_dict(recipe), list(overrides))
    if recipe.task.name == "visual":  # text-to-image concept erasure
        from unlearn.image_runner import run_visual

        return run_visual(recipe, progress=progress, keep_model=keep_model)
    from unlearn.editors import EditContext, Editor

    method_cls, method_config = resolve_method(recipe)
    is_editor = isinstance(method_cls, type) and issubclass(method_cls, Editor)
    if is_editor and recipe.train.evaluates_during_training:
        raise ValueError(f"method {recipe.method.name!r} is an editor (it returns a model rather than training the "
                         "target step by step): train.eval_every / train.eval_every_epoch / train.select_best do not "
                         "apply; remove them")
    torch.set_num_threads(recipe.model.threads)
    set_seed(recipe.seed)
    t_start = time.time()

    out_dir = Path(recipe.output.dir or f"runs/{recipe.name}")
    rd = RunDir(out_dir, overwrite=recipe.output.overwrite)
    try:
        attack_fn = _attack_fn(recipe) if recipe.eval.attacks else None  # checked before anything runs
        probes = _make_probes(recipe)  # likewise
        # ---- data -------------------------------------------------------------------------
        t = recipe.task
        world = WorldConfig(**vars(t.world)) if t.name == "tofu" else None
        data = load_tofu(name=t.name, world=world, path=t.path, forget_split=t.forget_split,
                         retain_split=t.retain_split, eval_splits=t.eval_splits, seed=recipe.seed)
        objective = method_cls(method_config)
        if objective.needs_retain() and data.retain is None:
            raise ValueError(f"method {objective.name!r} needs task.retain_split")

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

        # ---- attacks on the target (before it changes) -------------------------------------
        attack_forget = splits.get("forget", [])
        attack_retain = splits.get("retain_eval")
        if attack_retain is None and data.retain is not None:
            attack_retain = data.retain[: recipe.eval.max_items] if recipe.eval.max_items else data.retain
        attacks: dict[str, Any] = {}
        if attack_fn is not None and recipe.eval.compare_target:
            attacks["target"] = _run_attacks(attack_fn, adapter, recipe, attack_forget, attack_retain, progress, "target")
        probes_before = _probe_run(probes, adapter, data, progress)  # before the objective's setup touches weights

        # ---- evaluation during training: small splits, the retain model's and target's results
        tr = recipe.train
        te_baseline = te_retain = te_splits = None
        if tr.evaluates_during_training:
            n_te = tr.eval_max_items
            te_splits = {k: (v[:n_te] if n_te else v) for k, v in splits.items() if k != "holdout"}
            te_ev = {**ev, "suite": "tofu", "progress": False}
            te_retain = tofu_suite.evaluate(retain_adapter, te_splits, label="retain model (train-eval)", **te_ev) \
                if retain_adapter else None
            te_target = tofu_suite.evaluate(adapter, te_splits, label="target (train-eval)", **te_ev)
            te_baseline = {"step": 0, "epoch": None, "trigger": ["target"],
                           **_point(te_target, tofu_suite.summarize(te_target, te_retain))}
            te_baseline["utility_ratio"] = 1.0 if te_baseline["model_utility"] else None

        # ---- unlearn ----------------------------------------------------------------------
        settings = TrainSettings(epochs=tr.epochs, max_steps=tr.max_steps, lr=tr.lr, batch_size=tr.batch_size,
                                 grad_accum=tr.grad_accum, optimizer=tr.optimizer, weight_decay=tr.weight_decay,
                                 scheduler=tr.scheduler, warmup_ratio=tr.warmup_ratio, max_grad_norm=tr.max_grad_norm)
        train_eval = selected = None
        editor_info = None
        if is_editor:
            before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
            edit = objective.apply(adapter, data, EditContext(settings=settings, seed=recipe.seed, progress=progress,
                                                              eval_batch_size=recipe.eval.batch_size))
            log = edit.log if edit.log is not None else TrainLog(seed=recipe.seed)
            editor_info = edit.info
            n_changed = sum(1 for n, p in adapter.model.named_parameters() if not (p == before[n]).all())
            del before
            adapter = edit.adapter
            sel_info = None
        else:
            reference = adapter.reference() if objective.needs_reference() else None
            objective.setup(adapter, reference, data.forget)
            sel = recipe.method.selection
            sel_info = apply_selection(adapter, sel.name, dict(sel.params), objective=objective)
            before = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if p.requires_grad}
            if te_splits is not None:
                train_eval = TrainEval(adapter, te_splits, tr, retain_res=te_retain, baseline=te_baseline,
                                       ev={**ev, "suite": "tofu", "cache_dir": None, "progress": False},
                                       spill_dir=rd.path)
            log = train(adapter, objective, data.forget, data.retain, settings, seed=recipe.seed, progress=progress,
                        callback=train_eval)
            selected = train_eval.restore_best() if train_eval is not None else None
            n_changed = sum(1 for n, p in adapter.model.named_parameters() if n in before and not (p == before[n]).all())
            finalize_selection(adapter)
            del reference, before
        unl_res = tofu_suite.evaluate(adapter, splits, label="unlearned", **{**ev, "cache_dir": None})
        fingerprint_after = adapter.fingerprint()
        probe_res = _probe_run(probes, adapter, data, progress, before=probes_before) if probes else None
        if attack_fn is not None:
            attacks["unlearned"] = _run_attacks(attack_fn, adapter, recipe, attack_forget, attack_retain, progress,
                                                "unlearned")

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
        if train_eval is not None:
            summary["selected_step"] = selected["step"]
            summary["stopped_early"] = train_eval.stop["step"] if train_eval.stop else None
            summary["train_eval_seconds"] = round(train_eval.seconds, 1)  # included in train_seconds
        summary["wall_seconds"] = round(time.time() - t_start, 1)
        summary["train_seconds"] = round(log.seconds, 1)
        prov = provenance(
            recipe_name=recipe.name, seed=recipe.seed,
            model={"source": recipe.model.source, "fingerprint_before": target_fp, "fingerprint_after": fingerprint_after},
            retain_model={"source": t.retain_model, "fingerprint": retain_adapter.fingerprint()} if retain_adapter else None,
            data=data.fingerprints(), tokenization=t.tokenization, prompt_template=t.prompt_template,
            objective={"name": objective.name, "paper": objective.paper, "kind": "editor" if is_editor else "objective"},
            selection=sel_info.to_dict() if sel_info is not None else None,
            parameters_changed=n_changed,
        )
        # every result file carries what reproduces it: the resolved recipe and the provenance
        metrics = {"summary": summary, "models": models, "train": log.to_dict(),
                   "recipe": to_dict(recipe), "provenance": prov}
        if train_eval is not None:
            metrics["train_eval"] = train_eval.record(selected)
        if probe_res is not None:
            metrics["probes"] = probe_res
        if attacks:
            metrics["attacks"] = attacks
        if editor_info is not None:
            metrics["editor"] = editor_info
        final = finish_run(rd, recipe, adapter, metrics, prov,
                           lambda: write_report(rd.path, recipe, metrics, prov, data, n_samples=recipe.eval.n_samples))
    except BaseException:
        rd.abort()
        raise
    return RunResult(run_dir=final, summary=summary, metrics=metrics, recipe=recipe,
                     adapter=adapter if keep_model else None)
