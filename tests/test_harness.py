"""The harness: shared passes, parity with the per-metric computation, suites and aggregates."""

from __future__ import annotations

import numpy as np
import pytest

from unlearn.evaluators import harness, text_passes
from unlearn.evaluators.suites import TOFU_SPLIT_KINDS
from unlearn.evaluators.suites import get_suite
from unlearn.tasks.tofu_world import WorldConfig, build_world


@pytest.fixture(scope="module")
def splits():
    w = build_world(WorldConfig(n_authors=100, n_holdout=10))
    return {"forget": w.split("forget10")[:12], "retain_eval": w.split("retain_eval")[:12],
            "real_authors": w.real_authors[:8], "world_facts": w.world_facts[:8], "holdout": w.split("holdout")[:12]}


def _by_hand(adapter, items, kind):
    """The TOFU metrics of one split from plain (unshared) passes and the metric functions."""
    from unlearn.evaluators import tofu as M
    from unlearn.evaluators.text_passes import TeacherForced

    tf = lambda key, j=None: TeacherForced(key, j).run(adapter, items, batch_size=7)  # noqa: E731
    a = tf("answer")
    k = min(len(it["perturbed_answer"]) for it in items)
    pert = [tf("perturbed_answer", j) for j in range(k)]
    pn = np.stack([p["nll"] for p in pert], 1).tolist()
    pc = np.stack([p["n"] for p in pert], 1).tolist()
    para = a if kind == "mc" else tf("paraphrased_answer")
    out = {"truth_ratio": M.truth_ratio(para["nll"], para["n"], pn, pc, mode="forget" if kind == "forget" else "true")}
    out["prob"] = (M.prob_multiple_choice(a["nll"].tolist(), a["n"].tolist(), pn, pc) if kind == "mc"
                   else M.prob(a["nll"], a["n"]))
    gens = adapter.generate([it["question"] for it in items], max_new_tokens=8, batch_size=3)
    out["rouge"] = M.rouge_l_recall(gens, [it["answer"] for it in items])
    return out


def test_tofu_suite_equals_per_metric_computation_and_runs_each_pass_once(tiny_adapter, splits):
    res = harness.evaluate(tiny_adapter, splits, get_suite("tofu", max_new_tokens=8), batch_size=5, progress=False)
    for name, items in splits.items():
        if name == "holdout":
            continue
        ref = _by_hand(tiny_adapter, items, harness.split_kind(name, TOFU_SPLIT_KINDS))
        for m, v in ref.items():
            assert res["splits"][name]["metrics"][m]["value"] == pytest.approx(v.value, rel=1e-5, abs=1e-7), (name, m)
        assert res["splits"][name]["truth_ratio_raw"] == pytest.approx(ref["truth_ratio"].per_item, rel=1e-5)
    # forget: answer, paraphrase, 5 perturbed, generation -> 8 passes, each once
    assert res["passes"]["forget"]["count"] == 8
    # mc: answer (= paraphrase) + 3 options + generation
    assert res["passes"]["world_facts"]["count"] == 5


def test_directions_follow_the_split(tiny_adapter, splits):
    res = harness.evaluate(tiny_adapter, {k: splits[k] for k in ("forget", "retain_eval")},
                           get_suite("tofu", max_new_tokens=4), progress=False)
    assert res["splits"]["forget"]["metrics"]["prob"]["higher_is_better"] is False
    assert res["splits"]["retain_eval"]["metrics"]["prob"]["higher_is_better"] is True
    assert res["splits"]["forget"]["metrics"]["truth_ratio"]["higher_is_better"] is None


def test_mia_suite_matches_scores_computed_by_hand(tiny_adapter, splits):
    from sklearn.metrics import roc_auc_score

    sub = {"forget": splits["forget"], "holdout": splits["holdout"]}
    res = harness.evaluate(tiny_adapter, sub, get_suite("mia"), batch_size=4, progress=False)
    # LOSS by hand: mean answer-token NLL per item
    loss = []
    for items in (sub["forget"], sub["holdout"]):
        for it in items:
            nll, n = tiny_adapter.item_nll(tiny_adapter.collate([it]))
            loss.append((nll / n).item())
    labels = [0] * len(sub["forget"]) + [1] * len(sub["holdout"])
    assert res["multi"]["mia_loss"]["value"] == pytest.approx(roc_auc_score(labels, loss))
    assert res["multi"]["mia_loss"]["per_item"] == pytest.approx(loss, rel=1e-5)
    for k in ("mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm"):
        assert 0.0 <= res["multi"][k]["value"] <= 1.0
    # one teacher-forced pass + one gradient pass per split
    assert res["passes"]["forget"]["count"] == 2
    agg = harness.aggregate(res, get_suite("mia"), res)
    assert agg["privleak"]["value"] == pytest.approx(0.0, abs=1e-6)  # a model against itself
    assert agg["mia_reference"]["value"] == pytest.approx(0.5)  # all differences are 0 -> AUC 0.5
    assert harness.aggregate(res, get_suite("mia"), None)["privleak"]["value"] is None


