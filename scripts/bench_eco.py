"""Benchmark: generation time of an ECO-guarded model vs the unguarded target on retain prompts.

ECO's cost at inference is the prompt classifier (a sentence-encoder forward per new prompt +
a dot product) and, for flagged prompts only, the corruption of a few embedding rows. On retain
prompts (almost never flagged) the overhead is the classifier alone. The zoo's tiny Llama
(~1.5M parameters) is far smaller than the classifier's encoder (all-MiniLM-L6-v2, 22M), so the
ratio on it says little about real use; ``--large`` repeats the measurement on a random-init
Llama of a few hundred MB with the same tokenizer and guard (the guard's cost does not depend on
the wrapped model).

The encoder keeps a text -> embedding cache; it is cleared before every guarded run, so each
timing includes classifying every prompt (cold). Runs alternate guarded / unguarded; the
medians over ``--repeats`` are reported, with the median of the paired ratios and the guard's
own time measured inside the guarded runs (``guard_overhead_pct`` = guard time / unguarded
time: the part of the overhead that does not depend on machine noise; for unflagged prompts the
model call itself is the target's, unchanged).

    .venv/bin/python scripts/bench_eco.py                       # fits a small classifier first (~30 s)
    .venv/bin/python scripts/bench_eco.py --guard runs/tofu-eco/checkpoint --large
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(guarded, target, questions, *, repeats: int, max_new_tokens: int, batch_size: int) -> dict:
    """Times ``generate`` of both models (alternating, encoder cache cleared before each guarded
    run) and, inside the guarded runs, the guard's own work (classification + corruption plan)."""
    enc = guarded.classifier.get_encoder()
    g_times, t_times, guard_times = [], [], []
    run = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    target.generate(questions[:batch_size], **run)  # warm-up (allocations, lazy imports)
    guarded.generate(questions[:batch_size], **run)
    spent = [0.0]
    plan = guarded._plan

    def timed_plan(*a, **k):  # the guard's share: everything ECO adds before the model runs
        t0 = time.perf_counter()
        try:
            return plan(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0

    guarded._plan = timed_plan
    try:
        for _ in range(repeats):
            enc._cache.clear()
            spent[0] = 0.0
            g_times.append(_time(lambda: guarded.generate(questions, **run)))
            guard_times.append(spent[0])
            t_times.append(_time(lambda: target.generate(questions, **run)))
    finally:
        del guarded._plan
    g, t, c = statistics.median(g_times), statistics.median(t_times), statistics.median(guard_times)
    pair = statistics.median(a / b for a, b in zip(g_times, t_times))
    flagged = int(guarded.classifier.flags(questions).sum())
    return {"prompts": len(questions), "flagged": flagged, "repeats": repeats, "guarded_s": round(g, 3),
            "unguarded_s": round(t, 3), "ratio_of_medians": round(g / t, 4), "median_paired_ratio": round(pair, 4),
            "guard_s": round(c, 3), "guard_overhead_pct": round(100 * c / t, 2),
            "guarded_all_s": [round(x, 3) for x in g_times], "unguarded_all_s": [round(x, 3) for x in t_times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guard", help="a saved ECO model directory (run checkpoint); default: build one on the zoo target")
    ap.add_argument("--prompts", type=int, default=64, help="retain prompts to answer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--large", action="store_true", help="also time a random-init Llama with --large-* sizes")
    ap.add_argument("--large-hidden", type=int, default=1024)
    ap.add_argument("--large-layers", type=int, default=12)
    ap.add_argument("--device", default="cpu", help="device of the LLM (the classifier stays on CPU)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from unlearn.adapters.text import TextAdapter
    from unlearn.editors.eco import Corruption, ECOAdapter
    from unlearn.editors.eco_classifier import fit_prompt_classifier
    from unlearn.models import load_model
    from unlearn.tasks.tofu import load_tofu

    data = load_tofu(forget_split="forget10", retain_split="retain90", eval_splits=("retain_eval",))
    questions = [it["question"] for it in data.eval_splits["retain_eval"][: args.prompts]]
    if args.guard:
        guarded = load_model(args.guard, "text")
        if not isinstance(guarded, ECOAdapter):
            raise SystemExit(f"--guard {args.guard!r} is not an ECO model directory")
    else:
        t0 = time.perf_counter()
        clf = fit_prompt_classifier(data.forget, data.retain, target_fpr=0.01, max_negatives=400)
        print(f"fitted a classifier on 400 forget + 400 retain items in {time.perf_counter() - t0:.1f} s")
        entities = sorted({it["author"] for it in data.forget})
        guarded = ECOAdapter(TextAdapter.load("zoo:tiny-llama/target"), clf, Corruption(strength=0.5),
                             entities=entities)
    target = guarded.target
    results = {"setup": {"threads": args.threads, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                         "encoder": guarded.classifier.encoder, "device": args.device}}
    if args.device != "cpu":
        target.model.to(args.device)
    n_params = sum(p.numel() for p in target.model.parameters())
    print(f"tiny zoo target ({n_params / 1e6:.2f}M parameters) ...")
    results["tiny"] = {"params_m": round(n_params / 1e6, 2), **bench(guarded, target, questions, repeats=args.repeats,
                                                                      max_new_tokens=args.max_new_tokens,
                                                                      batch_size=args.batch_size)}
    print(json.dumps(results["tiny"]))
    if args.large:
        from transformers import LlamaConfig, LlamaForCausalLM

        h = args.large_hidden
        cfg = LlamaConfig(vocab_size=target.model.config.vocab_size, hidden_size=h, intermediate_size=int(h * 2.75),
                          num_hidden_layers=args.large_layers, num_attention_heads=max(1, h // 64),
                          max_position_embeddings=256, bos_token_id=target.tokenizer.bos_token_id,
                          eos_token_id=target.tokenizer.eos_token_id, pad_token_id=target.tokenizer.pad_token_id)
        torch.manual_seed(0)
        big = LlamaForCausalLM(cfg).eval().to(args.device)
        big.generation_config.pad_token_id = target.tokenizer.pad_token_id
        big_target = TextAdapter(big, target.tokenizer, source="<random-init llama>")
        big_guarded = ECOAdapter(big_target, guarded.classifier, guarded.corruption, entities=guarded.entities,
                                 fallback=guarded.fallback)
        n_params = sum(p.numel() for p in big.parameters())
        print(f"random-init Llama ({n_params / 1e6:.1f}M parameters) ...")
        results["large"] = {"params_m": round(n_params / 1e6, 1),
                            **bench(big_guarded, big_target, questions, repeats=args.repeats,
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)}
        print(json.dumps(results["large"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
