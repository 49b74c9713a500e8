"""Recipe loading: strict keys and types, impossible combinations, --set overrides.

The objective registry is replaced by a fresh one holding two fake objectives, so these tests
need neither torch nor the real objectives.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from unlearn import recipe as recipe_mod
from unlearn.config import RecipeError, apply_overrides, from_dict, invalid, to_dict
from unlearn.recipe import Recipe, load_recipe, resolve_method
from unlearn.registry import Registry

DOCS = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


# -- fake objectives ---------------------------------------------------------------------------
@dataclass
class _GradDiffConfig:
    alpha: float = 1.0
    gamma: float = 1.0
    retain_loss: Literal["nll", "kl"] = "nll"


class _FakeGradDiff:
    name = "grad_diff"
    Config = _GradDiffConfig

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def needs_retain(self) -> bool:
        return self.config.alpha > 0  # like GradDiff: the retain term is off at alpha = 0


@dataclass
class _GradAscentConfig:
    pass


class _FakeGradAscent:
    name = "grad_ascent"
    Config = _GradAscentConfig

    def __init__(self, config=None):
        self.config = config

    def needs_retain(self) -> bool:
        return False


@dataclass
class _FakeEditorConfig:
    strength: float = 1.0


class _FakeEditor:
    name = "fake_editor"
    Config = _FakeEditorConfig

    def __init__(self, config=None):
        self.config = config

    def needs_retain(self) -> bool:
        return False


@pytest.fixture(autouse=True)
def fake_objectives(monkeypatch):
    registry = Registry("objective")
    registry.register("grad_diff", _FakeGradDiff)
    registry.register("grad_ascent", _FakeGradAscent)
    monkeypatch.setattr(recipe_mod, "_objectives", lambda: registry)
    editors = Registry("editor")
    editors.register("fake_editor", _FakeEditor)
    monkeypatch.setattr(recipe_mod, "_editors", lambda: editors)
    return registry


def error_of(src, overrides=()) -> str:
    """The message of the RecipeError that loading raises; it must be a single line."""
    with pytest.raises(RecipeError) as info:
        load_recipe(src, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


FULL = """\
name: tofu-gd-forget05
seed: 3
description: GradDiff on forget05, every key spelled out
model:
  source: zoo:tiny-llama/target
  dtype: bfloat16
  threads: 2
task:
  name: tofu
  world: {seed: 1, n_authors: 100, n_holdout: 10, n_perturbed: 3, n_countries: 8, n_real_authors: 20}
  forget_split: forget05
  retain_split: retain95
  retain_model: zoo:tiny-llama/retain95
  eval_splits: [forget, retain_eval, holdout]
  tokenization: reference
  prompt_template: "Q: {question}\\nA:"
method:
  name: grad_diff
  params: {alpha: 0.5, retain_loss: kl}
  selection:
    name: lora
    params: {r: 4, alpha: 8, dropout: 0.05, target_modules: [q_proj, v_proj]}
train:
  epochs: 2
  max_steps: 40
  lr: 1e-4
  batch_size: 8
  grad_accum: 2
  optimizer: sgd
  weight_decay: 0.01
  scheduler: cosine
  warmup_ratio: 0.1
  max_grad_norm: null
  save_checkpoint: false
  eval_every: 10
eval:
  suite: tofu
  batch_size: 16
  max_new_tokens: 32
  compare_target: false
  n_samples: 0
output:
  dir: /tmp/somewhere
  overwrite: true
