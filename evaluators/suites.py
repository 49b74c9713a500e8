"""The metrics of the text side as harness metrics, and the named, versioned suites.

| suite | version | what |
| --- | --- | --- |
| ``tofu`` | 2 | Prob, truth ratio, ROUGE-L recall, exact memorisation, extraction strength per split; forget quality and model utility |
| ``mia`` | 2 | MIA AUCs (LOSS, ZLib, Min-K%, Min-K%++, GradNorm, Reference) on forget vs holdout; privleak |
| ``tofu-full`` | 2 | ``tofu`` + ``mia`` |

Version 2 (all three): the truth ratio no longer runs on ``holdout`` splits (they need only
question and answer, as TOFU's holdout files; the holdout split serves MIA); ZLib compresses
the decoded labelled tokens (open-unlearning's text) instead of the raw answer string; the
GradNorm loss drops each item's last labelled token (the reference convention, as Min-K%).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unlearn.evaluators import privacy as P
from unlearn.evaluators import tofu as M
from unlearn.evaluators.base import MetricResult
from unlearn.evaluators.harness import Aggregate, Metric, MultiSplitMetric, PassStore, SplitInfo, Suite
from unlearn.evaluators.text_passes import Generate, GradNorms, TeacherForced
from unlearn.registry import Registry

UTILITY_SPLITS = {"retain": "retain_eval", "real_authors": "real_authors", "world_facts": "world_facts"}
# TOFU's multiple-choice-style utility sets (truth ratio as TOFU computes it on them)
TOFU_SPLIT_KINDS = {"real_authors": "mc", "world_facts": "mc"}


def _n_perturbed(items: list[dict]) -> int:
    return min(len(it["perturbed_answer"]) for it in items)


def _pert_requests(split: SplitInfo, outputs=frozenset({"nll"})) -> list[TeacherForced]:
    return [TeacherForced("perturbed_answer", j, outputs=outputs) for j in range(_n_perturbed(split.items))]


def _pert_scores(store: PassStore, split: SplitInfo) -> tuple[list, list]:
    res = [store.get(r) for r in _pert_requests(split)]
    return np.stack([r["nll"] for r in res], 1).tolist(), np.stack([r["n"] for r in res], 1).tolist()  # (N, k)


# ------------------------------------------------------------------------------ TOFU
class Prob(Metric):
    """Length-normalised answer probability; the multiple-choice normalised form on ``mc`` splits."""

    spec = M.SPECS["prob"]

    def requests(self, split):
        reqs = [TeacherForced("answer")]
        return reqs + _pert_requests(split) if split.kind == "mc" else reqs

    def compute(self, store, split):
        a = store.get(TeacherForced("answer"))
        if split.kind == "mc":
            pn, pc = _pert_scores(store, split)
            r = M.prob_multiple_choice(a["nll"].tolist(), a["n"].tolist(), pn, pc)
            return _renamed(r, "prob")
        return M.prob(a["nll"], a["n"], forget_set=split.forget_set)


def _renamed(r: MetricResult, name: str) -> MetricResult:
    d = r.to_dict()
    return MetricResult(name=name, value=d["value"], per_item=d["per_item"], higher_is_better=d["higher_is_better"],
                        version=d["version"], note=(d.get("note") or "") + f" (computed as {r.name})")


class TruthRatio(Metric):
    """Truth ratio: forget form mean min(R, 1/R); retain and mc form mean max(0, 1 - R).

    Not on ``holdout`` splits: their items need only question and answer (TOFU's holdout
    files have no paraphrased or perturbed answers; the split serves MIA)."""

    spec = M.SPECS["truth_ratio"]
    kinds = ("forget", "retain", "mc")

    def _para(self, split):
        return TeacherForced("answer" if split.kind == "mc" else "paraphrased_answer")

    def requests(self, split):
        return [self._para(split)] + _pert_requests(split)

    def _result(self, store, split):
        p = store.get(self._para(split))
        pn, pc = _pert_scores(store, split)
        return M.truth_ratio(p["nll"], p["n"], pn, pc, mode="forget" if split.kind == "forget" else "true")

    def compute(self, store, split):
        return _renamed(self._result(store, split), "truth_ratio")

    def extras(self, store, split):
        return {"truth_ratio_raw": [float(x) for x in self._result(store, split).per_item]}


class RougeL(Metric):
    """ROUGE-L recall of greedy answers against the answer."""

    spec = M.SPECS["rouge_l_recall"]

    def __init__(self, max_new_tokens: int = 48) -> None:
        self.max_new_tokens = max_new_tokens

    @property
    def name(self):
        return "rouge"

    def requests(self, split):
        return [Generate(self.max_new_tokens)]

    def compute(self, store, split):
        gens = store.get(Generate(self.max_new_tokens))
        return _renamed(M.rouge_l_recall(gens, [it["answer"] for it in split.items], forget_set=split.forget_set), "rouge")

    def extras(self, store, split):
        return {"generations": list(store.get(Generate(self.max_new_tokens)))}


class _Memo(Metric):
    kinds = ("forget", "retain", "holdout")
    key = ""

    def requests(self, split):
        return [TeacherForced("answer", outputs=frozenset({"nll", "memorization"}))]

    def compute(self, store, split):
        vals = store.get(TeacherForced("answer", outputs=frozenset({"nll", "memorization"})))[self.key]
        return MetricResult(name=self.key, value=float(np.mean(vals)), per_item=[float(v) for v in vals],
                            higher_is_better=not split.forget_set, version=self.spec.version,
                            note="open-unlearning reference convention (last answer token not scored)")


class ExactMemorization(_Memo):
    spec = M.SPECS["exact_memorization"]
    key = "exact_memorization"


class ExtractionStrength(_Memo):
    spec = M.SPECS["extraction_strength"]
    key = "extraction_strength"


class ForgetQuality(Aggregate):
    spec = M.SPECS["forget_quality"]

    def __init__(self, split: str = "forget") -> None:
        self.split = split

    def compute(self, res, reference):
        f = res["splits"].get(self.split)
        if f is None or "truth_ratio_raw" not in f:
            return MetricResult(name=self.name, value=None, per_item=None, higher_is_better=True,
                                version=self.spec.version, note=f"not computable: no truth ratios on split {self.split!r}")
        ref = None if reference is None else reference["splits"][self.split]["truth_ratio_raw"]
        return M.forget_quality(f["truth_ratio_raw"], ref)


class ModelUtility(Aggregate):
    spec = M.SPECS["model_utility"]

    def compute(self, res, reference):
        vals = {}
        for short, split in UTILITY_SPLITS.items():
            s = res["splits"].get(split)
            for m in ("prob", "rouge", "truth_ratio"):
                if s is not None and m in s["metrics"]:
                    vals[f"{short}/{m}"] = s["metrics"][m]["value"]
        if len(vals) != 9:
            return MetricResult(name=self.name, value=None, per_item=None, higher_is_better=True, version=self.spec.version,
                                note=f"not computable: needs prob, rouge and truth_ratio on {sorted(UTILITY_SPLITS.values())}")
        return M.model_utility(vals)


# ------------------------------------------------------------------------------ MIA
_MIA_TF = TeacherForced("answer", outputs=frozenset({"nll", "token_logprobs", "vocab_stats", "target_texts"}))


class MIA(MultiSplitMetric):
    """AUC of one MIA score on forget (label 0) vs holdout (label 1); per_item = the scores of
    the forget items followed by the holdout items.

    Per item, as open-unlearning: LOSS over every labelled answer token; ZLib divides it by the
    zlib length of the labelled tokens decoded with ``skip_special_tokens=True``; Min-K%,
    Min-K%++ and GradNorm drop each item's last labelled token under ``convention="reference"``
    (default, in both tokenisations) and keep it under ``"exact"``.
    """

    def __init__(self, attack: str, forget: str = "forget", holdout: str = "holdout", k: float = P.DEFAULT_K,
                 convention: M.Convention = "reference") -> None:
        self.attack, self.k, self.convention = attack, k, convention
        self.splits = (forget, holdout)
        self.spec = P.SPECS[f"mia_{attack}"]

    def requests(self, split):
        if self.attack == "gradnorm":
            return [GradNorms(self.convention)]
        return [_MIA_TF]

    def scores(self, store: PassStore, info: SplitInfo) -> np.ndarray:
        if self.attack == "gradnorm":
            return P.gradnorm_score(store.get(GradNorms(self.convention)))
        r = store.get(_MIA_TF)
        lp = r["token_logprobs"]
        if self.attack == "loss":
            return P.loss_score(lp)
        if self.attack == "zlib":
            return P.zlib_score(lp, r["target_texts"])
        if self.attack == "min_k":
            return P.min_k_score(lp, self.k, convention=self.convention)
        if self.attack == "min_k_plus_plus":
            return P.min_k_plus_plus_score(lp, r["mu"], r["sigma"], self.k, convention=self.convention)
        raise ValueError(f"unknown MIA attack {self.attack!r}")

    def compute(self, stores, splits):
        f, h = self.splits
        sf, sh = self.scores(stores[f], splits[f]), self.scores(stores[h], splits[h])
        r = P.mia_auc(sf, sh, self.spec.name)
        d = r.to_dict()
        return MetricResult(name=d["name"], value=d["value"], per_item=[float(x) for x in np.concatenate([sf, sh])],
                            higher_is_better=d["higher_is_better"], version=d["version"],
                            note=(d.get("note") or "") + f"; per_item: {len(sf)} forget scores then {len(sh)} holdout scores")


class MIAReference(Aggregate):
    """Reference attack: LOSS_model - LOSS_reference per item (the retain model is the reference)."""

    spec = P.SPECS["mia_reference"]

    def compute(self, res, reference):
        if reference is None or "mia_loss" not in reference.get("multi", {}) or "mia_loss" not in res.get("multi", {}):
            return MetricResult(name=self.name, value=None, per_item=None, higher_is_better=None, version=self.spec.version,
                                note="not computable: needs mia_loss of the model and of a reference (retain) model")
        a = np.asarray(res["multi"]["mia_loss"]["per_item"])
        b = np.asarray(reference["multi"]["mia_loss"]["per_item"])
        if len(a) != len(b):
            raise ValueError(f"mia_reference: the model has {len(a)} scored items but the reference has {len(b)}; "
                             "evaluate both on the same forget and holdout splits")
        n_f = list(res["multi"]["mia_loss"]["split_sizes"].values())[0]
        diff = a - b
        return P.mia_auc(diff[:n_f], diff[n_f:], "mia_reference")


class PrivLeak(Aggregate):
    """privleak on the Min-K% AUC against the retain model's."""

    spec = P.SPECS["privleak"]

    def compute(self, res, reference):
        auc = res.get("multi", {}).get("mia_min_k", {}).get("value")
        ref = None if reference is None else reference.get("multi", {}).get("mia_min_k", {}).get("value")
        if auc is None:
            return MetricResult(name=self.name, value=None, per_item=None, higher_is_better=None, version=self.spec.version,
                                note="not computable: no mia_min_k AUC (needs forget and holdout splits)")
        return P.privleak(auc, ref)


