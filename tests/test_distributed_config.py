"""Where training runs (device selection), the shipped accelerate configurations and their check,
and the methods refused under FSDP / DeepSpeed (simulated through the variables accelerate sets)."""

from __future__ import annotations

import os
import re

import pytest
import torch

from unlearn import distributed
from unlearn.accelerate_configs import NAMES, check_accelerate_config, config_path, notes
from unlearn.cli import main as cli
from unlearn.editors import EDITORS
from unlearn.objectives import OBJECTIVES, GradAscent
from unlearn.trainer import TrainSettings, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_METHODS = {n: reg.get(n) for reg in (OBJECTIVES, EDITORS) for n in reg.names()}


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for var in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------------- device
def test_device_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.use_cpu("auto") is False  # a GPU: train there
    assert distributed.use_cpu("cpu") is True  # the recipe says CPU
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu
    assert distributed.use_cpu("auto") is True
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.use_cpu("auto") is True  # no GPU
    with pytest.raises(ValueError, match="model.device must be 'auto' or 'cpu'"):
        distributed.use_cpu("cuda:7")


def test_this_machine_trains_on_the_cpu(tiny_adapter, qa_items):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto trains there")
    assert distributed.use_cpu("auto") is True
    before = next(tiny_adapter.model.parameters()).detach().clone()
    train(tiny_adapter, GradAscent(), qa_items, None, TrainSettings(epochs=1, batch_size=4, lr=1e-2), progress=False)
    p = next(tiny_adapter.model.parameters())
    assert p.device.type == "cpu" and not torch.equal(p.detach(), before)  # trained, and still on the CPU