def test_unknown_suite_suggests():
    with pytest.raises(ValueError, match="did you mean 'tofu'"):
        get_suite("tofo")


def test_shared_prefix_pass_matches_plain_pass(tiny_adapter, splits):
    from unlearn.evaluators.text_passes import TeacherForced

    items = splits["forget"]
    reqs = [TeacherForced("answer", outputs=frozenset({"nll", "token_logprobs", "memorization"})),
            TeacherForced("paraphrased_answer"), TeacherForced("perturbed_answer", 2)]
    shared = text_passes.run_shared_prefix(tiny_adapter, items, reqs, batch_size=5)
    for r, got in zip(reqs, shared):
        plain = r.run(tiny_adapter, items, batch_size=7)
        assert got["nll"] == pytest.approx(plain["nll"], rel=1e-5)
        assert list(got["n"]) == list(plain["n"])
    assert shared[0]["exact_memorization"] == pytest.approx(reqs[0].run(tiny_adapter, items, 4)["exact_memorization"])
    # the harness takes the shared path for a plain TextAdapter in split mode ...
    res = harness.evaluate(tiny_adapter, {"forget": items}, get_suite("tofu", max_new_tokens=4), progress=False)
    assert any(k.startswith("joint:shared_prefix") for k in res["passes"]["forget"]["seconds"])
    # ... and never for a subclass that changes the logits
    from unlearn.adapters.text import TextAdapter

    class Shifted(TextAdapter):
        def logits(self, batch, model=None):
            return super().logits(batch, model) * 0.5

    sh = Shifted(tiny_adapter.model, tiny_adapter.tokenizer)
    assert not sh.supports_shared_prefix
    res2 = harness.evaluate(sh, {"forget": items}, get_suite("tofu", max_new_tokens=4), progress=False)
    assert not any(k.startswith("joint:shared_prefix") for k in res2["passes"]["forget"]["seconds"])
    assert res2["splits"]["forget"]["metrics"]["prob"]["value"] != pytest.approx(
        res["splits"]["forget"]["metrics"]["prob"]["value"])


# -- MIA per-item values against open-unlearning's conventions, by hand ------------------------
def _adapter(tiny_adapter, tokenization):
    from unlearn.adapters.text import TextAdapter

    return TextAdapter(tiny_adapter.model, tiny_adapter.tokenizer, tokenization=tokenization)


def _mia_splits(splits, tiny_qa):
    """4 items the tiny tokenizer was trained on (their first answer word is one token, which
    the reference tokenisation masks) as forget, 3 holdout items (it often is not)."""
    return {"forget": tiny_qa[:4], "holdout": splits["holdout"][:3]}


@pytest.mark.parametrize("tokenization", ["reference", "split"])
def test_mia_zlib_compresses_the_decoded_labelled_tokens(tiny_adapter, splits, tiny_qa, tokenization):
    import zlib

    ad = _adapter(tiny_adapter, tokenization)
    sub = _mia_splits(splits, tiny_qa)
    res = harness.evaluate(ad, sub, get_suite("mia"), batch_size=3, progress=False)
    want, old, dropped = [], [], 0
    for it in sub["forget"] + sub["holdout"]:
        b = ad.collate([it])
        labels = b["labels"][0]
        labelled = labels[labels != -100].tolist()  # what open-unlearning's extract_target_texts decodes
        text = ad.tokenizer.decode(labelled, skip_special_tokens=True)
        nll, n = ad.item_nll(b)
        loss = (nll / n).item()  # mean NLL over every labelled token (evaluate_probability's avg_loss)
        want.append(loss / len(zlib.compress(text.encode("utf-8"))))
        old.append(loss / len(zlib.compress(it["answer"].encode("utf-8"))))  # the raw answer string
        if tokenization == "reference":
            # a tail of the answer: where the prompt's trailing space merges into the first answer
            # token, that token is masked and missing from the text
            assert it["answer"].endswith(text.strip()) and text.strip()
            dropped += text.strip() != it["answer"]
        else:
            assert text == " " + it["answer"].strip()  # the answer as tokenised, EOS dropped
    assert dropped > 0 or tokenization == "split"
    got = res["multi"]["mia_zlib"]["per_item"]
    assert got == pytest.approx(want, rel=1e-5)
    assert not np.allclose(got, old, rtol=1e-3)  # the raw answer string gives other scores


