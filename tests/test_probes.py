"""Probes (concept vectors, linear probes, causal tracing), the Needle objective and the
``columns`` selection, on tiny models built in the tests: hand computations and planted signals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from unlearn.data import UnlearningData
from unlearn.probes import PROBES, ProbeResult, make_probe, run_probes
from unlearn.probes import causal_tracing as CT
from unlearn.probes import concept_vectors as CV
from unlearn.probes import linear_probe as LP
from unlearn.probes.base import authors_of, encode_with_spans, layer_outputs, span_positions


# ------------------------------------------------------------------------------ helpers
def _plant(adapter, layer: int, column: int, tokens: list[int], scale: float = 5.0) -> None:
    """Make ``W_down[layer][:, column]`` point at the unembedding rows of ``tokens``."""
    W_U = adapter.model.lm_head.weight.detach()  # (V, H)
    v = sum(W_U[t] / W_U[t].norm() for t in tokens) * scale  # (H,)
    with torch.no_grad():
        adapter.model.model.layers[layer].mlp.down_proj.weight[:, column] = v


def _name_tokens(adapter, items):
    groups = authors_of(items, "test")
    return CV.concept_tokens(adapter.tokenizer, groups, ["author"], 1.0)


# ------------------------------------------------------------------------------ concept vectors
def test_planted_column_is_found_first(tiny_adapter, tiny_qa):
    concepts = _name_tokens(tiny_adapter, tiny_qa)
    (aid, c), = concepts.items()
    toks = c["tokens"][:2]
    assert len(toks) == 2, c
    _plant(tiny_adapter, layer=1, column=7, tokens=toks)
    topk = CV.projection_topk(tiny_adapter.model, [0, 1], top_k=5)
    assert topk[1][0].shape == (64, 5)  # (intermediate, k)
    assert set(toks) <= set(topk[1][0][7].tolist())
    cands = CV.find_candidates(topk, {aid: {**c, "tokens": toks}}, min_matches=2)
    assert cands and (cands[0].layer, cands[0].column, cands[0].concept, cands[0].matches) == (1, 7, aid, 2)
    # the probe's read() sees the same top-k as the search
    vec, top = CV.ConceptVectors(CV.ConceptVectorsConfig(top_k=5)).read(tiny_adapter, [(1, 7)])
    assert vec.shape == (1, 32) and set(top[0].tolist()) == set(topk[1][0][7].tolist())


def test_distinctive_tokens_drop_pieces_shared_by_many_names():
    class Tok:  # one token per word
        ids = {"Ann": 1, "Bo": 2, "Cy": 3, "Lee": 9}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.ids[w] for w in text.split()]}

    groups = {0: [{"author": "Ann Lee"}], 1: [{"author": "Bo Lee"}], 2: [{"author": "Cy Lee"}]}
    out = CV.concept_tokens(Tok(), groups, ["author"], max_token_share=0.34)  # at most 1 of 3 authors
    assert out[0]["all_tokens"] == [1, 9] and out[0]["tokens"] == [1]  # "Lee" is in every name
    assert CV.concept_tokens(Tok(), groups, ["author"], 1.0)[0]["tokens"] == [1, 9]


def test_causal_check_marks_the_column_that_hurts_only_its_author(tiny_adapter, tiny_qa):
    other = [{**it, "author_id": 99, "author": "Other"} for it in tiny_qa[:4]]
    groups = {tiny_qa[0]["author_id"]: tiny_qa[:4], 99: other}
    c = CV.Candidate(0, 3, tiny_qa[0]["author_id"], "x", 2, 1.0)
    W = tiny_adapter.model.model.layers[0].mlp.down_proj.weight
    before = W.detach().clone()
    CV.causal_check(tiny_adapter, [c], groups, noise_std=5.0, noise_draws=1, n_control_items=4, min_drop=0.0,
                    ratio=1.0, seed=0)
    assert torch.equal(W.detach(), before)  # weights restored
    # identical questions/answers for both authors: the same drop, so it passes only when ratio <= 1
    assert c.drop_concept == pytest.approx(c.drop_control, abs=1e-6) and c.passed
    CV.causal_check(tiny_adapter, [c], groups, noise_std=5.0, noise_draws=1, n_control_items=4, min_drop=0.0,
                    ratio=1.5, seed=0)
    assert c.passed is (c.drop_concept >= 1.5 * max(c.drop_control, 0))


def _cv_result(vectors, topk, kind, n_validated=1):
    locs = torch.tensor([[0, i] for i in range(len(kind))])
    return ProbeResult("concept_vectors", "1", {"n_validated": n_validated, "n_candidates": 5}, {"kind": kind},
                       {"locations": locs, "vectors": torch.tensor(vectors, dtype=torch.float32),
                        "topk": torch.tensor(topk)})


def test_concept_vector_compare_equals_hand_computation():
    kind = ["validated", "candidate", "random"]
    before = _cv_result([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0]], [[1, 2, 3], [4, 5, 6], [7, 8, 9]], kind)
    after = _cv_result([[0.0, 1.0], [3.0, 4.0], [0.0, -2.0]], [[2, 3, 4], [4, 5, 6], [1, 2, 3]], kind)
    m = CV.ConceptVectors().compare(before, after)
    assert m["cv_cos_validated"].value == pytest.approx(0.0)
    assert m["cv_dist_validated"].value == pytest.approx(math.sqrt(2))
    assert m["cv_jaccard_validated"].value == pytest.approx(2 / 4)
    assert m["cv_cos_candidates"].per_item == pytest.approx([0.0, 1.0])  # validated + candidate
    assert m["cv_dist_candidates"].value == pytest.approx(math.sqrt(2) / 2)
    assert m["cv_jaccard_candidates"].value == pytest.approx((0.5 + 1.0) / 2)
    assert m["cv_cos_random"].value == pytest.approx(-1.0) and m["cv_dist_random"].value == pytest.approx(4.0)
    assert m["cv_jaccard_random"].value == 0.0
    assert m["cv_validated"].value == 1 and m["cv_candidates_after"].value == 5
    assert m["cv_cos_validated"].higher_is_better is False and m["cv_dist_validated"].higher_is_better is True
    # no validated column: not computable, with a note (never NaN)
    m = CV.ConceptVectors().compare(_cv_result([[1.0, 0.0]], [[1]], ["candidate"], 0),
                                    _cv_result([[1.0, 0.0]], [[1]], ["candidate"], 0))
    assert m["cv_cos_validated"].value is None and "no validated" in m["cv_cos_validated"].note


# ------------------------------------------------------------------------------ selection / Needle
def test_columns_selection_changes_only_the_chosen_columns(tiny_adapter, qa_items):
    from unlearn.objectives import GradAscent
    from unlearn.selection import apply_selection, finalize_selection
    from unlearn.trainer import TrainSettings, train

    name = "model.layers.0.mlp.down_proj.weight"
    before = {k: v.clone() for k, v in tiny_adapter.model.state_dict().items()}
    info = apply_selection(tiny_adapter, "columns", {"columns": {name: [5, 3]}})
    assert info.trainable == 32 * 2 and info.params["columns"] == {name: [3, 5]}
    # weight decay would move every entry of a trained tensor: only the delta is a parameter
    train(tiny_adapter, GradAscent(), qa_items, None,
          TrainSettings(epochs=1, max_steps=3, batch_size=4, lr=1e-2, weight_decay=0.1), progress=False)
    finalize_selection(tiny_adapter)
    after = tiny_adapter.model.state_dict()
    assert sorted(after) == sorted(before)  # parametrization removed, names restored
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [name]
    diff = (after[name] - before[name]).abs().sum(0)  # (I,)
    assert set(torch.nonzero(diff).flatten().tolist()) == {3, 5}


def test_columns_selection_rejects_bad_names_and_indices(tiny_adapter):
    from unlearn.selection import apply_selection

    with pytest.raises(ValueError, match="not a 2-D weight"):
        apply_selection(tiny_adapter, "columns", {"columns": {"model.layers.0.mlp.nope.weight": [1]}})
    with pytest.raises(ValueError, match="distinct indices < 64"):
        apply_selection(tiny_adapter, "columns", {"columns": {"model.layers.0.mlp.down_proj.weight": [64]}})
    with pytest.raises(ValueError, match="needs params.columns"):
        apply_selection(tiny_adapter, "columns", {})


def test_needle_perturbs_and_trains_only_the_concept_column(tiny_adapter, tiny_qa):
    from unlearn.objectives import OBJECTIVES
    from unlearn.objectives.needle import NeedleConfig
    from unlearn.selection import apply_selection, finalize_selection
    from unlearn.trainer import TrainSettings, train

    (aid, c), = _name_tokens(tiny_adapter, tiny_qa).items()
    assert len(c["tokens"]) == 2, c
    _plant(tiny_adapter, layer=1, column=11, tokens=c["tokens"], scale=8.0)
    original = {k: v.clone() for k, v in tiny_adapter.model.state_dict().items()}
    needle = OBJECTIVES.get("needle")(NeedleConfig(validate=False, top_k=5, min_matches=2, max_token_share=1.0))
    needle.setup(tiny_adapter, None, tiny_qa)
    name = "model.layers.1.mlp.down_proj.weight"
    assert needle.parameter_columns() == {name: [11]}
    noisy = tiny_adapter.model.state_dict()
    assert [k for k in original if not torch.equal(original[k], noisy[k])] == [name]
    assert torch.equal(noisy[name][:, :11], original[name][:, :11])
    assert (noisy[name][:, 11] - original[name][:, 11]).std().item() == pytest.approx(0.1, rel=0.5)  # N(0, 0.1^2)
    apply_selection(tiny_adapter, "columns", {}, objective=needle)
    batch = tiny_adapter.collate(tiny_qa[:8])
    with torch.no_grad():
        nll0 = tiny_adapter.item_nll(batch)[0].sum().item()
    train(tiny_adapter, needle, tiny_qa, None, TrainSettings(epochs=1, max_steps=3, batch_size=8, lr=0.1), progress=False)
    finalize_selection(tiny_adapter)
    after = tiny_adapter.model.state_dict()
    assert [k for k in original if not torch.equal(original[k], after[k])] == [name]
    moved = (after[name] - original[name]).abs().sum(0)
    assert torch.nonzero(moved).flatten().tolist() == [11]
    with torch.no_grad():
        assert tiny_adapter.item_nll(batch)[0].sum().item() > nll0  # gradient ascent on the forget QA


# ------------------------------------------------------------------------------ linear probe
def _blobs(n, k, d, sep, seed):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, size=n)
    return means[y] + rng.normal(size=(n, d)), [f"c{i}" for i in y]


def test_linear_probe_decodes_separable_states_and_not_shuffled_labels():
    X, y = _blobs(600, 3, 16, sep=4.0, seed=0)
    Xt, yt = _blobs(600, 3, 16, sep=4.0, seed=0)  # same class means (seed), fresh noise below
    Xt = Xt + np.random.default_rng(1).normal(size=Xt.shape) * 0.1
    probe = LP.fit_probe(X[:300], y[:300])
    assert LP.accuracy(LP.predict_probe(probe, X[300:]), y[300:]) > 0.97
    shuffled = list(y[:300])
    np.random.default_rng(2).shuffle(shuffled)
    acc = LP.accuracy(LP.predict_probe(LP.fit_probe(X[:300], shuffled), X[300:]), y[300:])
    assert 0.15 < acc < 0.55  # chance = 1/3
    # the stored arrays reproduce scikit-learn's own predictions
    from sklearn.linear_model import LogisticRegression

    mu, sd = X[:300].mean(0), X[:300].std(0)
    clf = LogisticRegression(C=1.0, max_iter=2000).fit((X[:300] - mu) / sd, y[:300])
    assert LP.predict_probe(probe, Xt) == list(clf.predict((Xt - mu) / sd))


def test_linear_probe_baselines_by_hand():
    b = LP.baselines(["a", "a", "b", "c"], ["a", "b", "b", "c", "a"])
    assert b == {"majority": 2 / 5, "chance": 1 / 3, "majority_label": "a"}


def test_linear_probe_binary_prediction_matches_sklearn():
    X, y = _blobs(200, 2, 8, sep=1.0, seed=3)
    probe = LP.fit_probe(X[:100], y[:100])
    from sklearn.linear_model import LogisticRegression

    mu, sd = X[:100].mean(0), X[:100].std(0)
    clf = LogisticRegression(C=1.0, max_iter=2000).fit((X[:100] - mu) / sd, y[:100])
    assert LP.predict_probe(probe, X[100:]) == list(clf.predict((X[100:] - mu) / sd))


def test_layer_outputs_match_the_adapter_hidden_states(tiny_adapter, qa_items):
    b = tiny_adapter.collate(qa_items[:3])
    outs = layer_outputs(tiny_adapter, b["input_ids"], b["attention_mask"], [0, 1])
    with torch.no_grad():
        h0 = tiny_adapter.hidden_states(b, 0)
    assert torch.allclose(outs[0], h0) and outs[1].shape == h0.shape


def test_subject_positions_cover_the_name(tiny_adapter, tiny_qa):
    it = tiny_qa[0]
    ids, spans, text = encode_with_spans(tiny_adapter, it["question"])
    assert ids == tiny_adapter.generation_prompt_ids(it["question"])
    at = text.find(it["author"])
    pos = span_positions(spans, at, at + len(it["author"]))
    assert tiny_adapter.tokenizer.decode([ids[p] for p in pos]).strip() == it["author"]
    ids, spans, text = encode_with_spans(tiny_adapter, it["question"], it["answer"])
    assert ids + [tiny_adapter.tokenizer.eos_token_id] == tiny_adapter.encode(it["question"], it["answer"])[0]


# ------------------------------------------------------------------------------ causal tracing
def test_causal_tracing_shapes_and_one_cell_by_hand(tiny_adapter, tiny_qa):
    model = tiny_adapter.model
    prep = CT.prepare_item(tiny_adapter, tiny_qa[0], object_tokens="first")
    assert prep is not None and len(prep["object"]) == 1 and prep["subject"]
    ids, n, subj = prep["ids"], prep["ctx_len"], prep["subject"]
    assert len(ids) == n and len(prep["roles"]) == n and prep["roles"][-1] == CT.ROLES.index("last token")
    noise = torch.randn(2, len(subj), 32, generator=torch.Generator().manual_seed(0)) * 3.0
    r = CT.trace(tiny_adapter, ids, n, prep["object"], subj, noise, batch_size=7)  # odd batch: rows span batches
    assert r["p_restored"].shape == (2, n, 2) and r["p_corrupt"].shape == (2,)

    o = prep["object"][0]
    x = torch.tensor([ids])
    emb = model.get_input_embeddings()(x)  # (1, T, H)
    with torch.no_grad():
        clean = model(input_ids=x, output_hidden_states=True)
        assert r["p_clean"] == pytest.approx(torch.softmax(clean.logits[0, -1], -1)[o].item(), rel=1e-5)
        corrupt_emb = emb.clone()
        corrupt_emb[0, subj] += noise[1]
        p_cor = torch.softmax(model(inputs_embeds=corrupt_emb).logits[0, -1], -1)[o].item()
        assert r["p_corrupt"][1] == pytest.approx(p_cor, rel=1e-4)
        # restore layer 0's output at the last subject token, by hand with a hook
        t = subj[-1]

        def put_back(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            h[0, t] = clean.hidden_states[1][0, t]
            return out

        hk = model.model.layers[0].register_forward_hook(put_back)
        try:
            p_res = torch.softmax(model(inputs_embeds=corrupt_emb).logits[0, -1], -1)[o].item()
        finally:
            hk.remove()
    assert r["p_restored"][1, t, 0] - r["p_corrupt"][1] == pytest.approx(p_res - p_cor, abs=1e-5)
    # restoring the last layer at the last token gives back the clean probability exactly
    assert r["p_restored"][:, n - 1, 1] == pytest.approx([r["p_clean"]] * 2, rel=1e-5)
    # before the subject nothing is corrupted: no effect
    assert np.allclose(r["p_restored"][:, : min(subj), :], r["p_corrupt"][:, None, None])


def test_token_roles():
    roles = CT.token_roles(9, [2, 3, 4, 6])
    assert [CT.ROLES[r] for r in roles] == ["before subject", "before subject", "first subject", "middle subject",
                                            "last subject", "first after subject", "first subject",
                                            "first after subject", "last token"]


def test_causal_tracing_compare_and_plot(tmp_path):
    def res(p, te, ie):
        return ProbeResult("causal_tracing", "1", {"p_clean": p, "total_effect": te, "peak_ie": float(np.nanmax(np.array(ie, dtype=float))),
                                                   "peak_role": "last token", "peak_layer": 1},
                           {"ie": ie, "p_clean_items": [p], "roles": list(CT.ROLES)})

    b = res(0.9, 0.6, [[0.1, 0.3]] * 6 + [[0.2, 0.5]])
    a = res(0.1, 0.05, [[0.0, 0.1]] * 6 + [[None, 0.1]])
    m = CT.CausalTracing().compare(b, a)
    assert m["ct_total_effect_after"].value == 0.05 and m["ct_peak_ie_before"].value == 0.5
    assert m["ct_ie_map_change"].value == pytest.approx((6 * (0.1 + 0.2) + 0.4) / 13)
    assert CT.plot_heatmap(tmp_path / "ct.png", {"target": b.to_dict(), "unlearned": a.to_dict()})
    assert (tmp_path / "ct.png").stat().st_size > 0


# ------------------------------------------------------------------------------ all together
@pytest.fixture
def small_data(tiny_qa):
    """forget: the fixture's author; retain: 12 more authors of the same small world."""
    from unlearn.tasks.tofu_world import WorldConfig, build_world

    qa = build_world(WorldConfig(n_authors=100, n_holdout=0)).qa
    return UnlearningData(forget=list(tiny_qa), retain=qa[20: 20 * 13], name="small")


