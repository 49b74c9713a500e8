"""The accelerate configurations shipped with unlearn, and a check of any such file.

``ddp.yaml`` (several GPUs, DDP), ``cpu_ddp.yaml`` (several CPU processes, gloo), ``fsdp.yaml``
(FSDP full shard, transformer-layer wrap) and ``deepspeed_zero3.yaml`` (DeepSpeed ZeRO-3).
:func:`config_path` finds one; ``python -m unlearn.accelerate_configs NAME`` prints its path::

    accelerate launch --config_file $(python -m unlearn.accelerate_configs ddp) -m unlearn run RECIPE

:func:`check_accelerate_config` (``unlearn check-accelerate-config FILE``) reads a file with
accelerate's own config class and launcher arguments, so that a wrong key or value is one
line naming the file and the key, here and now, not a failure on a GPU machine later. The
FSDP and DeepSpeed sections are checked for their structure and values only: DeepSpeed need
not be installed to check a file.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any

import yaml

NAMES = ("ddp", "cpu_ddp", "fsdp", "deepspeed_zero3")
_HERE = Path(__file__).resolve().parent

# values accelerate accepts but does not check when it reads the file (its launcher does, later)
_BOOL = {"use_cpu", "debug", "same_network", "enable_cpu_affinity", "downcast_bf16", "tpu_use_cluster", "tpu_use_sudo",
         "fsdp_offload_params", "fsdp_use_orig_params", "fsdp_sync_module_states", "fsdp_cpu_ram_efficient_loading",
         "fsdp_forward_prefetch", "fsdp_activation_checkpointing", "fsdp_activation_checkpointing_offload",
         "zero3_init_flag", "zero3_save_16bit_model"}
_POSITIVE_INT = {"num_processes", "num_machines", "gradient_accumulation_steps", "fsdp_min_num_params"}


def config_path(name: str) -> Path:
    """The path of the shipped configuration ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"no shipped accelerate configuration {name!r}; known: {', '.join(NAMES)}")
    return _HERE / f"{name}.yaml"


def _choices() -> dict[str, tuple]:
    from accelerate.utils import DistributedType
    from accelerate.utils import constants as c

    return {"distributed_type": tuple(d.value for d in DistributedType),
            "mixed_precision": ("no", "fp16", "bf16", "fp8"),
            "fsdp_version": (1, 2),
            "fsdp_sharding_strategy": tuple(c.FSDP_SHARDING_STRATEGY),
            "fsdp_auto_wrap_policy": tuple(c.FSDP_AUTO_WRAP_POLICY),
            "fsdp_state_dict_type": tuple(c.FSDP_STATE_DICT_TYPE),
            "fsdp_backward_prefetch": tuple(c.FSDP_BACKWARD_PREFETCH),
            "zero_stage": (0, 1, 2, 3),
            "offload_optimizer_device": ("none", "cpu", "nvme"),
            "offload_param_device": ("none", "cpu", "nvme")}


def _section_keys(title: str) -> set[str]:
    """The launcher's argument names of one of its groups ("FSDP Arguments", "DeepSpeed Arguments")."""
    from accelerate.commands.launch import launch_command_parser

    groups = [g for g in launch_command_parser()._action_groups if g.title == title]
    return {a.dest for g in groups for a in g._group_actions}


def _bad(path, key: str, problem: str, known=()) -> ValueError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else (f"; known: {', '.join(sorted(known))}" if known else "")
    return ValueError(f"accelerate config {path}: {key}: {problem}{hint}")


def _check_value(path, key: str, value: Any, choices: dict[str, tuple], label: str | None = None) -> None:
    """``key``: accelerate's name of the value; ``label``: where it stands in the file (default ``key``)."""
    label = label or key
    if key in _BOOL and not (isinstance(value, bool) or str(value).lower() in ("true", "false")):
        raise _bad(path, label, f"must be true or false, got {value!r}")
    if key in _POSITIVE_INT and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _bad(path, label, f"must be an integer >= 1, got {value!r}")
    if key == "gradient_clipping" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise _bad(path, label, f"must be a number > 0, got {value!r}")
    if key in choices:
        norm = str(value).upper() if key.startswith("fsdp_") and key != "fsdp_version" else value
        if key == "fsdp_version" and str(value) in ("1", "2"):
            norm = int(value)
        if norm not in choices[key]:
            raise _bad(path, label, f"must be one of {', '.join(map(str, choices[key]))}, got {value!r}")


def check_accelerate_config(path: str | Path):
    """Read an ``accelerate launch --config_file`` YAML as accelerate will; raise ``ValueError``
    (one line: the file, the key, what is wrong) on an unknown key or a wrong value.

    Returns accelerate's ``ClusterConfig``. Does not need DeepSpeed, a GPU, or several of them.
    """
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"accelerate config {path}: no such file; shipped ones: "
                         f"{', '.join(str(config_path(n)) for n in NAMES)}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"accelerate config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"accelerate config {path}: must be a mapping of accelerate's keys, got {type(raw).__name__}")
    if raw.get("compute_environment", "LOCAL_MACHINE") != "LOCAL_MACHINE":
        raise _bad(path, "compute_environment", f"only LOCAL_MACHINE is checked here, got {raw['compute_environment']!r}")
    known = set(ClusterConfig.__dataclass_fields__) | {"fp16", "dynamo_backend"}  # the last two: old names accelerate converts
    choices = _choices()
    for key, value in raw.items():
        if key not in known:
            raise _bad(path, key, "unknown key", known)
        if not isinstance(value, dict):
            _check_value(path, key, value, choices)
    try:
        config = load_config_from_file(str(path))
    except ValueError as e:  # e.g. a distributed_type accelerate does not know
        raise ValueError(f"accelerate config {path}: {str(e).splitlines()[0]}") from None
    dtype = str(config.distributed_type.value)
    for section, wanted, title, prefix in (("fsdp_config", "FSDP", "FSDP Arguments", "fsdp_"),
                                           ("deepspeed_config", "DEEPSPEED", "DeepSpeed Arguments", "")):
        body = raw.get(section) or {}
        if not isinstance(body, dict):
            raise _bad(path, section, f"must be a mapping, got {type(body).__name__}")
        if body and dtype != wanted:
            raise _bad(path, section, f"is given but distributed_type is {dtype}; set distributed_type: {wanted} or "
                                      "remove the section")
        allowed = _section_keys(title)
        for key, value in body.items():
            full = key if key.startswith(prefix) else prefix + key  # accelerate adds fsdp_ itself
            if full not in allowed:
                raise _bad(path, f"{section}.{key}", "unknown key", allowed)
            _check_value(path, full, value, choices, label=f"{section}.{key}")
    return config


def notes(config) -> list[str]:
    """What a checked configuration needs on the machine that launches it (one line each)."""
    out = []
    if str(config.distributed_type.value) == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        out.append("DeepSpeed is not installed here: pip install deepspeed on the machine that launches this")
    if str(config.distributed_type.value) in ("FSDP", "DEEPSPEED"):
        out.append("`unlearn run` refuses sharded training for now (docs/distributed.md); use ddp.yaml to run")
    return out


__all__ = ["NAMES", "config_path", "check_accelerate_config", "notes"]
