"""Recipes: one YAML file = one runnable unlearning experiment, as typed dataclasses.

A recipe names the model, the task (forget/retain/eval splits), the method (an objective and
what it trains), the training loop, the evaluation and the output directory. Loading is
strict: unknown keys, wrong types and impossible combinations are errors that name the key
(see :mod:`unlearn.config`). ``docs/recipes.md`` is the reference of every key.

    recipe = load_recipe("recipes/tofu_grad_diff.yaml", ["train.lr=1e-4"])
    objective_cls, config = resolve_method(recipe)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from unlearn.config import RecipeError, apply_overrides, from_dict, invalid, key_path, suggest, to_dict

__all__ = [
    "ATTACKS", "EVAL_SPLITS", "PROBES", "EvalSpec", "MethodSpec", "ModelSpec", "OutputSpec", "Recipe", "RecipeError",
    "SelectionSpec", "TaskSpec", "TrainSpec", "WorldSpec", "load_recipe", "resolve_method",
]

# Evaluation splits a task provides (TOFU's sets; ``retain_eval`` plays retain_perturbed's role).
EVAL_SPLITS = ("forget", "retain_eval", "real_authors", "world_facts", "holdout")
# Splits model utility is computed from (all three are needed).
UTILITY_EVAL_SPLITS = ("retain_eval", "real_authors", "world_facts")
# Attacks on the unlearned model (``unlearn.evaluators.attacks``), for ``eval.attacks``.
ATTACKS = ("paraphrase", "jailbreak_prefix", "jailbreak_roleplay", "jailbreak_reverse", "jailbreak_mc",
           "in_context", "relearn", "quantize_8bit", "quantize_4bit")
# Named attack sets, usable as one entry of ``eval.attacks`` (expanded in place); versioned:
# a set's content only changes with a new name.
ATTACK_SUITES = {"robustness": ATTACKS}  # robustness (v1): every attack with its default settings
# Attacks on an erased text-to-image model (``unlearn.evaluators.image_attacks``), task visual.
IMAGE_ATTACKS = ("embedding_inversion", "relearn", "quantize_8bit", "quantize_4bit")
# Probes run on the target and on the unlearned model (``unlearn.probes``), for ``eval.probes``.
PROBES = ("concept_vectors", "linear_probe", "causal_tracing", "expert_attribution")
SELECT_BEST = ("last", "forget_quality", "model_utility", "fq_mu_mean")
TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")
# The visual (image) task: forget / retain training sets and I2P-style evaluation splits.
VISUAL_FORGET_SPLITS = ("forget", "forget_explicit", "forget_implicit")
VISUAL_EVAL_SPLITS = ("forget_explicit", "forget_implicit", "retain")
# Named parameter groups of the image adapter, for selection ``group``.
IMAGE_PARAMETER_GROUPS = ("cross_attention_kv", "cross_attention", "non_cross_attention", "self_attention",
                          "time_embedding", "unet", "text_encoder")
_TEXT_DEFAULTS = {"forget_split": "forget10", "retain_split": "retain90", "retain_model": "zoo:tiny-llama/retain90",
                  "eval_splits": ["forget", "retain_eval", "real_authors", "world_facts"]}
_VISUAL_DEFAULTS = {"forget_split": "forget", "retain_split": "retain", "retain_model": None,
                    "eval_splits": list(VISUAL_EVAL_SPLITS)}

_ZOO = re.compile(r"^zoo:[^/\s]+/[^/\s]+$")
_PCT_SPLIT = re.compile(r"^(forget|retain)(\d+)$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, help: str) -> Any:
    return field(default=default, default_factory=factory, metadata={"help": help})


def _complement(split: str) -> str | None:
    """``forget10`` -> ``retain90`` (and back); ``None`` for names without a percentage."""
    m = _PCT_SPLIT.match(split)
    if not m:
        return None
    if int(m.group(2)) > 100:
        return None
    other = "retain" if m.group(1) == "forget" else "forget"
    return f"{other}{100 - int(m.group(2)):02d}"


def _positive(obj: Any, *names: str, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        if value <= 0:
            raise invalid(name, f"must be > 0, got {value}")


# -- sections ---------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """The model to unlearn: a zoo name, a local directory or a hub id."""

    source: str = _opt("zoo:tiny-llama/target", help="zoo:<family>/<name>, a local directory, or a hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = _opt("float32", help="weights dtype while training")
    threads: int = _opt(1, help="torch CPU threads")

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise invalid("source", "is empty; give zoo:<family>/<name>, a directory or a hub id")
        if self.source.startswith("zoo:") and not _ZOO.match(self.source):
            raise invalid("source", f"is {self.source!r}; a zoo name looks like zoo:<family>/<name>, e.g. zoo:tiny-llama/target")
        if self.threads < 1:
            raise invalid("threads", f"must be >= 1, got {self.threads}")


@dataclass
class WorldSpec:
    """Size and seed of the generated TOFU-style world (task ``tofu``); defaults are TOFU's sizes."""

    seed: int = _opt(0, help="seed of the world generator")
    n_authors: int = _opt(200, help="fictitious authors that are trained on (>= 100)")
    n_holdout: int = _opt(20, help="authors nobody trains on")
    n_perturbed: int = _opt(5, help="perturbed (wrong) answers per question (>= 3)")
    n_countries: int = _opt(30, help="fictional countries of the world_facts set (>= 8)")
    n_real_authors: int = _opt(100, help="famous authors of the real_authors set (>= 20)")

    def __post_init__(self) -> None:
        # Same bounds as tasks.tofu_world.WorldConfig, checked here so the error names the key.
        if self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}")
        if self.n_authors < 100:
            raise invalid("n_authors", f"must be >= 100 so that forget01 holds at least one author, got {self.n_authors}")
        if self.n_holdout < 0:
            raise invalid("n_holdout", f"must be >= 0, got {self.n_holdout}")
        if self.n_perturbed < 3:
            raise invalid("n_perturbed", f"must be >= 3, got {self.n_perturbed}")
        if self.n_countries < 8:
            raise invalid("n_countries", f"must be >= 8, got {self.n_countries}")
        if self.n_real_authors < 20:
            raise invalid("n_real_authors", f"must be >= 20, got {self.n_real_authors}")


