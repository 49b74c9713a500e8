"""The TOFU task's own report sections: membership inference (AUCs, privleak, ROC curves),
forget quality vs model utility (with the training-time path), the attack tables, the forget
truth-ratio distributions and sample generations. The shared sections are in
:mod:`unlearn.report`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unlearn.report import ORDER as _ORDER
from unlearn.report import fmt, plt


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
        lines.append(f"| {m} | " + " | ".join(fmt(_value((models[n].get("multi") or {}).get(m))) for n in names) + " |")
    for agg in ("mia_reference", "privleak"):
        vals = [_value((models[n].get("summary") or {}).get(agg)) for n in names]
        if any(v is not None for v in vals):
            lines.append(f"| {agg} | " + " | ".join(fmt(v) for v in vals) + " |")
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
    pyplot = plt()
    cols = min(3, len(mia))
    rows = (len(mia) + cols - 1) // cols
    fig, axes = pyplot.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
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
            ax.plot(fpr, tpr, label=f"{n} (AUC {fmt(r.get('value'))})", **style[n])
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
    pyplot.close(fig)
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
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.4, 4.4))
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
    pyplot.close(fig)
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
                cells += [fmt((r.get(k) or {}).get(m)) for k in ("before", "after", "delta")]
            retain = fmt(((r.get("retain") or {}).get("delta") or {}).get("prob"))
            note = str(r.get("note") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {name} | {fmt(r.get('items'))} | " + " | ".join(cells) + f" | {retain} | {note} |")
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
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 3.4))
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
    pyplot.close(fig)
    return True


def _plot_truth_ratios(path: Path, models: dict[str, Any]) -> bool:
    pyplot = plt()

    fig, ax = pyplot.subplots(figsize=(6.4, 3.6))
    logs = {}
    for name in _ORDER:
        res = models.get(name)
        if res is None or "forget" not in res["splits"]:
            continue
        r = np.asarray(res["splits"]["forget"]["truth_ratio_raw"], dtype=float)
        logs[name] = np.log10(np.clip(r, 1e-12, None))
    if not logs:
        pyplot.close(fig)
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
    pyplot.close(fig)
    return True


def headline_notes(summary: dict[str, Any]) -> list[str]:
    fq = {n: (summary.get(n) or {}).get("forget_quality") for n in _ORDER}
    if fq.get("target") and fq.get("unlearned") is not None:
        return [f"Forget quality rose {fq['unlearned'] / max(fq['target'], 1e-300):.3g}x over the target's.", ""]
    return []


def sample_section(models: dict[str, Any], names: list[str], items: list[dict], n_samples: int) -> list[str]:
    if n_samples <= 0 or "forget" not in models[names[0]]["splits"]:
        return []
    lines = ["## Sample generations (forget split)", ""]
    for i in range(min(n_samples, len(items))):
        lines += [f"**Q:** {items[i]['question']}  ", f"**truth:** {items[i]['answer']}  "]
        for n in names:
            gens = models[n]["splits"]["forget"].get("generations") or []
            if i < len(gens):
                lines.append(f"**{n}:** {gens[i]}  ")
        lines.append("")
    return lines


def tofu_sections(run_dir: Path, metrics: dict[str, Any], forget_items: list[dict], n_samples: int) -> dict[str, list[str]]:
    """The sections by slot of :meth:`unlearn.task.Task.report_sections`."""
    models = metrics["models"]
    names = [n for n in _ORDER if n in models]
    results = ["Directions are stated for the metric in general; on the forget split lower Prob/ROUGE/memorisation "
               "means more forgetting.", ""]
    results += _mia_section(models, names)
    if _plot_roc(run_dir / "mia_roc.png", models):
        results += ["![MIA ROC curves](mia_roc.png)", ""]
    if _plot_scatter(run_dir / "fq_vs_mu.png", metrics["summary"], metrics.get("train_eval")):
        results += ["## Forget quality vs model utility", "", "![forget quality vs model utility](fq_vs_mu.png)", ""]
    end = []
    if _plot_truth_ratios(run_dir / "truth_ratio_hist.png", models):
        end = ["## Forget truth-ratio distributions", "", "![truth ratios](truth_ratio_hist.png)", ""]
    return {"headline": headline_notes(metrics["summary"]), "results": results,
            "attacks": _attack_section(metrics["attacks"], run_dir) if metrics.get("attacks") else [],
            "end": end, "samples": sample_section(models, names, forget_items, n_samples)}
