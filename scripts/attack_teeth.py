"""Do the attacks have teeth? Unlearn forget10 from the tiny zoo target with gradient ascent,
then attack the unlearned model with ``relearn`` and ``in_context`` and print the forget
Prob / ROUGE-L of the target, the unlearned model, and the unlearned model under attack.

    .venv/bin/python scripts/attack_teeth.py                      # defaults below
    .venv/bin/python scripts/attack_teeth.py --epochs 3 --lr 3e-4 --max-items 200

The relearn attack trains on one half of the forget items and is scored on the other half;
the in-context attack is scored on all of them. One CPU thread.

Default unlearning: GradAscent, 3 epochs at lr 3e-4, batch 32 on all of forget10 (39 steps):
on the tiny zoo this takes forget Prob from ~0.45 to ~0.02 without a NaN (lr 1e-4 barely
dents it; 5 epochs at 3e-4 collapses the model into repeating one word).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _row(label: str, m: dict) -> str:
    f = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
    return f"| {label:<28} | {f(m['prob'])} | {f(m['rouge'])} | {f(m['truth_ratio'])} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:tiny-llama/target")
    ap.add_argument("--forget-split", default="forget10")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-items", type=int, default=None, help="evaluate/attack only the first N forget items")
    ap.add_argument("--relearn-steps", type=int, default=10)
    ap.add_argument("--relearn-lr", type=float, default=1e-3)
    ap.add_argument("--relearn-split", default="first_half", choices=["first_half", "per_author"])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write all results to this file")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from unlearn.adapters.text import TextAdapter
    from unlearn.evaluators.attacks import evaluate_attacks
    from unlearn.objectives import GradAscent
    from unlearn.tasks.tofu import FORGET_RETAIN, load_tofu
    from unlearn.trainer import TrainSettings, train

    data = load_tofu(forget_split=args.forget_split, retain_split=FORGET_RETAIN[args.forget_split],
                     eval_splits=("forget",), seed=args.seed)
    forget = data.forget[: args.max_items] if args.max_items else data.forget
    retain = data.retain[:32]
    names = ["relearn", "in_context"]
    params = {"relearn": {"steps": args.relearn_steps, "lr": args.relearn_lr, "split": args.relearn_split}}
    ev = dict(batch_size=64, max_new_tokens=args.max_new_tokens, seed=args.seed, progress=False, params=params)

    t0 = time.time()
    target = TextAdapter.load(args.model)
    res_target = evaluate_attacks(target, forget, retain, names, **ev)
    t_target = time.time() - t0

    t1 = time.time()
    unlearned = target.reference()
    unlearned._fingerprint = None
    for p in unlearned.model.parameters():
        p.requires_grad_(True)
    settings = TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    log = train(unlearned, GradAscent(), data.forget, None, settings, seed=args.seed, progress=False)
    unlearned.model.eval()
    t_train = time.time() - t1

    t2 = time.time()
    res_unl = evaluate_attacks(unlearned, forget, retain, names, **ev)
    t_attack = time.time() - t2

    print(f"model {args.model}; unlearning: GradAscent on all {len(data.forget)} {args.forget_split} items, "
          f"{args.epochs} epochs, lr {args.lr}, batch {args.batch_size} ({log.steps} steps, final loss "
          f"{log.history[-1]['loss']:.3f}, {t_train:.0f} s); attacks on {len(forget)} items; "
          f"greedy {args.max_new_tokens} new tokens")
    for name in names:
        rt, ru = res_target[name], res_unl[name]
        print(f"\n## {name}: {ru['note']}")
        print(f"settings: {json.dumps({k: v for k, v in ru['settings'].items() if k != 'trained_indices'})}")
        print("| forget metrics (same items)    |   Prob | ROUGE-L | truth ratio |")
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
    print(f"\nseconds: target eval+attacks {t_target:.0f}, unlearning {t_train:.0f}, unlearned eval+attacks {t_attack:.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"target": res_target, "unlearned": res_unl, "train": log.to_dict(), "args": vars(args)}, fh, indent=1)


if __name__ == "__main__":
    main()
