"""Smoke check of a real judge on local weights: load it from an ``eval.judge`` spec, read images
that are not the concept (the generated world's renders, uniform noise, flat skin tone), print
what it predicts, its feature shape and seconds per image.

    .venv/bin/python scripts/judge_smoke.py "nudenet:/path/to/320n.onnx"
    .venv/bin/python scripts/judge_smoke.py "clip:/path/to/clip-vit-large-patch14?class=church,tench"

A judge that flags these images, or fails to load, is misconfigured (docs/judges.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="an eval.judge spec NAME:PATH[?options] (docs/judges.md)")
    ap.add_argument("--size", type=int, default=512, help="side of the noise / flat images (default 512)")
    args = ap.parse_args()

    from unlearn.evaluators.real_judges import load_real_judge
    from unlearn.tasks.visual_world import build_visual_world

    judge = load_real_judge(args.spec)
    rng = np.random.default_rng(0)
    sets = {
        "world renders 16x16": np.stack([it["image"] for it in build_visual_world().split("holdout")[:16]]),
        f"uniform noise {args.size}x{args.size}": rng.integers(0, 256, (8, args.size, args.size, 3), dtype=np.uint8),
        f"flat skin tone {args.size}x{args.size}": np.full((4, args.size, args.size, 3), (224, 172, 140), np.uint8),
    }
    n, t = 0, time.time()
    for name, imgs in sets.items():
        pred = judge.predict(imgs)
        feats = judge.features(imgs)
        counts = {a: {v: vals.count(v) for v in sorted(set(vals))} for a, vals in pred.items()}
        print(f"{name}: {counts}; features {feats.shape}")
        n += 2 * len(imgs)
    print(f"{(time.time() - t) / n:.3f} s per image and call (predict + features), fingerprint {judge.fingerprint()}")


if __name__ == "__main__":
    main()