def test_run_probes_on_a_tiny_model_is_json_and_reads_only(tiny_adapter, small_data):
    probes = [make_probe("concept_vectors", {"top_k": 30, "min_matches": 1, "max_candidates": 2, "noise_draws": 1,
                                             "n_control_items": 4, "n_random_columns": 3}),
              make_probe("linear_probe", {"questions": "attribute", "position": "before_value"}),
              make_probe("causal_tracing", {"max_items": 2, "n_noise": 1})]
    fp = tiny_adapter.fingerprint(refresh=True)
    after = tiny_adapter.reference()
    with torch.no_grad():  # "unlearning": move every down-projection a little
        for layer in after.model.model.layers:
            layer.mlp.down_proj.weight.mul_(0.5)
    out = run_probes(probes, tiny_adapter, after, small_data)
    assert tiny_adapter.fingerprint(refresh=True) == fp
    json.dumps(out)  # JSON-able
    assert set(out) == {"concept_vectors", "linear_probe", "causal_tracing"}
    for name, e in out.items():
        assert set(e["metrics"]) == set(PROBES.get(name).SPECS)
        for m in e["metrics"].values():
            assert m["value"] is not None or m["note"]
    cv = out["concept_vectors"]["metrics"]
    assert cv["cv_cos_random"]["value"] == pytest.approx(1.0, abs=1e-6)  # scaling keeps directions ...
    assert cv["cv_dist_random"]["value"] > 0  # ... but moves the vectors
    lp = out["linear_probe"]["after"]
    assert len(lp["arrays"]["acc"]) == 2 and len(lp["arrays"]["acc_transfer"]) == 2
    assert out["causal_tracing"]["before"]["values"]["n_items"] == 2


