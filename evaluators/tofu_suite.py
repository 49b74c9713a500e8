"""The ``tofu`` evaluation suite: TOFU's metrics on a text adapter, each forward pass once.

Per split, the suite makes exactly these passes and derives every metric from them:

* the answer pass (teacher-forced): Prob, exact memorisation, extraction strength;
* the paraphrased-answer pass and one pass per perturbed answer: truth ratio (and
  multiple-choice Prob on the utility sets, where the perturbed answers are the wrong options);
* one greedy generation pass: ROUGE-L recall.

Split kinds: ``forget`` (truth ratio reported as mean min(R, 1/R)), ``retain`` (mean
max(0, 1 - R)) and ``mc`` (multiple-choice utility sets: normalised Prob, max(0, 1 - R) with
the correct answer standing in for the paraphrase).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from unlearn.evaluators import tofu as M
from unlearn.evaluators.base import MetricResult

SUITE_VERSION = "1"
UTILITY_SPLITS = {"retain": "retain_eval", "real_authors": "real_authors", "world_facts": "world_facts"}


def split_kind(name: str) -> str:
    if name.startswith("forget") or name == "holdout":
        return "forget"
    if name in ("real_authors", "world_facts"):
        return "mc"
    return "retain"


@torch.no_grad()
def _nll_pass(adapter, items, answer_key, answer_index=None, batch_size=32, want_logits_metrics=False, forget_set=True):
    nll, n, em, es = [], [], [], []
    for s in range(0, len(items), batch_size):
        b = adapter.collate(items[s: s + batch_size], answer_key=answer_key, answer_index=answer_index)
        logits = adapter.logits(b)  # (B, T, V)
        lg, lb, mask = adapter.shift(logits, b["labels"])
        tok = torch.nn.functional.cross_entropy(lg.float().transpose(1, 2), lb.clamp_min(0), reduction="none") * mask
        nll.append(tok.sum(-1))
        n.append(mask.sum(-1))
        if want_logits_metrics:
            em += M.exact_memorization(logits, b["labels"], forget_set=forget_set).per_item
            es += M.extraction_strength(logits, b["labels"], forget_set=forget_set).per_item
    return torch.cat(nll).numpy(), torch.cat(n).numpy(), em, es


def evaluate_split(adapter, items: list[dict], kind: str, *, batch_size: int = 32, max_new_tokens: int = 48,
                   generate: bool = True) -> dict[str, Any]:
    """All TOFU metrics of one split. Returns ``{"metrics": {name: MetricResult.to_dict()},
    "truth_ratio_raw": [R per item], "generations": [...]}``."""
    fs = kind == "forget"
    a_nll, a_n, em, es = _nll_pass(adapter, items, "answer", batch_size=batch_size, want_logits_metrics=(kind != "mc"),
                                   forget_set=fs)
    k = min(len(it["perturbed_answer"]) for it in items)
    pert = [_nll_pass(adapter, items, "perturbed_answer", j, batch_size)[:2] for j in range(k)]
    pert_nll = np.stack([p[0] for p in pert], 1).tolist()  # (N, k)
    pert_n = np.stack([p[1] for p in pert], 1).tolist()
    if kind == "mc":
        para_nll, para_n = a_nll, a_n
    else:
        para_nll, para_n, _, _ = _nll_pass(adapter, items, "paraphrased_answer", batch_size=batch_size)
    out: dict[str, MetricResult] = {}
    if kind == "mc":
        out["prob"] = M.prob_multiple_choice(a_nll.tolist(), a_n.tolist(), pert_nll, pert_n)
    else:
        out["prob"] = M.prob(a_nll, a_n, forget_set=fs)
    tr = M.truth_ratio(para_nll, para_n, pert_nll, pert_n, mode="forget" if kind == "forget" else "true")
    out["truth_ratio"] = tr
    gens: list[str] = []
    if generate:
        gens = adapter.generate([it["question"] for it in items], max_new_tokens=max_new_tokens, batch_size=batch_size)
        out["rouge"] = M.rouge_l_recall(gens, [it["answer"] for it in items], forget_set=fs)
    if kind != "mc":
        out["exact_memorization"] = _from_items("exact_memorization", em, fs)
        out["extraction_strength"] = _from_items("extraction_strength", es, fs)
    return {"metrics": {k_: v.to_dict() for k_, v in out.items()}, "truth_ratio_raw": list(map(float, tr.per_item)),
            "generations": gens}


def _from_items(name: str, per_item: list[float], forget_set: bool) -> MetricResult:
    spec = M.SPECS[name]
    return MetricResult(name=name, value=float(np.mean(per_item)), per_item=list(map(float, per_item)),
                        higher_is_better=(not forget_set), version=spec.version,
                        note="open-unlearning reference convention (last answer token not scored)")


def eval_key(adapter, splits: dict[str, list[dict]], settings: dict) -> str:
    from unlearn.data import items_fingerprint

    h = hashlib.sha256()
    h.update(json.dumps({"model": adapter.fingerprint(), "tok": adapter.tokenization, "prompt": adapter.prompt_template,
                         "suite": SUITE_VERSION, "settings": settings,
                         "splits": {k: items_fingerprint(v) for k, v in sorted(splits.items())}}, sort_keys=True).encode())
    return h.hexdigest()[:24]


def evaluate(adapter, splits: dict[str, list[dict]], *, batch_size: int = 32, max_new_tokens: int = 48,
             cache_dir: str | Path | None = None, progress: bool = True, label: str = "model",
             suite: str = "tofu") -> dict[str, Any]:
    """Run a named suite (default ``tofu``) through the harness on every split.

    Results are cached (when ``cache_dir`` is given) under a key made of the model
    fingerprint, the tokenisation, the prompt, the suite and its version, the settings and
    the split contents -- never by metric name alone.
    """
    from unlearn.evaluators import harness
    from unlearn.evaluators.suites import get_suite

    st = get_suite(suite, max_new_tokens=max_new_tokens)
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "suite": st.name, "suite_version": st.version}
    key = eval_key(adapter, splits, settings)
    cache = Path(cache_dir) / f"{key}.json" if cache_dir else None
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    protocol = {"tokenization": adapter.tokenization, "prompt_template": adapter.prompt_template,
                "decoding": "greedy", "memorization_convention": "reference", "max_new_tokens": max_new_tokens}
    res = harness.evaluate(adapter, splits, st, batch_size=batch_size, progress=progress, label=label, protocol=protocol)
    if cache is not None:
        from unlearn.runs import atomic_write_text

        atomic_write_text(cache, json.dumps(res))
    return res


def summarize(res: dict[str, Any], retain_res: dict[str, Any] | None, forget_split: str = "forget") -> dict[str, Any]:
    """The suite's aggregates: forget quality (vs the retain model's forget truth ratios),
    model utility (harmonic mean of the nine utility values), and for ``tofu-full`` the MIA
    reference attack and privleak."""
    from unlearn.evaluators import harness
    from unlearn.evaluators.suites import get_suite

    return harness.aggregate(res, get_suite(res.get("suite", "tofu")), retain_res)