@dataclass
class VisualSpec:
    """The generated I2P-style visual world (task ``visual``): seed and the concepts to erase."""

    seed: int = _opt(0, help="seed of every render, caption and prompt-table row")
    erase: list[str] = _opt(factory=lambda: ["colour:red"], help="concepts to erase, attribute:value each")
    guide: list[str] = _opt(factory=lambda: ["colour:blue"], help="one guide/anchor concept per erase concept "
                                                                   "(same attribute), what UCE/RECE map it to")
    prompts_per_combination: int = _opt(2, help="prompt-table rows per (shape, colour, texture) and kind")
    guidance: float = _opt(3.0, help="classifier-free guidance scale of every prompt-table row")

    def __post_init__(self) -> None:
        from unlearn.tasks.visual_world import ATTRIBUTES

        if self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}")
        for key in ("erase", "guide"):
            for i, c in enumerate(getattr(self, key)):
                att, _, val = str(c).partition(":")
                if att not in ATTRIBUTES or val not in ATTRIBUTES[att]:
                    known = [f"{a}:{v}" for a, vs in ATTRIBUTES.items() for v in vs]
                    raise invalid(f"{key}[{i}]", f"is {c!r}; a concept is attribute:value, one of {', '.join(known)}"
                                  + suggest(str(c), known))
        if not self.erase:
            raise invalid("erase", "is empty; name at least one concept, e.g. [colour:red]")
        if len(self.guide) != len(self.erase):
            raise invalid("guide", f"has {len(self.guide)} entries for {len(self.erase)} erase concepts; give one each")
        for e, g in zip(self.erase, self.guide):
            if e.split(":")[0] != g.split(":")[0] or e == g:
                raise invalid("guide", f"{g!r} for erase {e!r}: the guide must be another value of the same attribute")
        _positive(self, "prompts_per_combination", "guidance")

    def world_config(self):
        from unlearn.tasks.visual_world import VisualWorldConfig

        return VisualWorldConfig(seed=self.seed, erase=tuple(self.erase), guide=tuple(self.guide),
                                 prompts_per_combination=self.prompts_per_combination, guidance=self.guidance)