# ------------------------------------------------------------------------------ suites
def tofu_suite(max_new_tokens: int = 48) -> Suite:
    return Suite("tofu", "2", [Prob(), TruthRatio(), RougeL(max_new_tokens), ExactMemorization(), ExtractionStrength()],
                 aggregates=[ForgetQuality(), ModelUtility()],
                 description="TOFU's metrics (Maini et al., 2024) as open-unlearning computes them",
                 split_kinds=dict(TOFU_SPLIT_KINDS))


def mia_suite(max_new_tokens: int = 48) -> Suite:
    return Suite("mia", "2", [], multi=[MIA(a) for a in ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm")],
                 aggregates=[MIAReference(), PrivLeak()], description="membership inference on forget vs holdout",
                 split_kinds=dict(TOFU_SPLIT_KINDS))


def tofu_full_suite(max_new_tokens: int = 48) -> Suite:
    t, m = tofu_suite(max_new_tokens), mia_suite(max_new_tokens)
    return Suite("tofu-full", "2", t.metrics, multi=m.multi, aggregates=t.aggregates + m.aggregates,
                 description="tofu + mia", split_kinds=dict(TOFU_SPLIT_KINDS))


SUITES = Registry("suite")
SUITES.register("tofu", tofu_suite)
SUITES.register("mia", mia_suite)
SUITES.register("tofu_full", tofu_full_suite)


def get_suite(name: str, **kw: Any) -> Suite:
    """A suite by name (``tofu``, ``mia``, ``tofu-full``)."""
    return SUITES.get(name.replace("-", "_"))(**kw)