"""


# -- valid recipes ------------------------------------------------------------------------------
def test_full_recipe_round_trips(tmp_path):
    path = tmp_path / "full.yaml"
    path.write_text(FULL)
    recipe = load_recipe(path)
    assert recipe.train.lr == pytest.approx(1e-4) and isinstance(recipe.train.lr, float)  # YAML read "1e-4" as str
    assert recipe.method.selection.params == {"r": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert recipe.task.world.n_authors == 100 and recipe.train.max_grad_norm is None
    assert recipe.output_dir == Path("/tmp/somewhere")

    assert load_recipe(recipe.to_dict()) == recipe
    # ... and through YAML, as a run records it
    recorded = tmp_path / "recorded.yaml"
    recorded.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    assert load_recipe(recorded) == recipe


def test_defaults_fill_in():
    recipe = load_recipe({"name": "quick"})
    assert recipe == Recipe(name="quick")
    assert recipe.model.source == "zoo:tiny-llama/target"
    assert (recipe.task.name, recipe.task.forget_split, recipe.task.retain_split) == ("tofu", "forget10", "retain90")
    assert recipe.task.eval_splits == ["forget", "retain_eval", "real_authors", "world_facts"]
    assert (recipe.method.name, recipe.method.selection.name) == ("grad_diff", "full")
    assert (recipe.train.epochs, recipe.train.lr, recipe.train.optimizer) == (5, 1e-3, "adamw")
    assert recipe.output_dir == Path("runs") / "quick"


def test_resolve_method_builds_the_objective_config():
    recipe = load_recipe({"name": "x", "method": {"name": "grad_diff", "params": {"gamma": "2e0", "retain_loss": "kl"}}})
    cls, config = resolve_method(recipe)
    assert cls is _FakeGradDiff and config == _GradDiffConfig(alpha=1.0, gamma=2.0, retain_loss="kl")
    assert recipe.method.params == {"gamma": "2e0", "retain_loss": "kl"}  # the recipe keeps what was written


def test_the_input_mapping_is_not_modified():
    data = {"name": "x", "method": {"params": {"alpha": 1}}}
    load_recipe(data, ["method.params.alpha=2", "train.lr=1e-2"])
    assert data == {"name": "x", "method": {"params": {"alpha": 1}}}


def test_a_recipe_object_can_be_reloaded_with_overrides():
    recipe = load_recipe({"name": "x"})
    again = load_recipe(recipe, ["train.epochs=2"])
    assert again.train.epochs == 2 and recipe.train.epochs == 5


# -- unknown keys, types, literals -----------------------------------------------------------------
def test_unknown_top_level_key():
    msg = error_of({"name": "x", "modle": {}})
    assert "recipe key 'modle' is unknown" in msg and "did you mean 'model'?" in msg
    assert "allowed: description, eval, method, model, name, output, seed, task, train" in msg


def test_unknown_nested_key_with_did_you_mean():
    msg = error_of({"name": "x", "train": {"lr_rate": 0.1}})
    assert msg.startswith("recipe key 'train.lr_rate' is unknown; allowed: batch_size, checkpoint_every, epochs,")
    assert msg.endswith("did you mean 'lr'?")
    msg = error_of({"name": "x", "task": {"world": {"n_author": 100}}})
    assert "'task.world.n_author' is unknown" in msg and "did you mean 'n_authors'?" in msg


@pytest.mark.parametrize("overrides, expected", [
    (["train.epochs=five"], "recipe key 'train.epochs' must be int, got str ('five')"),
    (["train.epochs=true"], "recipe key 'train.epochs' must be int, got bool (True)"),
    (["train.epochs=2.5"], "recipe key 'train.epochs' must be int, got float (2.5)"),
    (["train.lr=false"], "recipe key 'train.lr' must be float, got bool (False)"),
    (["train.lr=fast"], "recipe key 'train.lr' must be float, got str ('fast')"),
    (["train.lr=.nan"], "recipe key 'train.lr' must be a finite float"),
    (["eval.compare_target=1"], "recipe key 'eval.compare_target' must be bool (true/false), got int (1)"),
    (["task.forget_split=10"], "recipe key 'task.forget_split' must be str, got int (10)"),
    (["task.eval_splits=forget"], "recipe key 'task.eval_splits' must be a list of str, got str ('forget')"),
    (["task.eval_splits=[forget, 3]"], "recipe key 'task.eval_splits[1]' must be str, got int (3)"),
    (["train.max_steps=ten"], "recipe key 'train.max_steps' must be int or null, got str ('ten')"),
    (["task=forget10"], "recipe key 'task' must be a mapping, got str ('forget10')"),
    (["method.params=[1]"], "recipe key 'method.params' must be a mapping, got list ([1])"),
])
def test_wrong_types_name_the_key(overrides, expected):
    assert expected in error_of({"name": "x"}, overrides)


def test_literal_violation_lists_allowed_values():
    msg = error_of({"name": "x", "train": {"optimizer": "adam"}})
    assert msg == "recipe key 'train.optimizer' must be one of 'adamw', 'sgd', got str ('adam'); did you mean 'adamw'?"
    msg = error_of({"name": "x", "model": {"dtype": "fp16"}})
    assert "'model.dtype' must be one of 'float32', 'bfloat16', 'float16'" in msg


def test_float_accepts_strings_like_1e_3_and_ints(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain: {lr: 1e-3, weight_decay: 0, max_grad_norm: 5E-1}\n")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-3"  # the PyYAML quirk handled here
    train = load_recipe(path).train
    assert (train.lr, train.weight_decay, train.max_grad_norm) == (1e-3, 0.0, 0.5)
    assert all(isinstance(v, float) for v in (train.lr, train.weight_decay, train.max_grad_norm))


def test_missing_required_field():
    assert error_of({"seed": 1}) == "recipe key 'name' is required (it has no default)"


@pytest.mark.parametrize("overrides, key", [
    (["train.epochs=0"], "train.epochs"),
    (["train.lr=-1e-3"], "train.lr"),
    (["train.warmup_ratio=1.0"], "train.warmup_ratio"),
    (["train.max_grad_norm=0"], "train.max_grad_norm"),
    (["model.threads=0"], "model.threads"),
    (["model.source=zoo:tiny-llama"], "model.source"),
    (["task.world.n_authors=50"], "task.world.n_authors"),
    (["task.eval_splits=[forget, retain]"], "task.eval_splits[1]"),
    (["task.eval_splits=[forget, forget]"], "task.eval_splits[1]"),
    (["task.prompt_template=Answer this"], "task.prompt_template"),
    (["task.prompt_template='{question} {answer}'"], "task.prompt_template"),
    (["name=runs/x"], "name"),
])
def test_value_checks_name_the_key(overrides, key):
    assert f"recipe key '{key}'" in error_of({"name": "x"}, overrides)


# -- overrides ---------------------------------------------------------------------------------
def test_overrides_nested_keys():
    recipe = load_recipe({"name": "x"}, [
        "train.lr=1e-4", "method.params.alpha=0.2", "task.world.seed=7", "train.max_steps=null",
        "method.selection.name=regex", "method.selection.params.pattern=^model\\.layers\\.0\\.mlp\\.",
        "description=a=b",  # only the first '=' splits
    ])
    assert recipe.train.lr == 1e-4 and recipe.train.max_steps is None and recipe.task.world.seed == 7
    assert recipe.method.params == {"alpha": 0.2}
    assert recipe.method.selection.params == {"pattern": r"^model\.layers\.0\.mlp\."}
    assert recipe.description == "a=b"


@pytest.mark.parametrize("override, needle", [
    ("train.lr", "override 'train.lr' must look like key.path=value"),
    ("=1e-4", "empty key part"),
    ("train..lr=1", "empty key part"),
    ("train.lr=[1, 2", "the value is not valid YAML"),
    ("train.lr.decay=1", "recipe key 'train.lr' is float (0.001), not a mapping"),
])
def test_malformed_overrides(override, needle):
    assert needle in error_of({"name": "x", "train": {"lr": 1e-3}}, [override])


def test_override_of_an_unknown_key_is_an_unknown_key():
    msg = error_of({"name": "x"}, ["train.epoch=3"])
    assert "recipe key 'train.epoch' is unknown" in msg and "did you mean 'epochs'?" in msg


def test_apply_overrides_copies():
    data = {"train": {"lr": 1}}
    out = apply_overrides(data, ["train.lr=2", "method.params.beta=0.2"])
    assert out == {"train": {"lr": 2}, "method": {"params": {"beta": 0.2}}} and data == {"train": {"lr": 1}}


# -- files --------------------------------------------------------------------------------------
def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == f"recipe file '{missing}' does not exist"
    assert "is not a file" in error_of(tmp_path)


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  lr: [1e-3\n  epochs: 2\n")
    msg = error_of(path)
    assert msg.startswith(f"recipe file '{path}' is not valid YAML") and re.search(r"line \d+", msg)


@pytest.mark.parametrize("text, got", [("", "empty"), ("- a\n- b\n", "a list"), ("just text\n", "a str")])
def test_top_level_must_be_a_mapping(tmp_path, text, got):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    msg = error_of(path)
    assert msg.startswith(f"recipe file '{path}' must be a mapping") and got in msg


# -- impossible combinations ----------------------------------------------------------------------
def test_tofu_files_needs_a_path_and_tofu_forbids_one():
    msg = error_of({"name": "x", "task": {"name": "tofu_files"}})
    assert msg.startswith("recipe key 'task.path' is required for task 'tofu_files'")
    msg = error_of({"name": "x", "task": {"path": "data/tofu"}})
    assert msg.startswith("recipe key 'task.path' must not be set for task 'tofu'") and "task.world" in msg
    recipe = load_recipe({"name": "x", "task": {"name": "tofu_files", "path": "data/tofu", "forget_split": "my_forget",
                                                "retain_split": "my_retain", "retain_model": None}})
    assert recipe.task.forget_split == "my_forget"


def test_mismatched_forget_and_retain_splits_name_both_keys():
    msg = error_of({"name": "x", "task": {"forget_split": "forget01", "retain_split": "retain90"}})
    assert "recipe key 'task.retain_split' is 'retain90'" in msg and "task.forget_split is 'forget01'" in msg
    assert "'retain99'" in msg
    msg = error_of({"name": "x", "task": {"forget_split": "forget01", "retain_split": "retain99"}})
    assert "recipe key 'task.retain_model'" in msg and "task.forget_split" in msg and "'zoo:tiny-llama/retain99'" in msg
    load_recipe({"name": "x", "task": {"forget_split": "forget01", "retain_split": "retain99",
                                       "retain_model": "zoo:tiny-llama/retain99"}})


def test_tofu_forget_split_must_be_a_tofu_split():
    msg = error_of({"name": "x", "task": {"forget_split": "forget1"}})
    assert "recipe key 'task.forget_split' must be one of forget01, forget05, forget10" in msg
    assert "got 'forget1'; did you mean 'forget" in msg


def test_empty_forget_split_name():
    msg = error_of({"name": "x", "task": {"forget_split": ""}})
    assert msg.startswith("recipe key 'task.forget_split' is empty")
    msg = error_of({"name": "x", "task": {"name": "tofu_files", "path": "d", "forget_split": "  "}})
    assert msg.startswith("recipe key 'task.forget_split' is empty")


# -- the method ----------------------------------------------------------------------------------
def test_unknown_objective_with_did_you_mean():
    msg = error_of({"name": "x", "method": {"name": "grad_dif"}})
    assert msg == ("recipe key 'method.name' is 'grad_dif', which is not a known objective or editor; "
                   "allowed: fake_editor, grad_ascent, grad_diff; did you mean 'grad_diff'?")


def test_editor_method_resolves_and_rejects_selection():
    from unlearn.recipe import load_recipe, resolve_method

    r = load_recipe({"name": "x", "method": {"name": "fake_editor", "params": {"strength": 2}}})
    cls, cfg = resolve_method(r)
    assert cls is _FakeEditor and cfg.strength == 2.0
    msg = error_of({"name": "x", "method": {"name": "fake_editor", "selection": {"name": "lora"}}})
    assert msg.startswith("recipe key 'method.selection' is set, but 'fake_editor' (method.name) is an editor")


def test_bad_objective_params():
    msg = error_of({"name": "x", "method": {"params": {"alpah": 0.5}}})
    assert msg == "recipe key 'method.params.alpah' is unknown; allowed: alpha, gamma, retain_loss; did you mean 'alpha'?"
    msg = error_of({"name": "x", "method": {"params": {"retain_loss": "kld"}}})
    assert "recipe key 'method.params.retain_loss' must be one of 'nll', 'kl'" in msg
    msg = error_of({"name": "x", "method": {"name": "grad_ascent", "params": {"alpha": 1}}})
    assert "recipe key 'method.params.alpha' is unknown; allowed: (none)" in msg


def test_objective_that_needs_retain_without_a_retain_split():
    msg = error_of({"name": "x", "task": {"retain_split": None}})
    assert msg.startswith("recipe key 'task.retain_split' is null, but method 'grad_diff'")
    # a retain-free objective, or a configuration without the retain term, is fine
    load_recipe({"name": "x", "task": {"retain_split": None}, "method": {"name": "grad_ascent"}})
    load_recipe({"name": "x", "task": {"retain_split": None}, "method": {"params": {"alpha": 0}}})


# -- parameter selection ---------------------------------------------------------------------------
@pytest.mark.parametrize("selection, needle", [
    ({"name": "regex"}, "recipe key 'method.selection.params.pattern' is required"),
    ({"name": "regex", "params": {"pattern": "mlp.(up"}}, "recipe key 'method.selection.params.pattern' is not a valid regular expression"),
    ({"name": "full", "params": {"r": 8}}, "recipe key 'method.selection.params' must be empty for selection 'full'"),
    ({"name": "lora", "params": {"rank": 8}}, "recipe key 'method.selection.params.rank' is unknown; allowed: alpha, dropout, r, target_modules"),
    ({"name": "lora", "params": {"dropout": 1}}, "recipe key 'method.selection.params.dropout' must be in [0, 1)"),
    ({"name": "lora", "params": {"r": 0}}, "recipe key 'method.selection.params.r' must be > 0"),
    ({"name": "lora", "params": {"target_modules": []}}, "recipe key 'method.selection.params.target_modules' is empty"),
    ({"name": "prune"}, "recipe key 'method.selection.name' must be one of 'full', 'lora', 'regex'"),
])
def test_selection_params_are_checked(selection, needle):
    assert needle in error_of({"name": "x", "method": {"selection": selection}})


def test_valid_selections():
    for selection in ({"name": "full"}, {"name": "lora"}, {"name": "lora", "params": {"target_modules": "all-linear"}},
                      {"name": "regex", "params": {"pattern": r"layers\.[01]\."}}):
        r = load_recipe({"name": "x", "method": {"selection": selection}})
        assert r.method.selection.name == selection["name"]
        assert dict(r.method.selection.params) == selection.get("params", {})


# -- the generic loader ------------------------------------------------------------------------
@dataclass
class _Inner:
    k: int = 1

    def __post_init__(self) -> None:
        if self.k == 13:
            raise ValueError("k must not be 13")
        if self.k == 7:
            raise invalid("k", "must not be 7")


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    items: list[int] = field(default_factory=list)
    table: dict[str, float] = field(default_factory=dict)
    free: dict[str, Any] = field(default_factory=dict)
    pair: tuple[int, str] = (0, "")
    maybe: Literal["a", "b"] | None = None


def test_from_dict_generic_types_and_paths():
    out = from_dict(_Outer, {"inner": {"k": 2}, "items": [1, 2], "table": {"a": 1, "b": "2.5"},
                             "free": {"x": [1, {"y": None}]}, "pair": [3, "s"], "maybe": "b"}, "cfg")
    assert out == _Outer(_Inner(2), [1, 2], {"a": 1.0, "b": 2.5}, {"x": [1, {"y": None}]}, (3, "s"), "b")
    assert from_dict(_Outer, to_dict(out), "cfg") == out
    for data, needle in [
        ({"items": [1, "2"]}, "recipe key 'cfg.items[1]' must be int, got str ('2')"),
        ({"table": {"a": "x"}}, "recipe key 'cfg.table.a' must be float"),
        ({"pair": [1]}, "recipe key 'cfg.pair' must be a list of 2 items"),
        ({"maybe": "c"}, "recipe key 'cfg.maybe' must be one of 'a', 'b' or null"),
        ({"inner": {"k": 13}}, "recipe key 'cfg.inner' is invalid: k must not be 13"),  # plain ValueError: prefixed
        ({"inner": {"k": 7}}, "recipe key 'cfg.inner.k' must not be 7"),  # invalid(): the full key
    ]:
        with pytest.raises(RecipeError) as info:
            from_dict(_Outer, data, "cfg")
        assert needle in str(info.value)
    # outside from_dict, invalid() names the bare field
    with pytest.raises(RecipeError, match="recipe key 'k' must not be 7"):
        _Inner(7)


# -- docs ----------------------------------------------------------------------------------------
def _keys(cls: type, prefix: str = ""):
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        yield key
        tp = cls.__annotations__[f.name]
        sub = getattr(recipe_mod, tp, None) if isinstance(tp, str) else tp
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            yield from _keys(sub, key + ".")


def test_docs_list_every_recipe_key():
    text = DOCS.read_text()
    missing = [k for k in _keys(Recipe) if f"`{k}`" not in text]
    assert not missing, f"docs/recipes.md does not describe: {missing}"


def test_tofu_full_suite_needs_holdout_split():
    from unlearn.recipe import load_recipe

    with pytest.raises(RecipeError, match="task.eval_splits"):
        load_recipe({"name": "x", "eval": {"suite": "tofu-full"}})
    r = load_recipe({"name": "x", "eval": {"suite": "tofu-full"},
                     "task": {"eval_splits": ["forget", "holdout", "retain_eval", "real_authors", "world_facts"]}})
    assert r.eval.suite == "tofu-full"


def test_attack_suite_robustness_expands_to_every_attack():
    from unlearn.recipe import ATTACKS

    r = load_recipe({"name": "x", "eval": {"attacks": ["robustness"]}})
    assert r.eval.attacks == list(ATTACKS)
    msg = error_of({"name": "x", "eval": {"attacks": ["robustnes"]}})
    assert msg.startswith("recipe key 'eval.attacks[0]' is 'robustnes', not a known attack or attack set")
    assert msg.endswith("did you mean 'robustness'?")
    msg = error_of({"name": "x", "eval": {"attacks": ["robustness", "relearn"]}})
    assert "repeats 'relearn'" in msg
