"""The ``rwku`` and ``muse`` suites: the metrics of the RWKU-style and MUSE-style tasks.

| suite | version | splits -> metrics |
| --- | --- | --- |
| ``rwku`` | 1 | ``forget_level1/2/3``, ``neighbor_level1/2``: ROUGE-L recall of greedy answers (``rouge``); ``mia_forget``, ``mia_retain``: mean LOSS, ZLib, Min-K%, Min-K%++ scores; ``utility_general``: multiple-choice accuracy; ``utility_fluency``: n-gram entropy of free generations |
| ``muse`` | 1 | ``verbmem_forget``: ROUGE-L F1 of the greedy continuation of a passage prefix (``verbmem``); ``knowmem_forget``, ``knowmem_retain``: ROUGE-L F1 of greedy answers (``knowmem``); ``privleak_forget`` vs ``privleak_holdout``: Min-K% AUC, and PrivLeak against the retain model's AUC |

RWKU (Jin et al., 2024, "RWKU: Benchmarking Real-World Knowledge Unlearning for Large
Language Models", arXiv:2406.10890) scores answers by ROUGE-L recall and reports the MIA
scores themselves (member texts both: higher on ``mia_forget`` after unlearning = forgotten;
``mia_retain`` should not move). MUSE (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way
Evaluation for Language Models", arXiv:2407.06460) scores with ROUGE-L F1 (as open-unlearning's
MUSE metrics) and PrivLeak ``((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain) x 100`` on the
Min-K% AUC (forget labelled 0, holdout 1; :func:`unlearn.evaluators.privacy.privleak`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from unlearn.evaluators import privacy as P
from unlearn.evaluators.base import MetricResult, MetricSpec
from unlearn.evaluators.harness import Metric, PassRequest, Suite
from unlearn.evaluators.suites import MIA, PrivLeak, RougeL, _MIA_TF, _pert_requests, _pert_scores
from unlearn.evaluators.text_passes import Generate, TeacherForced

RWKU_PAPER = ("Jin et al. RWKU: Benchmarking Real-World Knowledge Unlearning for Large Language Models. "
              "NeurIPS 2024 Datasets and Benchmarks. arXiv:2406.10890")
MUSE_PAPER = ("Shi et al. MUSE: Machine Unlearning Six-Way Evaluation for Language Models. ICLR 2025. "
              "arXiv:2407.06460")

SPECS = {s.name: s for s in (
    MetricSpec("mc_accuracy", True, "1", description="multiple choice: fraction of items whose correct option has a "
               "lower mean token NLL than every wrong option", paper=RWKU_PAPER),
    MetricSpec("fluency", True, "1", description="mean over free generations of the weighted n-gram entropy "
               "mean(2/3 H2, 4/3 H3) (bits) over word tokens", paper=RWKU_PAPER),
    MetricSpec("rouge_l_f1", False, "1", description="mean ROUGE-L F1 of greedy generations against the reference "
               "(lower = forgotten on a forget set)", paper=MUSE_PAPER),
    *(MetricSpec(f"mia_{a}_mean", True, "1", description=f"mean {a} MIA score of member texts (higher = looks less "
                 "like a member: forgotten on mia_forget; should stay on mia_retain)", paper=RWKU_PAPER)
      for a in ("loss", "zlib", "min_k", "min_k_plus_plus")),
)}
# RWKU scores its MIA with k = 0.2 (its 'mink20' keys); the suite uses the same k for Min-K% and Min-K%++
RWKU_MIA_K = 0.2
_WORD = re.compile(r"\w+|[^\w\s]")


def _result(name: str, values, higher_is_better: bool, note: str = "") -> MetricResult:
    vals = [float(v) for v in values]
    return MetricResult(name=name, value=float(np.mean(vals)), per_item=vals, higher_is_better=higher_is_better,
                        version=SPECS[name].version if name in SPECS else "1", note=note)


# ------------------------------------------------------------------------------ formulas
def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """RWKU's fluency of one text: the arithmetic mean over n in ``ns`` of ``weight_n x H_n``,
    ``H_n`` the entropy (bits) of the n-gram frequency distribution of the text's word tokens
    (``\\w+`` or one punctuation mark; RWKU tokenises with nltk's ``word_tokenize``). A text
    shorter than n words contributes 0 for that n."""
    words = _WORD.findall(text.lower())
    out = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
        if not grams:
            out.append(0.0)
            continue
        f = np.array(list(grams.values()), dtype=np.float64)
        f /= f.sum()
        out.append(w * float(-(f * np.log2(f)).sum()))
    return float(np.mean(out))


def rouge_l_f1(predictions: list[str], references: list[str]) -> list[float]:
    """Per item ``RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction).fmeasure``."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"rouge_l_f1: {len(predictions)} predictions but {len(references)} references")
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(sc.score(r, p)["rougeL"].fmeasure) for p, r in zip(predictions, references)]


# ------------------------------------------------------------------------------ passes
@dataclass(frozen=True)
class Continue(PassRequest):
    """Greedy continuations of ``item["prefix"]`` written after the item's prompt (as if the
    model had begun its answer with the prefix): ``list[str]``. MUSE's verbatim-memorisation
    probe; with an empty question the prompt is the prompt template alone."""

    max_new_tokens: int = 64

    def group(self):
        return ("continue",)

    def merge(self, other):
        return Continue(max(self.max_new_tokens, other.max_new_tokens))

    def run(self, adapter, items, batch_size):
        tok = adapter.tokenizer
        prompts = [adapter.generation_prompt_ids(it["question"])
                   + tok(" " + it["prefix"].strip(), add_special_tokens=False)["input_ids"] for it in items]
        return adapter.generate_from_ids(prompts, max_new_tokens=self.max_new_tokens, batch_size=batch_size)


