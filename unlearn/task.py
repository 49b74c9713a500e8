"""The ``Task`` contract: what a benchmark brings to the one run loop.

A task knows its data, its metrics and how to read them; the run loop
(:func:`unlearn.runner.run`) knows the order of the steps and nothing about TOFU, images or
any other benchmark. Adding a benchmark is one ``Task`` subclass (plus its data and suite),
registered in :data:`unlearn.tasks.registry.TASKS` -- no change to the run loop, the report
writer, the CLI or the recipe checks. See ``docs/architecture.md``.

A task is used in two phases:

* **recipe time** (class methods, no model loaded): :meth:`Task.check_spec` checks the
  ``task`` section and :meth:`Task.check_recipe` the keys that depend on the task
  (``eval.suite``, ``train.select_best``, ``eval.attacks``, ...). Both raise
  :class:`~unlearn.config.RecipeError` naming the key.
* **run time** (an instance per run, ``Task(recipe, progress)``): the run loop calls, in order,
  :meth:`load_data`, :meth:`load_model`, :meth:`prepare`, then :meth:`evaluate` on the target
  and on the unlearned model, :meth:`observe` on each (e.g. an image grid), the training-time
  hooks (:meth:`train_eval_baseline`, :meth:`train_eval_point`) when ``train.eval_every`` is
  set, :meth:`run_attacks`, and finally :meth:`summarize`, :meth:`provenance` and
  :meth:`report_sections` for the run's files.

Result dicts are the harness's (:func:`unlearn.evaluators.harness.evaluate`): ``{"splits":
{name: {"metrics": {metric: {"value", "higher_is_better", ...}}}}, ...}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar

from unlearn.config import RecipeError
from unlearn.data import UnlearningData

# Base defaults of the ``task`` section (the TOFU task's); a task whose own defaults differ lists
# them in ``spec_defaults`` and they replace these when the recipe left the key at its default.
TEXT_SPEC_DEFAULTS: dict[str, Any] = {
    "forget_split": "forget10", "retain_split": "retain90", "retain_model": "zoo:tiny-llama/retain90",
    "eval_splits": ["forget", "retain_eval", "real_authors", "world_facts"]}
# Likewise for keys outside the ``task`` section (dotted paths).
BASE_RECIPE_DEFAULTS: dict[str, Any] = {"eval.suite": "tofu", "model.source": "zoo:tiny-llama/target"}

# The dotted keys a recipe mapping gave explicitly, while ``load_recipe`` builds it (None otherwise).
GIVEN_KEYS: ContextVar[frozenset[str] | None] = ContextVar("GIVEN_KEYS", default=None)


def _defaulted(key: str, value: Any, text_default: Any) -> bool:
    given = GIVEN_KEYS.get()
    return key not in given if given is not None else value == text_default


class Task(ABC):
    """A benchmark as the run loop sees it.

    Class attributes:
        name: registry name (``task.name`` in recipes).
        modality: ``"text"`` or ``"image"``: which methods, attacks and adapters fit.
        suites: the ``eval.suite`` values the task evaluates with; ``suites[0]`` is its default.
        select_best: the ``train.select_best`` criteria it can score (``"last"`` is always allowed).
        headline: ``(summary key, column label)`` pairs: the numbers the CLI prints and the
            report's headline table shows, per model (``target``, ``unlearned``, ``retain``).
        forget_key: ``(headline key, higher means more forgotten)``: the one number that says
            how much was forgotten (what tests and comparisons move in the right direction).
        curve: ``(point key, column label)`` pairs of the training-time evaluation table.
        curve_suite: the suite the training-time evaluation runs.
        curve_plots: ``(point key, panel title, log scale)`` of the training-time evaluation plot.
        spec_defaults / recipe_defaults: defaults that differ from the TOFU task's (see
            :data:`TEXT_SPEC_DEFAULTS`, :data:`BASE_RECIPE_DEFAULTS`).
        has_probes: whether ``eval.probes`` applies.
        suite_versions: ``{suite name: version}`` of the suites in :attr:`suites` that the task
            builds itself rather than taking from :data:`unlearn.evaluators.suites.SUITES`
            (e.g. the visual task's ``i2p``, which needs the judge); ``unlearn list suites``
            shows them.
    """

    name: ClassVar[str] = ""
    modality: ClassVar[str] = "text"
    suites: ClassVar[tuple[str, ...]] = ()
    select_best: ClassVar[tuple[str, ...]] = ("last",)
    headline: ClassVar[tuple[tuple[str, str], ...]] = ()
    forget_key: ClassVar[tuple[str, bool]] = ("", True)
    curve: ClassVar[tuple[tuple[str, str], ...]] = ()
    curve_suite: ClassVar[str] = ""
    curve_plots: ClassVar[tuple[tuple[str, str, bool], ...]] = ()
    spec_defaults: ClassVar[dict[str, Any]] = {}
    recipe_defaults: ClassVar[dict[str, Any]] = {}
    has_probes: ClassVar[bool] = False
    suite_versions: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------ recipe time
    @classmethod
    def apply_spec_defaults(cls, spec) -> None:
        """Replace the TOFU defaults of the ``task`` section by this task's (``spec_defaults``):
        every key the recipe did not give (when loaded from a mapping or file by
        ``load_recipe``), or -- a section built in Python -- every key still at the TOFU default."""
        for key, value in cls.spec_defaults.items():
            if _defaulted(f"task.{key}", getattr(spec, key), TEXT_SPEC_DEFAULTS.get(key)):
                setattr(spec, key, value)

    @classmethod
    def apply_recipe_defaults(cls, recipe) -> None:
        """Replace defaults outside the ``task`` section (``recipe_defaults``, dotted keys), as
        :meth:`apply_spec_defaults` does: a key the recipe gave is kept, even when it equals the
        TOFU default."""
        for key, value in cls.recipe_defaults.items():
            section, attr = key.split(".")
            obj = getattr(recipe, section)
            if _defaulted(key, getattr(obj, attr), BASE_RECIPE_DEFAULTS.get(key)):
                setattr(obj, attr, value)

    @classmethod
    def check_spec(cls, spec) -> None:
        """Check the ``task`` section (a :class:`~unlearn.recipe.TaskSpec`); raise
        :func:`unlearn.config.invalid` errors naming the key. Default: nothing to check."""

    @classmethod
    def check_recipe(cls, recipe) -> None:
        """Check the keys whose meaning depends on the task. The base checks ``eval.suite``,
        ``train.select_best``, ``eval.probes`` and ``train.utility_floor``; subclasses add theirs
        and call ``super().check_recipe(recipe)``."""
        ev, tr = recipe.eval, recipe.train
        if ev.suite not in cls.suites:
            raise RecipeError(f"recipe key 'eval.suite' is {ev.suite!r}, but task {cls.name!r} evaluates with "
                              f"{', '.join(cls.suites)}")
        allowed = ("last", *cls.select_best)
        if tr.select_best not in allowed:
            raise RecipeError(f"recipe key 'train.select_best' is {tr.select_best!r}; allowed for task {cls.name!r}: "
                              f"{', '.join(allowed)}")
        if ev.probes and not cls.has_probes:
            raise RecipeError(f"recipe key 'eval.probes' is set, but task {cls.name!r} has no probes; remove it")
        if tr.utility_floor is not None and cls.utility_key() is None:
            raise RecipeError(f"recipe key 'train.utility_floor' is set, but task {cls.name!r} has no utility number "
                              "to compare with the target's; remove it")

    @classmethod
    def utility_key(cls) -> str | None:
        """The training-curve key that ``train.utility_floor`` compares with the target's."""
        return None

    # ------------------------------------------------------------------ run time
    def __init__(self, recipe, progress: bool = True) -> None:
        self.recipe = recipe
        self.progress = progress
        self.data: UnlearningData | None = None
        self.warnings: list[str] = []  # filled by prepare

    @abstractmethod
    def load_data(self) -> UnlearningData:
        """The forget / retain sets and the evaluation splits (already cut to ``eval.max_items``)."""

    @abstractmethod
    def load_model(self):
        """The model to unlearn, as an adapter of :attr:`modality` (``model.source``)."""

    def prepare(self, data: UnlearningData, model) -> None:
        """Load what evaluation needs besides the model (reference models, judges, suites) and
        evaluate the reference models. Called once, before the target is evaluated.

        Fills ``self.warnings`` (the runner prints them and keeps them in the provenance): the
        data's own (:meth:`UnlearningData.warnings`) plus what a subclass adds."""
        self.data = data
        self.warnings: list[str] = list(data.warnings())

    @abstractmethod
    def evaluate(self, model, label: str, *, cache: bool = True) -> dict[str, Any]:
        """The full evaluation of ``model`` on the evaluation splits (harness result).
        ``cache``: results may be read from / written to the evaluation cache."""

    def references(self) -> dict[str, dict[str, Any]]:
        """Results of reference models to show next to target and unlearned (e.g. ``retain``)."""
        return {}

    @abstractmethod
    def summarize(self, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``{model name: {headline key: value}}`` from the results of every evaluated model
        (the task may add aggregates to each result under ``"summary"``)."""

    @classmethod
    def forgetting(cls, row: dict[str, Any]) -> float | None:
        """The ``forget_key`` number of a summary row, signed so that higher = more forgotten."""
        key, higher = cls.forget_key
        v = row.get(key)
        return None if v is None else (v if higher else -v)

    def summary_note(self) -> str | None:
        """A sentence for ``summary["note"]`` (e.g. why a number is not computable)."""
        return None

    def observe(self, model, label: str) -> None:
        """Record what the report shows besides metrics (e.g. an image grid); ``label`` is
        ``"target"`` or ``"unlearned"``."""

    # training-time evaluation ------------------------------------------------------------
    def train_eval_baseline(self, model) -> dict[str, Any]:
        """Prepare the small evaluation during training and return the target's curve point."""
        raise RecipeError(f"task {self.name!r} does not evaluate during training; remove train.eval_every / "
                          "train.eval_every_epoch")

    def train_eval_point(self, model, label: str) -> dict[str, Any]:
        """Evaluate ``model`` on the small splits; the curve point (keys of :attr:`curve` and of
        the :attr:`select_best` criteria)."""
        raise NotImplementedError

    def train_eval_items(self) -> dict[str, int]:
        """Items per split of the training-time evaluation (recorded)."""
        return {}

    @classmethod
    def score(cls, point: dict[str, Any], criterion: str) -> float | None:
        """The value of ``criterion`` (one of :attr:`select_best`) at a curve point; higher is better."""
        return point.get(criterion)

    # attacks ----------------------------------------------------------------------------
    def run_attacks(self, model, original, label: str) -> dict[str, Any]:
        """Run ``eval.attacks`` against ``model`` (``original``: the model before unlearning);
        ``{attack name: result}``. Never modifies ``model``."""
        return {}

    # the run's files ----------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        """Task-specific provenance (reference models, judges, data fingerprints)."""
        return {"data": self.data.fingerprints() if self.data is not None else None}

    def describe(self) -> str:
        """One line for the report's header: what is forgotten, kept and evaluated."""
        t = self.recipe.task
        return f"`{t.name}` forget `{t.forget_split}`, retain `{t.retain_split}`"

    def headline_text(self, model_name: str, row: dict[str, Any]) -> str:
        """One line of the CLI's summary for one model."""
        cells = []
        for key, label in self.headline:
            v = row.get(key)
            cells.append(f"{label.split(' (')[0]} {'n/a' if v is None else f'{v:.4g}'}")
        return f"  {model_name:<10} " + "   ".join(cells)

    def report_sections(self, run_dir: Path, metrics: dict[str, Any]) -> dict[str, list[str]]:
        """Markdown of the task's own report sections by slot: ``"headline"`` (under the
        headline table), ``"results"`` (after the per-split tables), ``"attacks"`` (the attack
        tables), ``"end"`` (before the training-loss plot), ``"samples"`` (last)."""
        return {}


__all__ = ["Task", "TEXT_SPEC_DEFAULTS", "BASE_RECIPE_DEFAULTS"]
