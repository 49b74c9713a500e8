"""Do the attacks have teeth? Unlearn forget10 from a zoo target with gradient ascent (one or
several strengths), attack each unlearned copy with ``relearn`` and ``in_context``, and print the
forget Prob / ROUGE-L before and after each attack.

    .venv/bin/python scripts/attack_teeth.py                                   # tiny-reader, 3 strengths
    .venv/bin/python scripts/attack_teeth.py --lr 2e-4 --epochs 2 --max-items 200
    .venv/bin/python scripts/attack_teeth.py --model zoo:tiny-llama/target --lr 3e-4 --epochs 3

For every (lr, epochs) pair (the product of ``--lr`` and ``--epochs``) the script unlearns a fresh
copy of the model (GradAscent, all parameters, batch 32 on all of the forget split) and runs:

* ``relearn``: trains on one half of the forget items and is scored on the other half;
* ``in_context``: the item's own answer + 2 other answers of its author in a ``Context:`` prefix;
* ``in_context`` with ``include_own_fact: false`` (``--no-control`` skips it): only the related
  facts, the control that says whether the recovery comes from reading the fact back.

The attacks also run on the target itself (its "after" shows what the attack does to a model that
never forgot). The evaluation uses the first ``--max-items`` forget items (in TOFU order, whole
authors). One CPU thread. The last lines are a Markdown summary table; its last column is the
share of greedy answers that contain the asked value itself (bare / in_context / related facts
only), which separates reading the fact back from merely repairing the name and the template.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch


def _row(label: str, m: dict) -> str:
    f = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
    return f"| {label:<32} | {f(m['prob'])} | {f(m['rouge'])} | {f(m['truth_ratio'])} |"


def _value_recall(adapter, forget, args, control: bool) -> dict:
    """Share of greedy answers that contain the item's ``value`` (the asked fact itself, not the
    name or the template): bare question, in_context, and the related-facts-only control."""
    from unlearn.evaluators.attacks import InContext, InContextConfig
    from unlearn.zoo.build_reader import value_accuracy

    def recall(items):
        return value_accuracy(adapter, [it["question"] for it in items], [it["value"] for it in items],
                              batch_size=64, max_new_tokens=args.max_new_tokens)

    out = {}
    for key, own in (("in_context", True), ("in_context_related", False))[: 2 if control else 1]:
        _, before, after, _ = InContext(InContextConfig(include_own_fact=own), seed=args.seed).rewrite(forget)
        out.setdefault("bare", recall(before))
        out[key] = recall(after)
    return out


def _attack_all(adapter, forget, retain, args, control: bool) -> dict:
    from unlearn.evaluators.attacks import evaluate_attacks

    ev = dict(batch_size=64, max_new_tokens=args.max_new_tokens, seed=args.seed, progress=False)
    params = {"relearn": {"steps": args.relearn_steps, "lr": args.relearn_lr, "split": args.relearn_split}}
    res = evaluate_attacks(adapter, forget, retain, ["relearn", "in_context"], params=params, **ev)
    if control:
        res["in_context_related"] = evaluate_attacks(adapter, forget, retain, ["in_context"],
                                                     params={"in_context": {"include_own_fact": False}}, **ev)["in_context"]
    res["value_recall"] = _value_recall(adapter, forget, args, control)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:tiny-reader/target")
    ap.add_argument("--forget-split", default="forget10")
    ap.add_argument("--epochs", type=int, nargs="+", default=[2])
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4, 2e-4, 3e-4])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-items", type=int, default=200, help="evaluate/attack only the first N forget items (0: all)")
    ap.add_argument("--relearn-steps", type=int, default=10)
    ap.add_argument("--relearn-lr", type=float, default=1e-3)
    ap.add_argument("--relearn-split", default="first_half", choices=["first_half", "per_author"])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--no-control", action="store_true", help="skip in_context with include_own_fact: false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write all results to this file")
    args = ap.parse_args()

    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from unlearn.adapters.text import TextAdapter
    from unlearn.objectives import GradAscent
    from unlearn.tasks.tofu import FORGET_RETAIN, load_tofu
    from unlearn.trainer import TrainSettings, train

    data = load_tofu(forget_split=args.forget_split, retain_split=FORGET_RETAIN[args.forget_split],
                     eval_splits=("forget",), seed=args.seed)
    forget = data.forget[: args.max_items] if args.max_items else data.forget
    retain = data.retain[:32]
    control = not args.no_control
    names = ["relearn", "in_context"] + (["in_context_related"] if control else [])

    t0 = time.time()
    target = TextAdapter.load(args.model)
    res_target = _attack_all(target, forget, retain, args, control)
    print(f"model {args.model}; attacks on {len(forget)} {args.forget_split} items; greedy {args.max_new_tokens} "
          f"new tokens; target attacked in {time.time() - t0:.0f} s")
    runs = []
    for lr, epochs in itertools.product(args.lr, args.epochs):
        t1 = time.time()
        unlearned = target.reference()
        unlearned._fingerprint = None
        for p in unlearned.model.parameters():
            p.requires_grad_(True)
        settings = TrainSettings(epochs=epochs, lr=lr, batch_size=args.batch_size)
        log = train(unlearned, GradAscent(), data.forget, None, settings, seed=args.seed, progress=False)
        unlearned.model.eval()
        t_train = time.time() - t1
        res = _attack_all(unlearned, forget, retain, args, control)
        runs.append({"lr": lr, "epochs": epochs, "steps": log.steps, "train_seconds": round(t_train, 1),
                     "seconds": round(time.time() - t1, 1), "attacks": res})
        print(f"\n# GradAscent on all {len(data.forget)} {args.forget_split} items, {epochs} epochs, lr {lr}, batch "
              f"{args.batch_size} ({log.steps} steps, final loss {log.history[-1]['loss']:.3f}, {t_train:.0f} s)")
        for name in names:
            rt, ru = res_target[name], res[name]
            print(f"\n## {name}: {ru['note']}")
            print("| forget metrics (same items)      |   Prob | ROUGE-L | truth ratio |")
            print("| --- | --- | --- | --- |")
            print(_row("target", rt["before"]))
            print(_row(f"target + {name}", rt["after"]))
            print(_row("unlearned (GradAscent)", ru["before"]))
            print(_row(f"unlearned + {name}", ru["after"]))
            if "retain" in ru:
                print(f"retain Prob (first {ru['retain']['items']} retain items): target {rt['retain']['before']['prob']:.3f}, "
                      f"unlearned {ru['retain']['before']['prob']:.3f}, unlearned + {name} {ru['retain']['after']['prob']:.3f}")
            ex = ru["examples"][0]
            print(f"example: Q {ex['question_after']!r}\n  answer {ex['answer']!r}\n  unlearned {ex['generation_before']!r}"
                  f"\n  unlearned + {name} {ex['generation_after']!r}")

    print(f"\n## Summary: forget ROUGE-L (Prob) of {args.model} after GradAscent, and under each attack")
    cols = ["relearn (held-out half)", "in_context", "in_context, related facts only"][: len(names)]
    print("| GA lr | epochs | retain Prob | unlearned | " + " | ".join(f"+ {c}" for c in cols)
          + " | value recall: bare / in_context" + (" / related only" if control else "") + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in cols) + " | --- |")
    f = lambda m: f"{m['rouge']:.3f} ({m['prob']:.3f})"  # noqa: E731
    v = lambda r: " / ".join(f"{r[k]:.2f}" for k in ("bare", "in_context", "in_context_related") if k in r)  # noqa: E731
    t = res_target
    print(f"| target | | {t['relearn']['retain']['before']['prob']:.3f} | {f(t['in_context']['before'])} | "
          + " | ".join(f"{f(t[n]['after'])}" for n in names) + f" | {v(t['value_recall'])} |")
    for r in runs:
        a = r["attacks"]
        print(f"| {r['lr']:g} | {r['epochs']} | {a['relearn']['retain']['before']['prob']:.3f} | "
              f"{f(a['in_context']['before'])} | "
              + " | ".join(f"{f(a[n]['after'])} (before {f(a[n]['before'])})" if n == "relearn" else f(a[n]["after"])
                           for n in names) + f" | {v(a['value_recall'])} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"target": res_target, "runs": runs, "args": vars(args)}, fh, indent=1)


if __name__ == "__main__":
    main()
