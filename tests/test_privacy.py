"""MIA scores, MIA AUC and privleak: values pinned by hand on tiny inputs (arithmetic in comments)."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch

from unlearn.evaluators.base import MetricResult
from unlearn.evaluators.privacy import (
    DEFAULT_K,
    MIA_NAMES,
    SPECS,
    gradnorm_score,
    loss_score,
    mia_auc,
    min_k_plus_plus_score,
    min_k_score,
    privleak,
    reference_score,
    vocab_stats,
    zlib_score,
)

torch.set_num_threads(1)


# -- LOSS / ZLib / Reference -----------------------------------------------------------------


def test_loss_score_is_mean_nll_per_item():
    # item 0: -(-1 - 3)/2 = 2; item 1: -(-0.5)/1 = 0.5
    s = loss_score([[-1.0, -3.0], torch.tensor([-0.5])])
    np.testing.assert_allclose(s, [2.0, 0.5], rtol=1e-12)
    assert s.dtype == np.float64


def test_zlib_score_divides_mean_nll_by_compressed_answer_length():
    texts = ["hello hello hello hello", "é"]  # the second is 2 bytes in UTF-8
    z0 = len(zlib.compress(b"hello hello hello hello"))
    z1 = len(zlib.compress("é".encode("utf-8")))
    # item 0: mean NLL = 2 -> 2 / z0; item 1: mean NLL = 4 -> 4 / z1
    s = zlib_score([[-1.0, -3.0], [-4.0]], texts)
    np.testing.assert_allclose(s, [2.0 / z0, 4.0 / z1], rtol=1e-12)
    # equal losses: the text that compresses to more bytes gets the lower score
    long_text = "the quick brown fox jumps over the lazy dog 0123456789"
    assert len(zlib.compress(long_text.encode())) > len(zlib.compress(b"ab"))
    s2 = zlib_score([[-2.0], [-2.0]], [long_text, "ab"])
    assert s2[0] < s2[1]


def test_zlib_score_checks_texts():
    with pytest.raises(ValueError, match="2 items of token log-probs but 1 texts"):
        zlib_score([[-1.0], [-2.0]], ["a"])
    with pytest.raises(ValueError, match="text of item 1 is bytes"):
        zlib_score([[-1.0], [-2.0]], ["a", b"b"])
    with pytest.raises(ValueError, match="list of strings"):
        zlib_score([[-1.0]], "a")


def test_reference_score_is_target_loss_minus_ref_loss():
    # target: (1 + 3)/2 = 2, ref: 0.5 -> 1.5; item 1: target 1, ref (1+2+3)/3 = 2 -> -1
    s = reference_score([[-1.0, -3.0], [-1.0]], [[-0.5, -0.5], [-1.0, -2.0, -3.0]])
    np.testing.assert_allclose(s, [1.5, -1.0], rtol=1e-12)
    with pytest.raises(ValueError, match="2 items for the target model but 1"):
        reference_score([[-1.0], [-1.0]], [[-1.0]])


# -- Min-K% ----------------------------------------------------------------------------------


def test_min_k_exact_convention():
    lp = [[-1.0, -2.0, -3.0, -4.0]]
    # k = 0.5: int(4 * 0.5) = 2 lowest = {-4, -3} -> -mean = 3.5
    np.testing.assert_allclose(min_k_score(lp, k=0.5, convention="exact"), [3.5])
    # k = 1: all four -> 2.5
    np.testing.assert_allclose(min_k_score(lp, k=1.0, convention="exact"), [2.5])
    # k = 0.1: int(0.4) = 0 -> at least 1 token: the lowest, -4 -> 4
    np.testing.assert_allclose(min_k_score(lp, k=0.1, convention="exact"), [4.0])
    # order does not matter: the lowest are picked, not the first
    np.testing.assert_allclose(min_k_score([[-4.0, -1.0, -3.0, -2.0]], 0.5, convention="exact"), [3.5])


def test_min_k_reference_convention_drops_the_last_token():
    lp = [[-1.0, -2.0, -3.0, -4.0]]
    # reference drops -4 (EOS position): [-1, -2, -3], int(3 * 0.5) = 1 -> lowest -3 -> 3
    np.testing.assert_allclose(min_k_score(lp, k=0.5), [3.0])
    # default k = 0.4 (open-unlearning configs); 6 tokens -> 5 kept, int(5 * 0.4) = 2 lowest
    # of [-1, -5, -2, -4, -3] = {-5, -4} -> 4.5 (the dropped last token -9 is not among them)
    assert DEFAULT_K == 0.4
    np.testing.assert_allclose(min_k_score([[-1.0, -5.0, -2.0, -4.0, -3.0, -9.0]]), [4.5])
    with pytest.raises(ValueError, match="item 1 has 1 answer token.*convention='exact'"):
        min_k_score([[-1.0, -2.0], [-1.0]])
    # the same single-token item is fine under the exact convention
    np.testing.assert_allclose(min_k_score([[-1.0]], convention="exact"), [1.0])


def test_min_k_truncates_like_the_reference():
    # 100 * 0.29 = 28.999999999999996 in floating point -> int() = 28 tokens, not 29
    lp = [-float(i) for i in range(1, 101)]  # lowest 28: -100..-73, mean -86.5
    np.testing.assert_allclose(min_k_score([lp], k=0.29, convention="exact"), [86.5])


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, float("nan"), True, "0.4"])
def test_min_k_rejects_k_outside_unit_interval(k):
    with pytest.raises(ValueError, match="k must be"):
        min_k_score([[-1.0, -2.0]], k=k)
    with pytest.raises(ValueError, match="k must be"):
        min_k_plus_plus_score([[-1.0, -2.0]], [[-1.0, -1.0]], [[1.0, 1.0]], k=k)


# -- Min-K%++ --------------------------------------------------------------------------------


def test_min_k_plus_plus_hand_values():
    lp = [[-1.0, -2.0, -3.0]]
    mu = [[-1.0, -1.0, -1.0]]
    sigma = [[1.0, 2.0, 0.5]]
    # z = [(-1+1)/1, (-2+1)/2, (-3+1)/0.5] = [0, -0.5, -4]
    # exact, k = 1: -mean(0, -0.5, -4) = 1.5; k = 0.5: int(1.5) = 1 lowest -> 4
    np.testing.assert_allclose(min_k_plus_plus_score(lp, mu, sigma, k=1.0, convention="exact"), [1.5])
    np.testing.assert_allclose(min_k_plus_plus_score(lp, mu, sigma, k=0.5, convention="exact"), [4.0])
    # reference drops the last position: z = [0, -0.5], k = 1 -> 0.25
    np.testing.assert_allclose(min_k_plus_plus_score(lp, mu, sigma, k=1.0), [0.25])


def test_min_k_plus_plus_floors_the_variance_at_1e_6():
    # sigma = 0 -> sqrt(max(0, 1e-6)) = 1e-3: z = (-1 - (-0.5)) / 1e-3 = -500 -> score 500
    s = min_k_plus_plus_score([[-1.0]], [[-0.5]], [[0.0]], k=1.0, convention="exact")
    np.testing.assert_allclose(s, [500.0], rtol=1e-12)
    # sigma = 0.01 is above the floor (var 1e-4 > 1e-6): z = -0.5 / 0.01 = -50
    s = min_k_plus_plus_score([[-1.0]], [[-0.5]], [[0.01]], k=1.0, convention="exact")
    np.testing.assert_allclose(s, [50.0], rtol=1e-12)


def test_min_k_plus_plus_checks_lengths_naming_the_item():
    lp = [[-1.0, -2.0], [-1.0, -2.0, -3.0]]
    ok = [[-1.0, -1.0], [-1.0, -1.0, -1.0]]
    bad = [[-1.0, -1.0], [-1.0, -1.0]]
    with pytest.raises(ValueError, match="item 1: 3 token log-probs but 2 mu values"):
        min_k_plus_plus_score(lp, bad, ok)
    with pytest.raises(ValueError, match="item 1: 3 token log-probs but 2 sigma values"):
        min_k_plus_plus_score(lp, ok, bad)
    with pytest.raises(ValueError, match="2 items of token log-probs but 1 items of mu"):
        min_k_plus_plus_score(lp, ok[:1], ok)
    with pytest.raises(ValueError, match="item 0 has sigma < 0"):
        min_k_plus_plus_score(lp, ok, [[1.0, -1.0], [1.0, 1.0, 1.0]])


# -- vocab_stats -----------------------------------------------------------------------------


def test_vocab_stats_uniform_and_bernoulli():
    # V = 2 uniform: log p = log 0.5 everywhere -> mu = log 0.5, variance 0
    mu, sigma = vocab_stats(torch.zeros(3, 2))
    np.testing.assert_allclose(mu, [math.log(0.5)] * 3, rtol=1e-12)
    np.testing.assert_allclose(sigma, [0.0] * 3, atol=1e-7)
    # logits [0, log 3] -> p = (1/4, 3/4): mu = 1/4 log 1/4 + 3/4 log 3/4, and the variance of a
    # two-valued variable is p q (a - b)^2 = 3/16 (log 3)^2 -> sigma = sqrt(3)/4 * log 3
    mu, sigma = vocab_stats(torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64))
    np.testing.assert_allclose(mu, [0.25 * math.log(0.25) + 0.75 * math.log(0.75)], rtol=1e-12)
    np.testing.assert_allclose(sigma, [math.sqrt(3.0) / 4.0 * math.log(3.0)], rtol=1e-10)


def test_vocab_stats_ignores_zero_probability_entries_and_feeds_min_k_plus_plus():
    # a -inf logit has p = 0 and contributes 0 (not NaN): [0, 0, -inf] is uniform over 2
    mu, sigma = vocab_stats(torch.tensor([[0.0, 0.0, float("-inf")]]))
    np.testing.assert_allclose(mu, [math.log(0.5)], rtol=1e-12)
    assert np.isfinite(sigma).all()
    # random logits: agree with a direct float64 computation, and the output plugs into the score
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)  # (N, V)
    logp = torch.log_softmax(logits.double(), -1)
    mu, sigma = vocab_stats(logits)
    np.testing.assert_allclose(mu, (logp.exp() * logp).sum(-1).numpy(), rtol=1e-12)
    var = (logp.exp() * logp**2).sum(-1) - torch.from_numpy(mu) ** 2
    np.testing.assert_allclose(sigma**2, var.numpy(), rtol=1e-9)
    tok = logp[torch.arange(5), torch.tensor([0, 1, 2, 3, 4])].numpy()
    s = min_k_plus_plus_score([tok], [mu], [sigma], k=1.0, convention="exact")
    np.testing.assert_allclose(s, [-np.mean((tok - mu) / sigma)], rtol=1e-10)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        vocab_stats(torch.zeros(2, 3, 4))


# -- GradNorm --------------------------------------------------------------------------------


def test_gradnorm_score_passthrough_and_validation():
    x = [0.5, 2.0]
    s = gradnorm_score(x)
    np.testing.assert_array_equal(s, [0.5, 2.0])
    with pytest.raises(ValueError, match="item 1 has grad norm -1"):
        gradnorm_score([1.0, -1.0])
    with pytest.raises(ValueError, match="item 0 has grad norm nan"):
        gradnorm_score([float("nan")])
    with pytest.raises(ValueError, match="empty"):
        gradnorm_score([])


# -- input validation shared by the scores ---------------------------------------------------


def test_scores_reject_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        loss_score([])
    with pytest.raises(ValueError, match="item 1 has no answer tokens"):
        loss_score([[-1.0], []])
    with pytest.raises(ValueError, match="item 0, token 1 is nan"):
        min_k_score([[-1.0, float("nan")]])
    with pytest.raises(ValueError, match="not a log-probability"):
        loss_score([[1.0, 2.0]])  # NLLs passed instead of log-probs
    with pytest.raises(ValueError, match="item 0 must be a 1-D array"):
        loss_score(np.array([-1.0, -2.0]))  # one item's array instead of a list of items
    with pytest.raises(ValueError, match="convention"):
        min_k_score([[-1.0, -2.0]], convention="eos")


# -- AUC -------------------------------------------------------------------------------------


def test_mia_auc_label_convention():
    # forget scores all lower (more member-like) than holdout -> AUC 1; reversed -> 0
    r = mia_auc([1.0, 2.0], [3.0, 4.0], "mia_min_k")
    assert r.value == 1.0 and r.name == "mia_min_k"
    assert r.per_item is None and r.higher_is_better is None and r.version == "1"
    assert "forget=0" in r.note
    assert mia_auc([3.0, 4.0], [1.0, 2.0], "mia_loss").value == 0.0


def test_mia_auc_mixed_and_ties():
    # pairs (holdout > forget) over forget [1, 3] x holdout [2, 4]:
    # (2>1) yes, (2>3) no, (4>1) yes, (4>3) yes -> 3/4
    assert mia_auc([1.0, 3.0], [2.0, 4.0], "mia_zlib").value == pytest.approx(0.75)
    # forget [1, 2] x holdout [2, 3]: 2>1 = 1, 2 vs 2 tie = 0.5, 3>1 = 1, 3>2 = 1 -> 3.5/4
    assert mia_auc([1.0, 2.0], [2.0, 3.0], "mia_gradnorm").value == pytest.approx(0.875)
    # unequal sizes: forget [1] x holdout [0, 2, 3] -> 2 of 3 pairs -> 2/3
    assert mia_auc([1.0], [0.0, 2.0, 3.0], "mia_reference").value == pytest.approx(2 / 3)


def test_mia_auc_errors():
    with pytest.raises(ValueError, match="unknown attack name 'privleak'"):
        mia_auc([1.0], [2.0], "privleak")
    with pytest.raises(ValueError, match="holdout scores is empty"):
        mia_auc([1.0], [], "mia_loss")
    with pytest.raises(ValueError, match="forget scores: item 1 is inf"):
        mia_auc([1.0, float("inf")], [2.0], "mia_loss")


def test_end_to_end_memorised_forget_set_gives_high_auc():
    # forget items have high log-probs (memorised), holdout low -> every score ranks forget
    # as more member-like -> AUC 1 for each attack
    forget = [[-0.1, -0.2, -0.1], [-0.2, -0.1, -0.3]]
    holdout = [[-2.0, -3.0, -2.5], [-1.5, -2.5, -3.0]]
    assert mia_auc(loss_score(forget), loss_score(holdout), "mia_loss").value == 1.0
    assert mia_auc(min_k_score(forget), min_k_score(holdout), "mia_min_k").value == 1.0
    texts = ["abc", "abd"]
    assert mia_auc(zlib_score(forget, texts), zlib_score(holdout, texts), "mia_zlib").value == 1.0


# -- privleak --------------------------------------------------------------------------------


def test_privleak_values_and_sign():
    # AUC 0.8 vs retain 0.5: ((1-0.8) - (1-0.5)) / (1-0.5) * 100 = (0.2 - 0.5)/0.5*100 = -60
    r = privleak(0.8, 0.5)
    assert r.value == pytest.approx(-60.0, rel=1e-9) and r.name == "privleak"
    assert r.higher_is_better is None and r.version == "1"
    # AUC 0.3 vs 0.5: (0.7 - 0.5)/0.5*100 = +40 (over-unlearning)
    assert privleak(0.3, 0.5).value == pytest.approx(40.0, rel=1e-9)
    # AUC 0.9 vs retain 0.6: (0.1 - 0.4)/0.4*100 = -75
    assert privleak(0.9, 0.6).value == pytest.approx(-75.0, rel=1e-9)
    # equal to the retain model -> 0
    assert privleak(0.55, 0.55).value == 0.0
    # a fully memorised forget set (AUC 1) vs retain 0.5 -> (0 - 0.5)/0.5*100 = -100
    assert privleak(1.0, 0.5).value == pytest.approx(-100.0, rel=1e-9)
    # the reference's epsilon: / ((1 - AUC_retain) + 1e-10); without it the value would be
    # exactly -60.0, with it -60 * 0.5 / (0.5 + 1e-10), which differs in the 10th digit
    assert r.value == ((1 - 0.8) - (1 - 0.5)) / ((1 - 0.5) + 1e-10) * 100
    assert r.value != -60.0


def test_privleak_accepts_auc_results_and_reports_missing_retain():
    auc = mia_auc([1.0, 2.0], [3.0, 4.0], "mia_min_k")  # 1.0
    ret = mia_auc([1.0, 3.0], [2.0, 4.0], "mia_min_k")  # 0.75
    # (0 - 0.25)/0.25*100 = -100
    assert privleak(auc, ret).value == pytest.approx(-100.0, rel=1e-9)
    r = privleak(auc)
    assert r.value is None and "not computable" in r.note and "retain" in r.note
    r = privleak(0.7, 1.0)
    assert r.value is None and "AUC = 1" in r.note
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        privleak(1.2, 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        privleak(0.5, float("nan"))
    with pytest.raises(ValueError, match="must be an MIA AUC result"):
        privleak(privleak(0.8, 0.5), 0.5)


# -- specs -----------------------------------------------------------------------------------


def test_specs():
    names = {
        "mia_loss",
        "mia_zlib",
        "mia_min_k",
        "mia_min_k_plus_plus",
        "mia_reference",
        "mia_gradnorm",
        "privleak",
    }
    assert set(SPECS) == names
    assert set(MIA_NAMES) == names - {"privleak"}
    for name, spec in SPECS.items():
        # 2: ZLib compresses the decoded labelled tokens, GradNorm drops the last labelled token
        want = "2" if name in ("mia_zlib", "mia_gradnorm") else "1"
        assert spec.name == name and spec.version == want and spec.higher_is_better is None
        assert spec.description and spec.paper and spec.modality == "text"
    assert "2310.16789" in SPECS["mia_min_k"].paper
    assert "2404.02936" in SPECS["mia_min_k_plus_plus"].paper
    assert "2012.07805" in SPECS["mia_zlib"].paper and "2012.07805" in SPECS["mia_reference"].paper
    assert "2407.06460" in SPECS["privleak"].paper
    # results serialise to plain JSON
    r = mia_auc([1.0], [2.0], "mia_loss")
    assert isinstance(r, MetricResult)
    json.dumps(r.to_dict())
    json.dumps(privleak(0.8).to_dict())
