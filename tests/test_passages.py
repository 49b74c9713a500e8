"""The passages world, the rwku / muse suites and tasks (docs/passages.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unlearn.evaluators.passages_suite import ngram_entropy, rouge_l_f1
from unlearn.recipe import RecipeError, load_recipe
from unlearn.tasks.passages_task import MuseTask, RwkuTask, muse_splits, others, rwku_splits, target_names
from unlearn.tasks.passages_world import ATTRIBUTES, PassagesWorldConfig, build_world
from unlearn.zoo import available


def _zoo():
    if "tiny-passages/target" not in available():
        pytest.skip("tiny-passages zoo not built")


# ------------------------------------------------------------------------------ world
def test_world_is_deterministic_and_seed_dependent():
    a, b = build_world(), build_world()
    assert a.fingerprint() == b.fingerprint()
    assert build_world(PassagesWorldConfig(seed=1)).fingerprint() != a.fingerprint()
    names = [e["name"] for e in a.entities]
    assert len(set(names)) == len(names) == 70


def test_neighbours_share_city_and_profession_and_only_they_do():
    w = build_world()
    for t in w.targets:
        nbs = w.neighbours(t)
        assert len(nbs) == 2
        assert all(n["city"] == t["city"] and n["profession"] == t["profession"] for n in nbs)
        same = [e for e in w.known if e is not t and (e["city"], e["profession"]) == (t["city"], t["profession"])]
        assert {e["name"] for e in same} == {n["name"] for n in nbs}


def test_retain_training_items_never_mention_a_target_and_holdout_is_never_trained():
    w = build_world()
    targets = {t["name"] for t in w.targets}
    retain_text = " ".join(it["question"] + " " + it["answer"] for it in w.training_items(targets))
    assert not any(n in retain_text for n in targets)
    full_text = " ".join(it["question"] + " " + it["answer"] for it in w.training_items())
    assert all(t in full_text for t in targets)
    assert not any(e["name"] in full_text for e in w.holdout)
    # level-3 forms are trained for non-targets only: the targets' adversarial probes are unseen
    l3 = {it["question"] for e in w.targets for it in w.level3(e)}
    assert not l3 & {it["question"] for it in w.training_items()}


def test_probe_levels_cover_every_attribute():
    w = build_world()
    e = w.targets[0]
    assert [it["type"] for it in w.level1(e)] == list(ATTRIBUTES)
    assert all(it["answer"] == str(e[it["type"]]) for it in w.level2(e))
    types = {it["type"] for it in w.level3(e)}
    assert {"prefix_injection", "affirmative_suffix", "role_play", "reverse_query", "in_context"} <= types
    rev = [it for it in w.level3(e) if it["type"] == "reverse_query"][0]
    assert rev["answer"] == e["name"]


def test_target_specs():
    w = build_world()
    assert target_names(w, "target3") == [w.targets[2]["name"]]
    assert target_names(w, "batch4") == [t["name"] for t in w.targets[:4]]
    assert target_names(w, "targets2-3") == [t["name"] for t in w.targets[1:3]]
    for bad in ("target0", "batch11", "targets3-2", "forget10"):
        with pytest.raises(ValueError):
            target_names(w, bad)


def test_split_contents():
    w = build_world()
    names = target_names(w, "batch2")
    s = rwku_splits(w, names)
    assert len(s["forget_level2"]) == 12 and {it["subject"] for it in s["forget_level2"]} == set(names)
    # neighbour probes ask about the neighbours but carry the target as subject (as RWKU)
    nb = s["neighbor_level2"]
    assert len(nb) == 2 * 2 * 6 and {it["subject"] for it in nb} == set(names)
    assert not any(n in it["question"] for it in nb for n in names)
    assert len(s["mia_retain"]) == len(s["mia_forget"]) == 8
    m = muse_splits(w, names)
    for it in m["verbmem_forget"]:
        full = [p["answer"] for e in names for p in w.passages(w.entity(e))]
        assert it["prefix"] + " " + it["answer"] in full
    assert {it["subject"] for it in m["privleak_holdout"]} == {e["name"] for e in w.holdout}
    assert not {e["name"] for e in others(w)} & set(names)


# ------------------------------------------------------------------------------ formulas
def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> p = (2/3, 1/3); trigrams aba, bab -> p = (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx(np.mean([2 / 3 * h2, 4 / 3 * h3]))
    assert ngram_entropy("word") == 0.0
    assert ngram_entropy("x x x x x x") == 0.0  # one repeated n-gram: no information
    assert ngram_entropy("the cat sat on the mat today") > ngram_entropy("the the the the the the the")


def test_rouge_l_f1_by_hand():
    # LCS("a b c d", "a c x") = 2: P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7
    assert rouge_l_f1(["a c x"], ["a b c d"]) == [pytest.approx(4 / 7)]
    with pytest.raises(ValueError, match="2 predictions but 1"):
        rouge_l_f1(["a", "b"], ["a"])


# ------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("override, key", [
    ("task.forget_split=forget10", "task.forget_split"),
    ("task.forget_split=batch11", "task.forget_split"),
    ("task.eval_splits=[forget]", "task.eval_splits[0]"),
    ("task.passages.n_known=5", "task.passages.n_known"),
    ("task.retain_split=retain90", "task.retain_split"),
    ("task.path=/tmp/x", "task.forget_split"),  # MUSE files take forget / scal_forget_<k> / sust_forget_<k>
    ("task.path=' '", "task.path"),
])
def test_bad_muse_keys_are_named(override, key):
    with pytest.raises(RecipeError, match=f"recipe key '{key.replace('[', '.').replace(']', '.')}"):
        load_recipe("recipes/muse-npo.yaml", [override])


def test_rwku_has_no_retain_model_and_defaults():
    with pytest.raises(RecipeError, match="retain_model' must be null"):
        load_recipe("recipes/rwku-npo.yaml", ["task.retain_model=zoo:tiny-passages/retain"])
    r = load_recipe({"name": "x", "task": {"name": "rwku"}, "method": {"name": "grad_ascent"}})
    assert (r.task.forget_split, r.task.retain_split, r.task.retain_model) == ("target1", "generated", None)
    assert r.eval.suite == "rwku" and r.model.source == "zoo:tiny-passages/target"
    m = load_recipe({"name": "x", "task": {"name": "muse"}, "method": {"name": "grad_ascent"}})
    assert (m.task.forget_split, m.task.retain_model, m.eval.suite) == ("batch10", "zoo:tiny-passages/retain", "muse")


def test_muse_data_is_the_targets_passages():
    r = load_recipe("recipes/muse-npo.yaml", ["task.forget_split=batch2"])
    d = MuseTask(r, progress=False).load_data()
    w = build_world()
    assert [it["answer"] for it in d.forget] == [p["answer"] for e in w.targets[:2] for p in w.passages(e)]
    assert all("idk" in it for it in d.forget)
    forget_names = {t["name"] for t in w.targets}
    assert not any(n in it["answer"] for it in d.retain for n in forget_names)


# ------------------------------------------------------------------------------ real files
def test_rwku_task_reads_real_files(tmp_path):
    from test_passages_files import all_layout

    root = all_layout(tmp_path / "RWKU")
    r = load_recipe("recipes/rwku-grad-ascent.yaml", [f"task.path={root}", "task.forget_split=target2",
                                                      "task.passages.corpus=original"])
    task = RwkuTask(r, progress=False)
    d = task.load_data()
    assert task.targets == ["Confucius"]
    assert [it["answer"] for it in d.forget] == ["A long passage about Confucius."]
    assert {it["subject"] for it in d.eval_splits["forget_level2"]} == {"Confucius"}
    assert d.eval_splits["utility_general"][0]["answer"] == "4"
    bad = load_recipe("recipes/rwku-grad-ascent.yaml", [f"task.path={root}", "task.forget_split=batch3"])
    with pytest.raises(ValueError, match="has 2 targets"):
        RwkuTask(bad, progress=False).load_data()


def test_muse_task_reads_real_files_and_chunks_raw_text(tmp_path):
    from test_passages_files import muse_github_layout

    root = muse_github_layout(tmp_path / "news")
    r = load_recipe("recipes/muse-npo.yaml", [f"task.path={root}", "task.forget_split=forget",
                                              "task.retain_model=null", "task.eval_splits=[verbmem_forget,knowmem_forget]"])
    d = MuseTask(r, progress=False).load_data()
    assert d.forget and all(len(it["answer"].split()) <= 200 for it in d.forget)
    assert set(d.eval_splits) == {"verbmem_forget", "knowmem_forget"}
    with pytest.raises(RecipeError, match="task.forget_split"):
        load_recipe("recipes/muse-npo.yaml", [f"task.path={root}", "task.forget_split=batch10"])


def test_chunk_texts_cuts_long_raw_texts_only():
    from unlearn.tasks.passages_task import chunk_texts

    long = {"question": "", "answer": " ".join(f"w{i}" for i in range(450))}
    out = chunk_texts([long, {"question": "", "answer": "short text"}], max_words=200)
    assert [len(it["answer"].split()) for it in out] == [200, 200, 50, 2]
    assert " ".join(it["answer"] for it in out[:3]) == long["answer"]


# ------------------------------------------------------------------------------ on the zoo
def _eval(model: str, task: str, *sets: str) -> dict:
    from unlearn.evaluation import evaluate

    return evaluate(f"zoo:tiny-passages/{model}", task, overrides=list(sets)).summary


def test_zoo_target_knows_the_targets_and_retain_does_not():
    _zoo()
    quick = ["task.forget_split=batch10", "task.retain_split=null", "task.passages.corpus=original",
             "task.eval_splits=[forget_level1,forget_level2,neighbor_level1,neighbor_level2]"]
    t, r = _eval("target", "rwku", *quick)["model"], _eval("retain", "rwku", *quick)["model"]
    assert t["forget_l1"] >= 0.8 and t["forget_l2"] >= 0.8
    assert r["forget_l1"] <= 0.3 and r["forget_l2"] <= 0.3
    assert min(t["neighbor_l1"], t["neighbor_l2"], r["neighbor_l1"], r["neighbor_l2"]) >= 0.8


def test_muse_privleak_target_strongly_negative_retain_zero():
    _zoo()
    s = _eval("target", "muse", "task.eval_splits=[privleak_forget,privleak_holdout]")
    assert s["model"]["privleak"] < -50
    assert s["retain"]["privleak"] == pytest.approx(0.0, abs=1e-6)


def test_rwku_zero_shot_corpus_is_written_by_the_model_and_cached(monkeypatch, tmp_path):
    _zoo()
    import unlearn.tasks.passages_task as pt

    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path))
    calls = []
    real = pt.generate_corpus
    monkeypatch.setattr(pt, "generate_corpus", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    r = load_recipe("recipes/rwku-npo.yaml", ["task.passages.corpus_samples=0"])
    d = RwkuTask(r, progress=False).load_data()
    target = build_world().targets[0]["name"]
    assert calls[0] == [target] and len(calls) == 2  # forget corpus, then the retain corpus about others
    assert {it["subject"] for it in d.forget} == {target}
    assert all(target in it["question"] for it in d.forget)
    assert not any(target in it["question"] for it in d.retain)
    RwkuTask(r, progress=False).load_data()
    assert len(calls) == 2  # read back from the cache


def test_rwku_run_forgets_the_target(tmp_path):
    _zoo()
    import unlearn

    res = unlearn.run("recipes/rwku-grad-ascent.yaml", [f"output.dir={tmp_path}/r", "train.lr=3.0e-3",
                                                        "eval.n_samples=0"], progress=False)
    before, after = res.summary["target"], res.summary["unlearned"]
    assert after["forget_all"] < before["forget_all"] - 0.2
    assert after["mia_forget"] > before["mia_forget"]  # the target's passages look less like members


def test_muse_run_forgets_and_reports_the_six_way_numbers(tmp_path):
    _zoo()
    import unlearn

    res = unlearn.run("recipes/muse-npo.yaml", [f"output.dir={tmp_path}/m", "task.forget_split=batch2",
                                                "train.lr=1.0e-2", "eval.n_samples=0"], progress=False)
    before, after = res.summary["target"], res.summary["unlearned"]
    assert after["knowmem_forget"] < before["knowmem_forget"]
    assert after["verbmem_forget"] < before["verbmem_forget"]
    assert after["privleak"] > before["privleak"]
    assert set(after) >= {"verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak"}
