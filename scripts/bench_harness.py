"""Benchmark: the harness's ``tofu`` suite vs running each metric on its own.

"On its own" is how per-metric evaluation code usually runs: every metric (and every
aggregate that needs metric values: forget quality, model utility) makes its own forward
passes. The harness plans all passes of a split, merges the ones that share a forward pass
and runs each once. Both paths use the same pass and metric code, so values are equal;
the script checks that and prints the time ratio (median of repeats).

    python scripts/bench_harness.py --repeats 3 --items 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def standalone(adapter, splits, suite, batch_size):
    """Each metric with a private PassStore; aggregates recompute the values they need."""
    from unlearn.evaluators import harness
    from unlearn.evaluators.harness import PassStore, SplitInfo

    res = {"splits": {}, "suite": suite.name}
    n_passes = 0
    for name, items in splits.items():
        info = SplitInfo(name, harness.split_kind(name, suite.split_kinds), items)
        out = {"metrics": {}}
        for m in suite.metrics:
            if info.kind not in m.kinds:
                continue
            store = PassStore(adapter, items, batch_size)
            out["metrics"][m.name] = m.compute(store, info).to_dict()
            out.update(m.extras(store, info))  # extras recompute from the same private store
            n_passes += store.n_passes
        res["splits"][name] = out
    # aggregates on their own: forget quality needs the forget truth ratios, model utility the
    # nine utility values -- recomputed, as a standalone aggregate would
    from unlearn.evaluators.suites import ModelUtility, RougeL, TruthRatio, Prob, UTILITY_SPLITS

    tr = TruthRatio()
    fs = SplitInfo("forget", "forget", splits["forget"])
    st = PassStore(adapter, splits["forget"], batch_size)
    tr.extras(st, fs)
    n_passes += st.n_passes
    for split in UTILITY_SPLITS.values():
        info = SplitInfo(split, harness.split_kind(split, suite.split_kinds), splits[split])
        for m in (Prob(), RougeL(), TruthRatio()):
            st = PassStore(adapter, splits[split], batch_size)
            m.compute(st, info)
            n_passes += st.n_passes
    return res, n_passes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--items", type=int, default=100, help="items per split")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from unlearn.adapters.text import TextAdapter
    from unlearn.evaluators import harness
    from unlearn.evaluators.suites import get_suite
    from unlearn.tasks.tofu import load_tofu

    ad = TextAdapter.load("zoo:tiny-llama/target")
    data = load_tofu(forget_split="forget10", retain_split="retain90")
    splits = {k: v[: args.items] for k, v in data.eval_splits.items()}
    suite = get_suite("tofu")
    t_h, t_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        rh = harness.evaluate(ad, splits, suite, batch_size=args.batch_size, progress=False)
        t_h.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rs, n_standalone = standalone(ad, splits, suite, args.batch_size)
        t_s.append(time.perf_counter() - t0)
    for sp in splits:
        for m, v in rh["splits"][sp]["metrics"].items():
            w = rs["splits"][sp]["metrics"][m]["value"]
            if abs(v["value"] - w) > 1e-5 * max(1.0, abs(w)):  # shared-prefix pass: float rounding only
                raise SystemExit(f"values differ: {sp}/{m}: harness {v['value']} vs standalone {w}")
    n_h = sum(p["count"] for p in rh["passes"].values())
    mh, ms = statistics.median(t_h), statistics.median(t_s)
    print(f"items/split {args.items}, splits {list(splits)}, repeats {args.repeats}, threads {args.threads}")
    print(f"harness:    {mh:7.2f} s  ({n_h} passes)   runs {[round(t, 2) for t in t_h]}")
    print(f"standalone: {ms:7.2f} s  ({n_standalone} passes)   runs {[round(t, 2) for t in t_s]}")
    print(f"speed-up: {ms / mh:.2f}x at equal values")


if __name__ == "__main__":
    main()
