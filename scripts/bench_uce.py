"""Time UCE's closed-form edit at Stable Diffusion 1.x cross-attention dimensions (random weights).

SD 1.x has 16 cross-attention layers (down 2+2+2, mid 1, up 3+3+3) with query widths
320/640/1280; each has attn2.to_k and attn2.to_v of shape (width, 768) -- 32 matrices.
The edit concept contributes ``--edit`` token embeddings, the preserve set ``--preserve``
embeddings (768-dim). Timed: the shared Cholesky factor + the update of all 32 matrices
(weights in float32, solve in float64), median of ``--repeat`` runs, one torch thread.

    .venv/bin/python scripts/bench_uce.py --preserve 10 100 --edit 1 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unlearn.editors.uce import uce_closed_form, uce_factor

SD1_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]  # 16 layers


def bench(n_edit: int, n_preserve: int, repeat: int, d: int = 768) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(w, d, generator=g) / d ** 0.5 for w in SD1_WIDTHS for _ in ("k", "v")]  # 32 x (w, d)
    ce = torch.randn(n_edit, d, generator=g)
    cg = torch.randn(n_edit, d, generator=g)
    cp = torch.randn(n_preserve, d, generator=g)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f = uce_factor(ce, cp)  # (d, k): one solve for all layers
        new = [uce_closed_form(w, ce, cg @ w.T, cp, factor=f) for w in weights]
        times.append(time.perf_counter() - t0)
    # sanity: agrees with the printed formula (explicit inverse) on one layer
    w = weights[0].double()
    ced, cgd, cpd = ce.double(), cg.double(), cp.double()
    num = 0.5 * w + (cgd @ w.T).T @ ced + w @ cpd.T @ cpd
    den = 0.5 * torch.eye(d, dtype=torch.float64) + ced.T @ ced + cpd.T @ cpd
    err = float((new[0].double() - num @ torch.linalg.inv(den)).abs().max())
    return statistics.median(times), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edit", type=int, nargs="+", default=[1])
    ap.add_argument("--preserve", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, 16 layers x (K, V), d=768")
    for k in args.edit:
        for m in args.preserve:
            t, err = bench(k, m, args.repeat)
            print(f"edit={k:3d} preserve={m:4d}: median {t * 1000:8.1f} ms  (max |diff| vs explicit inverse {err:.1e})")


if __name__ == "__main__":
    main()
