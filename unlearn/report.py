"""``report.md`` of a run, for every task: one writer with the shared sections and the task's own.

Shared sections (each only when its data is there): header (method, model, task, seed, git,
times); headline table (the task's ``headline`` numbers per model); metrics per split (every
metric of every evaluated model, with its direction); attacks (the task formats them); probes;
evaluation during training (the task's ``curve`` columns, the selected step, a plot); the
training loss. The task adds its sections through :meth:`unlearn.task.Task.report_sections`
(TOFU: membership inference, forget quality vs utility, truth ratios, sample generations;
visual: the image grid). Plots are PNG files (matplotlib, Agg) next to ``report.md``; the
report itself is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unlearn.probes.report import probe_section
from unlearn.runs import atomic_write_text

ORDER = ("target", "unlearned", "retain")
ARROW = {True: "↑", False: "↓", None: "–"}


def fmt(v: Any) -> str:
    """A number for a Markdown table: ``n/a`` for None, 3 significant digits when tiny or huge."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.3g}"
        return f"{v:.4f}"
    return str(v)


def mean_std(xs: list, spec: str = ".2f", sep: str = " ± ") -> str:
    """``mean<sep>std`` (sample std) of the non-None values, each formatted with ``spec``; one value
    as is; none: ``n/a``. The seed tables of ``scripts/method_table.py`` and
    ``scripts/image_robustness.py`` use it."""
    import statistics

    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{format(statistics.mean(xs), spec)}{sep}{format(statistics.stdev(xs), spec)}"


def plt():
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def model_names(models: dict[str, Any]) -> list[str]:
    """The evaluated models in report order (target, unlearned, retain, then any other)."""
    return [n for n in ORDER if n in models] + [n for n in models if n not in ORDER]