# ------------------------------------------------------------------------------ metrics
class MCAccuracy(Metric):
    """Multiple-choice accuracy (``answer`` vs ``perturbed_answer`` options) by mean token NLL."""

    spec = SPECS["mc_accuracy"]
    kinds = ("mc",)

    def requests(self, split):
        return [TeacherForced("answer")] + _pert_requests(split)

    def compute(self, store, split):
        a = store.get(TeacherForced("answer"))
        correct = np.asarray(a["nll"]) / np.asarray(a["n"])  # (N,)
        pn, pc = _pert_scores(store, split)
        wrong = np.asarray(pn) / np.asarray(pc)  # (N, k)
        return _result("mc_accuracy", (correct[:, None] < wrong).all(1).astype(float), True)


class Fluency(Metric):
    """RWKU's fluency: mean n-gram entropy of greedy free generations."""

    spec = SPECS["fluency"]
    kinds = ("fluency",)

    def __init__(self, max_new_tokens: int = 48) -> None:
        self.max_new_tokens = max_new_tokens

    def requests(self, split):
        return [Generate(self.max_new_tokens)]

    def compute(self, store, split):
        gens = store.get(Generate(self.max_new_tokens))
        return _result("fluency", [ngram_entropy(g) for g in gens], True)

    def extras(self, store, split):
        return {"generations": list(store.get(Generate(self.max_new_tokens)))}


class MIAMean(Metric):
    """Mean MIA score of one attack over a split of member texts (RWKU reports these means)."""

    kinds = ("mia",)

    def __init__(self, attack: str, k: float = RWKU_MIA_K) -> None:
        self.attack, self.k = attack, k
        self.spec = SPECS[f"mia_{attack}_mean"]

    def requests(self, split):
        return [_MIA_TF]

    def compute(self, store, split):
        r = store.get(_MIA_TF)
        lp = r["token_logprobs"]
        if self.attack == "loss":
            s = P.loss_score(lp)
        elif self.attack == "zlib":
            s = P.zlib_score(lp, r["target_texts"])
        elif self.attack == "min_k":
            s = P.min_k_score(lp, self.k)
        else:
            s = P.min_k_plus_plus_score(lp, r["mu"], r["sigma"], self.k)
        return _result(self.spec.name, s, split.name.endswith("forget"), note=f"k={self.k}" if "min_k" in self.attack else "")


class RougeF1(Metric):
    """ROUGE-L F1 of greedy answers (``knowmem``) or of continuations of ``prefix`` (``verbmem``)."""

    spec = SPECS["rouge_l_f1"]

    def __init__(self, kind: str, max_new_tokens: int) -> None:
        self.kinds = (kind,)
        self.max_new_tokens = max_new_tokens

    @property
    def name(self):
        return self.kinds[0]

    def _req(self):
        return Continue(self.max_new_tokens) if self.kinds[0] == "verbmem" else Generate(self.max_new_tokens)

    def requests(self, split):
        return [self._req()]

    def compute(self, store, split):
        gens = store.get(self._req())
        vals = rouge_l_f1(list(gens), [it["answer"] for it in split.items])
        return MetricResult(name=self.name, value=float(np.mean(vals)), per_item=vals,
                            higher_is_better=not split.name.endswith("forget"), version=self.spec.version,
                            note="ROUGE-L F1 (computed as rouge_l_f1)")

    def extras(self, store, split):
        return {"generations": list(store.get(self._req()))}


# ------------------------------------------------------------------------------ suites
RWKU_KINDS = {"forget_level1": "forget", "forget_level2": "forget", "forget_level3": "forget",
              "neighbor_level1": "retain", "neighbor_level2": "retain", "mia_forget": "mia", "mia_retain": "mia",
              "utility_general": "mc", "utility_fluency": "fluency"}
MUSE_KINDS = {"verbmem_forget": "verbmem", "knowmem_forget": "knowmem", "knowmem_retain": "knowmem",
              "privleak_forget": "privleak", "privleak_holdout": "privleak"}


class ProbeRouge(RougeL):
    """ROUGE-L recall on the forget and neighbour probes only (not on the utility splits)."""

    kinds = ("forget", "retain")


def rwku_suite(max_new_tokens: int = 30, fluency_tokens: int = 48) -> Suite:
    return Suite("rwku", "1", [ProbeRouge(max_new_tokens), MCAccuracy(),
                               Fluency(fluency_tokens), *(MIAMean(a) for a in ("loss", "zlib", "min_k", "min_k_plus_plus"))],
                 description="RWKU-style: forget probes at three levels, neighbours, MIA, utility",
                 split_kinds=dict(RWKU_KINDS))


def muse_suite(max_new_tokens: int = 32, verbmem_tokens: int = 48) -> Suite:
    return Suite("muse", "1", [RougeF1("verbmem", verbmem_tokens), RougeF1("knowmem", max_new_tokens)],
                 multi=[MIA("min_k", forget="privleak_forget", holdout="privleak_holdout")],
                 aggregates=[PrivLeak()], description="MUSE-style: VerbMem, KnowMem, PrivLeak, utility",
                 split_kinds=dict(MUSE_KINDS))


def metric_value(res: dict[str, Any], split: str, metric: str) -> float | None:
    return res["splits"].get(split, {}).get("metrics", {}).get(metric, {}).get("value")


__all__ = ["rwku_suite", "muse_suite", "ngram_entropy", "rouge_l_f1", "Continue", "RWKU_KINDS", "MUSE_KINDS",
           "metric_value", "SPECS"]
