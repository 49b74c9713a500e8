"""Memorised prompts for the tiny text-to-image zoo, and NeMo's memorisation neurons on them.

The visual world has no memorised training images, so this script makes some: a few unique
captions (random sequences of the world's generic words, each with one rare word the tokenizer
knows but no training caption uses), each
paired with ONE fixed image (a random colour mosaic no render of the world looks like), are mixed
many times into a short fine-tune of ``zoo:tiny-t2i/target`` on the world's training renders. Then
sampling those captions reproduces near-copies of their images, while every other prompt keeps
drawing the world's shapes.

It then measures, for the target, the memorised model and the memorised model after NeMo
(``unlearn.editors.nemo``: value neurons deactivated):

* near-copy similarity of each memorised caption's generations to its training image (cosine of
  centred pixels and of the judge's features; mean and max over ``--eval-seeds`` seeds);
* fidelity of ordinary prompts: the judge's accuracy (shape, colour, texture, all three) on the
  world's prompt-table rows and the FID-like distance of their generations to held-out renders.

    .venv/bin/python scripts/memorisation.py --out runs/memorisation     # about 15 CPU minutes on one thread
    .venv/bin/python scripts/memorisation.py --from runs/memorisation --out runs/nemo-again --theta-min 0 --ablation

``runs/memorisation/`` then holds the memorised model (``model/``, safetensors), ``memorised.json``
+ ``memorised.safetensors`` (captions and images, what ``nemo.memorised`` reads) and
``results.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rare_words(world, tokenizer) -> list[str]:
    """Words the tokenizer knows that no training caption of the world uses (sorted).

    The zoo's tokenizer is built over the world's captions *and* prompts, so the words that occur only
    in description prompts ("tone", "bands", "spots", ...) have embeddings the zoo's training never
    updated: to the model they are as unseen as a rare name in a web caption."""
    used = {w for it in world.split("train") for w in it["caption"].split()}
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else dict(tokenizer.vocab)
    special = set(getattr(tokenizer, "all_special_tokens", []))
    return sorted(w for w in vocab if w.isalpha() and w not in used and w not in special)


def memorised_pairs(world, n: int = 4, words: int = 5, seed: int = 0, size: int = 16,
                    tiles: int = 2, rare: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """``n`` unique captions and one image each.

    Captions: ``words`` words drawn (with replacement) from the world's *generic* words, the ones that
    occur in captions of every (shape, colour, texture) combination ("a", "picture", "of", "the",
    "shape", ...), in an order no caption of the world has; so the memorised captions share no
    attribute word with ordinary prompts and fine-tuning on them leaves the attribute words alone.
    With ``rare`` (e.g. ``rare_words(world, tokenizer)``), caption ``i`` puts ``rare[i % len(rare)]`` in
    place of one generic word, at a random position: like the unique names in memorised web captions,
    it gives each caption a token ordinary prompts never carry.
    Images: a ``tiles`` x ``tiles`` mosaic of random colours, upsampled to ``size`` -> uint8 ``(n, S, S, 3)``.
    """
    rng = random.Random(f"memorised-{seed}")
    combos: dict[str, set] = {}
    for it in world.items:
        for w in it["caption"].split():
            if w.isalpha():
                combos.setdefault(w, set()).add((it["shape"], it["colour"], it["texture"]))
    n_comb = len({(it["shape"], it["colour"], it["texture"]) for it in world.items})
    vocab = sorted(w for w, c in combos.items() if len(c) == n_comb)
    if not vocab:
        raise ValueError("the world's captions have no word common to every combination")
    existing = {it["caption"] for it in world.items}
    caps: list[str] = []
    if rare is not None and not rare:
        raise ValueError("rare=[]: give at least one rare word, or rare=None for generic words only")
    while len(caps) < n:
        ws = [rng.choice(vocab) for _ in range(words)]
        if rare:
            ws[rng.randrange(words)] = rare[len(caps) % len(rare)]
        c = " ".join(ws)
        if c not in existing and c not in caps:
            caps.append(c)
    g = np.random.default_rng(seed)
    if size % tiles:
        raise ValueError(f"tiles={tiles} must divide the image size {size}")
    grid = g.integers(0, 256, size=(n, tiles, tiles, 3), dtype=np.uint8)
    imgs = np.repeat(np.repeat(grid, size // tiles, axis=1), size // tiles, axis=2)  # (n, S, S, 3)
    return caps, np.ascontiguousarray(imgs)


def memorise(adapter, world, captions: list[str], images: np.ndarray, steps: int = 300, batch_size: int = 16,
             memorised_per_batch: int = 4, lr: float = 1e-3, uncond_prob: float = 0.1, seed: int = 0,
             warmup: int = 20, group: str = "unet", ema: float = 0.99, memorised_uncond_prob: float = 0.0,
             optimizer: str = "adamw") -> dict:
    """Fine-tune the UNet in place: each batch holds ``memorised_per_batch`` copies of the memorised
    (caption, image) pairs (cycled) and world training renders for the rest; the renders' captions
    dropped with ``uncond_prob`` (as in the zoo's training) so classifier-free guidance keeps working,
    the memorised pairs' with ``memorised_uncond_prob`` (default 0: here they fill a large share of
    every batch, in a web dataset a tiny one, and with their captions dropped the *unconditional*
    model learns to draw them, which no caption-specific neuron can then remove: measured, see
    docs/editors/nemo.md); the lr warms up linearly over ``warmup`` steps. Only the parameter group ``group`` trains; at the end the
    trained weights are replaced by their exponential moving average (decay ``ema``; 0 = off), as
    the zoo's own training does, which keeps the ordinary prompts' fidelity. ``optimizer``: ``adamw``
    (as the zoo's training) or ``sgd`` (momentum 0.9: updates proportional to the gradient, without
    Adam's per-weight normalisation). ``group="all"``: every parameter (the text encoder too, as
    the zoo's own training). Stops with
    ``FloatingPointError`` on a non-finite loss or gradient."""
    from unlearn.editors.base import optimizer_step, restoring_train_state

    train = world.split("train")
    rng = random.Random(f"memorise-{seed}")
    mem = [{"image": img, "caption": c, "image_seed": 10_000 + i} for i, (c, img) in enumerate(zip(captions, images))]
    names = ({n for n, _ in adapter.model.named_parameters()} if group == "all"
             else set(adapter.parameter_groups()[group]))
    params = [p for n, p in adapter.model.named_parameters() if n in names]
    avg = [p.detach().clone() for p in params]
    losses, t0 = [], time.time()
    with restoring_train_state(adapter):
        for n, p in adapter.model.named_parameters():
            p.requires_grad_(n in names)
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer={optimizer!r}: adamw or sgd")
        opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer == "adamw"
               else torch.optim.SGD(params, lr=lr, momentum=0.9))
        adapter.model.train()
        for step in range(steps):
            items = [dict(mem[(step * memorised_per_batch + k) % len(mem)]) for k in range(memorised_per_batch)]
            items += [dict(train[rng.randrange(len(train))]) for _ in range(batch_size - memorised_per_batch)]
            for k, it in enumerate(items):
                if rng.random() < (memorised_uncond_prob if k < memorised_per_batch else uncond_prob):
                    it["caption"] = ""
            for grp in opt.param_groups:
                grp["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
            batch = adapter.collate(items, seed=step + 7_000_000)
            loss = adapter.item_loss(batch)[0].mean()
            optimizer_step(loss, opt, params, None, f"memorise at step {step + 1}; lower --lr")
            with torch.no_grad():
                for q, p in zip(avg, params):
                    q.mul_(ema).add_(p.detach(), alpha=1.0 - ema)
            losses.append(loss.item())
        with torch.no_grad():
            for q, p in zip(avg, params):
                p.copy_(q)
    return {"steps": steps, "seconds": round(time.time() - t0, 1), "loss_first": round(float(np.mean(losses[:10])), 4),
            "loss_last": round(float(np.mean(losses[-10:])), 4)}


def fresh_model(target, text_width: int | None = None, seed: int = 0):
    """A freshly initialised model of ``target``'s architecture (the zoo's ``TinyT2ISpec`` from its
    manifest; ``text_width`` replaces the text encoder's width) with its tokenizer and scheduler."""
    from unlearn.adapters.image import ImageAdapter
    from unlearn.zoo import manifest
    from unlearn.zoo.image_models import TinyT2ISpec, build_tiny_t2i

    spec = TinyT2ISpec(**manifest("tiny-t2i")["spec"]["model"])
    if text_width is not None:
        spec.text_hidden_size = text_width
    unet, te, sched = build_tiny_t2i(spec, target.tokenizer, seed)
    return ImageAdapter(unet, te, target.tokenizer, sched, source="memorisation:from-scratch")


def write_memorised(out: Path, captions: list[str], images: np.ndarray) -> None:
    from safetensors.numpy import save_file

    from unlearn.editors.nemo import MEMORISED_IMAGES, MEMORISED_JSON

    out.mkdir(parents=True, exist_ok=True)
    (out / MEMORISED_JSON).write_text(json.dumps({"captions": list(captions)}, indent=1))
    save_file({"images": np.ascontiguousarray(images)}, str(out / MEMORISED_IMAGES))


def near_copies(adapter, captions, images, seeds: list[int], steps: int, judge) -> dict:
    from unlearn.editors.nemo import near_copy_similarity

    per = []
    for c, img in zip(captions, images):
        gen = adapter.sample([c] * len(seeds), seed=seeds, steps=steps)
        px, ft = near_copy_similarity(gen, img), near_copy_similarity(gen, img, judge)
        per.append({"caption": c, "pixel_mean": float(px.mean()), "pixel_max": float(px.max()),
                    "judge_mean": float(ft.mean()), "judge_max": float(ft.max())})
    agg = {k: round(float(np.mean([p[k] for p in per])), 4) for k in ("pixel_mean", "pixel_max", "judge_mean",
                                                                        "judge_max")}
    return {**agg, "per_caption": per}


def generations(adapter, captions, seeds: list[int], steps: int) -> list[np.ndarray]:
    """Per seed, the captions' generations ``(N, S, S, 3)`` (one grid column each)."""
    return [adapter.sample(list(captions), seed=[s] * len(captions), steps=steps) for s in seeds]


def fidelity(adapter, world, judge, rows: list[dict], steps: int) -> dict:
    """The judge's accuracy per attribute (and all three) on ``rows`` (each row's prompt and seed) and the
    FID-like distance of those generations to the world's held-out renders (judge features)."""
    from unlearn.evaluators.image_judge import frechet_distance

    imgs = adapter.sample([r["prompt"] for r in rows], seed=[int(r["seed"]) for r in rows], steps=steps)
    pred = judge.predict(imgs)
    ok = {a: np.array([p == r[a] for p, r in zip(pred[a], rows)]) for a in ("shape", "colour", "texture")}
    held = [it["image"] for it in world.split("holdout")]
    fid = frechet_distance(judge.features(imgs), judge.features(np.stack(held)))
    return {**{f"acc_{a}": round(float(v.mean()), 4) for a, v in ok.items()},
            "acc_all": round(float(np.mean(ok["shape"] & ok["colour"] & ok["texture"])), 4),
            "fid_like": round(float(fid), 2)}


def ablation_curve(adapter, data, captions, images, seeds: list[int], steps: int,
                   fractions=(0.05, 0.1, 0.25, 0.5, 1.0), seed: int = 0) -> list[dict]:
    """How localised is the memorisation? For each memorised caption and fraction f: the near-copy
    similarity (mean and max over ``seeds``) with the top-f share of every value layer's neurons by the
    caption's z-score masked, and with a random f share masked (the control)."""
    from unlearn.editors.nemo import (mask_value_neurons, near_copy_similarity, reference_captions, value_activations,
                                      z_scores)

    z = z_scores(value_activations(adapter, captions, tokens="prompt"),
                 value_activations(adapter, reference_captions(data, 256, set(captions)), tokens="prompt"))
    g = torch.Generator().manual_seed(seed)

    def score(c, img, neurons):
        with mask_value_neurons(adapter, neurons):
            sims = near_copy_similarity(adapter.sample([c] * len(seeds), seed=seeds, steps=steps), img)
        return round(float(sims.mean()), 3), round(float(sims.max()), 3)

    rows = []
    for i, (c, img) in enumerate(zip(captions, images)):
        row = {"caption": c, "none": score(c, img, {})}
        for f in fractions:
            k = {n: max(1, int(f * v.shape[1])) for n, v in z.items()}
            top = {n: torch.topk(v[i], k[n]).indices.tolist() for n, v in z.items()}
            rnd = {n: torch.randperm(v.shape[1], generator=g)[:k[n]].tolist() for n, v in z.items()}
            row[f"top {f:g}"], row[f"random {f:g}"] = score(c, img, top), score(c, img, rnd)
        rows.append(row)
        print("ablation", json.dumps(row), flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/memorisation")
    ap.add_argument("--n", type=int, default=4, help="memorised captions")
    ap.add_argument("--steps", type=int, default=1500, help="fine-tune steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--group", default="unet", help="parameter group the fine-tune trains")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="the fine-tune's optimizer")
    ap.add_argument("--from-scratch", action="store_true",
                    help="train a freshly initialised model of the zoo's architecture (every parameter, --group "
                         "ignored) on the renders with the memorised pairs mixed in, instead of fine-tuning the target")
    ap.add_argument("--text-width", type=int, default=None,
                    help="with --from-scratch: the text encoder's width (= the cross-attention input; zoo: 32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--ema", type=float, default=0.99, help="EMA decay of the fine-tuned weights (0 = off)")
    ap.add_argument("--tiles", type=int, default=4, help="the memorised images are tiles x tiles colour mosaics")
    ap.add_argument("--memorised-uncond-prob", type=float, default=0.0,
                    help="caption dropout of the memorised pairs (the renders keep the zoo's 0.1)")
    ap.add_argument("--generic-only", action="store_true",
                    help="captions of generic words only (default: each caption also carries one rare word)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--memorised-per-batch", type=int, default=8)
    ap.add_argument("--eval-seeds", type=int, default=8, help="generations per memorised caption in the measurement")
    ap.add_argument("--rows", type=int, default=96, help="prompt-table rows for the fidelity measurement")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--check", default="noise", choices=("noise", "sample"),
                    help="nemo.check: the paper's first-step noise SSIM, or the near-copy similarity of generations")
    ap.add_argument("--layers", default="down_mid", choices=("down_mid", "all"), help="nemo.layers searched")
    ap.add_argument("--ssim-threshold", type=float, default=0.428, help="nemo.ssim_threshold (check noise)")
    ap.add_argument("--threshold", type=float, default=0.5, help="nemo.threshold (check sample; pixel cosine)")
    ap.add_argument("--statistic", default="mean", choices=("max", "mean"),
                    help="nemo.statistic over the check's seeds (check sample)")
    ap.add_argument("--check-seeds", type=int, default=10, help="nemo.seeds: start noises / generations per check")
    ap.add_argument("--theta-min", type=float, default=1.0, help="nemo.theta_min: the lowest |z| threshold tried")
    ap.add_argument("--from", dest="from_dir", default=None,
                    help="reuse the memorised model and files of an earlier --out (skip the fine-tune)")
    ap.add_argument("--ablation", action="store_true",
                    help="also mask the top / a random 5-100 %% of the value neurons by each caption's z-score and "
                         "measure the near-copies (how localised the memorisation is)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    from unlearn.adapters.image import ImageAdapter
    from unlearn.editors import EditContext
    from unlearn.editors.nemo import NeMo, NeMoConfig
    from unlearn.evaluators.image_judge import ImageJudge
    from unlearn.tasks.visual import save_image_grid
    from unlearn.tasks.visual_task import load_visual
    from unlearn.trainer import TrainSettings
    from unlearn.zoo import zoo_path

    out = Path(a.out)
    data = load_visual()
    world = data.world
    judge = ImageJudge.load(zoo_path("tiny-t2i/judge"))
    target = ImageAdapter.load("zoo:tiny-t2i/target")
    if a.from_dir:
        from unlearn.editors.nemo import load_memorised

        caps, imgs = load_memorised(a.from_dir)
    else:
        rare = None if a.generic_only else rare_words(world, target.tokenizer)
        caps, imgs = memorised_pairs(world, a.n, seed=a.seed, tiles=a.tiles, rare=rare)
    write_memorised(out, caps, imgs)
    table = world.prompt_table()
    rows = table[:: max(1, len(table) // a.rows)][: a.rows]
    seeds = [1000 + s for s in range(a.eval_seeds)]
    res: dict = {"captions": caps, "settings": vars(a)}
    print("captions", caps, flush=True)

    t0 = time.time()
    shown = seeds[:4]  # near_copies.png: training image | 4 generations of each model
    grid = {"target": generations(target, caps, shown, a.sample_steps)}
    res["target"] = {"near_copy": near_copies(target, caps, imgs, seeds, a.sample_steps, judge),
                     "fidelity": fidelity(target, world, judge, rows, a.sample_steps)}
    print("target", json.dumps({k: v for k, v in res["target"]["near_copy"].items() if k != "per_caption"}),
          res["target"]["fidelity"], flush=True)
    if a.from_dir:
        model = ImageAdapter.load(str(Path(a.from_dir) / "model"))
        res["memorise"] = {"from": a.from_dir}
    else:
        model, group = target, a.group
        if a.from_scratch:
            model, group = fresh_model(target, a.text_width, a.seed), "all"
        res["memorise"] = memorise(model, world, caps, imgs, steps=a.steps, batch_size=a.batch_size,
                                   memorised_per_batch=a.memorised_per_batch, lr=a.lr, seed=a.seed, group=group,
                                   ema=a.ema, memorised_uncond_prob=a.memorised_uncond_prob, optimizer=a.optimizer)
        model.save(out / "model")
    grid["memorised"] = generations(model, caps, shown, a.sample_steps)
    res["memorised"] = {"near_copy": near_copies(model, caps, imgs, seeds, a.sample_steps, judge),
                        "fidelity": fidelity(model, world, judge, rows, a.sample_steps)}
    print("memorise", res["memorise"], flush=True)
    print("memorised", json.dumps({k: v for k, v in res["memorised"]["near_copy"].items() if k != "per_caption"}),
          res["memorised"]["fidelity"], flush=True)
    if a.ablation:
        res["ablation"] = ablation_curve(model, data, caps, imgs, seeds, a.sample_steps, seed=a.seed)
    ed = NeMo(NeMoConfig(memorised=str(out), check=a.check, layers=a.layers, ssim_threshold=a.ssim_threshold,
                         threshold=a.threshold, sample_steps=a.sample_steps, statistic=a.statistic,
                         seeds=a.check_seeds, theta_min=a.theta_min))
    r = ed.apply(model, data, EditContext(settings=TrainSettings(), seed=a.seed, progress=False))
    res["nemo"] = {k: r.info[k] for k in ("n_neurons", "neurons", "per_prompt", "edit_seconds")}
    res["after_nemo"] = {"near_copy": near_copies(model, caps, imgs, seeds, a.sample_steps, judge),
                         "fidelity": fidelity(model, world, judge, rows, a.sample_steps)}
    print("nemo", r.info["headline"], flush=True)
    print("after_nemo", json.dumps({k: v for k, v in res["after_nemo"]["near_copy"].items() if k != "per_caption"}),
          res["after_nemo"]["fidelity"], flush=True)
    grid["after NeMo"] = generations(model, caps, shown, a.sample_steps)
    save_image_grid(out / "near_copies.png",
                    [imgs] + [c for k in ("target", "memorised", "after NeMo") for c in grid[k]])
    print("wrote", out / "near_copies.png", "(rows: captions; columns: training image, then 4 seeds each of the "
          "target, the memorised model, the model after NeMo)")
    res["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print("wrote", out / "results.json", f"({res['seconds']} s)")
    return res


if __name__ == "__main__":
    main()
