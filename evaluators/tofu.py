"""TOFU metrics as pure functions of per-item numbers (no model code).

The model adapter computes, per item, the summed answer-token cross-entropy ``NLL`` and the
number of answer tokens ``n`` (or, for the memorisation metrics, teacher-forced logits); these
functions turn them into :class:`~unlearn.evaluators.base.MetricResult` objects. Formulas
follow ``METHODS.md`` ("TOFU metrics") and the reference code users compare numbers against:

* TOFU (Maini et al., 2024), ``locuslab/tofu`` ``aggregate_eval_stat.py``;
* open-unlearning, ``locuslab/open-unlearning`` ``src/evals/metrics/memorization.py``
  (probability, probability_w_options, rouge, truth_ratio, exact_memorization,
  extraction_strength), ``privacy.py`` (ks_test = forget quality), ``utility.py``
  (hm_aggregate = model utility), ``utils.py`` (evaluate_probability,
  tokenwise_vocab_logprobs, eval_text_similarity).

Where our code deviates from the reference it says so in the docstring (and ``docs/metrics.md``).

Direction convention (``higher_is_better``): the knowledge metrics (``prob``,
``rouge_l_recall``, ``exact_memorization``, ``extraction_strength``) are declared with their
forget-set direction, ``False`` (lower = less of the forget set left); their functions take
``forget_set=False`` when scoring a retain / real-authors / world-facts set, and the result then
says ``higher_is_better=True``. Note that TOFU's *ideal* on the forget set is the retain model's
value, not zero: "lower" is the direction of forgetting, and ``forget_quality`` is the metric
that measures closeness to the retain model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from .base import MetricResult, MetricSpec

IGNORE_INDEX = -100
EPS = 1e-10  # the reference code's epsilon in truth ratio, forget aggregate, MC probability

TOFU_PAPER = (
    "Maini, Feng, Schwarzschild, Lipton, Kolter. TOFU: A Task of Fictitious Unlearning for "
    "LLMs. COLM 2024. arXiv:2401.06121"
)
EM_PAPER = (
    "Tirumala et al. Memorization Without Overfitting, NeurIPS 2022; used for unlearning in "
    "Wang et al., ICLR 2025 (openreview wUtCieKuQU), as implemented in open-unlearning"
)
ES_PAPER = (
    "Carlini et al. Extracting Training Data from Large Language Models, USENIX Security 2021; "
    "used for unlearning in Wang et al., ICLR 2025 (openreview wUtCieKuQU), as implemented in "
    "open-unlearning"
)

Convention = Literal["reference", "exact"]

UTILITY_KEYS: tuple[str, ...] = tuple(
    f"{split}/{metric}"
    for split in ("retain", "real_authors", "world_facts")
    for metric in ("prob", "rouge", "truth_ratio")
)

SPECS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec(
            "prob",
            False,
            "1",
            description=(
                "mean over items of P(a|q) = exp(-NLL(q,a)/|a|). Declared with its forget-set "
                "direction (lower = forgotten); on retain sets higher is better."
            ),
            paper=TOFU_PAPER,
        ),
        MetricSpec(
            "prob_mc",
            True,
            "1",
            description=(
                "multiple-choice probability on real-authors / world-facts sets: mean over items "
                "of P(a) / (P(a) + sum_j P(a~_j) + 1e-10); higher is better (utility sets)."
            ),
            paper=TOFU_PAPER,
        ),
        MetricSpec(
            "rouge_l_recall",
            False,
            "1",
            description=(
                "mean ROUGE-L recall (rouge_score, stemmer on) of the greedy answer against the "
                "reference answer. Forget-set direction declared (lower = forgotten); on retain "
                "sets higher is better."
            ),
            paper=TOFU_PAPER,
        ),
        MetricSpec(
            "truth_ratio",
            None,
            "1",
            description=(
                "forget-set truth ratio: mean over items of min(R, 1/(R+1e-10)), "
                "R = P_pert / P_para. No fixed direction: 1 means paraphrased and perturbed "
                "answers are equally likely, which is what a model that never saw the item "
                "tends towards, but the target is the retain model's value (compare with "
                "forget_quality), not the maximum."
            ),
            paper=TOFU_PAPER,
        ),
        MetricSpec(
            "truth_ratio_true",
            True,
            "1",
            description=(
                "retain / real-authors / world-facts truth ratio: mean over items of "
                "max(0, 1 - R); higher = the true answer is preferred over perturbed ones."
            ),
            paper=TOFU_PAPER,
        ),
        MetricSpec(
            "forget_quality",
            True,
            "1",
            description=(
                "p-value of the two-sample KS test between the unlearned and the retain model's "
                "per-item forget-set truth ratios R; higher = indistinguishable from the retain "
                "model. Not computable without a retain model."
            ),
            paper=TOFU_PAPER,
        ),
        MetricSpec(
            "model_utility",
            True,
            "1",
            description=(
                "harmonic mean of {prob, rouge, truth_ratio} x {retain, real_authors, "
                "world_facts} (prob_mc and truth_ratio_true on the two multiple-choice sets)."
            ),
            paper=TOFU_PAPER,
        ),
        MetricSpec(
            "exact_memorization",
            False,
            "1",
            description=(
                "teacher-forced fraction of answer tokens whose argmax prediction equals the "
                "label. Forget-set direction declared (lower = forgotten); on retain sets higher "
                "is better."
            ),
            paper=EM_PAPER,
        ),
        MetricSpec(
            "extraction_strength",
            False,
            "1",
            description=(
                "1 - k*/|a|, k* the smallest k such that the teacher-forced argmax predictions "
                "match the labels at every answer position from k on. Forget-set direction "
                "declared (lower = forgotten); on retain sets higher is better."
            ),
            paper=ES_PAPER,
        ),
    )
}


# -- helpers ---------------------------------------------------------------------------------


def _result(
    name: str,
    value: float | None,
    per_item: list | None,
    note: str = "",
    higher_is_better: bool | None | str = "spec",
) -> MetricResult:
    spec = SPECS[name]
    hib = spec.higher_is_better if higher_is_better == "spec" else higher_is_better
    return MetricResult(name, value, per_item, hib, spec.version, note)


def _direction(forget_set: bool) -> bool:
    """Direction of a knowledge metric: lower is better on a forget set, higher elsewhere."""
    return not forget_set


def _vector(x, what: str) -> np.ndarray:
    """A 1-D float64 array from a list / numpy array / torch tensor; non-empty."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one number per item), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: no items to score")
    return arr


