"""Compare concept-erasure methods on the tiny text-to-image zoo: run each visual recipe with
several seeds and print erasure rates, retain accuracy, alignment, FID-like, edit and wall time
as mean +- std (a Markdown table).

    .venv/bin/python scripts/image_table.py                         # every i2p-tiny-*.yaml, seed 0
    .venv/bin/python scripts/image_table.py recipes/i2p-tiny-uce.yaml --seeds 0 1 2
    .venv/bin/python scripts/image_table.py --set eval.max_items=8   # smoke

Runs go to ``--out/<recipe>-s<seed>`` (overwritten), one CPU thread each (the recipes' default).
The target row is the first run's before-erasure evaluation (the same for every recipe of one
world and model).
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

from method_table import _ms  # noqa: E402  (scripts/ is on sys.path when this script runs)

COLS = ("erasure_explicit", "erasure_implicit", "retain_in_domain", "retain_cross_domain", "alignment", "fid_like")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="recipe files (default: recipes/i2p-tiny-*.yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="/tmp/unlearn-image-table")
    ap.add_argument("--json", default=None, help="write every run's summary here (appends to an existing file)")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every run (key=value)")
    args = ap.parse_args()

    import unlearn

    recipes = args.recipes or sorted(glob.glob("recipes/i2p-tiny-*.yaml"))
    store = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    rows: dict[str, list[dict]] = {}
    target = None
    for path in recipes:
        name = Path(path).stem
        for seed in args.seeds:
            t0 = time.time()
            res = unlearn.run(path, [f"seed={seed}", f"output.dir={args.out}/{name}-s{seed}", "output.overwrite=true",
                                     *args.set], progress=False)
            s = res.summary
            rec = {"recipe": name, "seed": seed, **{k: s["unlearned"][k] for k in COLS},
                   "edit_seconds": (res.metrics.get("editor") or {}).get("edit_seconds", s["edit_seconds"]),
                   "wall_seconds": s["wall_seconds"],
                   "target_fingerprint": res.metrics["provenance"]["model"]["fingerprint_before"]}
            if "target" in s and target is None:
                target = s["target"]
            rows.setdefault(name, []).append(rec)
            store[f"{name}-s{seed}"] = rec
            print(f"[table] {name} seed {seed}: " + " ".join(f"{k} {rec[k]}" for k in COLS)
                  + f" ({time.time() - t0:.0f} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(store, indent=1))
    print("\n| method (recipe) | erasure explicit ↑ | erasure implicit ↑ | retain in-domain ↑ | retain cross-domain ↑ "
          "| alignment ↑ | FID-like ↓ | edit s | wall s | seeds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    if target:
        print("| target (before) | " + " | ".join(_ms([target[k]], ".3f") for k in COLS) + " | | | |")
    for name, rs in rows.items():
        print(f"| {name} | " + " | ".join(_ms([r[k] for r in rs], ".3f") for k in COLS)
              + f" | {_ms([r['edit_seconds'] for r in rs], '.2f')} | {_ms([r['wall_seconds'] for r in rs], '.0f')} | "
              + " ".join(str(r["seed"]) for r in rs) + " |")


if __name__ == "__main__":
    main()
