"""``report.md`` of a visual (concept-erasure) run: headline table, metrics per split, an image
grid before/after, the training loss. Written atomically next to ``grid.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unlearn.report import _fmt, _plot_loss
from unlearn.runs import atomic_write_text

_ORDER = ("target", "unlearned")
_HEAD = (("erasure_explicit", "erasure rate, explicit prompts (↑)"), ("erasure_implicit", "erasure rate, implicit (↑)"),
         ("retain_in_domain", "retain acc. in-domain (↑)"), ("retain_cross_domain", "retain acc. cross-domain (↑)"),
         ("alignment", "alignment (↑)"), ("fid_like", "FID-like (↓)"))


def save_grid(path: Path, rows: list[dict], before: np.ndarray, after: np.ndarray, scale: int = 4) -> None:
    """A PNG: one row per prompt, columns target | erased, each image upscaled ``scale`` x (nearest)."""
    from PIL import Image

    h, w = before.shape[1:3]
    pad = 2
    img = np.full((len(rows) * (h * scale + pad) + pad, 2 * (w * scale + pad) + pad, 3), 255, np.uint8)
    for i in range(len(rows)):
        for j, src in enumerate((before, after)):
            y, x = pad + i * (h * scale + pad), pad + j * (w * scale + pad)
            img[y: y + h * scale, x: x + w * scale] = src[i].repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(img).save(path)


def write_image_report(run_dir: Path, recipe, metrics: dict[str, Any], prov: dict[str, Any], grid_rows: list[dict],
                       grid_before: np.ndarray, grid_after: np.ndarray) -> None:
    models = metrics["models"]
    names = [n for n in _ORDER if n in models]
    s = metrics["summary"]
    lines = [f"# Run `{recipe.name}`", ""]
    if recipe.description:
        lines += [recipe.description.strip(), ""]
    sel = prov.get("selection")
    head = (metrics.get("editor") or {}).get("headline")
    how = (f"selection `{sel['name']}` ({sel['trainable']:,} of {sel['total']:,} parameters trainable)" if sel
           else "an editor" + (f" ({head})" if head else ""))
    t = recipe.task
    lines += [f"- method: **{recipe.method.name}** ({prov['objective']['paper']}), {how}",
              f"- model: `{recipe.model.source}` (fingerprint {prov['model']['fingerprint_before']} -> "
              f"{prov['model']['fingerprint_after']}); {prov['parameters_changed']} parameter tensors changed",
              f"- task: `visual`, erase {', '.join(t.visual.erase)} (guide {', '.join(t.visual.guide)}), forget "
              f"`{t.forget_split}`, retain `{t.retain_split}`; judge `{recipe.eval.judge}`; "
              f"{recipe.eval.sample_steps} DDIM steps per image",
              f"- seed {recipe.seed}; git {prov['git'].get('commit')}; edit/training {s['edit_seconds']} s; "
              f"run wall time {s['wall_seconds']} s", "", "## Headline", "",
              "| model | " + " | ".join(h for _, h in _HEAD) + " |", "| --- |" + " --- |" * len(_HEAD)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_fmt(s[n][k]) for k, _ in _HEAD) + " |")
    lines += ["", "Erasure rate: share of target-concept prompts whose image the judge does not read as the concept "
              "(before erasure it is the judge's/model's error rate). Retain accuracy: judge accuracy on the erased "
              "attribute (in-domain) and the other attributes (cross-domain) for prompts of other concepts.", "",
              "## Metrics per split", ""]
    for sp in models[names[0]]["splits"]:
        mets = list(models[names[0]]["splits"][sp]["metrics"])
        lines += [f"### `{sp}` ({len(models[names[0]]['splits'][sp]['metrics'][mets[0]].get('per_item') or [])} "
                  "prompts)" if mets else f"### `{sp}`", "", "| metric | direction | " + " | ".join(names) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for m in mets:
            d = models[names[0]]["splits"][sp]["metrics"][m]["higher_is_better"]
            vals = " | ".join(_fmt(models[n]["splits"][sp]["metrics"][m]["value"]) for n in names)
            lines.append(f"| {m} | {({True: '↑', False: '↓', None: '–'})[d]} | {vals} |")
        lines.append("")
    if len(grid_rows):
        save_grid(run_dir / "grid.png", grid_rows, grid_before, grid_after)
        lines += ["## Generations before / after", "", "Left: target, right: after erasure. Rows:", ""]
        lines += [f"{i + 1}. `{r['split']}` -- {r['prompt']} (seed {r['seed']})" for i, r in enumerate(grid_rows)]
        lines += ["", "![generations before and after](grid.png)", ""]
    attacks = (metrics.get("attacks") or {}).get("unlearned") or {}
    if attacks:
        cols = [c for c in ("forget_explicit", "forget_implicit", "retain")
                if any(c in r["after"] for r in attacks.values())]
        head = {"forget_explicit": "erasure explicit", "forget_implicit": "erasure implicit",
                "retain": "retain in-domain"}
        lines += ["## Attacks on the erased model", "",
                  "Each cell is before → after the attack (Δ). A falling erasure rate means the concept came back.", "",
                  "| attack | " + " | ".join(head[c] for c in cols) + " | seconds | note |",
                  "| --- | " + " | ".join("---" for _ in cols) + " | --- | --- |"]
        for name, r in attacks.items():
            cells = [f"{_fmt(r['before'].get(c))} → {_fmt(r['after'].get(c))} ({r['delta'][c]:+.3f})"
                     if c in r["delta"] else "n/a" for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['seconds']} | {r['note']} |")
        lines.append("")
    if _plot_loss(run_dir / "train_loss.png", metrics["train"]["history"]):
        lines += ["## Training", "", "![training](train_loss.png)", ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
