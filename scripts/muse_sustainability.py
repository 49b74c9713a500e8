"""MUSE's sustainability on the passages world: sequential unlearning requests.

Request k forgets the next ``--per-request`` targets, starting from the model that request
k-1 left (its run's ``checkpoint/``). After each request the model is evaluated on the
*cumulative* forget set (every target forgotten so far) and on the retain probes, so the table
shows whether earlier forgetting holds and how utility decays as requests pile up.

    .venv/bin/python scripts/muse_sustainability.py recipes/muse-npo.yaml --requests 5 --per-request 2
    .venv/bin/python scripts/muse_sustainability.py recipes/muse-grad-diff.yaml --out /tmp/sust --json sust.json

Prints a Markdown table (request, targets forgotten so far, VerbMem / KnowMem forget, KnowMem
retain, PrivLeak, wall seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="a muse recipe (its method and training settings are used for every request)")
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--per-request", type=int, default=2, help="targets per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/unlearn-sustainability")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every request (key=value)")
    args = ap.parse_args()

    import unlearn
    from unlearn.evaluation import evaluate

    source = "zoo:tiny-passages/target"
    rows = []
    before = evaluate(source, "muse", recipe=args.recipe, overrides=[f"seed={args.seed}", "task.forget_split=batch"
                                                                       f"{args.requests * args.per_request}", *args.set])
    rows.append({"request": 0, "forgotten": 0, **before.summary["model"],
                 "seconds": 0.0})
    for k in range(1, args.requests + 1):
        a, b = (k - 1) * args.per_request + 1, k * args.per_request
        t0 = time.time()
        run = unlearn.run(args.recipe, [f"seed={args.seed}", f"model.source={source}", f"task.forget_split=targets{a}-{b}",
                                        "train.save_checkpoint=true", f"output.dir={args.out}/request{k}",
                                        "output.overwrite=true", "eval.compare_target=false", *args.set], progress=False)
        source = str(Path(run.run_dir) / "checkpoint")
        ev = evaluate(source, "muse", recipe=args.recipe, overrides=[f"seed={args.seed}", f"task.forget_split=batch{b}",
                                                                      *args.set])
        rows.append({"request": k, "forgotten": b, **ev.summary["model"], "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))

    def f(x, d=3):
        return "n/a" if x is None else f"{x:.{d}f}"

    print("\n| request | targets forgotten | VerbMem forget | KnowMem forget | KnowMem retain | PrivLeak | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['request']} | {r['forgotten']} | {f(r['verbmem_forget'])} | {f(r['knowmem_forget'])} | "
              f"{f(r['knowmem_retain'])} | {f(r['privleak'], 1)} | {r['seconds']} |")


if __name__ == "__main__":
    main()
