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
