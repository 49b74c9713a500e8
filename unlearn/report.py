"""``report.md`` of a run: headline table, per-split metrics, plots, sample generations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unlearn.runs import atomic_write_text

_ORDER = ("target", "unlearned", "retain")


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.3g}"
        return f"{v:.4f}"
    return str(v)


def _plot_truth_ratios(path: Path, models: dict[str, Any]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bins = np.linspace(0, 1, 26)
    for name in _ORDER:
        res = models.get(name)
        if res is None or "forget" not in res["splits"]:
            continue
        r = np.asarray(res["splits"]["forget"]["truth_ratio_raw"])
        ax.hist(np.minimum(r, 1 / (r + 1e-10)), bins=bins, alpha=0.5, label=name, density=True)
    ax.set_xlabel("forget-set truth ratio  min(R, 1/R)")
    ax.set_ylabel("density")
    ax.set_title("Forget truth ratios: the unlearned model should look like the retain model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_loss(path: Path, history: list[dict]) -> bool:
    if not history:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="loss")
    for key in sorted({k for h in history for k in h} - {"step", "epoch", "loss", "lr"}):
        ax.plot(steps, [h.get(key, np.nan) for h in history], label=key, alpha=0.7)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.set_title("Training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(run_dir: Path, recipe, metrics: dict[str, Any], prov: dict[str, Any], data, n_samples: int = 5) -> None:
    models = metrics["models"]
    names = [n for n in _ORDER if n in models]
    lines = [f"# Run `{recipe.name}`", ""]
    if recipe.description:
        lines += [recipe.description.strip(), ""]
    lines += [f"- method: **{recipe.method.name}** ({prov['objective']['paper']}), selection "
              f"`{prov['selection']['name']}` ({prov['selection']['trainable']:,} of {prov['selection']['total']:,} parameters trainable)",
              f"- model: `{recipe.model.source}` (fingerprint {prov['model']['fingerprint_before']} -> {prov['model']['fingerprint_after']})",
              f"- task: `{recipe.task.name}` forget `{recipe.task.forget_split}`, retain `{recipe.task.retain_split}`, "
              f"retain model `{recipe.task.retain_model}`",
              f"- tokenization: `{recipe.task.tokenization}`; seed {recipe.seed}; git {prov['git'].get('commit')}",
              f"- train: {metrics['train']['steps']} steps in {metrics['train']['seconds']} s; run wall time {metrics['summary']['wall_seconds']} s",
              "", "## Headline", "",
              "| model | forget quality (↑) | model utility (↑) | forget Prob (↓) | forget ROUGE-L (↓) |",
              "| --- | --- | --- | --- | --- |"]
    for n in names:
        s = metrics["summary"][n]
        lines.append(f"| {n} | {_fmt(s['forget_quality'])} | {_fmt(s['model_utility'])} | {_fmt(s['forget_prob'])} | {_fmt(s['forget_rouge'])} |")
    if "note" in metrics["summary"]:
        lines += ["", f"> {metrics['summary']['note']}"]
    fq = {n: metrics["summary"][n]["forget_quality"] for n in names}
    if fq.get("target") and fq.get("unlearned") is not None:
        lines += ["", f"Forget quality rose {fq['unlearned'] / max(fq['target'], 1e-300):.3g}x over the target's."]
    lines += ["", "## Metrics per split", ""]
    splits = list(models[names[0]]["splits"])
    for sp in splits:
        mets = list(models[names[0]]["splits"][sp]["metrics"])
        lines += [f"### `{sp}`", "", "| metric | direction | " + " | ".join(names) + " |", "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for m in mets:
            d = models[names[0]]["splits"][sp]["metrics"][m]["higher_is_better"]
            arrow = {True: "↑", False: "↓", None: "–"}[d]
            vals = " | ".join(_fmt(models[n]["splits"][sp]["metrics"][m]["value"]) for n in names)
            lines.append(f"| {m} | {arrow} | {vals} |")
        lines.append("")
    lines += ["Directions are stated for the metric in general; on the forget split lower Prob/ROUGE/memorisation "
              "means more forgetting.", ""]
    if _plot_truth_ratios(run_dir / "truth_ratio_hist.png", models):
        lines += ["## Forget truth-ratio distributions", "", "![truth ratios](truth_ratio_hist.png)", ""]
    if _plot_loss(run_dir / "train_loss.png", metrics["train"]["history"]):
        lines += ["## Training", "", "![training](train_loss.png)", ""]
    if n_samples > 0 and "forget" in models[names[0]]["splits"]:
        lines += ["## Sample generations (forget split)", ""]
        items = data.eval_splits["forget"]
        for i in range(min(n_samples, len(items))):
            lines += [f"**Q:** {items[i]['question']}  ", f"**truth:** {items[i]['answer']}  "]
            for n in names:
                gens = models[n]["splits"]["forget"].get("generations") or []
                if i < len(gens):
                    lines.append(f"**{n}:** {gens[i]}  ")
            lines.append("")
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
