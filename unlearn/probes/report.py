"""The probes section of a run's ``report.md``: a metrics table, the causal-tracing heat maps and
the linear-probe accuracy per layer (PNG files next to the report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unlearn.probes.causal_tracing import plot_heatmap


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.4f}"
    return str(v)


def probe_section(probes: dict[str, Any], run_dir: Path) -> list[str]:
    """Markdown lines for ``metrics["probes"]`` (the output of :func:`unlearn.probes.probe_after`)."""
    if not probes:
        return []
    lines = ["## Probes (inside the weights)", "",
             "Measured on the target before unlearning and on the unlearned model; see docs/probes.md. "
             "Directions are stated from the forgetting side (↓ on a cosine: the concept vector moved more).", "",
             "| probe | metric | direction | value | note |", "| --- | --- | --- | --- | --- |"]
    for name, entry in probes.items():
        for m, r in (entry.get("metrics") or {}).items():
            arrow = {True: "↑", False: "↓", None: "–"}[r.get("higher_is_better")]
            note = str(r.get("note") or "").replace("|", "\\|")
            lines.append(f"| {name} | {m} | {arrow} | {_fmt(r.get('value'))} | {note} |")
    lines.append("")
    cv = probes.get("concept_vectors")
    if cv and cv.get("before"):
        v = cv["before"]["values"]
        lines += [f"Concept vectors: {v.get('n_candidates')} (column, author) matches among "
                  f"{v.get('n_concepts_with_tokens')}/{v.get('n_concepts')} authors with distinctive name tokens; "
                  f"{v.get('n_checked')} checked causally, {_fmt(v.get('n_validated'))} passed "
                  f"({_fmt(v.get('n_concepts_validated'))} authors).", ""]
    ct = probes.get("causal_tracing")
    if ct and ct.get("before"):
        if plot_heatmap(run_dir / "causal_tracing.png", {"target": ct["before"], "unlearned": ct.get("after")}):
            lines += ["![causal tracing](causal_tracing.png)", ""]
    lp = probes.get("linear_probe")
    if lp and lp.get("before") and _plot_linear_probe(run_dir / "linear_probe.png", lp):
        lines += ["![linear probe accuracy per layer](linear_probe.png)", ""]
    return lines


def _plot_linear_probe(path: Path, entry: dict[str, Any]) -> bool:
    b, a = entry["before"], entry.get("after")
    layers = b["arrays"].get("layers") or []
    if not layers:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    ax.plot(layers, b["arrays"]["acc"], "-o", color="C0", label="target")
    if a:
        ax.plot(layers, a["arrays"]["acc"], "-o", color="C1", label="unlearned (refitted)")
        if a["arrays"].get("acc_transfer"):
            ax.plot(layers, a["arrays"]["acc_transfer"], "--s", color="C1", ms=3, alpha=0.7,
                    label="unlearned (target's probe)")
    ax.plot(layers, b["arrays"]["shuffled_acc"], ":", color="grey", label="shuffled labels (target)")
    ax.axhline(b["values"]["majority"], color="C3", lw=1, ls="--", label="majority baseline")
    ax.axhline(b["values"]["chance"], color="black", lw=0.8, ls=":", label="chance")
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("test accuracy (forget authors)")
    ax.set_ylim(0, max(1.0, float(np.nanmax(b["arrays"]["acc"]))))
    ax.set_title(f"Linear probe: {b['values']['attribute']} of forget authors", fontsize=10)
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
