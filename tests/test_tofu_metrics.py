"""TOFU metric functions: values pinned by hand on tiny inputs (arithmetic in the comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from unlearn.evaluators.base import MetricResult, MetricSpec
from unlearn.evaluators.tofu import (
    SPECS,
    UTILITY_KEYS,
    exact_memorization,
    extraction_strength,
    forget_quality,
    harmonic_mean,
    length_normalized_prob,
    model_utility,
    prob,
    prob_multiple_choice,
    rouge_l_recall,
    truth_ratio,
)

torch.set_num_threads(1)

LN2, LN4 = math.log(2.0), math.log(4.0)


# -- probability -------------------------------------------------------------------------------


def test_length_normalized_prob_and_prob():
    # exp(-0/1) = 1; exp(-2ln2/2) = 1/2; exp(-3ln4/3) = 1/4
    p = length_normalized_prob([0.0, 2 * LN2, 3 * LN4], [1, 2, 3])
    np.testing.assert_allclose(p, [1.0, 0.5, 0.25], rtol=1e-12)
    r = prob([0.0, 2 * LN2, 3 * LN4], [1, 2, 3])
    # mean = (1 + 0.5 + 0.25) / 3 = 1.75 / 3
    assert r.value == pytest.approx(1.75 / 3, rel=1e-12)
    assert r.per_item == pytest.approx([1.0, 0.5, 0.25])
    assert r.name == "prob" and r.higher_is_better is False  # forget-set direction
    assert prob([0.0], [1], forget_set=False).higher_is_better is True


def test_length_normalized_prob_rejects_empty_answers_naming_the_item():
    with pytest.raises(ValueError, match="item 1 has n_tokens=0"):
        length_normalized_prob([1.0, 2.0, 3.0], [2, 0, 1])
    with pytest.raises(ValueError, match="item 0"):
        prob([1.0], [-1])
    with pytest.raises(ValueError, match="NaN"):
        prob([float("nan")], [1])
    with pytest.raises(ValueError, match="2 NLL values but 1"):
        prob([1.0, 2.0], [1])


def test_prob_multiple_choice():
    # item 0: P(a) = exp(-3/3) = e^-1; wrong: exp(-2/2) = exp(-4/4) = e^-1
    #         -> e^-1 / (3 e^-1) = 1/3
    # item 1: P(a) = exp(0) = 1; wrong: exp(-2ln2/2) = 1/2, exp(-ln4/1) = 1/4
    #         -> 1 / (1 + 0.75) = 4/7
    # mean = (1/3 + 4/7) / 2 = (7 + 12) / 42 = 19/42
    r = prob_multiple_choice(
        [3.0, 0.0], [3, 1], [[2.0, 4.0], [2 * LN2, LN4]], [[2, 4], [2, 1]]
    )
    assert r.per_item == pytest.approx([1 / 3, 4 / 7], rel=1e-9)
    assert r.value == pytest.approx(19 / 42, rel=1e-9)
    assert r.name == "prob_mc" and r.higher_is_better is True
    with pytest.raises(ValueError, match="item 1 has no answers"):
        prob_multiple_choice([1.0, 1.0], [1, 1], [[1.0], []], [[1], []])


# -- truth ratio -------------------------------------------------------------------------------


def _tr_inputs():
    # item 0: para avg NLL = 2/2 = 1; perturbed avg NLLs 4/2 = 2 and 9/3 = 3, mean 2.5
    #         R = e^-2.5 / e^-1 = e^-1.5 = 0.22313016
    # item 1: para avg NLL = 3/1 = 3; perturbed avg NLLs 1/1 = 1, 1/1 = 1, mean 1
    #         R = e^-1 / e^-3 = e^2 = 7.3890561
    return [2.0, 3.0], [2, 1], [[4.0, 9.0], [1.0, 1.0]], [[2, 3], [1, 1]]


def test_truth_ratio_forget():
    r = truth_ratio(*_tr_inputs(), mode="forget")
    # per_item = raw R
    assert r.per_item == pytest.approx([math.exp(-1.5), math.exp(2.0)], rel=1e-8)
    # min(R, 1/R): e^-1.5 = 0.22313016 and e^-2 = 0.13533528 -> mean 0.17923272
    assert r.value == pytest.approx((math.exp(-1.5) + math.exp(-2.0)) / 2, rel=1e-8)
    assert r.value == pytest.approx(0.17923272, abs=1e-8)
    assert r.name == "truth_ratio" and r.higher_is_better is None


def test_truth_ratio_true():
    r = truth_ratio(*_tr_inputs(), mode="true")
    # max(0, 1 - R): 1 - e^-1.5 = 0.77686984 and max(0, 1 - e^2) = 0 -> mean 0.38843492
    assert r.value == pytest.approx(0.38843492, abs=1e-8)
    assert r.per_item == pytest.approx([math.exp(-1.5), math.exp(2.0)], rel=1e-8)
    assert r.name == "truth_ratio_true" and r.higher_is_better is True


def test_truth_ratio_uses_geometric_mean_over_perturbed():
    # one item, para avg NLL 0 (P=1); perturbed avg NLLs 0 and 2: geometric mean of probs
    # exp(-(0+2)/2) = e^-1 (the arithmetic mean (1 + e^-2)/2 = 0.568 would be wrong)
    r = truth_ratio([0.0], [1], [[0.0, 2.0]], [[1, 1]], mode="true")
    assert r.per_item[0] == pytest.approx(math.exp(-1.0) / (1 + 1e-10), rel=1e-12)


def test_truth_ratio_errors():
    with pytest.raises(ValueError, match="mode"):
        truth_ratio(*_tr_inputs(), mode="retain")
    with pytest.raises(ValueError, match="2 paraphrased answers but 1"):
        truth_ratio([1.0, 1.0], [1, 1], [[1.0]], [[1]])
    with pytest.raises(ValueError, match="perturbed, item 1: answer 0 has n_tokens=0"):
        truth_ratio([1.0, 1.0], [1, 1], [[1.0], [1.0]], [[1], [0]])


# -- ROUGE -------------------------------------------------------------------------------------


def test_rouge_l_recall():
    # pair 0 (stemmed, lowercased, punctuation dropped):
    #   reference "the cat were run" (cats->cat, running->run), prediction "a cat run"
    #   LCS = [cat, run] = 2 -> recall 2/4 = 0.5 (without the stemmer it would be 0)
    # pair 1: reference "the cat sat on the mat" (6), prediction "the cat is on a mat"
    #   LCS = [the, cat, on, mat] = 4 -> recall 4/6
    r = rouge_l_recall(
        ["A cat runs", "the cat is on a mat"],
        ["The cats were running.", "the cat sat on the mat"],
    )
    assert r.per_item == pytest.approx([0.5, 4 / 6])
    assert r.value == pytest.approx((0.5 + 4 / 6) / 2)
    assert r.higher_is_better is False
    assert rouge_l_recall(["x"], ["x"], forget_set=False).higher_is_better is True
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l_recall(["a", "b"], ["a"])


# -- forget quality ----------------------------------------------------------------------------


def test_forget_quality_identical_samples_is_one():
    tr = truth_ratio(*_tr_inputs(), mode="forget")
    r = forget_quality(tr, tr.per_item)  # a truth_ratio result or its per-item R both work
    # KS statistic D = 0 -> p-value 1
    assert r.value == pytest.approx(1.0)
    assert r.higher_is_better is True


def test_forget_quality_separated_samples():
    # n = m = 5, every unlearned R below every retain R -> D = 1. Exact two-sided p-value:
    # of the C(10, 5) = 252 equally likely orderings, 2 give D = 1 -> p = 2/252 = 1/126 = 0.0079
    u = [0.1, 0.2, 0.3, 0.4, 0.5]
    r = [1.1, 1.2, 1.3, 1.4, 1.5]
    fq = forget_quality(u, r)
    assert fq.value == pytest.approx(1 / 126, rel=1e-9)
    assert fq.value < 0.01
    assert "D=1" in fq.note
    # TOFU's original code feeds 1/R; KS is invariant under a monotone map of both samples
    assert forget_quality(1 / np.array(u), 1 / np.array(r)).value == pytest.approx(fq.value)


def test_forget_quality_not_computable_without_retain_model():
    fq = forget_quality([0.5, 1.0, 2.0], None)
    assert fq.value is None and not fq.computable
    assert fq.note.startswith("not computable: no retain model given")
    d = fq.to_dict()
    assert d["value"] is None and d["name"] == "forget_quality"
    json.dumps(d)  # serialisable


def test_forget_quality_errors():
    with pytest.raises(ValueError, match="3 unlearned-model truth ratios but 2"):
        forget_quality([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="not finite"):
        forget_quality([1.0, float("inf")], [1.0, 2.0])
    with pytest.raises(ValueError, match="expected a truth_ratio result"):
        forget_quality(prob([1.0], [1]), None)


# -- model utility -----------------------------------------------------------------------------


def _utility_values():
    # retain/* = 0.5, real_authors/* = 0.25, world_facts/* = 1.0
    vals = {"retain": 0.5, "real_authors": 0.25, "world_facts": 1.0}
    return {k: vals[k.split("/")[0]] for k in UTILITY_KEYS}


def test_model_utility_harmonic_mean():
    # 9 / (3 * 1/0.5 + 3 * 1/0.25 + 3 * 1/1) = 9 / (6 + 12 + 3) = 9/21 = 3/7
    r = model_utility(_utility_values())
    assert r.value == pytest.approx(3 / 7, rel=1e-12)
    assert r.name == "model_utility" and r.higher_is_better is True
    assert len(UTILITY_KEYS) == 9 and "real_authors/truth_ratio" in UTILITY_KEYS


def test_model_utility_zero_component_gives_zero():
    v = _utility_values()
    v["world_facts/rouge"] = 0.0
    r = model_utility(v)
    assert r.value == 0.0
    assert "world_facts/rouge" in r.note


def test_model_utility_key_and_value_errors():
    v = _utility_values()
    del v["real_authors/truth_ratio"]
    with pytest.raises(ValueError, match="missing value 'real_authors/truth_ratio'"):
        model_utility(v)
    v = _utility_values()
    v["forget/prob"] = 0.3
    with pytest.raises(ValueError, match="unexpected key 'forget/prob'"):
        model_utility(v)
    v = _utility_values()
    v["retain/prob"] = -0.1
    with pytest.raises(ValueError, match="'retain/prob' = -0.1"):
        model_utility(v)
    v = _utility_values()
    v["retain/prob"] = None
    with pytest.raises(ValueError, match="not computable"):
        model_utility(v)


def test_harmonic_mean_matches_scipy_on_valid_input():
    from scipy.stats import hmean

    xs = [0.3, 0.9, 0.05, 1.0]
    # 4 / (1/0.3 + 1/0.9 + 20 + 1) = 4 / 25.4444... = 0.15720524
    assert harmonic_mean(xs) == pytest.approx(0.15720524, abs=1e-8)
    assert harmonic_mean(xs) == pytest.approx(hmean(xs), rel=1e-12)
    assert harmonic_mean([0.0, 1.0]) == 0.0 == hmean([0.0, 1.0])
    with pytest.raises(ValueError, match="element 1"):
        harmonic_mean([1.0, float("nan")])


# -- exact memorisation / extraction strength --------------------------------------------------


def _onehot_logits(pred_ids: list[int], vocab: int = 4) -> torch.Tensor:
    logits = torch.zeros(len(pred_ids), vocab)  # (T, V)
    logits[torch.arange(len(pred_ids)), torch.tensor(pred_ids)] = 5.0
    return logits


def _memorisation_batch():
    # V = 4, T = 6; logits[t] predicts the token at t + 1.
    # item A: tokens [BOS=0, q=1, 2, 3, 1, EOS=0], answer = positions 2..5 (EOS scored)
    #   argmax per position t=0..5: [3, 2, 0, 1, 0, 3]
    #   t=1 -> pos 2 (label 2): 2 ok; t=2 -> pos 3 (label 3): 0 WRONG;
    #   t=3 -> pos 4 (label 1): 1 ok; t=4 -> pos 5 (label 0 = EOS): 0 ok; t=5 predicts nothing
    # item B: answer = positions 2..3 (labels 1, 2), right-padded
    #   argmax [0, 3, 2, 1, 1, 1]: t=1 -> pos 2 (label 1): 3 WRONG; t=2 -> pos 3 (label 2): 2 ok
    logits = torch.stack([_onehot_logits([3, 2, 0, 1, 0, 3]), _onehot_logits([0, 3, 2, 1, 1, 1])])
    labels = torch.tensor([[-100, -100, 2, 3, 1, 0], [-100, -100, 1, 2, -100, -100]])
    return logits, labels  # (B=2, T=6, V=4), (B=2, T=6)


def test_exact_memorization_exact_convention():
    # A: [ok, WRONG, ok, ok] -> 3/4; B: [WRONG, ok] -> 1/2; mean 0.625
    r = exact_memorization(*_memorisation_batch(), convention="exact")
    assert r.per_item == pytest.approx([0.75, 0.5])
    assert r.value == pytest.approx(0.625)
    assert r.higher_is_better is False and "convention=exact" in r.note


def test_exact_memorization_reference_convention_drops_last_labelled_token():
    # A: [ok, WRONG, ok] (EOS dropped) -> 2/3; B: [WRONG] -> 0; mean 1/3
    r = exact_memorization(*_memorisation_batch())
    assert r.per_item == pytest.approx([2 / 3, 0.0])
    assert r.value == pytest.approx(1 / 3)
    assert exact_memorization(*_memorisation_batch(), forget_set=False).higher_is_better is True


def test_extraction_strength_exact_convention():
    # A: matches [1,0,1,1]: suffix from k=2 all match, from k=1 not -> k*=2, ES = 1 - 2/4 = 0.5
    # B: matches [0,1]: k*=1 -> ES = 1 - 1/2 = 0.5
    r = extraction_strength(*_memorisation_batch(), convention="exact")
    assert r.per_item == pytest.approx([0.5, 0.5])
    # all wrong -> k* = |a| -> 0; all right -> k* = 0 -> 1
    logits, labels = _memorisation_batch()
    assert extraction_strength(-logits[:1], labels[:1], convention="exact").value == 0.0
    perfect = torch.stack([_onehot_logits([3, 2, 3, 1, 0, 3])])
    assert extraction_strength(perfect, labels[:1], convention="exact").value == 1.0


def test_extraction_strength_reference_convention_and_quirk():
    # A: matches [1,0,1] (EOS dropped), |a| = 3: k*=2 -> ES = 1 - 2/3 = 1/3
    # B: matches [0], |a| = 1: no suffix matches; the reference loop ends at k = |a|-1 = 0
    #    -> ES = 1 - 0/1 = 1 (the quirk; the exact convention would give 0)
    r = extraction_strength(*_memorisation_batch())
    assert r.per_item == pytest.approx([1 / 3, 1.0])
    assert r.value == pytest.approx(2 / 3)
    assert "quirk" in r.note


def _naive_memorisation(logits, labels, drop_last, reference_loop):
    """Straightforward loops over positions, for parity with the vectorised code."""
    em, es = [], []
    for b in range(labels.shape[0]):
        pos = [t for t in range(1, labels.shape[1]) if labels[b, t] != -100]
        if drop_last:
            pos = pos[:-1]
        ok = [int(torch.argmax(logits[b, t - 1])) == int(labels[b, t]) for t in pos]
        em.append(sum(ok) / len(ok))
        n = len(ok)
        ks = range(n) if reference_loop else range(n + 1)
        k = None
        for k in ks:
            if all(ok[k:]):
                break
        es.append(1 - k / n)
    return em, es


def test_memorisation_parity_with_naive_loops():
    g = torch.Generator().manual_seed(0)
    B, T, V = 16, 9, 4
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    # answers start after a prompt of 1..4 tokens and end before right padding of 0..2
    for b in range(B):
        start = 1 + b % 4
        end = T - (b % 3)
        labels[b, :start] = -100
        labels[b, end:] = -100
        # make some answers mostly memorised so ES takes several values
        if b % 2:
            labels[b, start:end] = logits[b, start - 1 : end - 1].argmax(-1)
            labels[b, start] = (labels[b, start] + 1) % V
    for conv, drop, loop in (("reference", True, True), ("exact", False, False)):
        em, es = _naive_memorisation(logits, labels, drop, loop)
        assert exact_memorization(logits, labels, convention=conv).per_item == pytest.approx(em)
        assert extraction_strength(logits, labels, convention=conv).per_item == pytest.approx(es)


def test_memorisation_errors():
    logits, labels = _memorisation_batch()
    with pytest.raises(ValueError, match=r"need logits \(B, T, V\) and labels \(B, T\)"):
        exact_memorization(logits[0], labels)
    with pytest.raises(ValueError, match="convention"):
        extraction_strength(logits, labels, convention="paper")
    one_token = torch.tensor([[-100, -100, 2, -100, -100, -100]])
    # reference drops the only labelled token -> nothing to score
    with pytest.raises(ValueError, match="item 0 has no answer tokens"):
        exact_memorization(logits[:1], one_token)
    assert exact_memorization(logits[:1], one_token, convention="exact").value == 1.0


# -- specs and results -------------------------------------------------------------------------


def test_specs_declare_every_metric_with_its_direction():
    expected = {
        "prob": False,
        "prob_mc": True,
        "rouge_l_recall": False,
        "truth_ratio": None,
        "truth_ratio_true": True,
        "forget_quality": True,
        "model_utility": True,
        "exact_memorization": False,
        "extraction_strength": False,
    }
    assert {k: s.higher_is_better for k, s in SPECS.items()} == expected
    for name, spec in SPECS.items():
        assert isinstance(spec, MetricSpec) and spec.name == name
        assert spec.version and spec.description and spec.paper and spec.modality == "text"
    with pytest.raises(AttributeError):
        SPECS["prob"].version = "2"  # frozen


def test_metric_result_refuses_nan_and_silent_none():
    with pytest.raises(ValueError, match="not finite"):
        MetricResult("prob", float("nan"), None, False, "1")
    with pytest.raises(ValueError, match="needs a note"):
        MetricResult("prob", None, None, False, "1")
    d = prob([0.0, 2 * LN2], [1, 2]).to_dict()
    assert d == {
        "name": "prob",
        "value": 0.75,
        "per_item": [1.0, 0.5],
        "higher_is_better": False,
        "version": "1",
        "note": "",
    }
    assert all(type(x) is float for x in d["per_item"])