def _grad_norm_by_hand(ad, item, drop_last: bool) -> float:
    """open-unlearning's GradNormAttack (p = 2) on one item, written out on the bare model."""
    import torch

    model = ad.model
    b = ad.collate([item])
    model.train()
    try:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (1, T, V)
        logp = torch.log_softmax(logits[0, :-1].float(), -1)  # position t predicts token t + 1
        targets = b["input_ids"][0, 1:]
        pos = (b["labels"][0, 1:] != -100).nonzero()[:, 0]  # labelled positions, in order
        if drop_last:
            pos = pos[:-1]  # tokenwise_logprobs: "ignore eos prediction"
        loss = -logp[pos, targets[pos]].mean()
        params = list(model.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.eval()
    return float(np.mean([g.norm(2).item() for g in grads if g is not None]))


@pytest.mark.parametrize("tokenization", ["reference", "split"])
def test_mia_gradnorm_drops_the_last_labelled_token(tiny_adapter, splits, tiny_qa, tokenization):
    ad = _adapter(tiny_adapter, tokenization)
    sub = _mia_splits(splits, tiny_qa)
    res = harness.evaluate(ad, sub, get_suite("mia"), batch_size=3, progress=False)
    items = sub["forget"] + sub["holdout"]
    want = [_grad_norm_by_hand(ad, it, drop_last=True) for it in items]
    every = [_grad_norm_by_hand(ad, it, drop_last=False) for it in items]
    got = res["multi"]["mia_gradnorm"]["per_item"]
    assert got == pytest.approx(want, rel=1e-5)
    assert not np.allclose(got, every, rtol=1e-3)  # keeping the last token (EOS) changes every item
    # the pass itself: the 'exact' convention keeps it
    exact = text_passes.GradNorms("exact").run(ad, items, batch_size=3)
    assert list(exact) == pytest.approx(every, rel=1e-5)
    assert not ad.model.training  # the model is back in eval mode


def test_scored_mean_nll_and_drop_last_labelled(tiny_adapter, splits):
    import torch

    m = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert text_passes.drop_last_labelled(m).tolist() == [[False, True, True, False, False],
                                                          [True, False, False, False, False],
                                                          [False] * 5]
    b = tiny_adapter.collate(splits["forget"][:3])
    nll, n = tiny_adapter.item_nll(b)
    with torch.no_grad():
        exact = text_passes.scored_mean_nll(tiny_adapter, b, "exact")
        ref = text_passes.scored_mean_nll(tiny_adapter, b, "reference")
        logp, mask = tiny_adapter.token_logprobs(b)
    assert exact.tolist() == pytest.approx((nll / n).tolist(), rel=1e-5)
    keep = text_passes.drop_last_labelled(mask)
    assert ref.tolist() == pytest.approx((-(logp * keep).sum(-1) / (n - 1)).tolist(), rel=1e-5)
    # an item with one labelled token has nothing left under the reference convention
    one = {"input_ids": b["input_ids"][:1, :4], "attention_mask": b["attention_mask"][:1, :4],
           "labels": torch.tensor([[-100, -100, -100, 5]])}
    with pytest.raises(ValueError, match="item 0 has 1 answer token"):
        text_passes.scored_mean_nll(tiny_adapter, one, "reference")
    assert text_passes.scored_mean_nll(tiny_adapter, one, "exact").shape == (1,)


def test_mia_convention_exact_keeps_the_last_token(tiny_adapter, splits, tiny_qa):
    from unlearn.evaluators import privacy as P
    from unlearn.evaluators.suites import MIA

    sub = _mia_splits(splits, tiny_qa)
    ref = harness.evaluate(tiny_adapter, sub, get_suite("mia"), batch_size=3, progress=False)["multi"]
    suite = harness.Suite("mia-exact", "0", [], multi=[MIA(a, convention="exact") for a in ("min_k", "gradnorm")])
    exact = harness.evaluate(tiny_adapter, sub, suite, batch_size=3, progress=False)["multi"]
    lp = text_passes.TeacherForced("answer", outputs=frozenset({"token_logprobs"}))
    lps = lp.run(tiny_adapter, sub["forget"], 3)["token_logprobs"] + lp.run(tiny_adapter, sub["holdout"], 3)["token_logprobs"]
    assert exact["mia_min_k"]["per_item"] == pytest.approx(list(P.min_k_score(lps, convention="exact")), rel=1e-6)
    assert ref["mia_min_k"]["per_item"] == pytest.approx(list(P.min_k_score(lps)), rel=1e-6)
    assert not np.allclose(exact["mia_gradnorm"]["per_item"], ref["mia_gradnorm"]["per_item"], rtol=1e-3)


def test_truth_ratio_does_not_run_on_holdout(tiny_adapter):
    """A holdout split needs only question and answer (TOFU's holdout files have nothing else)."""
    w = build_world(WorldConfig(n_authors=100, n_holdout=10))
    bare = [{"question": it["question"], "answer": it["answer"]} for it in w.split("holdout")[:3]]
    sub = {"forget": w.split("forget10")[:3], "holdout": bare}
    res = harness.evaluate(tiny_adapter, sub, get_suite("tofu-full", max_new_tokens=4), batch_size=3, progress=False)
    assert "truth_ratio" not in res["splits"]["holdout"]["metrics"]
    assert set(res["splits"]["holdout"]["metrics"]) == {"prob", "rouge", "exact_memorization", "extraction_strength"}
    assert "truth_ratio" in res["splits"]["forget"]["metrics"]
    assert all(0.0 <= res["multi"][m]["value"] <= 1.0 for m in ("mia_loss", "mia_zlib", "mia_gradnorm"))
    assert res["suite_version"] == "2"
