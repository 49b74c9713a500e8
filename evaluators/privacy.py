"""Membership-inference (MIA) scores, their AUC, and MUSE's privleak, as pure functions.

The harness computes, once per split, per-item arrays (answer-token log-probabilities, the
vocabulary statistics Min-K%++ needs, the decoded labelled tokens, gradient norms); the
functions here turn
them into per-item attack scores and :class:`~unlearn.evaluators.base.MetricResult` objects.
Formulas follow ``METHODS.md`` ("Membership inference (MIA) and privacy") and the reference
code users compare numbers against, open-unlearning (``locuslab/open-unlearning``, read at
commit d3d7cf9):

* ``src/evals/metrics/mia/loss.py``, ``zlib.py``, ``min_k.py``, ``min_k_plus_plus.py``,
  ``reference.py``, ``gradnorm.py`` (one attack each);
* ``src/evals/metrics/mia/utils.py`` (``mia_auc``: labels and ``roc_auc_score``);
* ``src/evals/metrics/privacy.py`` (``privleak``);
* ``src/evals/metrics/utils.py`` (``evaluate_probability``, ``tokenwise_logprobs``,
  ``tokenwise_vocab_logprobs``, ``extract_target_texts_from_processed_data``: which tokens and
  which text each attack sees);
* ``configs/eval/{tofu,muse}_metrics/mia_*.yaml``, ``privleak.yaml`` (k = 0.4, p = 2,
  privleak on the Min-K AUC with a fallback retain AUC of 0.5).

Score sign (all attacks): **higher = looks less like a training member** (like a loss), as in
the reference ("all MIA attack statistics are signed ... to show the same trends as loss").

AUC convention: ``roc_auc_score(labels, scores)`` with the forget set labelled 0 and the holdout
set labelled 1, so AUC = P(score(holdout) > score(forget)) (+ half the ties): AUC near 1 means
the forget items still look like training members, 0.5 means forget and holdout are
indistinguishable, near 0 means the forget items look *less* member-like than never-seen text.

Which tokens (``convention``): the reference computes LOSS, ZLib and Reference from
``evaluate_probability`` (every labelled answer token, EOS included when labelled), but Min-K%,
Min-K%++ and GradNorm from ``tokenwise_logprobs`` / ``tokenwise_vocab_logprobs``, which drop
the **last** labelled token of each item ("ignore eos prediction"). The functions here all take
the same per-item arrays over *every* labelled answer token; ``min_k_score`` and
``min_k_plus_plus_score`` drop the last token themselves under ``convention="reference"``
(the default, as in :mod:`unlearn.evaluators.tofu`) and keep it under ``"exact"``. The
harness's gradient pass (``text_passes.GradNorms``) takes the same ``convention``, with the
same default: its per-item loss is the mean NLL over every labelled token but the last. The
default is ``"reference"`` under both tokenisations (``split`` and ``reference``, see
:mod:`unlearn.adapters.text`): the convention is about which labelled tokens are scored, the
tokenisation about which tokens are labelled.

Which text (ZLib): the reference compresses ``extract_target_texts_from_processed_data``,
the labelled tokens decoded with ``skip_special_tokens=True``. The harness passes exactly
that under both tokenisations (``text_passes.labelled_texts``): under ``reference`` the first
answer token is often masked and so absent from the text; under ``split`` the text is the
answer tokenised as ``" " + answer.strip()`` and decoded (EOS dropped).

Deviations from the reference are stated per function and in ``docs/privacy.md``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from .base import MetricResult, MetricSpec
from .tofu import Convention

PRIVLEAK_EPS = 1e-10  # the reference's epsilon in privleak's denominator
MIN_K_PP_VAR_FLOOR = 1e-6  # the reference clamps sigma^2 (not sigma) at 1e-6 before sqrt
DEFAULT_K = 0.4  # open-unlearning configs mia_min_k*.yaml (the attack class default is 0.2)
_LOGPROB_TOL = 1e-4  # a log-probability above this is not one (NLLs passed by mistake?)

LOSS_PAPER = (
    "Yeom, Giacomelli, Fredrikson, Jha. Privacy Risk in Machine Learning: Analyzing the "
    "Connection to Overfitting. IEEE CSF 2018"
)
CARLINI_PAPER = (
    "Carlini et al. Extracting Training Data from Large Language Models. USENIX Security 2021. "
    "arXiv:2012.07805"
)
MIN_K_PAPER = (
    "Shi, Ajith, Xia, Huang, Liu, Blevins, Chen, Zettlemoyer. Detecting Pretraining Data from "
    "Large Language Models. ICLR 2024. arXiv:2310.16789"
)
MIN_K_PP_PAPER = (
    "Zhang, Sun, Chen, Guo, Wang, Sun, Xu. Min-K%++: Improved Baseline for Detecting "
    "Pre-Training Data from Large Language Models. 2024. arXiv:2404.02936"
)
GRADNORM_PAPER = (
    "Wang, Wang, Li, Neel. Pandora's White-Box: Precise Training Data Detection and Extraction "
    "in Large Language Models. 2024. arXiv:2402.17012 (cited by open-unlearning's gradnorm.py)"
)
MUSE_PAPER = (
    "Shi, Liang, Xia, et al. MUSE: Machine Unlearning Six-Way Evaluation for Language Models. "
    "2024. arXiv:2407.06460"
)

_AUC_DIRECTION = (
    " AUC = roc_auc_score with forget labelled 0 and holdout 1 (scores: higher = less "
    "member-like). No fixed direction: ~1 = the forget set still looks like training data "
    "(under-unlearning), ~0 = it looks less member-like than unseen text (over-unlearning, "
    "itself detectable); the target is the retain model's AUC (compare with privleak)."
)


def _mia_spec(name: str, formula: str, paper: str, version: str = "1") -> MetricSpec:
    return MetricSpec(name, None, version, description=formula + _AUC_DIRECTION, paper=paper)


SPECS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        _mia_spec(
            "mia_loss",
            "MIA AUC of the LOSS attack: per item mean answer-token NLL = NLL/|a|.",
            LOSS_PAPER,
        ),
        _mia_spec(
            "mia_zlib",
            "MIA AUC of the ZLib attack: per item (NLL/|a|) / len(zlib.compress(text, UTF-8)), "
            "text = the labelled answer tokens decoded without special tokens (the reference's "
            "text).",
            CARLINI_PAPER,
            version="2",  # 2: the text is the decoded labelled tokens (1: the raw answer string)
        ),
        _mia_spec(
            "mia_min_k",
            "MIA AUC of Min-K% (k = 0.4): per item -mean of the max(1, int(k*n)) lowest "
            "answer-token log-probs (reference convention: last labelled token dropped).",
            MIN_K_PAPER,
        ),
        _mia_spec(
            "mia_min_k_plus_plus",
            "MIA AUC of Min-K%++ (k = 0.4): Min-K% over z_t = (log p(x_t) - mu_t) / sigma_t, "
            "mu_t = sum_v p_v log p_v, sigma_t^2 = sum_v p_v (log p_v)^2 - mu_t^2 (clamped at "
            "1e-6).",
            MIN_K_PP_PAPER,
        ),
        _mia_spec(
            "mia_reference",
            "MIA AUC of the reference-model attack: per item LOSS_target - LOSS_ref.",
            CARLINI_PAPER,
        ),
        _mia_spec(
            "mia_gradnorm",
            "MIA AUC of the gradient-norm attack: per item mean over parameter tensors of the "
            "L2 norm of the gradient of the item's mean NLL over its answer tokens (reference "
            "convention: last labelled token dropped).",
            GRADNORM_PAPER,
            version="2",  # 2: the loss drops the last labelled token (1: every labelled token)
        ),
        MetricSpec(
            "privleak",
            None,
            "1",
            description=(
                "MUSE PrivLeak = ((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain + 1e-10) x 100 "
                "with AUC = mia_min_k on forget vs holdout of the unlearned model, AUC_retain the "
                "retain model's. No fixed direction: 0 is ideal, negative = under-unlearning "
                "(forget set still looks like training data), positive = over-unlearning. Not "
                "computable without a retain model."
            ),
            paper=MUSE_PAPER,
        ),
    )
}

MIA_NAMES: tuple[str, ...] = tuple(n for n in SPECS if n != "privleak")


# -- validation helpers ----------------------------------------------------------------------


def _array(x, what: str) -> np.ndarray:
    """A float64 numpy array from a list / numpy array / torch tensor (any shape)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _items(arrays, what: str, *, logprobs: bool = False) -> list[np.ndarray]:
    """Per-item 1-D float64 arrays: a non-empty list, each item non-empty and finite.

    ``logprobs=True`` also checks every value is <= 0 (up to a small tolerance), which catches
    NLLs passed where log-probabilities are expected.
    """
    if isinstance(arrays, (np.ndarray, torch.Tensor)) and arrays.ndim != 1 and arrays.ndim != 2:
        raise ValueError(f"{what}: expected one 1-D array per item, got shape {tuple(arrays.shape)}")
    if isinstance(arrays, (str, bytes)) or not hasattr(arrays, "__len__"):
        raise ValueError(f"{what}: expected a sequence with one 1-D array per item")
    if len(arrays) == 0:
        raise ValueError(f"{what} is empty: no items to score")
    out = []
    for i, a in enumerate(arrays):
        arr = _array(a, what)
        if arr.ndim != 1:
            raise ValueError(
                f"{what}: item {i} must be a 1-D array (one value per answer token), got shape "
                f"{arr.shape}"
            )
        if arr.size == 0:
            raise ValueError(
                f"{what}: item {i} has no answer tokens (check the prompt/answer masking)"
            )
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(f"{what}: item {i}, token {int(bad[0])} is {float(arr[bad[0]])!r} (not finite)")
        if logprobs and arr.max() > _LOGPROB_TOL:
            j = int(arr.argmax())
            raise ValueError(
                f"{what}: item {i}, token {j} = {float(arr[j])!r} > 0 is not a log-probability (were "
                "NLLs passed instead of log p?)"
            )
        out.append(arr)
    return out


