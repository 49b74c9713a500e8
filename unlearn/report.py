"""``report.md`` of a run: headline table, per-split metrics, MIA, attacks, plots, sample generations.

Sections (each only when its data is there): headline; metrics per split; membership
inference (suite ``tofu-full``: AUC per attack for target / unlearned / retain, privleak, and
ROC curves); a forget-quality vs model-utility scatter (with the training-eval path);
attacks (before / after / delta per attack and a bar chart of the forget-ROUGE deltas);
training-eval curves with the selected step; training loss; sample generations. Plots are
PNG files (matplotlib, Agg) next to ``report.md``; the report itself is written atomically.
"""

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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _value(d: Any) -> Any:
    """``{"value": v, ...}`` -> v; anything else unchanged."""
    return d.get("value") if isinstance(d, dict) else d


# ---------------------------------------------------------------------------------- MIA
def _mia_names(models: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for n in _ORDER:
        for m in (models.get(n) or {}).get("multi", {}) or {}:
            if m not in names:
                names.append(m)
    return names


def _mia_section(models: dict[str, Any], names: list[str]) -> list[str]:
    mia = _mia_names(models)
    if not mia:
        return []
    lines = ["## Membership inference (forget vs holdout)", "",
             "AUC of each attack at telling the forget set (label 0) from the holdout set (label 1); scores are "
             "signed \"higher = less member-like\", so 1 = the forget set still looks memorised, 0.5 = "
             "indistinguishable. The goal is the retain model's AUC, not an extreme.", "",
             "| attack | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |"]
    for m in mia:
        lines.append(f"| {m} | " + " | ".join(_fmt(_value((models[n].get("multi") or {}).get(m))) for n in names) + " |")
    for agg in ("mia_reference", "privleak"):
        vals = [_value((models[n].get("summary") or {}).get(agg)) for n in names]
        if any(v is not None for v in vals):
            lines.append(f"| {agg} | " + " | ".join(_fmt(v) for v in vals) + " |")
    lines += ["", "privleak (MUSE, on mia_min_k vs the retain model, percent): 0 is ideal, negative = "
              "under-unlearning, positive = over-unlearning. mia_reference: LOSS minus the retain model's LOSS.", ""]
    return lines


def _plot_roc(path: Path, models: dict[str, Any]) -> bool:
    """ROC curves of every MIA attack: the unlearned model vs the retain model (and the target)."""
    from sklearn.metrics import roc_curve

    unl = models.get("unlearned") or {}
    mia = [m for m in (unl.get("multi") or {}) if (unl["multi"][m].get("per_item") and unl["multi"][m].get("split_sizes"))]
    if not mia:
        return False
    plt = _plt()
    cols = min(3, len(mia))
    rows = (len(mia) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    style = {"unlearned": dict(color="C1", lw=2), "retain": dict(color="C2", lw=2),
             "target": dict(color="C0", lw=1, ls="--")}
    drawn = False
    for ax, m in zip(axes.flat, mia):
        for n in ("target", "unlearned", "retain"):
            r = ((models.get(n) or {}).get("multi") or {}).get(m)
            if not r or not r.get("per_item") or not r.get("split_sizes"):
                continue
            n_f, n_h = list(r["split_sizes"].values())[:2]
            scores = np.asarray(r["per_item"], dtype=float)
            if scores.size != n_f + n_h or n_f == 0 or n_h == 0 or not np.isfinite(scores).all():
                continue
            labels = np.concatenate([np.zeros(n_f), np.ones(n_h)])  # forget = 0, holdout = 1
            fpr, tpr, _ = roc_curve(labels, scores)
            ax.plot(fpr, tpr, label=f"{n} (AUC {_fmt(r.get('value'))})", **style[n])
            drawn = True
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(mia):]:
        ax.axis("off")
    fig.suptitle("MIA ROC curves (forget = 0, holdout = 1)", fontsize=10)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


# ------------------------------------------------------------------------ FQ vs MU scatter
_FQ_FLOOR = 1e-30  # forget quality of 0 is drawn here on the log axis


def _plot_scatter(path: Path, summary: dict[str, Any], train_eval: dict[str, Any] | None) -> bool:
    pts = {n: (summary[n].get("model_utility"), summary[n].get("forget_quality")) for n in _ORDER if n in summary}
    pts = {n: (mu, max(fq, _FQ_FLOOR)) for n, (mu, fq) in pts.items() if mu is not None and fq is not None}
    path_pts = []
    sel_step = None
    if train_eval:
        seq = ([train_eval["baseline"]] if train_eval.get("baseline") else []) + list(train_eval.get("curve", []))
        path_pts = [(p["step"], p["model_utility"], max(p["forget_quality"], _FQ_FLOOR)) for p in seq
                    if p.get("model_utility") is not None and p.get("forget_quality") is not None]
        sel_step = (train_eval.get("selected") or {}).get("step")
    if not pts and not path_pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if path_pts:
        n_items = max((train_eval.get("items_per_split") or {0: 0}).values())
        ax.plot([p[1] for p in path_pts], [p[2] for p in path_pts], "-o", color="0.6", ms=3, lw=1, zorder=1,
                label=f"during training (first {n_items} items per split)")
        for st, mu, fq in (path_pts[0], path_pts[-1]):
            ax.annotate(f"step {st}", (mu, fq), fontsize=7, color="0.4", xytext=(3, 3), textcoords="offset points")
        for st, mu, fq in path_pts:
            if st == sel_step:
                ax.scatter([mu], [fq], marker="*", s=160, color="C3", zorder=3, label=f"selected (step {st})")
    style = {"target": dict(color="C0", marker="s", s=110), "unlearned": dict(color="C1", marker="o", s=70),
             "retain": dict(color="C2", marker="D", s=45)}  # sizes differ so that coinciding points stay visible
    for n, (mu, fq) in pts.items():
        ax.scatter([mu], [fq], edgecolor="black", zorder=4, label=n, **style[n])
    ax.set_yscale("log")
    ax.set_xlabel("model utility (↑)")
    ax.set_ylabel("forget quality (↑, log)")
    ax.set_title("Forget quality vs model utility: aim for the top right (the retain model)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------- attacks
_ATTACK_METRICS = ("prob", "rouge", "truth_ratio")


def _attack_section(attacks: dict[str, Any], run_dir: Path) -> list[str]:
    lines = ["## Attacks on the forget split", "",
             "Each attack tries to bring forgotten answers back; \"before\" is the model as evaluated without the "
             "attack, \"after\" with it, Δ = after − before (forget Prob/ROUGE rising = knowledge recovered). "
             "retain Prob Δ (model attacks): the attack's effect on retain items -- a forget-set rise that the "
             "retain set does not share means the attack brought the forgotten facts back.", ""]
    head = " | ".join(f"{m} before | {m} after | {m} Δ" for m in _ATTACK_METRICS)
    for model in [n for n in _ORDER if n in attacks] + [n for n in attacks if n not in _ORDER]:
        res = attacks[model]
        if not isinstance(res, dict) or not res:
            continue
        lines += [f"### {model}", "", f"| attack | items | {head} | retain Prob Δ | note |",
                  "| --- | --- | " + " | ".join("---" for _ in range(3 * len(_ATTACK_METRICS))) + " | --- | --- |"]
        for name, r in res.items():
            cells = []
            for m in _ATTACK_METRICS:
                cells += [_fmt((r.get(k) or {}).get(m)) for k in ("before", "after", "delta")]
            retain = _fmt(((r.get("retain") or {}).get("delta") or {}).get("prob"))
            note = str(r.get("note") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {name} | {_fmt(r.get('items'))} | " + " | ".join(cells) + f" | {retain} | {note} |")
        lines.append("")
    if _plot_attack_deltas(run_dir / "attacks_rouge_delta.png", attacks):
        lines += ["![forget ROUGE deltas](attacks_rouge_delta.png)", ""]
    return lines


def _plot_attack_deltas(path: Path, attacks: dict[str, Any]) -> bool:
    models = [n for n in _ORDER if isinstance(attacks.get(n), dict) and attacks[n]]
    names: list[str] = []
    for n in models:
        names += [a for a in attacks[n] if a not in names]
    vals = {n: [((attacks[n].get(a) or {}).get("delta") or {}).get("rouge") for a in names] for n in models}
    if not any(v is not None for vs in vals.values() for v in vs):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 3.4))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(names))
    colors = {"target": "C0", "unlearned": "C1", "retain": "C2"}
    for i, n in enumerate(models):
        ax.bar(x + (i - (len(models) - 1) / 2) * width, [np.nan if v is None else v for v in vals[n]], width,
               label=n, color=colors.get(n))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("forget ROUGE-L Δ (after − before)")
    ax.set_title("Attacks: forget ROUGE recovered")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------ training evals
