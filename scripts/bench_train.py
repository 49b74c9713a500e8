"""Benchmarks of the unlearning step (ratios, measured in one run; see docs/performance.md).

    python scripts/bench_train.py matmul                      # this machine's fp32 matmul FLOP/s
    python scripts/bench_train.py step --hidden 512           # step time and FLOP/s per method
    python scripts/bench_train.py memory --hidden 768 --layers 14   # peak memory per method (~100M params)
    python scripts/bench_train.py procs                       # 2 processes vs 1, same global batch

Every measurement runs on ``--threads`` torch threads (default 1: this machine has 2 cores,
and torch on 2 threads with the other core busy has been measured 20x slower). Methods are
timed interleaved (method A, B, C, A, B, C, ...) so that drifts of the machine hit all alike;
the median over ``--repeats`` is reported. FLOPs of a step are counted as 6 x (parameters
outside the embedding) x (tokens through forward+backward) + 2 x (parameters) x (tokens
through forward only), the usual transformer estimate; attention's quadratic term is left
out (sequences here are ~60 tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = {  # name -> (objective, its params)
    "grad_ascent": ("grad_ascent", {}),
    "npo_forget_only": ("npo", {"alpha": 0.0}),  # NPO's own cost over GA: the cached reference NLLs
    "grad_diff": ("grad_diff", {}),
    "grad_diff_kl": ("grad_diff", {"retain_loss": "kl"}),
    "npo": ("npo", {}),
    "simnpo": ("simnpo", {}),
    "rmu": ("rmu", {"layer": 1}),
}


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def build(hidden: int, layers: int, vocab: int = 1024):
    from unlearn.adapters.text import TextAdapter
    from unlearn.tasks.tofu import load_tofu
    from unlearn.tasks.tofu_world import build_world, corpus
    from unlearn.zoo.models import TinyLlamaSpec, build_tiny_llama, train_tokenizer

    w = build_world()
    tok = train_tokenizer(corpus(w)[:4000], vocab)
    spec = TinyLlamaSpec(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64 or 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64))
    model = build_tiny_llama(spec, tok, seed=0)
    data = load_tofu(forget_split="forget10", retain_split="retain90", eval_splits=["forget"])
    return TextAdapter(model, tok), data


def _objective(name: str):
    from unlearn.objectives import OBJECTIVES

    obj_name, params = METHODS[name]
    cls = OBJECTIVES.get(obj_name)
    return cls(cls.Config(**params))


def one_method(base, data, name: str, steps: int, batch: int) -> dict:
    """Setup + ``steps`` optimizer steps of one method on a copy of ``base``."""
    from unlearn.trainer import TrainSettings, train

    adapter = copy.deepcopy(base)
    obj = _objective(name)
    t0 = time.perf_counter()
    ref = adapter.reference() if obj.needs_reference() else None
    obj.setup(adapter, ref, data.forget)
    setup = time.perf_counter() - t0
    # count tokens of the batches the trainer will see (same seed, same order)
    s = TrainSettings(epochs=100, max_steps=steps, batch_size=batch, lr=1e-5)
    log = train(adapter, obj, data.forget, data.retain if obj.needs_retain() else None, s, progress=False)
    return {"setup_s": setup, "step_s": log.seconds / log.steps, "steps": log.steps}


def tokens_per_step(adapter, data, batch: int) -> float:
    b = adapter.collate(data.forget[:batch])
    return float(b["attention_mask"].sum())


def cmd_step(a) -> dict:
    base, data = build(a.hidden, a.layers)
    n_all = sum(p.numel() for p in base.model.parameters())
    n_emb = base.model.get_input_embeddings().weight.numel()
    tok = tokens_per_step(base, data, a.batch)
    peak = matmul_flops()
    times: dict[str, list[float]] = {m: [] for m in a.methods}
    setups: dict[str, list[float]] = {m: [] for m in a.methods}
    for _ in range(a.repeats):
        for m in a.methods:
            r = one_method(base, data, m, a.steps, a.batch)
            times[m].append(r["step_s"])
            setups[m].append(r["setup_s"])
    ga = statistics.median(times["grad_ascent"]) if "grad_ascent" in times else None
    out = {"hidden": a.hidden, "layers": a.layers, "params": n_all, "tokens_per_forget_batch": tok,
           "threads": torch.get_num_threads(), "matmul_flops": peak, "methods": {}}
    for m in a.methods:
        st = statistics.median(times[m])
        obj = _objective(m)
        batches = 2 if obj.needs_retain() else 1
        flops = 6 * (n_all - n_emb) * tok * batches  # forward + backward of forget (+ retain) batches
        if m == "grad_diff_kl":
            flops += 2 * (n_all - n_emb) * tok  # the reference's forward on the retain batch
        gd = statistics.median(times["grad_diff"]) if "grad_diff" in times else None
        out["methods"][m] = {"step_s": st, "setup_s": statistics.median(setups[m]),
                             "vs_grad_ascent": st / ga if ga else None,
                             # methods with a retain batch process twice GA's tokens: compare with GradDiff
                             "vs_grad_diff": st / gd if gd and batches == 2 else None,
                             "flops_per_s": flops / st, "of_matmul_peak": flops / st / peak}
    return out


def cmd_memory(a) -> dict:
    """Each method in its own process: peak resident memory of setup + 2 steps."""
    out = {}
    for m in a.methods:
        p = subprocess.run([sys.executable, __file__, "_memory_one", m, "--hidden", str(a.hidden), "--layers",
                            str(a.layers), "--batch", str(a.batch), "--threads", str(a.threads)],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        if p.returncode != 0:
            out[m] = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
            continue
        out[m] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def cmd_memory_one(a) -> dict:
    base, data = build(a.hidden, a.layers)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r = one_method(base, data, a.method, 2, a.batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"params": sum(p.numel() for p in base.model.parameters()), "peak_rss_mib": round(peak),
            "model_loaded_rss_mib": round(before), "step_s": r["step_s"]}


def cmd_procs(a) -> dict:
    """The quickstart recipe, shortened, with 1 and 2 processes (torchrun): wall and train time."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sets = ["train.max_steps=12", "train.batch_size=16", "eval.max_items=4", "task.retain_model=null",
            "eval.n_samples=0", "eval.compare_target=false", "output.overwrite=true"]
    out = {}
    for n in (1, 2, 1, 2):
        argv = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] if n > 1
                else [sys.executable]) + ["-m", "unlearn.cli", "run", os.path.join(root, "recipes", "quickstart.yaml"),
                                          "-q"]
        d = f"/tmp/unlearn-bench-procs-{n}"
        for s in [*sets, f"output.dir={d}"]:
            argv += ["--set", s]
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - t0
        m = json.loads(open(f"{d}/metrics.json").read())
        out.setdefault(n, []).append({"wall_s": wall, "train_s": m["train"]["seconds"],
                                      "step_s": m["train"]["seconds"] / m["train"]["steps"]})
    res = {n: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for n, runs in out.items()}
    res["ratio_step_2_over_1"] = res[2]["step_s"] / res[1]["step_s"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["matmul", "step", "memory", "procs", "_memory_one"])
    p.add_argument("method", nargs="?")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    if a.what == "matmul":
        res = {"threads": a.threads, "matmul_flops_1024": matmul_flops()}
    elif a.what == "step":
        res = cmd_step(a)
    elif a.what == "memory":
        res = cmd_memory(a)
    elif a.what == "_memory_one":
        res = cmd_memory_one(a)
    else:
        res = cmd_procs(a)
    print(json.dumps(res, indent=None if a.what == "_memory_one" else 1, default=float))


if __name__ == "__main__":
    main()