def _same_lengths(a: list[np.ndarray], b: list[np.ndarray], what_a: str, what_b: str) -> None:
    """Same number of items and, per item, the same number of tokens (else name the item)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} items of {what_a} but {len(b)} items of {what_b}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.size != y.size:
            raise ValueError(f"item {i}: {x.size} {what_a} but {y.size} {what_b}")


def _check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float, np.floating, np.integer)):
        raise ValueError(f"k must be a number in (0, 1], got {k!r}")
    k = float(k)
    if not (0.0 < k <= 1.0):  # also False for NaN
        raise ValueError(f"k must be in (0, 1] (the fraction of tokens kept), got {k!r}")
    return k


def _check_convention(convention: str, what: str) -> None:
    if convention not in ("reference", "exact"):
        raise ValueError(f"{what}: convention must be 'reference' or 'exact', got {convention!r}")


def _scored_tokens(arr: np.ndarray, convention: str, what: str, i: int) -> np.ndarray:
    """The token positions Min-K(++) scores: all, or all but the last under the reference."""
    if convention == "exact":
        return arr
    if arr.size < 2:
        raise ValueError(
            f"{what}: item {i} has {arr.size} answer token; convention='reference' drops the last "
            "labelled token (EOS), leaving none to score (use convention='exact')"
        )
    return arr[:-1]


def _bottom_k_neg_mean(x: np.ndarray, k: float) -> float:
    """``-mean`` of the ``max(1, int(len(x) * k))`` smallest values of ``x``.

    ``int(len * k)`` truncates the floating-point product exactly as the reference does (so,
    e.g., 100 tokens at k = 0.29 keep 28, since 100 * 0.29 = 28.999999999999996).
    """
    n_k = max(1, int(len(x) * k))
    return float(-np.mean(np.sort(x)[:n_k]))


# -- scores (per item; higher = less member-like) --------------------------------------------


def loss_score(token_logprobs: Sequence) -> np.ndarray:
    """LOSS attack: per item the mean answer-token NLL, ``-mean_t log p(x_t)``.

    Args:
        token_logprobs: N items, each a 1-D array of log p(x_t) over the item's labelled answer
            tokens (EOS included when labelled).

    Returns:
        (N,) float64 array. Matches open-unlearning ``LOSSAttack`` (``avg_loss`` of
        ``evaluate_probability``: summed CE over labelled tokens / number of labelled tokens).

    Raises:
        ValueError: no items, an item with no tokens, a non-finite or positive log-prob.
    """
    items = _items(token_logprobs, "loss_score token_logprobs", logprobs=True)
    return np.array([-a.mean() for a in items])


def zlib_score(token_logprobs: Sequence, texts: Sequence[str]) -> np.ndarray:
    """ZLib attack (Carlini et al. 2021): per item ``LOSS / len(zlib.compress(text))``.

    ``LOSS`` is :func:`loss_score` (mean NLL over every labelled answer token) and the zlib
    length is that of ``text`` encoded as UTF-8, compressed with zlib's default level, in
    bytes. In open-unlearning (``ZLIBAttack``) the text is
    ``extract_target_texts_from_processed_data``: the labelled tokens decoded with
    ``skip_special_tokens=True`` (EOS dropped; under its tokenisation the first answer token
    is often masked and then missing; on MUSE, where nothing is masked, the whole passage).
    The harness passes exactly those texts, under both tokenisations
    (``text_passes.labelled_texts``; under ``split`` the labelled tokens are
    ``" " + answer.strip()`` and EOS, so the text is the answer with the tokenizer's leading
    space). This function compresses whatever it is given.

    Args:
        token_logprobs: N items of answer-token log-probs (as :func:`loss_score`).
        texts: N strings, the decoded labelled tokens of each item.

    Returns:
        (N,) float64 array.
    """
    losses = loss_score(token_logprobs)
    if isinstance(texts, str) or not hasattr(texts, "__len__"):
        raise ValueError("zlib_score: texts must be a list of strings (one per item)")
    if len(texts) != losses.size:
        raise ValueError(f"zlib_score: {losses.size} items of token log-probs but {len(texts)} texts")
    lengths = np.empty(losses.size)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"zlib_score: text of item {i} is {type(t).__name__}, not str")
        lengths[i] = len(zlib.compress(t.encode("utf-8")))  # >= 8 bytes, even for ""
    return losses / lengths


def min_k_score(
    token_logprobs: Sequence, k: float = DEFAULT_K, *, convention: Convention = "reference"
) -> np.ndarray:
    """Min-K% Prob (Shi et al. 2024): per item ``-mean`` of the ``max(1, int(n*k))`` lowest
    token log-probs, n the number of scored tokens.

    Args:
        token_logprobs: N items, each the log-probs of **every** labelled answer token (the same
            arrays as :func:`loss_score`).
        k: fraction of tokens kept, in (0, 1]; default 0.4 as open-unlearning's TOFU and MUSE
            configs (``mia_min_k.yaml``; the attack class default, 0.2, is not used by them).
        convention: ``"reference"`` drops each item's last token first, as open-unlearning's
            ``tokenwise_logprobs`` does ("ignore eos prediction"); ``"exact"`` scores all.

    Returns:
        (N,) float64 array.

    Deviation: an item left with no token to score raises ValueError (the reference scores it
    0). The reference sorts float32 values; we use float64.
    """
    _check_convention(convention, "min_k_score")
    k = _check_k(k)
    items = _items(token_logprobs, "min_k_score token_logprobs", logprobs=True)
    return np.array(
        [
            _bottom_k_neg_mean(_scored_tokens(a, convention, "min_k_score", i), k)
            for i, a in enumerate(items)
        ]
    )


def min_k_plus_plus_score(
    token_logprobs: Sequence,
    mu: Sequence,
    sigma: Sequence,
    k: float = DEFAULT_K,
    *,
    convention: Convention = "reference",
) -> np.ndarray:
    """Min-K%++ (Zhang et al. 2024): Min-K% over standardised token log-probs::

        z_t = (log p(x_t) - mu_t) / sqrt(max(sigma_t^2, 1e-6))
        score = -mean of the max(1, int(n*k)) lowest z_t

    with ``mu_t = sum_v p_v log p_v`` and ``sigma_t^2 = sum_v p_v (log p_v)^2 - mu_t^2`` the mean
    and variance of log p under the model's next-token distribution at position t (see
    :func:`vocab_stats`). The floor 1e-6 on the variance is open-unlearning's
    (``MinKPlusPlusAttack``: ``sigma = clamp(var, min=1e-6)`` then ``sqrt``), i.e. sigma is
    floored at 1e-3.

    Args:
        token_logprobs: N items of log p(x_t) over every labelled answer token.
        mu, sigma: N items, same lengths, the statistics at the same positions (sigma >= 0 is
            the standard deviation, not the variance).
        k, convention: as :func:`min_k_score` (the reference drops the last position of all
            three arrays).

    Returns:
        (N,) float64 array.
    """
    _check_convention(convention, "min_k_plus_plus_score")
    k = _check_k(k)
    lp = _items(token_logprobs, "min_k_plus_plus_score token_logprobs", logprobs=True)
    mus = _items(mu, "min_k_plus_plus_score mu", logprobs=True)
    sigmas = _items(sigma, "min_k_plus_plus_score sigma")
    _same_lengths(lp, mus, "token log-probs", "mu values")
    _same_lengths(lp, sigmas, "token log-probs", "sigma values")
    out = np.empty(len(lp))
    for i, (x, m, s) in enumerate(zip(lp, mus, sigmas)):
        if s.min() < 0:
            raise ValueError(f"min_k_plus_plus_score: item {i} has sigma < 0 ({float(s.min())!r})")
        what = "min_k_plus_plus_score"
        x, m, s = (_scored_tokens(v, convention, what, i) for v in (x, m, s))
        z = (x - m) / np.sqrt(np.maximum(s * s, MIN_K_PP_VAR_FLOOR))
        out[i] = _bottom_k_neg_mean(z, k)
    return out


def reference_score(token_logprobs_target: Sequence, token_logprobs_ref: Sequence) -> np.ndarray:
    """Reference-model attack (Carlini et al. 2021): per item ``LOSS_target - LOSS_ref``.

    Both LOSSes as :func:`loss_score` (mean NLL over every labelled answer token), as
    open-unlearning ``ReferenceAttack`` (``avg_loss`` of both models on the same batch). The
    reference model is typically one never trained on the data (e.g. the retain model). The two
    lists must have the same number of items; token counts may differ per item (a reference
    model with another tokenizer), since only the means are compared.

    Returns:
        (N,) float64 array: higher = the target finds the item relatively harder than the
        reference does = less member-like.
    """
    target = loss_score(token_logprobs_target)
    ref = loss_score(token_logprobs_ref)
    if target.size != ref.size:
        raise ValueError(
            f"reference_score: {target.size} items for the target model but {ref.size} for the "
            "reference model"
        )
    return target - ref


def gradnorm_score(grad_norms: Sequence[float]) -> np.ndarray:
    """Gradient-norm attack: per item the gradient norm itself (validated passthrough).

    The harness (``text_passes.GradNorms``) computes, for each item separately (batch size
    1), the item loss ``L`` = mean NLL over the item's labelled answer tokens **except the
    last** (``convention="reference"``, the default under both tokenisations; ``"exact"``
    keeps every labelled token) and then ``mean over parameter tensors W (those receiving a
    gradient) of ||dL/dW||_2`` (norm of each tensor flattened; a mean of per-tensor norms, not
    the global norm). This is open-unlearning ``GradNormAttack`` with ``p = 2`` (the TOFU and
    MUSE configs' value), whose loss is ``-mean`` of ``tokenwise_logprobs`` (last labelled
    token dropped, "ignore eos prediction") and which runs the model in ``train()`` mode
    (dropout active, if any). A larger
    gradient = the item is further from a minimum = less member-like, so the norm is the score
    as is (the reference's docstring says "negative gradient norm" but it returns the norm).

    Args:
        grad_norms: (N,) per-item gradient norms, finite and >= 0.

    Returns:
        (N,) float64 array (a copy).
    """
    arr = _array(grad_norms, "gradnorm_score grad_norms")
    if arr.ndim != 1:
        raise ValueError(f"gradnorm_score: grad_norms must be 1-D (one per item), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("gradnorm_score: grad_norms is empty: no items to score")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"gradnorm_score: item {i} has grad norm {float(arr[i])!r}; need finite and >= 0")
    return arr.copy()


def vocab_stats(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Min-K%++ statistics of the next-token distributions at N answer positions.

    Args:
        logits: (N, V) logits whose row t predicts answer token t (i.e. already shifted:
            ``logits[:, :-1]`` of a causal LM at the labelled positions, like the rows of
            open-unlearning's ``tokenwise_vocab_logprobs``).

    Returns:
        ``(mu, sigma)``, each (N,) float64: ``mu_t = sum_v p_v log p_v`` and
        ``sigma_t = sqrt(max(0, sum_v p_v (log p_v)^2 - mu_t^2))``, with ``p = softmax(row)``
        computed in float64. Vocabulary entries with p_v = 0 (logit -inf) contribute 0 (the
        limit of p log p), not NaN. Unclamped: :func:`min_k_plus_plus_score` applies the
        reference's variance floor.
    """
    if not isinstance(logits, torch.Tensor):
        logits = torch.as_tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"vocab_stats: logits must be (N, V), got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"vocab_stats: empty logits of shape {tuple(logits.shape)}")
    with torch.no_grad():
        logp = torch.log_softmax(logits.detach().double(), dim=-1)  # (N, V)
        if torch.isnan(logp).any():
            raise ValueError("vocab_stats: logits give NaN log-probabilities (NaN or all -inf row)")
        p = logp.exp()  # (N, V)
        safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))  # 0 * -inf -> 0
        mu = (p * safe_logp).sum(-1)  # (N,)
        second = (p * safe_logp.square()).sum(-1)  # (N,)
        sigma = (second - mu.square()).clamp(min=0.0).sqrt()  # (N,)
    return mu.cpu().numpy(), sigma.cpu().numpy()


