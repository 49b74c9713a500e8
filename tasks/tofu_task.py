"""The TOFU tasks as :class:`~unlearn.task.Task`: ``tofu`` (the generated world of fictitious
authors) and ``tofu_files`` (TOFU-layout files under ``task.path``).

Evaluation is the ``tofu`` / ``tofu-full`` suite (:mod:`unlearn.evaluators.suites`) with the
result cache; forget quality compares with the retain model's results on the same items
(``task.retain_model``), model utility is the harmonic mean over the utility splits. Attacks
run on the ``forget`` split (retain Prob on ``retain_eval``). See ``docs/metrics.md``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from unlearn.config import RecipeError, invalid, key_path, suggest
from unlearn.evaluators import cache as eval_cache
from unlearn.evaluators import tofu_suite
from unlearn.evaluators.attacks import evaluate_attacks
from unlearn.models import load_model
from unlearn.task import Task
from unlearn.tasks.tofu import load_tofu
from unlearn.tasks.tofu_report import tofu_sections
from unlearn.tasks.tofu_world import WorldConfig

# Evaluation splits a task provides (TOFU's sets; ``retain_eval`` plays retain_perturbed's role).
EVAL_SPLITS = ("forget", "retain_eval", "real_authors", "world_facts", "holdout")
# Splits model utility is computed from (all three are needed).
UTILITY_EVAL_SPLITS = ("retain_eval", "real_authors", "world_facts")
TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")
SELECT_BEST = ("forget_quality", "model_utility", "fq_mu_mean")

_PCT_SPLIT = re.compile(r"^(forget|retain)(\d+)$")


def complement(split: str) -> str | None:
    """``forget10`` -> ``retain90`` (and back); ``None`` for names without a percentage."""
    m = _PCT_SPLIT.match(split)
    if not m or int(m.group(2)) > 100:
        return None
    other = "retain" if m.group(1) == "forget" else "forget"
    return f"{other}{100 - int(m.group(2)):02d}"


def _point(res: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one evaluation that the training curve records."""
    def metric(split: str, name: str) -> float | None:
        return res["splits"].get(split, {}).get("metrics", {}).get(name, {}).get("value")

    return {"forget_quality": summary["forget_quality"]["value"], "model_utility": summary["model_utility"]["value"],
            "forget_prob": metric("forget", "prob"), "forget_rouge": metric("forget", "rouge"),
            "forget_truth_ratio": metric("forget", "truth_ratio"),
            "retain_prob": metric("retain_eval", "prob"), "retain_rouge": metric("retain_eval", "rouge")}