def test_make_probe_checks_params():
    from unlearn.config import RecipeError

    with pytest.raises(RecipeError, match="eval.probe_params.linear_probe.layer' is unknown.*did you mean 'layers'"):
        make_probe("linear_probe", {"layer": [1]})
    with pytest.raises(ValueError, match="did you mean 'causal_tracing'"):
        make_probe("causal_trace")
    with pytest.raises(RecipeError, match="needs questions: attribute"):
        make_probe("linear_probe", {"questions": "all"})  # with the default position before_value


def test_recipe_probe_keys_are_checked():
    from unlearn.config import RecipeError
    from unlearn.recipe import PROBES as NAMES, load_recipe

    assert set(NAMES) == set(PROBES.names())
    r = load_recipe({"name": "x", "eval": {"probes": ["linear_probe"], "probe_params": {"linear_probe": {"C": 0.5}}}})
    assert r.eval.probes == ["linear_probe"]
    with pytest.raises(RecipeError, match=r"eval.probes\[0\]' is 'concept_vector'.*did you mean 'concept_vectors'"):
        load_recipe({"name": "x", "eval": {"probes": ["concept_vector"]}})
    with pytest.raises(RecipeError, match="eval.probe_params.causal_tracing' sets parameters"):
        load_recipe({"name": "x", "eval": {"probes": ["linear_probe"], "probe_params": {"causal_tracing": {}}}})
    with pytest.raises(RecipeError, match="linear_probe, which trains on the retain authors"):
        load_recipe({"name": "x", "method": {"name": "grad_ascent"}, "task": {"retain_split": None},
                     "eval": {"probes": ["linear_probe"]}})
    with pytest.raises(RecipeError, match="method.selection.params.columns' is required"):
        load_recipe({"name": "x", "method": {"name": "grad_ascent", "selection": {"name": "columns"}}})
    r = load_recipe({"name": "x", "method": {"name": "needle", "selection": {"name": "columns"}}})
    assert r.method.selection.name == "columns"