@dataclass
class TaskSpec:
    """What to forget, what to keep, what to evaluate on, and how items become text (or images)."""

    name: Literal["tofu", "tofu_files", "visual"] = _opt(
        "tofu", help="tofu: generated world; tofu_files: TOFU-layout files under path; visual: the I2P-style visual "
                     "world (text-to-image models; forget_split, retain_split, retain_model and eval_splits then "
                     "default to forget, retain, null and forget_explicit/forget_implicit/retain)")
    world: WorldSpec = _opt(factory=WorldSpec, help="the generated world (task tofu)")
    visual: VisualSpec = _opt(factory=VisualSpec, help="the generated visual world (task visual)")
    path: str | None = _opt(None, help="directory of TOFU-layout files (required for tofu_files, forbidden for tofu)")
    forget_split: str = _opt("forget10", help="the forget set")
    retain_split: str | None = _opt("retain90", help="the retain set; null for retain-free methods")
    retain_model: str | None = _opt("zoo:tiny-llama/retain90", help="model never trained on the forget set (forget quality); null to skip")
    eval_splits: list[str] = _opt(
        factory=lambda: ["forget", "retain_eval", "real_authors", "world_facts"], help="evaluation splits"
    )
    tokenization: Literal["split", "reference"] = _opt("split", help="split: prompt and answer tokenised apart; reference: open-unlearning's")
    prompt_template: str = _opt("Question: {question}\nAnswer:", help="prompt built from an item; must use {question}")

    def __post_init__(self) -> None:
        if self.name == "visual":
            self._check_visual()
            return
        if self.name == "tofu" and self.path is not None:
            raise invalid("path", f"must not be set for task 'tofu' (its world is generated from {key_path('world')}); "
                                  "use name 'tofu_files' to read files")
        if self.name == "tofu_files" and not (self.path or "").strip():
            raise invalid("path", "is required for task 'tofu_files': the directory holding the TOFU-layout files")
        if not self.forget_split.strip():
            raise invalid("forget_split", "is empty; name the forget set, e.g. forget10")
        if self.name == "tofu" and self.forget_split not in TOFU_FORGET_SPLITS:
            raise invalid("forget_split", f"must be one of {', '.join(TOFU_FORGET_SPLITS)} for task 'tofu', "
                                          f"got {self.forget_split!r}" + suggest(self.forget_split, TOFU_FORGET_SPLITS))
        if self.retain_split is not None:
            if not self.retain_split.strip():
                raise invalid("retain_split", "is empty; name the retain set (e.g. retain90) or write null")
            want = _complement(self.forget_split)
            if (self.name == "tofu" or _PCT_SPLIT.match(self.retain_split)) and want and self.retain_split != want:
                raise invalid("retain_split", f"is {self.retain_split!r} but {key_path('forget_split')} is "
                                              f"{self.forget_split!r}: the retain set must be its complement, {want!r}")
        if self.retain_model is not None:
            if not self.retain_model.strip():
                raise invalid("retain_model", "is empty; name the retain model or write null")
            m = re.match(r"^zoo:.*/(retain\d+)$", self.retain_model)
            want = _complement(self.forget_split)
            if m and want and m.group(1) != want:
                raise invalid("retain_model", f"is {self.retain_model!r}, trained without the authors of "
                                              f"{_complement(m.group(1))}, but {key_path('forget_split')} is "
                                              f"{self.forget_split!r}; use {self.retain_model[: m.start(1)] + want!r}")
        seen = set()
        for i, split in enumerate(self.eval_splits):
            if split not in EVAL_SPLITS:
                raise invalid(f"eval_splits[{i}]", f"is {split!r}; allowed: {', '.join(EVAL_SPLITS)}" + suggest(split, EVAL_SPLITS))
            if split in seen:
                raise invalid(f"eval_splits[{i}]", f"repeats {split!r}")
            seen.add(split)
        try:
            self.prompt_template.format(question="?")
        except (KeyError, IndexError, ValueError) as e:
            raise invalid("prompt_template", f"must be a format string using only {{question}}; "
                                             f"formatting it failed with {type(e).__name__}: {e}") from None
        if "{question}" not in self.prompt_template:
            raise invalid("prompt_template", f"must contain {{question}}, got {self.prompt_template!r}")

    def _check_visual(self) -> None:
        # the text defaults become the visual ones (a recipe for the visual task need not repeat them)
        for k, text_default in _TEXT_DEFAULTS.items():
            if getattr(self, k) == text_default:
                setattr(self, k, _VISUAL_DEFAULTS[k])
        if self.path is not None:
            raise invalid("path", "must not be set for task 'visual' (its world is generated from task.visual)")
        if self.forget_split not in VISUAL_FORGET_SPLITS:
            raise invalid("forget_split", f"must be one of {', '.join(VISUAL_FORGET_SPLITS)} for task 'visual', got "
                                          f"{self.forget_split!r}" + suggest(self.forget_split, VISUAL_FORGET_SPLITS))
        if self.retain_split not in (None, "retain"):
            raise invalid("retain_split", f"must be 'retain' or null for task 'visual', got {self.retain_split!r}")
        if self.retain_model is not None:
            raise invalid("retain_model", "must be null for task 'visual' (image metrics need no retain model)")
        if not self.eval_splits:
            raise invalid("eval_splits", f"is empty; use some of {', '.join(VISUAL_EVAL_SPLITS)}")
        for i, split in enumerate(self.eval_splits):
            if split not in VISUAL_EVAL_SPLITS:
                raise invalid(f"eval_splits[{i}]", f"is {split!r}; allowed for task 'visual': "
                                                   f"{', '.join(VISUAL_EVAL_SPLITS)}" + suggest(split, VISUAL_EVAL_SPLITS))
        if len(set(self.eval_splits)) != len(self.eval_splits):
            raise invalid("eval_splits", f"repeats a split: {self.eval_splits}")


