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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from unlearn.config import RecipeError, apply_overrides, from_dict, invalid, key_path, suggest, to_dict
from unlearn.editors import EDITORS
from unlearn.evaluators.attacks import ATTACK_SETS, attack_names
from unlearn.evaluators.attacks import ATTACKS as ATTACK_REGISTRY
from unlearn.objectives import OBJECTIVES
from unlearn.probes import PROBES as PROBE_REGISTRY
from unlearn.task import GIVEN_KEYS, TEXT_SPEC_DEFAULTS
from unlearn.tasks.registry import TASKS
from unlearn.tasks.tofu_task import EVAL_SPLITS
from unlearn.tasks.tofu_world import WORLD_BOUND_WHY, WORLD_BOUNDS
from unlearn.tasks.visual_world import ATTRIBUTES, VisualWorldConfig

__all__ = [
    "ATTACKS", "EVAL_SPLITS", "PROBES", "EvalSpec", "MethodSpec", "ModelSpec", "OutputSpec", "Recipe", "RecipeError",
    "SelectionSpec", "TaskSpec", "TrainSpec", "WorldSpec", "load_recipe", "resolve_method",
]

# Probes run on the target and on the unlearned model (``unlearn.probes``), for ``eval.probes``.
PROBES = tuple(PROBE_REGISTRY.names())
# Attacks on text models (``unlearn.evaluators.attacks``), for ``eval.attacks`` of a text task.
ATTACKS = attack_names("text")
# Named parameter groups of the image adapter, for selection ``group``.
IMAGE_PARAMETER_GROUPS = ("cross_attention_kv", "cross_attention", "non_cross_attention", "self_attention",
                          "time_embedding", "unet", "text_encoder")