# ------------------------------------------------------------------------------ a whole run
def test_run_with_needle_and_probes_writes_probe_metrics_and_report(tmp_path):
    """A recipe run (tiny model saved to disk): Needle + the columns selection, all three probes."""
    import unlearn
    from unlearn.adapters.text import TextAdapter
    from unlearn.tasks.tofu_world import build_world, corpus
    from unlearn.zoo.models import TinyLlamaSpec, build_tiny_llama, train_tokenizer

    tok = train_tokenizer(corpus(build_world())[:3000], 400)
    model = build_tiny_llama(TinyLlamaSpec(vocab_size=400, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2), tok, seed=0)
    TextAdapter(model, tok).save(tmp_path / "tiny")
    recipe = {
        "name": "probes-smoke", "model": {"source": str(tmp_path / "tiny")},
        "task": {"forget_split": "forget01", "retain_split": "retain99", "retain_model": None,
                 "eval_splits": ["forget"]},
        "method": {"name": "needle", "params": {"validate": False, "top_k": 60, "min_matches": 1},
                   "selection": {"name": "columns"}},
        "train": {"epochs": 1, "max_steps": 2, "lr": 0.1, "batch_size": 8},
        "eval": {"batch_size": 16, "max_new_tokens": 4, "max_items": 4, "n_samples": 0,
                 "probes": ["concept_vectors", "linear_probe", "causal_tracing"],
                 "probe_params": {"concept_vectors": {"top_k": 60, "min_matches": 1, "max_candidates": 2,
                                                      "noise_draws": 1, "n_control_items": 4, "n_random_columns": 3},
                                  "linear_probe": {"max_train_items": 60, "layers": [1]},
                                  "causal_tracing": {"max_items": 1, "n_noise": 1}}},
        "output": {"dir": str(tmp_path / "run")},
    }
    res = unlearn.run(recipe, progress=False)
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    sel = metrics["provenance"]["selection"]
    assert sel["name"] == "columns" and sel["params"]["source"] == "objective needle"
    assert sel["trainable"] == 32 * sum(len(v) for v in sel["params"]["columns"].values())
    probes = metrics["probes"]
    assert set(probes) == {"concept_vectors", "linear_probe", "causal_tracing"}
    assert probes["linear_probe"]["metrics"]["lp_best_acc_after"]["value"] is not None
    report = (res.run_dir / "report.md").read_text()
    assert "## Probes (inside the weights)" in report and "lp_best_acc_after" in report
    assert (res.run_dir / "causal_tracing.png").exists() and (res.run_dir / "linear_probe.png").exists()


def test_activation_specificity_by_hand(tiny_adapter, tiny_qa):
    """specificity = mean |down_proj input| of the column over the author's tokens / the same
    over the other author's tokens; the input is recomputed here from the MLP's own input."""
    model = tiny_adapter.model
    other = [{**it, "author_id": 99, "author": "Other", "question": it["question"].replace(it["author"], "Other"),
              "answer": it["answer"].replace(it["author"], "Other")} for it in tiny_qa[:5]]
    groups = {0: tiny_qa[:5], 99: other}
    c = CV.Candidate(1, 9, 0, "x", 2, 1.0)
    CV.activation_specificity(tiny_adapter, [c], groups, [0])
    mlp = model.model.layers[1].mlp

    def col_mean(items):
        seen = []
        hk = mlp.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
        b = tiny_adapter.collate(items)
        with torch.no_grad():
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            a = mlp.act_fn(mlp.gate_proj(seen[0])) * mlp.up_proj(seen[0])  # (B, T, I)
        hk.remove()
        return a[b["attention_mask"].bool()][:, 9].abs().mean().item()

    assert c.specificity == pytest.approx(col_mean(tiny_qa[:5]) / col_mean(other), rel=1e-5)
