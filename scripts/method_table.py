"""Compare unlearning methods on the tiny TOFU-style world: run each recipe with several seeds
and print forget quality, model utility and wall time as mean +- std (a Markdown table).

    .venv/bin/python scripts/method_table.py                       # every tofu-*.yaml, seeds 0 1 2
    .venv/bin/python scripts/method_table.py recipes/tofu-npo.yaml recipes/tofu-rmu.yaml --seeds 0 1
    .venv/bin/python scripts/method_table.py --out /tmp/table --json table.json

Runs go to ``--out/<recipe>-s<seed>`` (overwritten). One CPU thread per run (the recipes'
default); start two copies on disjoint recipe lists to use two cores. The target's and the
retain model's evaluations are cached across runs (``UNLEARN_CACHE``), so only the first run
pays for them. Wall time is the run's own ``wall_seconds`` (unlearning + evaluation).
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path


def _ms(xs: list, fmt: str = ".2f") -> str:
    from unlearn.report import mean_std

    return mean_std(xs, fmt, sep=" ± ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="recipe files (default: recipes/tofu-*.yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="/tmp/unlearn-table")
    ap.add_argument("--json", default=None, help="write every run's summary here (appends to an existing file)")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every run (key=value)")
    args = ap.parse_args()

    import unlearn

    recipes = args.recipes or sorted(glob.glob("recipes/tofu-*.yaml"))
    rows: dict[str, list[dict]] = {}
    store = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    target = None
    for path in recipes:
        name = Path(path).stem
        for seed in args.seeds:
            t0 = time.time()
            res = unlearn.run(path, [f"seed={seed}", f"output.dir={args.out}/{name}-s{seed}", "output.overwrite=true",
                                     *args.set], progress=False)
            s = res.summary
            rec = {"recipe": name, "seed": seed, "forget_quality": s["unlearned"]["forget_quality"],
                   "model_utility": s["unlearned"]["model_utility"], "forget_rouge": s["unlearned"]["forget_rouge"],
                   "wall_seconds": s["wall_seconds"], "train_seconds": s["train_seconds"],
                   "target_fingerprint": res.metrics["provenance"]["model"]["fingerprint_before"]}
            if "target" in s:
                target = s["target"]
            rows.setdefault(name, []).append(rec)
            store[f"{name}-s{seed}"] = rec
            print(f"[table] {name} seed {seed}: FQ {rec['forget_quality']:.3g} MU {rec['model_utility']:.4f} "
                  f"ROUGE {rec['forget_rouge']:.3f} ({time.time() - t0:.0f} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(store, indent=1))
    print("\n| method (recipe) | forget quality | model utility | forget ROUGE-L | wall s |")
    print("| --- | --- | --- | --- | --- |")
    if target:
        print(f"| target (before) | {target['forget_quality']:.2g} | {target['model_utility']:.4f} | "
              f"{target['forget_rouge']:.3f} | |")
    for name, rs in rows.items():
        fq = [r["forget_quality"] for r in rs]
        print(f"| {name} | {_ms(fq, '.2g')} | {_ms([r['model_utility'] for r in rs], '.4f')} | "
              f"{_ms([r['forget_rouge'] for r in rs], '.3f')} | {_ms([r['wall_seconds'] for r in rs], '.0f')} |")


if __name__ == "__main__":
    main()