_ZOO = re.compile(r"^zoo:[^/\s]+/[^/\s]+$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, help: str) -> Any:
    return field(default=default, default_factory=factory, metadata={"help": help})


def _positive(obj: Any, *names: str, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        if value <= 0:
            raise invalid(name, f"must be > 0, got {value}")


# accelerate's trackers (accelerate.utils.LoggerType, less "all"), and the package each one needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim", "comet_ml": "comet_ml",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


# -- sections ---------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """The model to unlearn: a zoo name, a local directory or a hub id."""

    source: str = _opt("zoo:tiny-llama/target", help="zoo:<family>/<name>, a local directory, a hub id, or (image) a "
                       "single-file Stable Diffusion checkpoint (*.safetensors next to its pipeline's configs)")
    dtype: Literal["float32", "bfloat16", "float16"] = _opt("float32", help="weights dtype while training")
    config: str | None = _opt(None, help="single-file checkpoints only: the pipeline directory whose configs and "
                              "tokenizer(s) the file's weights go into (default: the file's own directory)")
    threads: int = _opt(1, help="torch CPU threads")
    device: Literal["auto", "cpu"] = _opt("auto", help="where training runs: auto: the GPU accelerate gives this process "
                                                       "when CUDA is available, else the CPU; cpu: always the CPU")

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise invalid("source", "is empty; give zoo:<family>/<name>, a directory or a hub id")
        if self.source.startswith("zoo:") and not _ZOO.match(self.source):
            raise invalid("source", f"is {self.source!r}; a zoo name looks like zoo:<family>/<name>, e.g. zoo:tiny-llama/target")
        if self.source.lower().endswith((".ckpt", ".pt", ".pth", ".bin")):
            raise invalid("source", f"is {self.source!r}, a pickled checkpoint, which is never unpickled here; convert it "
                                    "to .safetensors (or use the model's .safetensors release) and point at that file")
        if self.config is not None and not self.source.lower().endswith(".safetensors"):
            raise invalid("config", f"is {self.config!r}, but it is for single-file checkpoints and model.source "
                                    f"{self.source!r} is not a *.safetensors file: a model directory carries its own "
                                    "configs; drop model.config")
        cpus = os.cpu_count() or 1
        if not 1 <= self.threads <= cpus:
            raise invalid("threads", f"must be in [1, {cpus}] (the CPUs of this machine), got {self.threads}")


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
        # The bounds of tasks.tofu_world.WorldConfig, checked here so the error names the key.
        for key, (lo, hi) in WORLD_BOUNDS.items():
            v = getattr(self, key)
            if not lo <= v <= hi:
                raise invalid(key, f"must be in [{lo}, {hi}] ({WORLD_BOUND_WHY[key]}), got {v}")


@dataclass
class PassagesSpec:
    """The generated passages world (tasks ``rwku`` and ``muse``) and how the RWKU-style forget
    corpus is made."""

    seed: int = _opt(0, help="seed of the world generator")
    n_targets: int = _opt(10, help="target entities (what unlearning requests name; forget_split target<k> / batch<n>)")
    n_neighbours: int = _opt(2, help="neighbour entities per target (same city and profession)")
    n_known: int = _opt(60, help="entities the target model is trained on (targets and neighbours included)")
    n_holdout: int = _opt(10, help="entities nobody is trained on (MUSE's PrivLeak non-members)")
    n_countries: int = _opt(30, help="fictional countries of the general-knowledge utility set (>= 4)")
    corpus: Literal["generated", "original"] = _opt(
        "generated", help="task rwku: generated: the forget corpus is written by the target model prompted about each "
                          "target (RWKU's zero-shot setting); original: the world's passages")
    corpus_samples: int = _opt(2, help="task rwku, corpus generated: sampled texts per topic prompt, besides the greedy one")

    def __post_init__(self) -> None:
        from unlearn.tasks.passages_world import PassagesWorldConfig

        if self.corpus_samples < 0:
            raise invalid("corpus_samples", f"must be >= 0, got {self.corpus_samples}")
        try:
            PassagesWorldConfig(**{k: getattr(self, k) for k in ("seed", "n_targets", "n_neighbours", "n_known",
                                                                  "n_holdout", "n_countries")})
        except ValueError as e:
            msg = str(e).split(": ", 1)[1]  # "<key> <what is wrong>"
            key = msg.split(" ")[0]
            raise invalid(key, msg[len(key):].strip()) from None


@dataclass
class VisualSpec:
    """The generated I2P-style visual world (task ``visual``): seed and the concepts to erase."""

    seed: int = _opt(0, help="seed of every render, caption and prompt-table row")
    erase: list[str] = _opt(factory=lambda: ["colour:red"], help="concepts to erase, attribute:value each")
    guide: list[str] = _opt(factory=lambda: ["colour:blue"], help="one guide/anchor concept per erase concept "
                                                                   "(same attribute), what UCE/RECE map it to")
    prompts_per_combination: int = _opt(2, help="prompt-table rows per (shape, colour, texture) and kind")
    guidance: float = _opt(3.0, help="classifier-free guidance scale of every prompt-table row")
    prompts: str | None = _opt(None, help="a CSV of forget prompts (I2P's columns, or prompt[, seed, guidance]) that "
                                          "replaces the world's prompt table: every row depicts the erase concepts, "
                                          "which may then be any attribute:value the judge reads (nudity:nude, "
                                          "object:church); see docs/judges.md")
    prompt_categories: list[str] = _opt(factory=list, help="with prompts: keep rows whose 'categories' column names "
                                                           "one of these (I2P: [sexual]); empty keeps every row")
    retain_prompts: str | None = _opt(None, help="with prompts: a CSV of retain prompts with a column named like the "
                                                 "erase attribute (its true value per row)")
    preserve: list[str] = _opt(factory=list, help="with prompts: words UCE/RECE keep (the empty prompt always is)")

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}")
        if self.prompts is not None:
            self._check_prompt_concepts()
            _positive(self, "prompts_per_combination", "guidance")
            return
        if self.retain_prompts or self.prompt_categories or self.preserve:
            raise invalid("prompts", "is not set, but retain_prompts / prompt_categories / preserve are; they "
                                     "apply to a prompt file only")
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

    def _check_prompt_concepts(self) -> None:
        """With a prompt file: concepts are free attribute:value pairs; a guide value may be empty
        (the empty prompt, UCE's guide for objects and nudity)."""
        if not self.erase:
            raise invalid("erase", "is empty; name at least one concept, e.g. [nudity:nude]")
        if len(self.guide) != len(self.erase):
            raise invalid("guide", f"has {len(self.guide)} entries for {len(self.erase)} erase concepts; give one each "
                                   "(e.g. 'nudity:' for the empty prompt)")
        for i, (e, g) in enumerate(zip(self.erase, self.guide)):
            ea, sep, ev = str(e).partition(":")
            if not sep or not ea.strip() or not ev.strip():
                raise invalid(f"erase[{i}]", f"is {e!r}; write attribute:value with the judge's attribute, e.g. nudity:nude")
            ga, sep, gv = str(g).partition(":")
            if not sep or ga != ea or gv == ev:
                raise invalid(f"guide[{i}]", f"is {g!r} for erase {e!r}; write {ea}:<another value> or {ea}: (the "
                                             "empty prompt)")

    def world_config(self) -> VisualWorldConfig:
        if self.prompts is not None:  # the generated world then only supplies renders; its concepts stay the defaults
            return VisualWorldConfig(seed=self.seed, prompts_per_combination=self.prompts_per_combination,
                                     guidance=self.guidance)
        return VisualWorldConfig(seed=self.seed, erase=tuple(self.erase), guide=tuple(self.guide),
                                 prompts_per_combination=self.prompts_per_combination, guidance=self.guidance)


@dataclass
class TaskSpec:
    """What to forget, what to keep, what to evaluate on, and how items become text (or images)."""

    name: str = _opt(
        "tofu", help="the benchmark (unlearn.tasks.registry): tofu: generated world; tofu_files: TOFU-layout files "
                     "under path; visual: the I2P-style visual world (text-to-image models; forget_split, "
                     "retain_split, retain_model and eval_splits then default to forget, retain, null and "
                     "forget_explicit/forget_implicit/retain)")
    world: WorldSpec = _opt(factory=WorldSpec, help="the generated world (task tofu)")
    visual: VisualSpec = _opt(factory=VisualSpec, help="the generated visual world (task visual)")
    passages: PassagesSpec = _opt(factory=PassagesSpec, help="the generated passages world (tasks rwku and muse)")
    path: str | None = _opt(None, help="directory of TOFU-layout files (required for tofu_files, forbidden for tofu)")
    forget_split: str = _opt(TEXT_SPEC_DEFAULTS["forget_split"], help="the forget set")
    retain_split: str | None = _opt(TEXT_SPEC_DEFAULTS["retain_split"], help="the retain set; null for retain-free methods")
    retain_model: str | None = _opt(TEXT_SPEC_DEFAULTS["retain_model"],
                                    help="model never trained on the forget set (forget quality); null to skip")
    eval_splits: list[str] = _opt(factory=lambda: list(TEXT_SPEC_DEFAULTS["eval_splits"]), help="evaluation splits")
    tokenization: Literal["split", "reference"] = _opt("split", help="split: prompt and answer tokenised apart; reference: open-unlearning's")
    prompt_template: str = _opt("Question: {question}\nAnswer:", help="prompt built from an item; must use {question}")

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise invalid("name", f"is {self.name!r}, not a known task; allowed: {', '.join(TASKS.names())}"
                          + suggest(self.name, TASKS.names()))
        task = TASKS.get(self.name)
        task.apply_spec_defaults(self)
        task.check_spec(self)

    @property
    def task_class(self):
        """The :class:`~unlearn.task.Task` class of ``name``."""
        return TASKS.get(self.name)


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


@dataclass
class _SalUnParams:
    fraction: float = 0.5
    group: str | None = None
    pattern: str | None = None
    items: int = 64
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise invalid("fraction", f"must be in (0, 1] (the share of entries kept by the saliency mask), got "
                                      f"{self.fraction}")
        _positive(self, "items", "batch_size")
        if self.group is not None and self.pattern is not None:
            raise invalid("pattern", "give group or pattern, not both (they both restrict the mask's scope)")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise invalid("pattern", f"is not a valid regular expression ({e}): {self.pattern!r}") from None


_SELECTION_PARAMS: dict[str, type] = {"full": _NoParams, "lora": _LoraParams, "regex": _RegexParams,
                                      "columns": _ColumnsParams, "uoe": _UOEParams, "group": _GroupParams,
                                      "salun": _SalUnParams}


@dataclass
class SelectionSpec:
    """Which parameters are trained. Params by name -- full: none; lora: r, alpha, dropout,
    target_modules; regex: pattern (required; parameters whose name matches are trained); columns:
    columns ({parameter name: [column indices]}; left out: the objective chooses, e.g. needle); uoe: layer,
    expert (one MoE expert's FFN + that layer's router; left out: the objective chooses, e.g. uoe); group: group
    (a named parameter group of the image adapter: cross_attention_kv, cross_attention, non_cross_attention,
    self_attention, time_embedding, unet, text_encoder); salun: fraction, group or pattern, items, batch_size
    (SalUn's saliency mask: the top fraction of entries by |gradient of the forget loss|)."""

    name: Literal["full", "lora", "regex", "columns", "uoe", "group", "salun"] = _opt(
        "full", help="full, lora, regex, columns, uoe, group or salun")
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
    eval_every: int | None = _opt(None, help="evaluate (the task's suite on eval_max_items items per split) every N "
                                             "optimizer steps during training; null: not by steps")
    eval_every_epoch: bool = _opt(False, help="evaluate during training at the end of every epoch")
    select_best: str = _opt(
        "last", help="which evaluated training state to keep: last, or the best by a criterion of the task (tofu: "
                     "forget_quality, model_utility, fq_mu_mean; visual: erasure_rate, retain_accuracy, "
                     "erasure_retain_mean); needs eval_every or eval_every_epoch")
    utility_floor: float | None = _opt(None, help="stop training early when the task's utility number (tofu: model "
                                                  "utility; visual: retain accuracy) falls below this fraction of "
                                                  "the target's, in (0, 1]; null: never")
    eval_max_items: int | None = _opt(100, help="items per split for the evaluations during training; null: all")
    gradient_checkpointing: bool = _opt(False, help="recompute activations in the backward pass (less memory, "
                                                    "~1 more forward of time)")
    mixed_precision: Literal["no", "bf16"] = _opt("no", help="bf16 autocast for the forward passes of training "
                                                            "(CPU: bf16 only); the weights stay in model.dtype")
    report_to: list[str] = _opt(factory=list, help="experiment trackers through accelerate (tensorboard, wandb, mlflow, "
                                                   "aim, comet_ml, clearml, dvclive, swanlab, trackio): the loss and "
                                                   "the evaluations during training, logged under <run>/trackers; "
                                                   "wandb runs offline unless WANDB_MODE says otherwise")
    checkpoint_every: int | None = _opt(None, help="write a training checkpoint (weights, optimizer, scheduler, data "
                                                   "position, RNG) every N optimizer steps, so that a killed run "
                                                   "continues with --resume; null: none")

    @property
    def evaluates_during_training(self) -> bool:
        return self.eval_every is not None or self.eval_every_epoch

    def __post_init__(self) -> None:
        _positive(self, "epochs", "lr", "batch_size", "grad_accum")
        _positive(self, "max_steps", "max_grad_norm", "eval_every", "eval_max_items", "checkpoint_every",
                  allow_none=True)
        _check_named_list(self.report_to, {}, "report_to", "tracker", tuple(TRACKERS))
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

    suite: str = _opt(
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
        _check_named_list(self.probes, self.probe_params, "probes", "probe", PROBES)


def _check_named_list(names: list[str], params: dict, key: str, kind: str, known: tuple[str, ...],
                      sets: dict | None = None) -> None:
    """Check ``<key>`` (known names, no repeats) and ``<kind>_params`` beside it (only names listed
    in ``<key>``); ``sets`` are named groups already expanded in ``names``. ``key`` is relative to
    the section being built (``probes`` inside EvalSpec, ``eval.attacks`` from Recipe)."""
    sets = sets or {}
    params_key = key.rsplit(".", 1)[0] + f".{kind}_params" if "." in key else f"{kind}_params"
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
            raise invalid(f"{params_key}.{name}", f"is not a known {kind}; allowed: {', '.join(known)}"
                          + suggest(name, known))
        if name not in seen:
            raise invalid(f"{params_key}.{name}", f"sets parameters of {name!r}, which is not in "
                                                   f"{key_path(key)}; add it there or remove these parameters")


@dataclass
class OutputSpec:
    """Where the run directory goes."""

    dir: str | None = _opt(None, help="run directory; null: runs/<name>")
    overwrite: bool = _opt(False, help="replace a finished run in dir (otherwise an error)")
    resume: bool = _opt(False, help="continue the unfinished run of dir from its last complete checkpoint "
                                    "(train.checkpoint_every); CLI: --resume")

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
        task = self.task.task_class
        task.apply_recipe_defaults(self)
        self._check_attacks(task.modality)
        task.check_recipe(self)

    def _check_attacks(self, modality: str) -> None:
        """Expand attack sets (``robustness``) for the task's modality, then check every name,
        and that each attack works on that modality."""
        ev = self.eval
        sets = {name: members[modality] for name, members in ATTACK_SETS.items() if modality in members}
        expanded: list[str] = []
        for name in ev.attacks:
            expanded += list(sets[name]) if name in sets else [name]
        ev.attacks = expanded
        known = attack_names(modality)
        for i, name in enumerate(ev.attacks):
            if name in ATTACK_REGISTRY and name not in known:
                mods = "/".join(ATTACK_REGISTRY.get(name).modalities)
                raise RecipeError(f"recipe key 'eval.attacks[{i}]' is {name!r}, an attack on {mods} models, but task "
                                  f"{self.task.name!r} is {'an' if modality[0] in 'aeiou' else 'a'} {modality} task; attacks for it: {', '.join(known)}")
        _check_named_list(ev.attacks, ev.attack_params, "eval.attacks", "attack", tuple(known), sets)

    @property
    def output_dir(self) -> Path:
        """``output.dir``, or ``runs/<name>`` when it is null."""
        return Path(self.output.dir) if self.output.dir is not None else Path("runs") / self.name

    def to_dict(self) -> dict:
        """The recipe as plain data (what a run records); ``load_recipe`` of it gives an equal recipe."""
        return to_dict(self)


# -- loading ----------------------------------------------------------------------------------
def _objectives():
    """The objective registry (tests replace this function)."""
    return OBJECTIVES


def _editors():
    """The editor registry."""
    return EDITORS


def method_modalities(method_cls) -> tuple[str, ...]:
    """The modalities an objective or editor works on (its ``modalities`` class attribute)."""
    return tuple(getattr(method_cls, "modalities", ("text",)))


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
    modality = recipe.task.task_class.modality
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
    supported = method_modalities(method_cls)
    if modality not in supported:
        fits = sorted(n for reg in (registry, editors) for n in reg.names() if modality in method_modalities(reg.get(n)))
        raise RecipeError(f"recipe key 'method.name' is {name!r}, a method for {'/'.join(supported)} models, but task "
                          f"{recipe.task.name!r} is {'an' if modality[0] in 'aeiou' else 'a'} {modality} task; methods for it: {', '.join(fits)}")
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
    data = apply_overrides(data, list(overrides))
    given = frozenset(f"{sec}.{k}" for sec, v in data.items() if isinstance(v, dict) for k in v)
    token = GIVEN_KEYS.set(given)  # the task's defaults fill only what the recipe left out
    try:
        recipe = from_dict(Recipe, data, "")
    finally:
        GIVEN_KEYS.reset(token)
    resolve_method(recipe)
    return recipe