# -- AUC and privleak ------------------------------------------------------------------------


def _scores(x, what: str) -> np.ndarray:
    arr = _array(x, what)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one score per item), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: the AUC needs at least one item per set")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{what}: item {int(bad[0])} is {float(arr[bad[0]])!r} (not finite)")
    return arr


def mia_auc(forget_scores, holdout_scores, name: str) -> MetricResult:
    """MIA AUC of one attack: ``sklearn.metrics.roc_auc_score`` with forget labelled 0 and
    holdout labelled 1, as open-unlearning ``mia/utils.py:mia_auc``.

    With scores signed "higher = less member-like", AUC = P(s_holdout > s_forget) + 0.5 P(tie)
    over all (forget, holdout) pairs: 1 when every forget item looks more member-like than every
    holdout item (the forget set is still memorised), 0.5 when indistinguishable.

    Args:
        forget_scores: (N_f,) scores of the forget items (from one of the ``*_score``
            functions).
        holdout_scores: (N_h,) scores of holdout items (same distribution, never trained on).
        name: the attack's metric name, one of :data:`MIA_NAMES` (``mia_loss``, ``mia_zlib``,
            ``mia_min_k``, ``mia_min_k_plus_plus``, ``mia_reference``, ``mia_gradnorm``).

    Returns:
        ``MetricResult`` with ``per_item=None`` (the AUC is a set-level statistic; the per-item
        scores are the caller's inputs, to be stored next to the result if wanted) and
        ``higher_is_better=None``: for an unlearned model the target is the retain model's AUC,
        not an extreme (see ``SPECS``; :func:`privleak` measures the gap).
    """
    if name not in MIA_NAMES:
        raise ValueError(f"mia_auc: unknown attack name {name!r}; expected one of {', '.join(MIA_NAMES)}")
    f = _scores(forget_scores, f"{name} forget scores")
    h = _scores(holdout_scores, f"{name} holdout scores")
    from sklearn.metrics import roc_auc_score  # lazy: sklearn is slow to import

    labels = np.concatenate([np.zeros(f.size), np.ones(h.size)])  # forget = 0, holdout = 1
    auc = roc_auc_score(labels, np.concatenate([f, h]))
    spec = SPECS[name]
    return MetricResult(
        name,
        float(auc),
        None,
        spec.higher_is_better,
        spec.version,
        note=f"labels forget=0 (n={f.size}), holdout=1 (n={h.size}); scores higher = less member-like",
    )


