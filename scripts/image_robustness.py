"""Robustness of concept erasure on the tiny text-to-image zoo: every image method (recipe) x
every image attack. Prints, per method, the erasure rate before any attack and each attack's
concept rate after it (the attack success rate, ASR) on the explicit and implicit forget
prompts, the retain in-domain accuracy after the attack, and per run the method's retain
accuracies, FID-like, edit/training time and run wall time (a Markdown table).

    .venv/bin/python scripts/image_robustness.py                          # the default methods, seed 0
    .venv/bin/python scripts/image_robustness.py recipes/i2p-tiny-uce.yaml --seeds 0 1 2
    .venv/bin/python scripts/image_robustness.py --set eval.max_items=4 --set eval.sample_steps=2   # smoke
    .venv/bin/python scripts/image_robustness.py --table runs/a.json runs/b.json   # mean ± std over the seeds stored

Runs go to ``--out/<recipe>-s<seed>`` (overwritten), one CPU thread each. The attacks are the
sets ``robustness`` and ``optimisation`` (``--attacks`` to change), with their default budgets
unless ``--set eval.attack_params...`` says otherwise; ``eval.compare_target`` is off (the
attacks on the un-erased target are in tests/test_optim_attacks.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHODS = ("uce", "rece", "esd", "safree", "grad-ascent", "npo", "salun", "concept-ablation")
SPLITS = ("forget_explicit", "forget_implicit")


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _ms(xs: list, fmt: str = ".2f") -> str:
    from unlearn.report import mean_std

    return mean_std(xs, fmt, sep="±")


def seed_table(store: dict) -> str:
    """The Markdown table of the runs in ``store`` (what ``--json`` writes), one row per recipe with
    mean±std over its seeds: erasure explicit / implicit, retain in-domain / cross-domain, FID-like,
    each attack's ASR explicit / implicit, edit seconds and run seconds."""
    by: dict[str, list[dict]] = {}
    for r in store.values():
        by.setdefault(r["recipe"], []).append(r)
    attacks = list(dict.fromkeys(a for rs in by.values() for r in rs for a in r["attacks"]))
    lines = ["| method (recipe) | seeds | erasure expl / impl | retain in / cross | FID-like | "
             + " | ".join(f"`{a}`" for a in attacks) + " | edit s | run s |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in attacks) + " | --- | --- |"]
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        cells = []
        for a in attacks:
            v = [r["attacks"].get(a) for r in rs]
            cells.append(" / ".join(_ms([x["asr"].get(sp) if x else None for x in v]) for sp in SPLITS))
        lines.append(f"| {name} | {' '.join(str(r['seed']) for r in rs)} | "
                     f"{_ms([r['erasure_explicit'] for r in rs])} / {_ms([r['erasure_implicit'] for r in rs])} | "
                     f"{_ms([r['retain_in_domain'] for r in rs])} / {_ms([r.get('retain_cross_domain') for r in rs])} | "
                     f"{_ms([r.get('fid_like') for r in rs], '.0f')} | " + " | ".join(cells)
                     + f" | {_ms([r.get('edit_seconds') for r in rs], '.1f')} | {_ms([r['wall_seconds'] for r in rs], '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="recipe files (default: recipes/i2p-tiny-<method>.yaml that exist)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--attacks", default="[robustness, optimisation]", help="eval.attacks for every run (YAML list)")
    ap.add_argument("--out", default="/tmp/unlearn-image-robustness")
    ap.add_argument("--json", default=None, help="write every run's numbers here (appends to an existing file)")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every run (key=value)")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="run nothing: print the mean±std table of the runs stored in these --json files")
    args = ap.parse_args()
    if args.table:
        store = {}
        for f in args.table:
            store.update(json.loads(Path(f).read_text()))
        print(seed_table(store))
        return

    import unlearn

    recipes = args.recipes or [p for m in METHODS if (p := Path(f"recipes/i2p-tiny-{m}.yaml")).exists()]
    store = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    runs: list[dict] = []
    for path in recipes:
        name = Path(path).stem
        for seed in args.seeds:
            t0 = time.time()
            res = unlearn.run(path, [f"seed={seed}", f"output.dir={args.out}/{name}-s{seed}", "output.overwrite=true",
                                     f"eval.attacks={args.attacks}", "eval.compare_target=false", *args.set],
                              progress=False)
            s = res.summary["unlearned"]
            rec = {"recipe": name, "seed": seed, "erasure_explicit": s["erasure_explicit"],
                   "erasure_implicit": s["erasure_implicit"], "retain_in_domain": s["retain_in_domain"],
                   "retain_cross_domain": s.get("retain_cross_domain"), "fid_like": s.get("fid_like"),
                   "edit_seconds": (res.metrics.get("editor") or {}).get("edit_seconds", res.summary.get("edit_seconds")),
                   "wall_seconds": round(time.time() - t0, 1), "attacks": {}}
            for att, r in (res.metrics.get("attacks") or {}).get("unlearned", {}).items():
                st = r["settings"]
                rec["attacks"][att] = {"asr": r["asr"]["after"], "retain_in_domain": r["after"].get("retain"),
                                       "seconds": r["seconds"], "steps_done": st.get("steps_done"),
                                       "tokens": st.get("tokens")}
            runs.append(rec)
            store[f"{name}-s{seed}"] = rec
            print(f"[robustness] {name} seed {seed}: erasure {_f(rec['erasure_explicit'])} / "
                  f"{_f(rec['erasure_implicit'])}; " + ", ".join(
                      f"{a} ASR {_f(v['asr'].get(SPLITS[0]))}/{_f(v['asr'].get(SPLITS[1]))}"
                      for a, v in rec["attacks"].items()) + f" ({rec['wall_seconds']:.0f} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(store, indent=1))
    attacks = list(dict.fromkeys(a for r in runs for a in r["attacks"]))
    print("\nCells: ASR explicit / implicit (concept rate after the attack) [retain in-domain after].\n")
    print("| method (recipe) | seed | erasure before expl / impl | retain in / cross | FID-like | "
          + " | ".join(f"`{a}`" for a in attacks) + " | edit s | run s |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in attacks) + " | --- | --- |")
    for r in runs:
        cells = []
        for a in attacks:
            v = r["attacks"].get(a)
            cells.append("" if v is None else f"{_f(v['asr'].get(SPLITS[0]))} / {_f(v['asr'].get(SPLITS[1]))} "
                                              f"[{_f(v['retain_in_domain'])}]")
        fid = "n/a" if r.get("fid_like") is None else f"{r['fid_like']:.0f}"
        edit = "n/a" if r.get("edit_seconds") is None else f"{r['edit_seconds']:.2f}"
        print(f"| {r['recipe']} | {r['seed']} | {_f(r['erasure_explicit'])} / {_f(r['erasure_implicit'])} | "
              f"{_f(r['retain_in_domain'])} / {_f(r.get('retain_cross_domain'))} | {fid} | "
              + " | ".join(cells) + f" | {edit} | {r['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main()