def _train_eval_section(te: dict[str, Any], run_dir: Path) -> list[str]:
    sel = te.get("selected") or {}
    stop = te.get("stopped_early")
    n_items = max((te.get("items_per_split") or {0: 0}).values())
    when = " and ".join(x for x in ((f"every {te['eval_every']} steps" if te.get("eval_every") else ""),
                                    ("at every epoch end" if te.get("eval_every_epoch") else "")) if x)
    lines = ["## Evaluation during training", "",
             f"Suite `tofu` on the first {n_items} items per split, {when} and at the last step. "
             f"Selection `{te.get('select_best')}`: step {sel.get('step')} ({sel.get('reason')}).", ""]
    if stop:
        lines += [f"**Stopped early** after step {stop['step']}: {stop['reason']}.", ""]
    lines += ["| step | epoch | trigger | forget quality | model utility | utility / target | forget Prob | forget ROUGE | retain Prob |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = te.get("baseline")
    rows = ([base] if base else []) + list(te.get("curve", []))
    for p in rows:
        mark = " ◀" if p.get("step") == sel.get("step") and p is not base else ""
        lines.append(f"| {p['step']}{mark} | {_fmt(p.get('epoch'))} | {', '.join(p.get('trigger') or [])} | "
                     f"{_fmt(p.get('forget_quality'))} | {_fmt(p.get('model_utility'))} | {_fmt(p.get('utility_ratio'))} | "
                     f"{_fmt(p.get('forget_prob'))} | {_fmt(p.get('forget_rouge'))} | {_fmt(p.get('retain_prob'))} |")
    lines.append("")
    if _plot_train_eval(run_dir / "train_eval.png", te):
        lines += ["![evaluation during training](train_eval.png)", ""]
    return lines


def _plot_train_eval(path: Path, te: dict[str, Any]) -> bool:
    curve = list(te.get("curve") or [])
    if not curve:
        return False
    base = te.get("baseline")
    seq = ([base] if base else []) + curve
    steps = [p["step"] for p in seq]
    fq = [np.nan if p.get("forget_quality") is None else max(p["forget_quality"], _FQ_FLOOR) for p in seq]
    mu = [np.nan if p.get("model_utility") is None else p["model_utility"] for p in seq]
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 3.4))
    a1.plot(steps, fq, "-o", ms=3, color="C1")
    a1.set_yscale("log")
    a1.set_title("forget quality (↑, log)")
    a2.plot(steps, mu, "-o", ms=3, color="C0")
    a2.set_title("model utility (↑)")
    tmu, floor = te.get("target_model_utility"), te.get("utility_floor")
    if tmu is not None and floor is not None:
        a2.axhline(floor * tmu, color="C3", ls=":", lw=1, label=f"floor ({floor} × target)")
        a2.legend(fontsize=8)
    sel = (te.get("selected") or {}).get("step")
    stop = (te.get("stopped_early") or {}).get("step")
    from matplotlib.ticker import MaxNLocator

    for ax in (a1, a2):
        ax.set_xlabel("step (0 = target)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if sel is not None:
            ax.axvline(sel, color="C2", lw=1.5, label="selected")
        if stop is not None:
            ax.axvline(stop, color="C3", lw=1, ls="--", label="stopped")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ existing
def _plot_truth_ratios(path: Path, models: dict[str, Any]) -> bool:
    plt = _plt()

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    logs = {}
    for name in _ORDER:
        res = models.get(name)
        if res is None or "forget" not in res["splits"]:
            continue
        r = np.asarray(res["splits"]["forget"]["truth_ratio_raw"], dtype=float)
        logs[name] = np.log10(np.clip(r, 1e-12, None))
    if not logs:
        plt.close(fig)
        return False
    lo = min(v.min() for v in logs.values())
    hi = max(v.max() for v in logs.values())
    bins = np.linspace(lo, max(hi, lo + 1e-6), 31)
    for name, v in logs.items():
        ax.hist(v, bins=bins, alpha=0.5, label=name, density=True)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("log10 R,  R = P(perturbed) / P(paraphrase)   (< 0: prefers the truth)")
    ax.set_ylabel("density")
    ax.set_title("Forget truth ratios (goal: match the retain model)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_loss(path: Path, history: list[dict]) -> bool:
    if not history:
        return False
    plt = _plt()

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
    sel = prov.get("selection")
    how = (f"selection `{sel['name']}` ({sel['trainable']:,} of {sel['total']:,} parameters trainable)" if sel
           else "an editor: the evaluated model is what it returned" + (
               f" ({', '.join(f'{k} {v}' for k, v in metrics['editor'].get('headline', {}).items())})"
               if metrics.get("editor", {}).get("headline") else ""))
    lines += [f"- method: **{recipe.method.name}** ({prov['objective']['paper']}), {how}",
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
    lines += _mia_section(models, names)
    if _plot_roc(run_dir / "mia_roc.png", models):
        lines += ["![MIA ROC curves](mia_roc.png)", ""]
    te = metrics.get("train_eval")
    if _plot_scatter(run_dir / "fq_vs_mu.png", metrics["summary"], te):
        lines += ["## Forget quality vs model utility", "", "![forget quality vs model utility](fq_vs_mu.png)", ""]
    if metrics.get("attacks"):
        lines += _attack_section(metrics["attacks"], run_dir)
    if metrics.get("probes"):
        from unlearn.probes.report import probe_section

        lines += probe_section(metrics["probes"], run_dir)
    if te:
        lines += _train_eval_section(te, run_dir)
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
