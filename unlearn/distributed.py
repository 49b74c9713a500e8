"""Several processes (``accelerate launch --num_processes N unlearn-run ...``): who writes, and
how evaluation is shared.

Every process runs the same run loop (SPMD). Training is data-parallel through accelerate
(DDP: each process takes its share of every global batch, gradients are averaged). Evaluation
is shared, not repeated: every forward pass of the harness runs on ``items[rank::N]`` and the
per-item outputs are gathered and put back in item order on every process
(:func:`run_sharded`), so the metrics -- computed from the gathered outputs, identically on
every process -- are those of one process, and the model sees each item once. Only the main
process writes (the run directory, the report, the evaluation cache, checkpoints) and prints.

Outputs travel between processes as JSON with numpy arrays in base64 (:func:`_encode`), over
``torch.distributed`` byte tensors -- never pickled.

With one process (no ``WORLD_SIZE`` > 1 in the environment) every function here is the
identity / a no-op.

Where training runs: :func:`use_cpu` decides (a CUDA device when one is present, unless the
recipe says ``model.device: cpu`` or accelerate was launched with ``--cpu``). What cannot run
sharded: :func:`check_sharding` (FSDP / DeepSpeed, from the variables ``accelerate launch`` sets).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
from typing import Any, Callable

import numpy as np
import torch


def use_cpu(device: str = "auto") -> bool:
    """True when training stays on the CPU: ``device`` (the recipe's ``model.device``) is
    ``"cpu"``, accelerate was launched with ``--cpu`` (``ACCELERATE_USE_CPU``), or torch sees no
    CUDA device. ``"auto"`` otherwise trains on the GPU accelerate gives this process."""
    if device not in ("auto", "cpu"):
        raise ValueError(f"model.device must be 'auto' or 'cpu', got {device!r}")
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return device == "cpu" or forced or not torch.cuda.is_available()


def init(device: str = "auto") -> None:
    """Join the process group when launched with several processes (accelerate sets
    ``WORLD_SIZE``): gloo on the CPU, NCCL (and gloo for CPU tensors) on GPUs -- see
    :func:`use_cpu`. A no-op with one process. Safe to call more than once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _initialized():
        from accelerate import PartialState

        PartialState(cpu=use_cpu(device))


def sharding() -> str | None:
    """``"fsdp"`` or ``"deepspeed"`` when ``accelerate launch`` was given such a configuration
    (it sets ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``), else ``None`` (DDP, one process)."""
    for name, var in (("fsdp", "ACCELERATE_USE_FSDP"), ("deepspeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(var, "false").lower() in ("1", "true", "yes"):
            return name
    return None


def check_sharding(method) -> None:
    """Refuse, before any model loads, a run launched with FSDP or DeepSpeed (``method``: an
    objective or editor, instance or class).

    A method whose ``full_parameters`` class attribute says why it needs whole, unsharded
    parameters on every process (hooks on one layer, a second model built from the target's
    layers, closed-form edits of weight matrices) is named with that reason. The others would
    train sharded, but the run then evaluates and saves the model in every process, which
    needs the weights gathered back, and that is not wired yet. Either way the fix is the DDP
    configuration (each process holds the whole model), see docs/distributed.md.
    """
    mode = sharding()
    if mode is None:
        return
    from unlearn.accelerate_configs import config_path

    what = "FSDP" if mode == "fsdp" else "DeepSpeed"
    fix = f"launch with the DDP configuration instead: accelerate launch --config_file {config_path('ddp')} ..."
    if mode == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        fix += " (and DeepSpeed is not installed here: pip install deepspeed)"
    reason = getattr(method, "full_parameters", None)
    if reason:
        raise ValueError(f"method {method.name!r} cannot run under {what}: it needs the full, unsharded "
                         f"parameters on every process ({reason}); {fix}")
    raise ValueError(f"method {method.name!r} under {what}: training would be sharded, but evaluating and saving "
                     f"the unlearned model needs its weights gathered on every process, which is not wired yet; {fix}")


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, number of processes)``; ``(0, 1)`` outside a process group."""
    if not _initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors live: the CPU under gloo (also accelerate's ``cuda:nccl,cpu:gloo``),
    this process's GPU under NCCL alone (DeepSpeed, plain DDP on GPUs)."""
    backend = str(torch.distributed.get_backend())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_true(flag: bool) -> bool:
    """True on every process iff ``flag`` is true on every process (decisions that must agree,
    e.g. an evaluation cache hit: a process that computes would wait for the others)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def mean_over_processes(value: float) -> float:
    """The mean of ``value`` over the processes (e.g. a loss logged for the global batch)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return float(t.item()) / world()[1]


def broadcast(obj: Any) -> Any:
    """The main process's ``obj`` (JSON-able, numpy arrays allowed) on every process."""
    if world()[1] == 1:
        return obj
    return _decode(_all_gather_bytes(_encode(obj) if is_main() else b"")[0])


# ---------------------------------------------------------------------------- sharded passes
def run_sharded(fn: Callable[[list], Any], items: list) -> Any:
    """``fn(items)``, computed as ``fn(items[rank::N])`` on each of N processes and merged back
    into item order on every process.

    ``fn``'s output must be per-item along its first axis: a list or a numpy array of
    ``len(items)``, or a dict / list of such (nested). With fewer items than processes, every
    process computes everything (no sharding).
    """
    rank, n = world()
    if n == 1 or len(items) < n:
        return fn(items)
    local = fn(items[rank::n])
    parts = [_decode(b) for b in _all_gather_bytes(_encode(local))]
    return _merge(parts, [list(range(r, len(items), n)) for r in range(n)], len(items))


def _merge(parts: list[Any], index: list[list[int]], total: int) -> Any:
    first = parts[0]
    if isinstance(first, dict):
        return {k: _merge([p[k] for p in parts], index, total) for k in first}
    if isinstance(first, np.ndarray) and first.ndim >= 1 and all(
            p.shape[0] == len(ix) for p, ix in zip(parts, index)):
        out = np.empty((total, *first.shape[1:]), dtype=first.dtype)
        for p, ix in zip(parts, index):
            out[ix] = p
        return out
    if isinstance(first, list) and all(len(p) == len(ix) for p, ix in zip(parts, index)):
        out_l: list[Any] = [None] * total
        for p, ix in zip(parts, index):
            for v, i in zip(p, ix):
                out_l[i] = v
        return out_l
    return first  # not per item: the same on every process


# ---------------------------------------------------------------------------- transport
def _to_json(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__nd__": [obj.dtype.str, list(obj.shape),
                           base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode()]}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot send a {type(obj).__name__} between processes (JSON and numpy arrays only)")


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__nd__"}:
            dtype, shape, data = obj["__nd__"]
            return np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype)).reshape(shape).copy()
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def _encode(obj: Any) -> bytes:
    return json.dumps(_to_json(obj)).encode()


def _decode(b: bytes) -> Any:
    return _from_json(json.loads(b.decode()))


def _all_gather_bytes(data: bytes) -> list[bytes]:
    n, dev = world()[1], _comm_device()
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(n)]
    torch.distributed.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.zeros(longest, dtype=torch.uint8, device=dev) for _ in range(n)]
    torch.distributed.all_gather(bufs, buf.to(dev))
    return [bytes(b[: int(s.item())].cpu().numpy().tobytes()) for b, s in zip(bufs, sizes)]


__all__ = ["use_cpu", "init", "sharding", "check_sharding", "world", "is_main", "barrier", "all_true", "mean_over_processes", "broadcast", "run_sharded"]