def test_recipe_cpu_is_honoured_when_a_gpu_is_claimed(tiny_adapter, qa_items, monkeypatch):
    """torch says a GPU is there, the recipe says cpu: the accelerator is never asked for CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train(tiny_adapter, GradAscent(), qa_items, None, TrainSettings(epochs=1, batch_size=4, device="cpu"),
          progress=False)
    assert next(tiny_adapter.model.parameters()).device.type == "cpu"


def test_recipe_key_model_device():
    from unlearn.recipe import load_recipe

    assert load_recipe(os.path.join(ROOT, "recipes", "quickstart.yaml")).model.device == "auto"
    with pytest.raises(ValueError, match="model.device"):
        load_recipe(os.path.join(ROOT, "recipes", "quickstart.yaml"), ["model.device=cuda"])


# ---------------------------------------------------------------------------- shipped configs
def test_shipped_configs_pass_the_check():
    c = {n: check_accelerate_config(config_path(n)) for n in NAMES}
    assert c["ddp"].distributed_type.value == "MULTI_GPU" and not c["ddp"].use_cpu
    assert c["cpu_ddp"].distributed_type.value == "MULTI_GPU" and c["cpu_ddp"].use_cpu
    fs = c["fsdp"].fsdp_config
    assert (fs["fsdp_sharding_strategy"], fs["fsdp_auto_wrap_policy"], fs["fsdp_state_dict_type"]) == (
        "FULL_SHARD", "TRANSFORMER_BASED_WRAP", "FULL_STATE_DICT")
    assert fs["fsdp_use_orig_params"] is True
    assert c["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3
    assert any("refuses sharded training" in n for n in notes(c["fsdp"]))
    assert notes(c["ddp"]) == []


@pytest.mark.parametrize("text, message", [
    ("distributed_type: MULTI_GPU\nnum_process: 2\n", "num_process: unknown key (did you mean 'num_processes'?)"),
    ("distributed_type: MULTI_GPUS\n", "distributed_type: must be one of"),
    ("distributed_type: MULTI_GPU\nnum_processes: 0\n", "num_processes: must be an integer >= 1"),
    ("distributed_type: MULTI_GPU\nuse_cpu: maybe\n", "use_cpu: must be true or false"),
    ("distributed_type: MULTI_GPU\nmixed_precision: bf17\n", "mixed_precision: must be one of"),
    ("distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_stratgy: FULL_SHARD\n",
     "fsdp_config.fsdp_sharding_stratgy: unknown key (did you mean 'fsdp_sharding_strategy'?)"),
    ("distributed_type: FSDP\nfsdp_config:\n  state_dict_type: FULL\n", "fsdp_config.state_dict_type: must be one of"),
    ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 3\n", "fsdp_config.fsdp_version: must be one of 1, 2"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 4\n", "deepspeed_config.zero_stage: must be one of"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  offload_param_device: gpu\n",
     "deepspeed_config.offload_param_device: must be one of none, cpu, nvme"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stag: 3\n", "deepspeed_config.zero_stag: unknown key"),
    ("distributed_type: MULTI_GPU\nfsdp_config:\n  fsdp_version: 2\n", "fsdp_config: is given but distributed_type is MULTI_GPU"),
    ("num_processes: 2\n", "A `distributed_type` must be specified"),
    ("- a list\n", "must be a mapping"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, text, message):
    f = tmp_path / "acc.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        check_accelerate_config(f)
    assert str(e.value).startswith(f"accelerate config {f}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_check_accelerate_config(tmp_path, capsys):
    assert cli(["check-accelerate-config", str(config_path("deepspeed_zero3"))]) == 0
    out = capsys.readouterr().out
    assert "ok:" in out and "DEEPSPEED, 2 processes" in out
    bad = tmp_path / "acc.yaml"
    bad.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_auto_wrap_policy: LAYERS\n")
    assert cli(["check-accelerate-config", str(bad)]) == 2
    assert "fsdp_config.fsdp_auto_wrap_policy: must be one of" in capsys.readouterr().err


# ---------------------------------------------------------------------------- sharded launches
NEEDS_FULL = {"rmu", "uoe", "needle", "uld", "eco", "safree", "uce", "rece", "esd", "concept_ablation", "advunlearn",
              "spm", "mace", "nemo", "all_but_one"}


def test_the_full_parameter_table():
    assert {n for n, cls in ALL_METHODS.items() if cls.full_parameters} == NEEDS_FULL


@pytest.mark.parametrize("var, what", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharded_launch_is_refused_naming_the_method_and_the_fix(monkeypatch, var, what):
    distributed.check_sharding(ALL_METHODS["rmu"])  # not launched sharded: nothing to refuse
    monkeypatch.setenv(var, "true")
    assert distributed.sharding() == what.lower()
    for name in sorted(NEEDS_FULL):
        with pytest.raises(ValueError) as e:
            distributed.check_sharding(ALL_METHODS[name])
        msg = str(e.value)
        assert msg.startswith(f"method {name!r} cannot run under {what}") and ALL_METHODS[name].full_parameters in msg
        assert str(config_path("ddp")) in msg
    with pytest.raises(ValueError, match=f"method 'npo' under {what}: .*not wired yet.*ddp.yaml"):
        distributed.check_sharding(ALL_METHODS["npo"])


def test_a_sharded_run_is_refused_before_any_model_loads(monkeypatch, tmp_path):
    import yaml

    import unlearn

    recipe = yaml.safe_load(open(os.path.join(ROOT, "recipes", "quickstart.yaml"), encoding="utf-8"))
    recipe["method"] = {"name": "rmu", "params": {"layer": 0}}
    recipe["output"] = {"dir": str(tmp_path / "r")}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="method 'rmu' cannot run under FSDP"):
        unlearn.run(recipe, progress=False)
    assert not (tmp_path / "r").exists()


def test_docs_table_lists_every_method():
    text = open(os.path.join(ROOT, "docs", "distributed.md"), encoding="utf-8").read()
    rows = {n: (kind, full) for n, kind, full in
            re.findall(r"^\| `(\w+)` \| (objective|editor) \| (yes|no) \|", text, flags=re.M)}
    assert set(rows) == set(ALL_METHODS)
    assert {n for n, (_, full) in rows.items() if full == "yes"} == NEEDS_FULL
    assert {n for n, (kind, _) in rows.items() if kind == "editor"} == set(EDITORS.names())