@dataclass
class _LoraParams:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        _positive(self, "r", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise invalid("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise invalid("target_modules", "is empty; name modules (e.g. [q_proj, v_proj]) or leave it out")


@dataclass
class _RegexParams:
    pattern: str

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise invalid("pattern", f"is not a valid regular expression ({e}): {self.pattern!r}") from None


@dataclass
class _ColumnsParams:
    columns: dict[str, list[int]] | None = None


@dataclass
class _NoParams:
    pass


@dataclass
class _GroupParams:
    group: Literal[IMAGE_PARAMETER_GROUPS] = "cross_attention"  # type: ignore[valid-type]


@dataclass
class _UOEParams:
    layer: int | None = None
    expert: int | None = None

    def __post_init__(self) -> None:
        if (self.layer is None) != (self.expert is None):
            raise ValueError("give both layer and expert, or neither (the objective picks them, e.g. method uoe)")
        if (self.layer is not None and self.layer < 0) or (self.expert is not None and self.expert < 0):
            raise ValueError(f"layer and expert must be >= 0, got layer={self.layer}, expert={self.expert}")


_SELECTION_PARAMS: dict[str, type] = {"full": _NoParams, "lora": _LoraParams, "regex": _RegexParams,
                                      "columns": _ColumnsParams, "uoe": _UOEParams, "group": _GroupParams}


@dataclass
class SelectionSpec:
    """Which parameters are trained. Params by name -- full: none; lora: r, alpha, dropout,
    target_modules; regex: pattern (required; parameters whose name matches are trained); columns:
    columns ({parameter name: [column indices]}; left out: the objective chooses, e.g. needle); uoe: layer,
    expert (one MoE expert's FFN + that layer's router; left out: the objective chooses, e.g. uoe); group: group
    (a named parameter group of the image adapter: cross_attention_kv, cross_attention, non_cross_attention,
    self_attention, time_embedding, unet, text_encoder)."""

    name: Literal["full", "lora", "regex", "columns", "uoe", "group"] = _opt(
        "full", help="full, lora, regex, columns, uoe or group")
    params: dict[str, Any] = _opt(factory=dict, help="parameters of the selection")

    def __post_init__(self) -> None:
        params_cls = _SELECTION_PARAMS.get(self.name)
        if params_cls is None:
            raise invalid("name", f"must be one of {', '.join(map(repr, _SELECTION_PARAMS))}, got {self.name!r}")
        if params_cls is _NoParams and self.params:
            raise invalid("params", f"must be empty for selection {self.name!r}, got keys: {', '.join(map(str, self.params))}")
        typed = from_dict(params_cls, self.params, key_path("params"))
        # Keep only the keys the recipe gave, with normalised values ("1e-3" -> 0.001).
        self.params = {k: v for k, v in to_dict(typed).items() if k in self.params}


@dataclass
class MethodSpec:
    """The unlearning objective (``name`` in the objective registry, ``params`` its Config) and
    the parameters it trains."""

    name: str = _opt("grad_diff", help="objective name, see unlearn.objectives")
    params: dict[str, Any] = _opt(factory=dict, help="fields of the objective's Config dataclass")
    selection: SelectionSpec = _opt(factory=SelectionSpec, help="which parameters are trained")

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise invalid("name", "is empty; name an objective, e.g. grad_diff")


@dataclass
class TrainSpec:
    """The optimisation loop."""

    epochs: int = _opt(5, help="passes over the forget set")
    max_steps: int | None = _opt(None, help="stop after this many optimizer steps (overrides epochs)")
    lr: float = _opt(1e-3, help="peak learning rate")
    batch_size: int = _opt(16, help="forget items per step (and retain items, when used)")
    grad_accum: int = _opt(1, help="micro-batches per optimizer step")
    optimizer: Literal["adamw", "sgd"] = _opt("adamw", help="adamw or sgd")
    weight_decay: float = _opt(0.0, help="decoupled weight decay (adamw) / L2 (sgd)")
    scheduler: Literal["constant", "linear", "cosine"] = _opt("constant", help="learning-rate schedule after warm-up")
    warmup_ratio: float = _opt(0.0, help="fraction of steps of linear warm-up, in [0, 1)")
    max_grad_norm: float | None = _opt(1.0, help="gradient clipping norm; null disables")
    save_checkpoint: bool = _opt(True, help="save the unlearned weights in the run directory")
    eval_every: int | None = _opt(None, help="evaluate (tofu suite, eval_max_items items per split) every N optimizer steps "
                                             "during training; null: not by steps")
    eval_every_epoch: bool = _opt(False, help="evaluate during training at the end of every epoch")
    select_best: Literal["last", "forget_quality", "model_utility", "fq_mu_mean"] = _opt(
        "last", help="which evaluated training state to keep: last, or the best by forget quality, model utility "
                     "or their mean (needs eval_every or eval_every_epoch)")
    utility_floor: float | None = _opt(None, help="stop training early when model utility falls below this fraction "
                                                  "of the target's, in (0, 1]; null: never")
    eval_max_items: int | None = _opt(100, help="items per split for the evaluations during training; null: all")

    @property
    def evaluates_during_training(self) -> bool:
        return self.eval_every is not None or self.eval_every_epoch

    def __post_init__(self) -> None:
        _positive(self, "epochs", "lr", "batch_size", "grad_accum")
        _positive(self, "max_steps", "max_grad_norm", "eval_every", "eval_max_items", allow_none=True)
        if self.select_best != "last" and not self.evaluates_during_training:
            raise invalid("select_best", f"is {self.select_best!r}, which needs evaluations during training: "
                                         f"set {key_path('eval_every')} or {key_path('eval_every_epoch')}")
        if self.utility_floor is not None:
            if not 0.0 < self.utility_floor <= 1.0:
                raise invalid("utility_floor", f"must be in (0, 1] (a fraction of the target's model utility), "
                                               f"got {self.utility_floor}")
            if not self.evaluates_during_training:
                raise invalid("utility_floor", f"needs evaluations during training: set {key_path('eval_every')} "
                                               f"or {key_path('eval_every_epoch')}")
        if self.weight_decay < 0:
            raise invalid("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise invalid("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class EvalSpec:
    """The evaluation suite run after unlearning."""

    suite: Literal["tofu", "tofu-full", "i2p"] = _opt(
        "tofu", help="metric suite: tofu, or tofu-full (tofu + MIA/privleak; needs the holdout split); i2p for task "
                     "visual (erasure rate, retain accuracy, FID-like, alignment; the default there)")
    judge: str = _opt("zoo:tiny-t2i/judge", help="task visual: the image judge (zoo name or directory of an ImageJudge)")
    sample_steps: int = _opt(20, help="task visual: DDIM steps per generated image")
    batch_size: int = _opt(32, help="evaluation batch size")
    max_new_tokens: int = _opt(48, help="greedy generation length (ROUGE)")
    compare_target: bool = _opt(True, help="also evaluate the model before unlearning, for before/after tables")
    n_samples: int = _opt(5, help="generations shown per split in the report")
    max_items: int | None = _opt(None, help="evaluate only the first N items of each split (smoke runs); null: all")
    attacks: list[str] = _opt(factory=list, help="attacks run on the unlearned model (and the target) over the forget "
                                                 "split; 'robustness' stands for all of them")
    attack_params: dict[str, dict[str, Any]] = _opt(factory=dict, help="settings per attack, by attack name")
    probes: list[str] = _opt(factory=list, help="probes run on the target before unlearning and on the unlearned model")
    probe_params: dict[str, dict[str, Any]] = _opt(factory=dict, help="settings per probe, by probe name")

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "max_new_tokens", "sample_steps")
        _positive(self, "max_items", allow_none=True)
        if not self.judge.strip():
            raise invalid("judge", "is empty; give zoo:tiny-t2i/judge or a directory holding judge.json")
        if self.n_samples < 0:
            raise invalid("n_samples", f"must be >= 0, got {self.n_samples}")
        expanded: list[str] = []
        for name in self.attacks:
            expanded += list(ATTACK_SUITES[name]) if name in ATTACK_SUITES else [name]
        self.attacks = expanded
        _check_named_list(self.attacks, self.attack_params, "attacks", "attack",
                          tuple(dict.fromkeys(ATTACKS + IMAGE_ATTACKS)), ATTACK_SUITES)
        _check_named_list(self.probes, self.probe_params, "probes", "probe", PROBES)


def _check_named_list(names: list[str], params: dict, key: str, kind: str, known: tuple[str, ...],
                      sets: dict | None = None) -> None:
    """Check ``eval.<key>`` (known names, no repeats) and ``eval.<key minus s>_params`` (only names
    listed in ``eval.<key>``); ``sets`` are named groups already expanded in ``names``."""
    sets = sets or {}
    choices = [*known, *sets]
    what = f"a known {kind}" + (f" or {kind} set" if sets else "")
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name not in known:
            raise invalid(f"{key}[{i}]", f"is {name!r}, not {what}; allowed: {', '.join(choices)}"
                          + suggest(name, choices))
        if name in seen:
            raise invalid(f"{key}[{i}]", f"repeats {name!r}")
        seen.add(name)
    for name in params:
        if name not in known:
            raise invalid(f"{kind}_params.{name}", f"is not a known {kind}; allowed: {', '.join(known)}"
                          + suggest(name, known))
        if name not in seen:
            raise invalid(f"{kind}_params.{name}", f"sets parameters of {name!r}, which is not in "
                                                   f"{key_path(key)}; add it there or remove these parameters")


@dataclass
class OutputSpec:
    """Where the run directory goes."""

    dir: str | None = _opt(None, help="run directory; null: runs/<name>")
    overwrite: bool = _opt(False, help="replace a finished run in dir (otherwise an error)")

    def __post_init__(self) -> None:
        if self.dir is not None and not self.dir.strip():
            raise invalid("dir", "is empty; give a directory or write null for runs/<name>")


@dataclass
class Recipe:
    """One runnable experiment."""

    name: str = _opt(help="run name (letters, digits, . _ -); the default output is runs/<name>")
    seed: int = _opt(0, help="seed of training (data order, initialisations)")
    model: ModelSpec = _opt(factory=ModelSpec, help="the model to unlearn")
    task: TaskSpec = _opt(factory=TaskSpec, help="data")
    method: MethodSpec = _opt(factory=MethodSpec, help="objective and trained parameters")
    train: TrainSpec = _opt(factory=TrainSpec, help="optimisation")
    eval: EvalSpec = _opt(factory=EvalSpec, help="evaluation")
    output: OutputSpec = _opt(factory=OutputSpec, help="run directory")
    description: str = _opt("", help="free text, copied into the report")

    def __post_init__(self) -> None:
        if not _RUN_NAME.match(self.name):
            raise invalid("name", f"is {self.name!r}; use letters, digits, '.', '_' or '-' (it names the run directory)")
        if self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}")
        if self.task.name == "visual":
            self._check_visual()
        elif self.eval.suite == "i2p":
            raise RecipeError(f"recipe key 'eval.suite' is 'i2p', an image suite, but task.name is "
                              f"{self.task.name!r}; use tofu or tofu-full, or task.name visual")
        if self.eval.suite == "tofu-full" and "holdout" not in self.task.eval_splits:
            raise RecipeError("recipe key 'task.eval_splits' must include 'holdout' when eval.suite is 'tofu-full' "
                              "(MIA compares the forget set with the holdout set)")
        tr = self.train
        if tr.select_best in ("forget_quality", "fq_mu_mean"):
            if self.task.retain_model is None:
                raise RecipeError(f"recipe key 'train.select_best' is {tr.select_best!r}, which needs forget quality, "
                                  "but task.retain_model is null; name a retain model or choose model_utility/last")
            if "forget" not in self.task.eval_splits:
                raise RecipeError(f"recipe key 'train.select_best' is {tr.select_best!r}, which needs forget quality, "
                                  "but task.eval_splits lacks 'forget'")
        needs_mu = [k for k, on in (("train.select_best", tr.select_best in ("model_utility", "fq_mu_mean")),
                                    ("train.utility_floor", tr.utility_floor is not None)) if on]
        missing = [s for s in UTILITY_EVAL_SPLITS if s not in self.task.eval_splits]
        if needs_mu and missing:
            raise RecipeError(f"recipe key '{needs_mu[0]}' needs model utility, which is computed from "
                              f"{', '.join(UTILITY_EVAL_SPLITS)}, but task.eval_splits lacks {', '.join(missing)}")
        if "linear_probe" in self.eval.probes and self.task.retain_split is None:
            raise RecipeError("recipe key 'eval.probes' includes linear_probe, which trains on the retain authors, "
                              "but task.retain_split is null; name a retain split or remove linear_probe")
        text_attacks = self.eval.attacks if self.task.name != "visual" else []
        for i, name in enumerate(text_attacks):
            if name not in ATTACKS:
                raise RecipeError(f"recipe key 'eval.attacks[{i}]' is {name!r}, an attack on text-to-image models, but "
                                  f"task.name is {self.task.name!r}; text attacks: {', '.join(ATTACKS)}")
        if text_attacks and "forget" not in self.task.eval_splits:
            raise RecipeError("recipe key 'eval.attacks' runs attacks over the forget split, but task.eval_splits "
                              "lacks 'forget'")

    def _check_visual(self) -> None:
        if self.eval.suite == "tofu":  # the default suite of the text tasks
            self.eval.suite = "i2p"
        if self.eval.suite != "i2p":
            raise RecipeError(f"recipe key 'eval.suite' is {self.eval.suite!r}, a text suite, but task.name is 'visual'; "
                              "use i2p")
        if self.model.source == "zoo:tiny-llama/target":  # the text default
            self.model.source = "zoo:tiny-t2i/target"
        if self.eval.probes:
            raise RecipeError("recipe key 'eval.probes' is set, but task 'visual' has no probes yet; remove it")
        for i, name in enumerate(self.eval.attacks):
            if name not in IMAGE_ATTACKS:
                raise RecipeError(f"recipe key 'eval.attacks[{i}]' is {name!r}, a text attack, but task.name is "
                                  f"'visual'; image attacks: {', '.join(IMAGE_ATTACKS)}")
        if self.eval.attacks and not any(s in self.task.eval_splits for s in ("forget_explicit", "forget_implicit")):
            raise RecipeError("recipe key 'eval.attacks' scores the forget splits, but task.eval_splits has neither "
                              "forget_explicit nor forget_implicit")
        if self.train.evaluates_during_training:
            raise RecipeError("recipe keys 'train.eval_every' / 'train.eval_every_epoch' are for the text tasks; task "
                              "'visual' evaluates after unlearning only: remove them")
        if self.method.params.get("retain_loss") == "kl":
            raise RecipeError("recipe key 'method.params.retain_loss' is 'kl', which needs token logits; task 'visual' "
                              "supports retain_loss nll")

    @property
    def output_dir(self) -> Path:
        """``output.dir``, or ``runs/<name>`` when it is null."""
        return Path(self.output.dir) if self.output.dir is not None else Path("runs") / self.name

    def to_dict(self) -> dict:
        """The recipe as plain data (what a run records); ``load_recipe`` of it gives an equal recipe."""
        return to_dict(self)


# -- loading ----------------------------------------------------------------------------------
def _objectives():
    """The objective registry (imported lazily; tests replace this function)."""
    from unlearn.objectives import OBJECTIVES

    return OBJECTIVES


def _editors():
    """The editor registry (imported lazily)."""
    from unlearn.editors import EDITORS

    return EDITORS


def resolve_method(recipe: Recipe) -> tuple[type, Any]:
    """Look up ``method.name`` (an objective or an editor) and build its Config from ``method.params``.

    Returns:
        ``(method_cls, config)``; ``method_cls(config)`` is the objective to train with, or an
        :class:`~unlearn.editors.base.Editor` (ULD, ECO, ...) that returns the model to evaluate.

    Raises:
        RecipeError: unknown method (with the allowed names and a "did you mean"), a bad
            ``method.params`` key or value, a method that needs a retain set while
            ``task.retain_split`` is null, or a ``method.selection`` given to an editor.
    """
    registry, editors = _objectives(), _editors()
    name = recipe.method.name
    modality = "image" if recipe.task.name == "visual" else "text"
    if name in registry:
        method_cls = registry.get(name)
    elif name in editors:
        method_cls = editors.get(name)
        if recipe.method.selection.name != "full" or recipe.method.selection.params:
            raise RecipeError(f"recipe key 'method.selection' is set, but {name!r} (method.name) is an editor that "
                              "chooses what it changes itself (see its method.params); remove method.selection")
    else:
        names = sorted(registry.names() + editors.names())
        raise RecipeError(f"recipe key 'method.name' is {name!r}, which is not a known objective or editor; "
                          f"allowed: {', '.join(names)}" + suggest(name, names))
    supported = getattr(method_cls, "modalities", None) or (getattr(method_cls, "modality", "text"),)
    if modality not in supported:
        fits = sorted(n for reg in (registry, editors) for n in reg.names()
                      if modality in (getattr(reg.get(n), "modalities", None) or (getattr(reg.get(n), "modality", "text"),)))
        raise RecipeError(f"recipe key 'method.name' is {name!r}, a method for {'/'.join(supported)} models, but task "
                          f"{recipe.task.name!r} is a {modality} task; methods for it: {', '.join(fits)}")
    config = from_dict(method_cls.Config, recipe.method.params, "method.params")
    sel = recipe.method.selection
    if sel.name == "group" and modality != "image":
        raise RecipeError("recipe key 'method.selection.name' is 'group', which selects image-adapter parameter groups; "
                          "use regex for text models")
    if sel.name == "columns" and not sel.params.get("columns") and not hasattr(method_cls, "parameter_columns"):
        raise RecipeError(f"recipe key 'method.selection.params.columns' is required: method {name!r} does not choose "
                          "columns itself (needle does); give {parameter name: [column indices]}")
    if sel.name == "uoe" and sel.params.get("layer") is None and not hasattr(method_cls, "expert_target"):
        raise RecipeError(f"recipe key 'method.selection.params.layer' and '.expert' are required: method {name!r} "
                          "does not pick an expert itself (uoe does); give layer and expert")
    if recipe.task.retain_split is None and method_cls(config).needs_retain():
        raise RecipeError(f"recipe key 'task.retain_split' is null, but method {name!r} (method.name) with "
                          "these method.params uses a retain set; name a retain split (e.g. retain90) "
                          "or choose a retain-free method")
    return method_cls, config


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist" if not path.exists() else f"recipe path '{path}' is not a file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"recipe file '{path}' is not valid YAML: {problem}{where}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe file '{path}' is not UTF-8 text ({e.reason})") from None


def load_recipe(src: str | Path | dict | Recipe, overrides: Iterable[str] = ()) -> Recipe:
    """Load, override, validate.

    Args:
        src: a YAML file path, an already parsed mapping (not modified), or a Recipe
            (re-validated, e.g. to apply overrides to it).
        overrides: ``--set`` items, ``dotted.key=value`` (value parsed as YAML), applied before
            validation, so an override of an unknown key is an unknown-key error.

    Returns:
        The validated :class:`Recipe`; ``method.name`` and ``method.params`` were checked
        against the objective registry (see :func:`resolve_method`).

    Raises:
        RecipeError: anything wrong, in one line naming the key (or the file).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(src, Recipe):
        data = to_dict(src)
        where = "recipe"
    elif isinstance(src, (str, Path)):
        data = _read_yaml(Path(src))
        where = f"recipe file '{src}'"
    else:
        data = src
        where = "recipe"
    if not isinstance(data, dict):
        got = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(f"{where} must be a mapping of sections (name, model, task, method, ...), but it is {got}")
    recipe = from_dict(Recipe, apply_overrides(data, list(overrides)), "")
    resolve_method(recipe)
    return recipe