def _auc_value(x, what: str) -> float | None:
    if isinstance(x, MetricResult):
        if x.name not in MIA_NAMES:
            raise ValueError(f"privleak: {what} must be an MIA AUC result, got {x.name!r}")
        x = x.value
    if x is None:
        return None
    if isinstance(x, bool):
        raise ValueError(f"privleak: {what} must be a number in [0, 1], got {x!r}")
    v = float(x)
    if not (0.0 <= v <= 1.0):  # also False for NaN
        raise ValueError(f"privleak: {what} must be in [0, 1], got {v!r}")
    return v


def privleak(auc, auc_retain=None) -> MetricResult:
    """MUSE PrivLeak (Shi et al. 2024, arXiv:2407.06460), as open-unlearning ``privleak``
    (``src/evals/metrics/privacy.py``)::

        privleak = ((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain + 1e-10) * 100

    ``AUC`` is the unlearned model's and ``AUC_retain`` the retain model's MIA AUC (forget vs
    holdout, :func:`mia_auc` convention); MUSE and open-unlearning use ``mia_min_k`` (k = 0.4).
    ``1 - AUC`` converts to MUSE's reporting convention; the sign is MUSE's: 0 is ideal,
    negative = under-unlearning (the forget set still looks more member-like than for the
    retain model; AUC = 1 gives -100), positive = over-unlearning. Hence
    ``higher_is_better=None``.

    Args:
        auc: float in [0, 1], or the ``MetricResult`` of :func:`mia_auc`.
        auc_retain: the same for the retain model, or ``None``.

    Returns:
        ``MetricResult`` named ``privleak`` (percent). ``value=None`` with a "not computable"
        note when ``auc_retain`` (or ``auc``) is missing, or when ``AUC_retain = 1``.

    Deviations: without a retain AUC the reference logs a warning and substitutes
    ``ref_value = 0.5`` from its config; here the value is ``None`` (pass ``auc_retain=0.5``
    explicitly to reproduce that). With ``AUC_retain = 1`` the reference divides by 1e-10
    (a meaningless ~1e12); here the value is ``None``.
    """
    a = _auc_value(auc, "auc")
    r = _auc_value(auc_retain, "auc_retain")
    spec = SPECS["privleak"]

    def missing(why: str) -> MetricResult:
        return MetricResult("privleak", None, None, spec.higher_is_better, spec.version, note=why)

    if r is None:
        return missing(
            "not computable: no retain-model AUC given (privleak compares with a model never "
            "trained on the forget set; the reference would silently use 0.5)"
        )
    if a is None:
        return missing("not computable: the unlearned model's AUC is missing")
    if r == 1.0:
        return missing("not computable: retain-model AUC = 1, so 1 - AUC_retain = 0")
    score, ref = 1.0 - a, 1.0 - r
    value = (score - ref) / (ref + PRIVLEAK_EPS) * 100.0
    return MetricResult(
        "privleak",
        value,
        None,
        spec.higher_is_better,
        spec.version,
        note=f"AUC={a:.6g}, AUC_retain={r:.6g}; 0 ideal, <0 under-unlearning, >0 over-unlearning",
    )


__all__ = [
    "DEFAULT_K",
    "MIA_NAMES",
    "SPECS",
    "gradnorm_score",
    "loss_score",
    "mia_auc",
    "min_k_plus_plus_score",
    "min_k_score",
    "privleak",
    "reference_score",
    "vocab_stats",
    "zlib_score",
]