# ------------------------------------------------------------------------ training evals
def _train_eval_section(te: dict[str, Any], run_dir: Path, columns: list[tuple[str, str]],
                        plots: list[tuple[str, str, bool]]) -> list[str]:
    sel = te.get("selected") or {}
    stop = te.get("stopped_early")
    n_items = max((te.get("items_per_split") or {0: 0}).values())
    when = " and ".join(x for x in ((f"every {te['eval_every']} steps" if te.get("eval_every") else ""),
                                    ("at every epoch end" if te.get("eval_every_epoch") else "")) if x)
    lines = ["## Evaluation during training", "",
             f"Suite `{te.get('suite')}` on the first {n_items} items per split, {when} and at the last step. "
             f"Selection `{te.get('select_best')}`: step {sel.get('step')} ({sel.get('reason')}).", ""]
    if stop:
        lines += [f"**Stopped early** after step {stop['step']}: {stop['reason']}.", ""]
    lines += ["| step | epoch | trigger | " + " | ".join(label for _, label in columns) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    base = te.get("baseline")
    rows = ([base] if base else []) + list(te.get("curve", []))
    for p in rows:
        mark = " ◀" if p.get("step") == sel.get("step") and p is not base else ""
        lines.append(f"| {p['step']}{mark} | {fmt(p.get('epoch'))} | {', '.join(p.get('trigger') or [])} | "
                     + " | ".join(fmt(p.get(key)) for key, _ in columns) + " |")
    lines.append("")
    if _plot_train_eval(run_dir / "train_eval.png", te, plots):
        lines += ["![evaluation during training](train_eval.png)", ""]
    return lines


_LOG_FLOOR = 1e-30  # a value of 0 on a log axis is drawn here


def _plot_train_eval(path: Path, te: dict[str, Any], plots: list[tuple[str, str, bool]]) -> bool:
    """One panel per ``(curve key, title, log scale)``; the selected and stopping steps marked,
    the utility floor drawn on the panel of the task's utility number."""
    from matplotlib.ticker import MaxNLocator

    curve = list(te.get("curve") or [])
    if not curve or not plots:
        return False
    base = te.get("baseline")
    seq = ([base] if base else []) + curve
    steps = [p["step"] for p in seq]
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(plots), figsize=(4.8 * len(plots), 3.4), squeeze=False)
    sel = (te.get("selected") or {}).get("step")
    stop = (te.get("stopped_early") or {}).get("step")
    for i, (ax, (key, title, log)) in enumerate(zip(axes[0], plots)):
        ys = [np.nan if p.get(key) is None else (max(p[key], _LOG_FLOOR) if log else p[key]) for p in seq]
        ax.plot(steps, ys, "-o", ms=3, color=f"C{(i + 1) % 10}")
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        target, floor = te.get("target_utility"), te.get("utility_floor")
        if key == te.get("utility_key") and target is not None and floor is not None:
            ax.axhline(floor * target, color="C3", ls=":", lw=1, label=f"floor ({floor} × target)")
        ax.set_xlabel("step (0 = target)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if sel is not None:
            ax.axvline(sel, color="C2", lw=1.5, label="selected")
        if stop is not None:
            ax.axvline(stop, color="C3", lw=1, ls="--", label="stopped")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return True


def plot_loss(path: Path, history: list[dict]) -> bool:
    """The training loss (and every logged term) against the step; False when nothing was trained."""
    if not history:
        return False
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.4, 3.0))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="loss")
    for key in sorted({k for h in history for k in h} - {"step", "epoch", "loss", "lr"}):
        ax.plot(steps, [h.get(key, np.nan) for h in history], label=key, alpha=0.7)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.set_title("Training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return True


# ------------------------------------------------------------------------------ the writer
def _how(metrics: dict[str, Any], prov: dict[str, Any]) -> str:
    sel = prov.get("selection")
    if sel:
        return f"selection `{sel['name']}` ({sel['trainable']:,} of {sel['total']:,} parameters trainable)"
    head = (metrics.get("editor") or {}).get("headline")
    if isinstance(head, dict):
        head = ", ".join(f"{k} {v}" for k, v in head.items())
    return "an editor: the evaluated model is what it returned" + (f" ({head})" if head else "")


def _split_tables(models: dict[str, Any], names: list[str]) -> list[str]:
    lines = ["## Metrics per split", ""]
    first = models[names[0]]["splits"]
    for sp in first:
        mets = list(first[sp]["metrics"])
        n_items = len((first[sp]["metrics"][mets[0]].get("per_item") or [])) if mets else 0
        lines += [f"### `{sp}`" + (f" ({n_items} items)" if n_items else ""), "",
                  "| metric | direction | " + " | ".join(names) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for m in mets:
            arrow = ARROW[first[sp]["metrics"][m]["higher_is_better"]]
            vals = " | ".join(fmt(((models[n]["splits"].get(sp) or {}).get("metrics", {}).get(m) or {}).get("value"))
                              for n in names)
            lines.append(f"| {m} | {arrow} | {vals} |")
        lines.append("")
    return lines


def write_report(run_dir: Path, recipe, task, metrics: dict[str, Any], prov: dict[str, Any]) -> None:
    """Write ``report.md`` (and its plots) for a finished run of any task."""
    models = metrics["models"]
    names = model_names(models)
    s = metrics["summary"]
    sections = task.report_sections(run_dir, metrics)
    lines = [f"# Run `{recipe.name}`", ""]
    if recipe.description:
        lines += [recipe.description.strip(), ""]
    lines += [f"- method: **{recipe.method.name}** ({prov['objective']['paper']}), {_how(metrics, prov)}",
              f"- model: `{recipe.model.source}` (fingerprint {prov['model']['fingerprint_before']} -> "
              f"{prov['model']['fingerprint_after']}); {prov['parameters_changed']} parameter tensors changed",
              f"- task: {task.describe()}",
              f"- seed {recipe.seed}; git {prov['git'].get('commit')}",
              f"- train: {metrics['train']['steps']} steps in {metrics['train']['seconds']} s; run wall time "
              f"{s['wall_seconds']} s", "", "## Headline", "",
              "| model | " + " | ".join(label for _, label in task.headline) + " |",
              "| --- |" + " --- |" * len(task.headline)]
    for n in names:
        if n in s:
            lines.append(f"| {n} | " + " | ".join(fmt(s[n].get(k)) for k, _ in task.headline) + " |")
    if "note" in s:
        lines += ["", f"> {s['note']}"]
    lines += [""] + sections.get("headline", [])
    lines += _split_tables(models, names)
    lines += sections.get("results", [])
    lines += sections.get("attacks", [])
    if metrics.get("probes"):
        lines += probe_section(metrics["probes"], run_dir)
    te = metrics.get("train_eval")
    if te:
        lines += _train_eval_section(te, run_dir, task.curve, list(task.curve_plots))
    lines += sections.get("end", [])
    if plot_loss(run_dir / "train_loss.png", metrics["train"]["history"]):
        lines += ["## Training", "", "![training](train_loss.png)", ""]
    lines += sections.get("samples", [])
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