class TofuTask(Task):
    """Forget fictitious authors (TOFU, Maini et al., 2024): the generated world of ``task.world``."""

    name = "tofu"
    modality = "text"
    suites = ("tofu", "tofu-full")
    select_best = SELECT_BEST
    headline = (("forget_quality", "forget quality (↑)"), ("model_utility", "model utility (↑)"),
                ("forget_prob", "forget Prob (↓)"), ("forget_rouge", "forget ROUGE-L (↓)"))
    forget_key = ("forget_prob", False)
    curve = (("forget_quality", "forget quality"), ("model_utility", "model utility"),
             ("utility_ratio", "utility / target"), ("forget_prob", "forget Prob"), ("forget_rouge", "forget ROUGE"),
             ("retain_prob", "retain Prob"))
    curve_suite = "tofu"
    curve_plots = (("forget_quality", "forget quality (↑, log)", True), ("model_utility", "model utility (↑)", False))
    has_probes = True

    # ------------------------------------------------------------------ recipe time
    @classmethod
    def check_spec(cls, spec) -> None:
        if spec.path is not None:
            raise invalid("path", f"must not be set for task 'tofu' (its world is generated from {key_path('world')}); "
                                  "use name 'tofu_files' to read files")
        if spec.forget_split.strip() and spec.forget_split not in TOFU_FORGET_SPLITS:
            raise invalid("forget_split", f"must be one of {', '.join(TOFU_FORGET_SPLITS)} for task 'tofu', "
                                          f"got {spec.forget_split!r}" + suggest(spec.forget_split, TOFU_FORGET_SPLITS))
        cls._check_text_spec(spec)

    @classmethod
    def _check_text_spec(cls, spec) -> None:
        if not spec.forget_split.strip():
            raise invalid("forget_split", "is empty; name the forget set, e.g. forget10")
        if spec.retain_split is not None:
            if not spec.retain_split.strip():
                raise invalid("retain_split", "is empty; name the retain set (e.g. retain90) or write null")
            want = complement(spec.forget_split)
            if (spec.name == "tofu" or _PCT_SPLIT.match(spec.retain_split)) and want and spec.retain_split != want:
                raise invalid("retain_split", f"is {spec.retain_split!r} but {key_path('forget_split')} is "
                                              f"{spec.forget_split!r}: the retain set must be its complement, {want!r}")
        if spec.retain_model is not None:
            if not spec.retain_model.strip():
                raise invalid("retain_model", "is empty; name the retain model or write null")
            m = re.match(r"^zoo:.*/(retain\d+)$", spec.retain_model)
            want = complement(spec.forget_split)
            if m and want and m.group(1) != want:
                raise invalid("retain_model", f"is {spec.retain_model!r}, trained without the authors of "
                                              f"{complement(m.group(1))}, but {key_path('forget_split')} is "
                                              f"{spec.forget_split!r}; use {spec.retain_model[: m.start(1)] + want!r}")
        seen = set()
        for i, split in enumerate(spec.eval_splits):
            if split not in EVAL_SPLITS:
                raise invalid(f"eval_splits[{i}]", f"is {split!r}; allowed: {', '.join(EVAL_SPLITS)}" + suggest(split, EVAL_SPLITS))
            if split in seen:
                raise invalid(f"eval_splits[{i}]", f"repeats {split!r}")
            seen.add(split)
        try:
            spec.prompt_template.format(question="?")
        except (KeyError, IndexError, ValueError) as e:
            raise invalid("prompt_template", f"must be a format string using only {{question}}; "
                                             f"formatting it failed with {type(e).__name__}: {e}") from None
        if "{question}" not in spec.prompt_template:
            raise invalid("prompt_template", f"must contain {{question}}, got {spec.prompt_template!r}")

    @classmethod
    def check_recipe(cls, recipe) -> None:
        super().check_recipe(recipe)
        t, tr, ev = recipe.task, recipe.train, recipe.eval
        if ev.suite == "tofu-full" and "holdout" not in t.eval_splits:
            raise RecipeError("recipe key 'task.eval_splits' must include 'holdout' when eval.suite is 'tofu-full' "
                              "(MIA compares the forget set with the holdout set)")
        if tr.select_best in ("forget_quality", "fq_mu_mean"):
            if t.retain_model is None:
                raise RecipeError(f"recipe key 'train.select_best' is {tr.select_best!r}, which needs forget quality, "
                                  "but task.retain_model is null; name a retain model or choose model_utility/last")
            if "forget" not in t.eval_splits:
                raise RecipeError(f"recipe key 'train.select_best' is {tr.select_best!r}, which needs forget quality, "
                                  "but task.eval_splits lacks 'forget'")
        needs_mu = [k for k, on in (("train.select_best", tr.select_best in ("model_utility", "fq_mu_mean")),
                                    ("train.utility_floor", tr.utility_floor is not None)) if on]
        missing = [s for s in UTILITY_EVAL_SPLITS if s not in t.eval_splits]
        if needs_mu and missing:
            raise RecipeError(f"recipe key '{needs_mu[0]}' needs model utility, which is computed from "
                              f"{', '.join(UTILITY_EVAL_SPLITS)}, but task.eval_splits lacks {', '.join(missing)}")
        if "linear_probe" in ev.probes and t.retain_split is None:
            raise RecipeError("recipe key 'eval.probes' includes linear_probe, which trains on the retain authors, "
                              "but task.retain_split is null; name a retain split or remove linear_probe")
        if ev.attacks and "forget" not in t.eval_splits:
            raise RecipeError("recipe key 'eval.attacks' runs attacks over the forget split, but task.eval_splits "
                              "lacks 'forget'")

    @classmethod
    def utility_key(cls) -> str | None:
        return "model_utility"

    @classmethod
    def score(cls, point: dict[str, Any], criterion: str) -> float | None:
        fq, mu = point.get("forget_quality"), point.get("model_utility")
        if criterion == "fq_mu_mean":
            return None if fq is None or mu is None else (fq + mu) / 2
        return point.get(criterion)

    # ------------------------------------------------------------------ run time
    def __init__(self, recipe, progress: bool = True) -> None:
        super().__init__(recipe, progress)
        ev = recipe.eval
        self.ev = dict(batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens, suite=ev.suite,
                       cache_dir=eval_cache.default_cache_dir(), progress=progress)
        self.retain_adapter = None
        self.retain_res: dict[str, Any] | None = None
        self.te_splits: dict[str, list[dict]] | None = None
        self.te_retain: dict[str, Any] | None = None

    def load_data(self):
        t, n = self.recipe.task, self.recipe.eval.max_items
        world = WorldConfig(**vars(t.world)) if t.name == "tofu" else None
        data = load_tofu(name=t.name, world=world, path=t.path, forget_split=t.forget_split,
                         retain_split=t.retain_split, eval_splits=t.eval_splits, seed=self.recipe.seed)
        if n:
            data.eval_splits = {k: v[:n] for k, v in data.eval_splits.items()}
        return data

    def _adapter_kw(self) -> dict[str, Any]:
        t = self.recipe.task
        return dict(prompt_template=t.prompt_template, tokenization=t.tokenization)

    def load_model(self):
        return load_model(self.recipe.model.source, "text", dtype=self.recipe.model.dtype, **self._adapter_kw())

    def prepare(self, data, model) -> None:
        super().prepare(data, model)
        self.warnings += too_long(model, data)
        t = self.recipe.task
        if t.retain_model:
            self.retain_adapter = load_retain_model(self.recipe, model, **self._adapter_kw())
            self.retain_res = tofu_suite.evaluate(self.retain_adapter, data.eval_splits, label="retain model", **self.ev)

    def evaluate(self, model, label: str, *, cache: bool = True) -> dict[str, Any]:
        return tofu_suite.evaluate(model, self.data.eval_splits, label=label,
                                   **{**self.ev, "cache_dir": self.ev["cache_dir"] if cache else None})

    def references(self) -> dict[str, dict[str, Any]]:
        return {"retain": self.retain_res} if self.retain_res is not None else {}

    def summarize(self, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {}
        for name, res in results.items():
            s = tofu_suite.summarize(res, self.retain_res)
            res["summary"] = s
            forget = res["splits"].get("forget")
            out[name] = {"forget_quality": s["forget_quality"]["value"], "model_utility": s["model_utility"]["value"],
                         "forget_prob": forget["metrics"]["prob"]["value"] if forget else None,
                         "forget_rouge": forget["metrics"].get("rouge", {}).get("value") if forget else None}
        return out

    def summary_note(self) -> str | None:
        if self.retain_res is None:
            return "forget quality not computable: no retain model (task.retain_model is null)"
        return None

    # training-time evaluation ------------------------------------------------------------
    def train_eval_baseline(self, model) -> dict[str, Any]:
        n = self.recipe.train.eval_max_items
        self.te_splits = {k: (v[:n] if n else v) for k, v in self.data.eval_splits.items() if k != "holdout"}
        te_ev = {**self.ev, "suite": "tofu", "progress": False}
        self.te_retain = tofu_suite.evaluate(self.retain_adapter, self.te_splits, label="retain model (train-eval)",
                                             **te_ev) if self.retain_adapter is not None else None
        te_target = tofu_suite.evaluate(model, self.te_splits, label="target (train-eval)", **te_ev)
        return _point(te_target, tofu_suite.summarize(te_target, self.te_retain))

    def train_eval_point(self, model, label: str) -> dict[str, Any]:
        res = tofu_suite.evaluate(model, self.te_splits, label=label,
                                  **{**self.ev, "suite": "tofu", "cache_dir": None, "progress": False})
        return _point(res, tofu_suite.summarize(res, self.te_retain))

    def train_eval_items(self) -> dict[str, int]:
        return {k: len(v) for k, v in (self.te_splits or {}).items()}

    # attacks ----------------------------------------------------------------------------
    def run_attacks(self, model, original, label: str) -> dict[str, Any]:
        ev, splits = self.recipe.eval, self.data.eval_splits
        forget = splits.get("forget", [])
        retain = splits.get("retain_eval")
        if retain is None and self.data.retain is not None:
            retain = self.data.retain[: ev.max_items] if ev.max_items else self.data.retain
        return evaluate_attacks(model, forget, retain, list(ev.attacks), batch_size=ev.batch_size,
                                max_new_tokens=ev.max_new_tokens, seed=self.recipe.seed, progress=self.progress,
                                params={k: dict(v) for k, v in ev.attack_params.items()} or None)

    # the run's files ----------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        t = self.recipe.task
        return {"retain_model": {"source": t.retain_model, "fingerprint": self.retain_adapter.fingerprint()}
                if self.retain_adapter is not None else None,
                "data": self.data.fingerprints(), "tokenization": t.tokenization, "prompt_template": t.prompt_template}

    def describe(self) -> str:
        t = self.recipe.task
        return (f"`{t.name}` forget `{t.forget_split}`, retain `{t.retain_split}`, retain model `{t.retain_model}`; "
                f"tokenization `{t.tokenization}`")

    def headline_text(self, model_name: str, row: dict[str, Any]) -> str:
        fq, mu = row.get("forget_quality"), row.get("model_utility")
        fq_s = "not computable" if fq is None else f"{fq:.3g}"
        mu_s = "n/a" if mu is None else f"{mu:.4f}"
        return f"  {model_name:<10} forget quality {fq_s:>14}   model utility {mu_s}"

    def report_sections(self, run_dir: Path, metrics: dict[str, Any]) -> dict[str, list[str]]:
        return tofu_sections(run_dir, metrics, self.data.eval_splits.get("forget", []), self.recipe.eval.n_samples)


class TofuFilesTask(TofuTask):
    """TOFU-layout files (the released TOFU dataset, or data in its layout) under ``task.path``."""

    name = "tofu_files"

    @classmethod
    def check_spec(cls, spec) -> None:
        if not (spec.path or "").strip():
            raise invalid("path", "is required for task 'tofu_files': the directory holding the TOFU-layout files")
        cls._check_text_spec(spec)


__all__ = ["TofuTask", "TofuFilesTask", "EVAL_SPLITS", "UTILITY_EVAL_SPLITS", "TOFU_FORGET_SPLITS", "complement"]


def load_retain_model(recipe, model, **adapter_kw):
    """``task.retain_model`` as a text adapter; an error when its tokenizer is not the target's."""
    t = recipe.task
    retain = load_model(t.retain_model, "text", **adapter_kw)
    if retain.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise ValueError(f"task.retain_model {t.retain_model!r} uses a different tokenizer than model.source "
                         f"{recipe.model.source!r}; the retain model must share the target's tokenizer")
    return retain


def too_long(model, data) -> list[str]:
    """One line per split with items (question + answer, as the model tokenises them) longer
    than the model's context (``max_position_embeddings``). Nothing is truncated: such items are
    trained and evaluated whole, past the positions the model was trained on."""
    ctx = getattr(getattr(model.model, "config", None), "max_position_embeddings", None)
    if not ctx:
        return []
    splits = [("the forget set", data.forget), *([("the retain set", data.retain)] if data.retain else []),
              *((f"evaluation split {k!r}", v) for k, v in data.eval_splits.items())]
    out = []
    for name, items in splits:
        lengths = [len(model.encode(it["question"], it["answer"])[0]) for it in items
                   if isinstance(it.get("question"), str) and isinstance(it.get("answer"), str)]
        n = sum(n_tok > ctx for n_tok in lengths)
        if n:
            out.append(f"{name}: {n} of {len(items)} items are longer than the model's context of {ctx} "
                       f"tokens (longest {max(lengths)}); they are not truncated, but the model has never seen such "
                       "positions -- shorten them or use a model with a longer context")
    return out