def _avg_nll(nll, n, what: str, item: str = "item {}") -> np.ndarray:
    """Per-item NLL/n with checks: equal lengths, n > 0, NLL not NaN. ``item`` formats the
    position of an offending entry in error messages."""
    nll = _vector(nll, f"{what} NLL")
    n = _vector(n, f"{what} token counts")
    if nll.shape != n.shape:
        raise ValueError(f"{what}: {nll.size} NLL values but {n.size} token counts")
    bad = np.flatnonzero(~(n > 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{what}: {item.format(i)} has n_tokens={n[i]:g}; every answer needs at least one "
            "token (check the prompt/answer masking)"
        )
    bad = np.flatnonzero(np.isnan(nll))
    if bad.size:
        raise ValueError(f"{what}: {item.format(int(bad[0]))} has NLL = NaN")
    return nll / n


def _per_item_avg_nll_lists(nll_lists, n_lists, what: str) -> list[np.ndarray]:
    """For ragged per-item lists (perturbed / wrong answers): per item the array of NLL_j/n_j."""
    if len(nll_lists) != len(n_lists):
        raise ValueError(f"{what}: {len(nll_lists)} items of NLLs but {len(n_lists)} of token counts")
    if len(nll_lists) == 0:
        raise ValueError(f"{what} is empty: no items to score")
    out = []
    for i, (nll_i, n_i) in enumerate(zip(nll_lists, n_lists)):
        if len(nll_i) == 0:
            raise ValueError(f"{what}: item {i} has no answers (need at least one per item)")
        out.append(_avg_nll(nll_i, n_i, f"{what}, item {i}", item="answer {}"))
    return out


# -- probability -----------------------------------------------------------------------------


def length_normalized_prob(nll_sum, n_tokens) -> np.ndarray:
    """Per-item ``P(a|q) = exp(-NLL/|a|)``, the length-normalised (geometric-mean token)
    probability, as ``evaluate_probability`` in open-unlearning ``src/evals/metrics/utils.py``.

    Args:
        nll_sum: (N,) summed answer-token cross-entropy per item.
        n_tokens: (N,) number of answer tokens per item.

    Returns:
        (N,) float64 array.

    Raises:
        ValueError: if some ``n_tokens <= 0`` (naming the first such item), an NLL is NaN,
            the lengths differ, or there are no items.
    """
    return np.exp(-_avg_nll(nll_sum, n_tokens, "length_normalized_prob"))


def prob(nll_sum, n_tokens, *, forget_set: bool = True) -> MetricResult:
    """Mean length-normalised answer probability (TOFU "Prob." on forget / retain sets).

    per_item: P(a|q) per item. ``forget_set=False`` when scoring a retain-type set (the result
    then says higher is better). Matches open-unlearning ``probability``.
    """
    p = length_normalized_prob(nll_sum, n_tokens)
    return _result("prob", float(p.mean()), p.tolist(), higher_is_better=_direction(forget_set))


def prob_multiple_choice(correct_nll, correct_n, wrong_nll, wrong_n) -> MetricResult:
    """Multiple-choice probability (TOFU "Prob." on real-authors / world-facts).

    Per item ``P(a) / (P(a) + sum_j P(a~_j) + 1e-10)`` with ``P = exp(-NLL/n)``; the 1e-10 is
    open-unlearning's (``probability_w_options``; original TOFU has none: it only matters when
    every probability underflows to 0, where it gives 0 instead of NaN).

    Args:
        correct_nll, correct_n: (N,) NLL sum and token count of the correct answer.
        wrong_nll, wrong_n: N lists (ragged allowed) of the wrong options' NLL sums / counts.

    per_item: the normalised probability per item.
    """
    p_correct = length_normalized_prob(correct_nll, correct_n)
    wrong_avg = _per_item_avg_nll_lists(wrong_nll, wrong_n, "prob_multiple_choice wrong options")
    if len(wrong_avg) != p_correct.size:
        raise ValueError(
            f"prob_multiple_choice: {p_correct.size} correct answers but {len(wrong_avg)} items "
            "of wrong options"
        )
    p_wrong = np.array([np.exp(-a).sum() for a in wrong_avg])
    per_item = p_correct / (p_correct + p_wrong + EPS)
    return _result("prob_mc", float(per_item.mean()), per_item.tolist())


# -- truth ratio -----------------------------------------------------------------------------


def truth_ratio(
    para_nll, para_n, pert_nll, pert_n, mode: Literal["forget", "true"] = "forget"
) -> MetricResult:
    """TOFU truth ratio, exactly as open-unlearning ``truth_ratio``.

    Per item::

        R = exp(-mean_j(pert_nll_j / pert_n_j)) / (exp(-para_nll / para_n) + 1e-10)

    i.e. the geometric mean (over perturbed answers) of the length-normalised perturbed-answer
    probability over the paraphrased answer's. On real-authors / world-facts sets pass the
    correct answer as the "paraphrase" (the reference does the same).

    Aggregates:
        ``mode="forget"`` -> name ``truth_ratio``: ``mean(min(R, 1/(R + 1e-10)))``
        (no fixed direction; see ``SPECS["truth_ratio"]``);
        ``mode="true"`` -> name ``truth_ratio_true``: ``mean(max(0, 1 - R))`` (higher is better).

    per_item: the **raw R values** in both modes (not the transformed ones), because forget
    quality runs its KS test on them.

    Note: the original TOFU ``aggregate_eval_stat.py`` stores ``1/R`` (``exp(pert_loss -
    para_loss)``) without the epsilon and aggregates it with the same, algebraically equal,
    transforms (forget ``min(x, 1/x)``, else ``max(0, 1 - 1/x)``).
    """
    if mode not in ("forget", "true"):
        raise ValueError(f"truth_ratio mode must be 'forget' or 'true', got {mode!r}")
    para_avg = _avg_nll(para_nll, para_n, "truth_ratio paraphrased")
    pert_avg = _per_item_avg_nll_lists(pert_nll, pert_n, "truth_ratio perturbed")
    if len(pert_avg) != para_avg.size:
        raise ValueError(
            f"truth_ratio: {para_avg.size} paraphrased answers but {len(pert_avg)} items of "
            "perturbed answers"
        )
    pert_mean = np.array([a.mean() for a in pert_avg])  # mean over perturbed answers of avg NLL
    r = np.exp(-pert_mean) / (np.exp(-para_avg) + EPS)  # (N,)
    if mode == "forget":
        value = float(np.mean(np.minimum(r, 1.0 / (r + EPS))))
        name = "truth_ratio"
    else:
        value = float(np.mean(np.maximum(0.0, 1.0 - r)))
        name = "truth_ratio_true"
    return _result(name, value, r.tolist(), note="per_item = raw R = P_pert / P_para")


# -- ROUGE -----------------------------------------------------------------------------------


def rouge_l_recall(
    predictions: Sequence[str], references: Sequence[str], *, forget_set: bool = True
) -> MetricResult:
    """Mean ROUGE-L recall of generations against reference answers.

    ``RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction).recall`` per item,
    as ``eval_text_similarity`` in open-unlearning (target = ground truth, prediction =
    generation). Generation itself (greedy, 200 new tokens, decoded without special tokens,
    stripped) is the adapter's job. per_item: recall per item.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("rouge_l_recall takes lists of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(
            f"rouge_l_recall: {len(predictions)} predictions but {len(references)} references"
        )
    if len(predictions) == 0:
        raise ValueError("rouge_l_recall: no items to score")
    from rouge_score import rouge_scorer  # lazy: pulls in nltk (seconds of import time)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    per_item = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str) or not isinstance(ref, str):
            raise ValueError(f"rouge_l_recall: item {i} is not a pair of strings")
        per_item.append(float(scorer.score(ref, pred)["rougeL"].recall))
    return _result(
        "rouge_l_recall", float(np.mean(per_item)), per_item, higher_is_better=_direction(forget_set)
    )


# -- forget quality --------------------------------------------------------------------------


def _truth_ratio_values(x, what: str) -> np.ndarray:
    if isinstance(x, MetricResult):
        if x.name not in ("truth_ratio", "truth_ratio_true") or x.per_item is None:
            raise ValueError(f"{what}: expected a truth_ratio result with per-item R, got {x.name!r}")
        x = x.per_item
    arr = _vector(x, what)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: item {int(np.flatnonzero(~np.isfinite(arr))[0])} is not finite")
    return arr


def forget_quality(unlearned_truth_ratios, retain_truth_ratios=None) -> MetricResult:
    """TOFU forget quality: p-value of ``scipy.stats.ks_2samp(R_unlearned, R_retain)``.

    Inputs are the per-item **raw** truth ratios R = P_pert / P_para on the *forget set*
    (``truth_ratio(..., mode="forget").per_item``, or that result itself), of the unlearned
    model and of the retain model (never trained on the forget set). This is open-unlearning's
    ``ks_test`` (``src/evals/metrics/privacy.py``), which feeds the ``score`` values of
    ``forget_Truth_Ratio`` (raw R) to ``ks_2samp`` with scipy's default (``method="auto"``:
    exact for small samples). The original TOFU code feeds ``1/R``; the KS statistic and its
    p-value are invariant under a strictly monotone map applied to both samples, so the numbers
    agree. (open-unlearning's unused ``utils.get_forget_quality`` feeds ``1/(R+1e-10)``: same.)

    With ``retain_truth_ratios=None`` the value is ``None`` and the note says "not computable"
    (the reference logs a warning and returns None; never a number). The two samples must have
    the same size: they score the same forget items, and a mismatch means the retain model was
    evaluated on another split.

    note: the KS statistic D and the sample sizes.
    """
    u = _truth_ratio_values(unlearned_truth_ratios, "forget_quality unlearned truth ratios")
    if retain_truth_ratios is None:
        return _result(
            "forget_quality",
            None,
            None,
            note=(
                "not computable: no retain model given (forget quality compares against a model "
                "never trained on the forget set)"
            ),
        )
    r = _truth_ratio_values(retain_truth_ratios, "forget_quality retain truth ratios")
    if u.size != r.size:
        raise ValueError(
            f"forget_quality: {u.size} unlearned-model truth ratios but {r.size} retain-model ones; "
            "both must score the same forget items (was the retain model evaluated on another split?)"
        )
    from scipy.stats import ks_2samp  # lazy: scipy.stats is slow to import

    res = ks_2samp(u, r)
    return _result(
        "forget_quality",
        float(res.pvalue),
        None,
        note=f"KS statistic D={float(res.statistic):.6g}, n={u.size} items per model",
    )


# -- model utility ---------------------------------------------------------------------------


def harmonic_mean(xs) -> float:
    """Harmonic mean ``n / sum(1/x)`` of non-negative numbers; 0 if any is 0.

    Same as ``scipy.stats.hmean`` (used by both reference codes) on non-negative input, which
    returns 0 when an element is 0. Where scipy returns NaN (negative or NaN input) this raises
    ValueError instead: TOFU's components lie in [0, 1], so such a value is a bug upstream.
    """
    arr = _vector(xs, "harmonic_mean input")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"harmonic_mean: element {i} = {arr[i]!r}; need finite values >= 0")
    if np.any(arr == 0):
        return 0.0
    return float(arr.size / np.sum(1.0 / arr))


def model_utility(values: Mapping[str, float]) -> MetricResult:
    """TOFU model utility: harmonic mean of exactly these 9 values (:data:`UTILITY_KEYS`)::

        retain/prob        retain/rouge        retain/truth_ratio
        real_authors/prob  real_authors/rouge  real_authors/truth_ratio
        world_facts/prob   world_facts/rouge   world_facts/truth_ratio

    with ``prob`` = :func:`prob` on retain and :func:`prob_multiple_choice` on the other two,
    ``rouge`` = :func:`rouge_l_recall`, ``truth_ratio`` = :func:`truth_ratio` in ``"true"``
    mode (``max(0, 1 - R)``), as open-unlearning's ``model_utility`` config /
    ``hm_aggregate`` (``scipy.stats.hmean``) and TOFU's ``get_model_utility``.

    A value of 0 makes the utility 0 (scipy's convention; the note names the zero components).
    Missing or extra keys, ``None``, NaN or negative values raise ValueError.
    """
    missing = [k for k in UTILITY_KEYS if k not in values]
    if missing:
        raise ValueError(
            f"model_utility: missing value {missing[0]!r} (needs exactly {', '.join(UTILITY_KEYS)})"
        )
    extra = sorted(set(values) - set(UTILITY_KEYS))
    if extra:
        raise ValueError(
            f"model_utility: unexpected key {extra[0]!r} (needs exactly {', '.join(UTILITY_KEYS)})"
        )
    xs = []
    for k in UTILITY_KEYS:
        v = values[k]
        if isinstance(v, MetricResult):
            v = v.value
        if v is None:
            raise ValueError(f"model_utility: {k!r} is not computable (None)")
        v = float(v)
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"model_utility: {k!r} = {v!r}; need a finite value >= 0")
        xs.append(v)
    zeros = [k for k, v in zip(UTILITY_KEYS, xs) if v == 0]
    note = f"0 because {', '.join(zeros)} = 0" if zeros else ""
    return _result("model_utility", harmonic_mean(xs), None, note=note)


# -- memorisation (teacher-forced argmax) -----------------------------------------------------


def _answer_matches(
    logits: torch.Tensor, labels: torch.Tensor, convention: str, what: str
) -> list[np.ndarray]:
    """Per item: boolean array, over the scored answer positions in order, of argmax == label.

    Causal shift: ``logits[:, t]`` predicts token ``t + 1``, so predictions ``logits[:, :-1]``
    are compared with ``labels[:, 1:]``.
    """
    if convention not in ("reference", "exact"):
        raise ValueError(f"{what}: convention must be 'reference' or 'exact', got {convention!r}")
    if logits.ndim != 3 or labels.ndim != 2 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"{what}: need logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if labels.shape[0] == 0:
        raise ValueError(f"{what}: no items to score")
    if bool((labels[:, 0] != IGNORE_INDEX).any()):
        warnings.warn(
            f"{what}: labels at position 0 are not masked; no logit predicts position 0, so it is "
            "not scored",
            UserWarning,
            stacklevel=3,
        )
    with torch.no_grad():
        preds = logits[:, :-1].argmax(dim=-1)  # (B, T-1): preds[:, t] guesses token t+1
        targets = labels[:, 1:]  # (B, T-1)
        matches = (preds == targets).cpu()  # (B, T-1)
        scored = (targets != IGNORE_INDEX).cpu()  # (B, T-1)
    out = []
    for i in range(labels.shape[0]):
        idx = scored[i].nonzero(as_tuple=True)[0]  # answer positions (shifted), in order
        if convention == "reference":
            idx = idx[:-1]  # open-unlearning drops the last labelled token ("ignore eos prediction")
        if idx.numel() == 0:
            why = " (the reference convention drops the last labelled token)"
            raise ValueError(
                f"{what}: item {i} has no answer tokens to score"
                + (why if convention == "reference" else "")
            )
        out.append(matches[i, idx].numpy())
    return out


_CONVENTION_NOTE = {
    "reference": (
        "convention=reference (open-unlearning): the last labelled answer token (EOS) is not scored"
    ),
    "exact": "convention=exact: every labelled answer token is scored",
}


def exact_memorization(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    convention: Convention = "reference",
    forget_set: bool = True,
) -> MetricResult:
    """Exact memorisation: per item the fraction of answer positions where the teacher-forced
    argmax prediction equals the label; aggregate = mean over items.

    Args:
        logits: (B, T, V) teacher-forced logits of prompt + answer (right padding).
        labels: (B, T) token ids, ``-100`` on prompt and padding (unshifted, as given to a
            HF causal LM: position t's label is the token at t).
        convention: ``"reference"`` reproduces open-unlearning ``exact_memorization`` /
            ``tokenwise_vocab_logprobs``, which drop the **last** labelled token of each item
            (meant to skip EOS); ``"exact"`` scores every labelled token.
        forget_set: False when scoring a retain-type set (higher is better there).

    Deviation: an item with no scoreable token raises ValueError (the reference sets None).
    per_item: the fraction per item.
    """
    per_item = [float(m.mean()) for m in _answer_matches(logits, labels, convention, "exact_memorization")]
    return _result(
        "exact_memorization",
        float(np.mean(per_item)),
        per_item,
        note=_CONVENTION_NOTE[convention],
        higher_is_better=_direction(forget_set),
    )


def extraction_strength(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    convention: Convention = "reference",
    forget_set: bool = True,
) -> MetricResult:
    """Extraction strength: per item ``1 - k*/|a|`` with k* the smallest k in 0..|a| such that
    the teacher-forced argmax predictions match the labels at every answer position from k on
    (k* = |a| when even the last position is wrong, giving 0); aggregate = mean over items.

    Args: as :func:`exact_memorization`.

    ``convention="reference"`` reproduces open-unlearning ``extraction_strength`` exactly:
    the last labelled token is dropped (|a| = labelled tokens - 1), and its search loop
    ``for k in range(|a|): ... break`` leaves k = |a| - 1 when no suffix matches, so an item
    whose last scored prediction is wrong gets ``1/|a|`` instead of 0 (with |a| = 1: ES = 1).
    That quirk is kept for comparability with published numbers; ``convention="exact"`` scores
    every labelled token and uses k* in 0..|a|.

    Deviation: an item with no scoreable token raises ValueError (the reference gives 0).
    per_item: ES per item.
    """
    per_item = []
    for m in _answer_matches(logits, labels, convention, "extraction_strength"):
        n = m.size
        wrong = np.flatnonzero(~m)
        k_star = int(wrong[-1]) + 1 if wrong.size else 0  # smallest k with m[k:] all True
        if convention == "reference":
            k_star = min(k_star, n - 1)  # the reference loop never reaches k = |a|
        per_item.append(1.0 - k_star / n)
    note = _CONVENTION_NOTE[convention]
    if convention == "reference":
        note += "; no-suffix-match items score 1/|a| (reference loop quirk), not 0"
    return _result(
        "extraction_strength",
        float(np.mean(per_item)),
        per_item,
        note=note,
        higher_is_better=_direction(forget_set),
    )


__all__ = [
    "SPECS",
    "UTILITY_KEYS",
    "exact_memorization",
    "extraction_strength",
    "forget_quality",
    "harmonic_mean",
    "length_normalized_prob",
    "model_utility",
    "prob",
    "prob_multiple_choice",
    "rouge_l_recall",
    "truth_ratio",
]
