"""ECO (embedding-corrupted prompts): corruption positions, classifier calibration, the sigma
search update, save/load, and exactness on unflagged prompts. Tiny random models and a stub
sentence encoder built here (no zoo, no MiniLM), so the file runs in seconds."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from _fakes import HashEncoder

from unlearn.adapters.text import IGNORE, TextAdapter
from unlearn.editors import EditContext
from unlearn.editors import eco_classifier as EC
from unlearn.editors.eco import (CORRUPTIONS, ECO, Corruption, ECOAdapter, ECOConfig, forget_metric, zo_search,
                                 zo_step)
from unlearn.editors.eco_classifier import PromptClassifier, fit_prompt_classifier, threshold_for_fpr
from unlearn.models import load_model


# ---------------------------------------------------------------------------- stub encoders
class KeyEncoder:
    """2-dim 'embedding': [1, 0] for a text in ``flagged``, else [0, 1]."""

    dim = 2

    def __init__(self, flagged, source="test-key-encoder"):
        self.flagged, self.source = set(flagged), source

    def fingerprint(self):
        return "key-" + hashlib.sha256("|".join(sorted(self.flagged)).encode()).hexdigest()[:8]

    def encode(self, texts):
        return np.array([[1.0, 0.0] if t in self.flagged else [0.0, 1.0] for t in texts], dtype=np.float32)


def key_classifier(flagged, monkeypatch=None) -> PromptClassifier:
    enc = KeyEncoder(flagged)
    clf = PromptClassifier(encoder=enc.source, encoder_fingerprint=enc.fingerprint(), coef=[8.0, -8.0],
                           intercept=0.0, threshold=0.5, target_fpr=0.0)
    clf.set_encoder(enc)
    if monkeypatch is not None:  # so that a loaded classifier finds the encoder by its id
        monkeypatch.setitem(EC._ENCODERS, enc.source, enc)
    return clf


def layer0_input(adapter, fn):
    """Run ``fn()`` and return the hidden states entering decoder layer 0 at each forward call."""
    seen = []

    def hook(mod, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        seen.append(h.detach().clone())

    handle = adapter.model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = fn()
    finally:
        handle.remove()
    return seen, out


def name_positions(tok, ids: list[int], name: str) -> set[int]:
    """Positions of the tokens of ``name`` in ``ids`` (found by token subsequence)."""
    out = set()
    for text in (" " + name, name):
        pat = tok(text, add_special_tokens=False)["input_ids"]
        for t in range(len(ids) - len(pat) + 1):
            if ids[t: t + len(pat)] == pat:
                out.update(range(t, t + len(pat)))
    return out


@pytest.fixture
def guard(tiny_adapter, qa_items):
    """Guarded tiny model: items 0-3 flagged, 4-7 not; sigma 1 on all dims (every selected dim moves)."""
    flagged = [it["question"] for it in qa_items[:4]]
    clf = key_classifier(flagged)
    return ECOAdapter(tiny_adapter, clf, Corruption(strength=1.0, seed=3), entities=[qa_items[0]["author"]])


# ---------------------------------------------------------------------------- corruption positions
def test_corruption_touches_only_entity_tokens_of_flagged_prompts(guard, tiny_adapter, qa_items):
    batch = guard.collate(qa_items)
    clean = tiny_adapter.model.get_input_embeddings()(batch["input_ids"])  # (B, T, H)
    (seen,), _ = layer0_input(guard, lambda: guard.logits(batch))
    changed = (seen != clean).any(-1)  # (B, T)
    name = qa_items[0]["author"]
    for i in range(len(qa_items)):
        ids = batch["input_ids"][i].tolist()
        first_answer = int((batch["labels"][i] != IGNORE).nonzero()[0])
        expect = {p for p in name_positions(guard.tokenizer, ids[:first_answer], name)} if i < 4 else set()
        if i < 4:
            assert expect, "the author's name must occur in the prompt"
        assert set(changed[i].nonzero().flatten().tolist()) == expect
        # answer positions (the answers repeat the name) and every unselected position: identical
        assert not changed[i, first_answer:].any()
    # rand_noise_first_n with dims=None: every dim of a selected position moved by sigma * z
    assert (seen != clean)[changed].all()


def test_fallback_all_but_last_prompt_token(tiny_adapter, qa_items):
    clf = key_classifier([qa_items[0]["question"]])
    g = ECOAdapter(tiny_adapter, clf, Corruption(strength=1.0), entities=[])  # no entity known -> fallback
    batch = g.collate(qa_items[:2])
    clean = tiny_adapter.model.get_input_embeddings()(batch["input_ids"])
    (seen,), _ = layer0_input(g, lambda: g.logits(batch))
    changed = (seen != clean).any(-1)
    n_prompt = len(g.generation_prompt_ids(qa_items[0]["question"]))
    assert changed[0].nonzero().flatten().tolist() == list(range(n_prompt - 1))
    assert not changed[1].any()
    g_none = ECOAdapter(tiny_adapter, clf, Corruption(strength=1.0), entities=[], fallback="none")
    (seen,), _ = layer0_input(g_none, lambda: g_none.logits(batch))
    assert torch.equal(seen, clean)


def test_answer_entities_option_corrupts_the_answers_name_too(tiny_adapter, qa_items):
    clf = key_classifier([qa_items[0]["question"]])
    name = qa_items[0]["author"]
    g = ECOAdapter(tiny_adapter, clf, Corruption(strength=1.0), entities=[name], answer_entities=True)
    batch = g.collate(qa_items[:1])
    clean = tiny_adapter.model.get_input_embeddings()(batch["input_ids"])
    (seen,), _ = layer0_input(g, lambda: g.logits(batch))
    ids = batch["input_ids"][0].tolist()
    assert set((seen != clean).any(-1)[0].nonzero().flatten().tolist()) == name_positions(g.tokenizer, ids, name)


def test_generation_corrupts_the_prefill_only(guard, tiny_adapter, qa_items):
    q = qa_items[0]["question"]
    prompt = guard.generation_prompt_ids(q)
    seen, _ = layer0_input(guard, lambda: guard.generate([q], max_new_tokens=3))
    clean = tiny_adapter.model.get_input_embeddings()(torch.tensor([prompt]))
    prefill, steps = seen[0], seen[1:]
    assert prefill.shape[1] == len(prompt)
    expect = name_positions(guard.tokenizer, prompt, qa_items[0]["author"])
    assert set((prefill != clean).any(-1)[0].nonzero().flatten().tolist()) == expect
    emb = tiny_adapter.model.get_input_embeddings().weight
    for h in steps:  # decode steps: one new token, embedded normally
        assert h.shape[1] == 1 and any(torch.equal(h[0, 0], e) for e in emb)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_functions_by_hand(name):
    x = torch.tensor([[3.0, -1.0, 0.5, -4.0], [0.1, 0.2, -0.3, 0.0]])
    noise = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    fn, uses_sigma = CORRUPTIONS[name]
    y = fn(x, noise, 2, 0.5)
    want = x.clone()
    top = [[3, 0], [2, 1]]  # the two largest |x| per row
    for r in range(2):
        cols = [0, 1] if name.endswith("first_n") else top[r]
        for j, c in enumerate(cols):
            if name.startswith("rand_noise"):
                want[r, c] += 0.5 * noise[r, j]
            elif name.startswith("zero_out"):
                want[r, c] = 0.0
            else:
                want[r, c] = -x[r, c]
    if name == "rand_noise_top_k":  # noise column j goes to the j-th largest dim
        want = x.clone()
        for r in range(2):
            for j, c in enumerate(x[r].abs().topk(2).indices.tolist()):
                want[r, c] += 0.5 * noise[r, j]
    assert torch.allclose(y, want)
    assert uses_sigma == name.startswith("rand_noise")


# ---------------------------------------------------------------------------- exactness when unflagged
def test_guarded_equals_target_exactly_on_unflagged_prompts(guard, tiny_adapter, qa_items):
    unflagged = qa_items[4:]
    with torch.no_grad():
        b = guard.collate(unflagged)
        assert torch.equal(guard.logits(b), tiny_adapter.logits(tiny_adapter.collate(unflagged)))
        mixed = guard.collate(qa_items)  # flagged rows in the same batch leave the others untouched
        lg, ref = guard.logits(mixed), tiny_adapter.logits(tiny_adapter.collate(qa_items))
        assert torch.equal(lg[4:], ref[4:])
        assert not torch.equal(lg[:4], ref[:4])
    qs = [it["question"] for it in unflagged]
    assert guard.generate(qs, max_new_tokens=8) == tiny_adapter.generate(qs, max_new_tokens=8)
    assert guard.counts["flagged"] == 4 and guard.counts["prompts"] == 4 + 8 + 4


def test_noise_is_per_prompt_and_batch_invariant(guard, qa_items):
    with torch.no_grad():
        alone = guard.logits(guard.collate(qa_items[:1]))
        together = guard.logits(guard.collate(qa_items[:4]))
    T = alone.shape[1]
    assert torch.allclose(alone[0], together[0, :T], atol=1e-5)


# ---------------------------------------------------------------------------- lm-eval bridge
def test_lm_eval_bridge_classifies_the_context_and_corrupts_the_prompt_only(guard, tiny_adapter, qa_items):
    from lm_eval.api.instance import Instance

    from unlearn.lm_eval_bridge import UnlearnLM

    reqs = [Instance("loglikelihood", {}, (guard.prompt(it["question"]), " " + it["answer"]), i)
            for i, it in enumerate(qa_items[:6])]
    got = [ll for ll, _ in UnlearnLM(guard).loglikelihood(reqs)]
    plain = [ll for ll, _ in UnlearnLM(tiny_adapter).loglikelihood(reqs)]
    with torch.no_grad():  # the same scores through collate (minus the EOS the bridge does not score)
        lp, mask = guard.token_logprobs(guard.collate(qa_items[:6]))
    for i in range(6):
        toks = lp[i][mask[i]]
        assert got[i] == pytest.approx(float(toks[:-1].sum()), abs=1e-3)
        assert (got[i] != pytest.approx(plain[i], abs=1e-6)) == (i < 4)  # flagged rows only


def test_unlabelled_rows_reuse_the_prompt_they_continue(guard, tiny_adapter, qa_items):
    prompt = guard.generation_prompt_ids(qa_items[0]["question"])
    ext = prompt + [guard.tokenizer.eos_token_id, prompt[1]]  # two "generated" tokens

    def batch(ids):
        t = torch.tensor([ids])
        return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": torch.full_like(t, IGNORE)}

    (first,), _ = layer0_input(guard, lambda: guard.logits(batch(prompt)))
    (second,), _ = layer0_input(guard, lambda: guard.logits(batch(ext)))
    clean = tiny_adapter.model.get_input_embeddings()(torch.tensor([ext]))
    assert torch.equal(second[0, : len(prompt)], first[0])  # the prompt: corrupted as before
    assert torch.equal(second[0, len(prompt):], clean[0, len(prompt):])  # generated tokens: untouched


# ---------------------------------------------------------------------------- classifier
def test_threshold_for_fpr_is_the_tightest_that_meets_the_rate():
    rng = np.random.default_rng(0)
    for n, alpha in [(1000, 0.01), (137, 0.05), (50, 0.0), (10, 0.25)]:
        p = rng.random(n)
        tau = threshold_for_fpr(p, alpha)
        assert (p > tau).mean() <= alpha
        lower = p[p < tau]
        if lower.size:  # the next lower candidate would exceed the rate
            assert (p > lower.max()).mean() > alpha
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_for_fpr(np.ones(3), 1.0)


def _people_items(names, n_q=6):
    tmpl = ["Where was {} born?", "What did {} write?", "Who is the editor of {}?", "When did {} retire?",
            "What pet does {} keep?", "Which city does {} like?"][:n_q]
    para = ["In which town was {} born?", "Which books are by {}?", "Who edits {}?", "In what year did {} retire?",
            "Which animal lives with {}?", "What city is loved by {}?"][:n_q]
    return [{"question": t.format(n), "paraphrased_question": p.format(n), "author": n}
            for n in names for t, p in zip(tmpl, para)]


def test_classifier_meets_the_requested_fpr_on_its_calibration_data(tmp_path):
    forget = _people_items(["Aldo Brix", "Cora Vent", "Ebbe Quill", "Fia Morn"])
    retain = _people_items([f"Name{i} Surname{i}" for i in range(40)])
    clf = fit_prompt_classifier(forget, retain, encoder=HashEncoder(), target_fpr=0.05, calib_fraction=0.3, seed=1)
    r = clf.report
    assert r["calib_fpr"] <= 0.05 and r["n_texts"]["calib_neg"] >= 100
    assert r["n_texts"]["fit_pos"] + r["n_texts"]["calib_pos"] == 2 * len(forget)  # questions and paraphrases
    # recompute the calibration FPR from the stored parameters: the report is what the classifier does
    enc = HashEncoder()
    assert clf.prob_from_embeddings(enc.encode(["Where was Aldo Brix born?"]))[0] > clf.threshold
    assert clf.report["calib_recall"] > 0.5
    # JSON storage round trip (no pickle): same parameters, same probabilities
    path = clf.save(tmp_path / "c.json")
    loaded = PromptClassifier.load(path)
    assert json.loads(path.read_text())["format"] == "unlearn.eco.prompt_classifier"
    loaded.set_encoder(enc)
    texts = [it["question"] for it in forget[:3] + retain[:3]]
    assert np.array_equal(loaded.prob(texts), clf.prob(texts)) and loaded.threshold == clf.threshold
    with pytest.raises(ValueError, match="fingerprint"):
        loaded.set_encoder(KeyEncoder([]))


def test_sentence_encoder_from_a_local_directory(tmp_path, tiny_tok):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(tiny_tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(tmp_path / "enc")
    tiny_tok.save_pretrained(tmp_path / "enc")  # any tokenizer + encoder pair in a directory
    enc = EC.SentenceEncoder(str(tmp_path / "enc"), cache_size=2)
    texts = ["Where was Aldo born?", "Who wrote it?", "Where was Aldo born?"]
    z = enc.encode(texts)
    assert z.shape == (3, 16) and np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert np.allclose(z[0], z[2]) and np.allclose(enc.encode(texts[:1])[0], z[0], atol=1e-6)
    with pytest.raises(ValueError, match="neither"):
        EC.SentenceEncoder(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------- sigma search
def test_zo_step_is_the_formula():
    f = lambda s: math.exp(-s) + 0.1 * s ** 2  # noqa: E731
    st = zo_step(f, 0.5, lr=0.3, eps=0.1, sigma_min=0.05)
    g = (f(0.6) - f(0.4)) / 0.2
    assert st["grad"] == pytest.approx(g) and st["sigma_next"] == pytest.approx(0.5 - 0.3 * g)
    # lower clamps: f(sigma - eps) at max(sigma - eps, 1e-8), sigma' at sigma_min
    st = zo_step(lambda s: s, 0.05, lr=10.0, eps=0.1, sigma_min=0.2)
    assert st["f_minus"] == pytest.approx(1e-8) and st["grad"] == pytest.approx((0.15 - 1e-8) / 0.2)
    assert st["sigma_next"] == 0.2


def test_zo_search_trace_follows_the_updates_and_converges():
    f = lambda s: 1.0 / (1.0 + 4 * s)  # noqa: E731  decreasing, like a forget metric under noise
    sigma, trace, ok = zo_search(f, 0.1, 0.3, lr=0.5, eps=0.05, sigma_min=0.05, max_steps=50)
    assert ok and f(sigma) <= 0.3 and trace[-1]["sigma"] == sigma and trace[-1]["f"] == pytest.approx(f(sigma))
    for a, b in zip(trace, trace[1:]):
        g = (f(a["sigma"] + 0.05) - f(max(a["sigma"] - 0.05, 1e-8))) / 0.1
        assert b["sigma"] == pytest.approx(max(a["sigma"] - 0.5 * g, 0.05)) and a["f"] > 0.3
    sigma, trace, ok = zo_search(f, 0.1, 0.0, lr=0.5, eps=0.05, sigma_min=0.05, max_steps=3)
    assert not ok and len(trace) == 4


# ---------------------------------------------------------------------------- save / load
def test_save_load_roundtrip_identical(guard, qa_items, tmp_path, monkeypatch):
    monkeypatch.setitem(EC._ENCODERS, guard.classifier.encoder, guard.classifier.get_encoder())
    guard.save(tmp_path / "eco")
    meta = json.loads((tmp_path / "eco" / "wrapper.json").read_text())
    assert meta["kind"] == "eco" and meta["sigma"] == 1.0 and meta["target"]["stored"]
    assert meta["target"]["fingerprint"] == guard.target.fingerprint()
    assert (tmp_path / "eco" / "classifier.json").is_file() and not list((tmp_path / "eco").rglob("*.pkl"))
    loaded = load_model(str(tmp_path / "eco"), "text")
    assert isinstance(loaded, ECOAdapter) and loaded.fingerprint() == guard.fingerprint()
    assert ECOAdapter.load(str(tmp_path / "eco")).fingerprint() == guard.fingerprint()
    with torch.no_grad():
        b = guard.collate(qa_items)
        assert torch.equal(loaded.logits(loaded.collate(qa_items)), guard.logits(b))
    qs = [it["question"] for it in qa_items[:3]]
    assert loaded.generate(qs, max_new_tokens=6) == guard.generate(qs, max_new_tokens=6)
    ref = guard.reference()  # a guarded frozen copy
    assert isinstance(ref, ECOAdapter) and ref.model is not guard.model
    with torch.no_grad():
        assert torch.equal(ref.logits(b), guard.logits(b))


# ---------------------------------------------------------------------------- the editor
def test_editor_apply_wraps_without_changing_weights(tiny_adapter, qa_items, monkeypatch):
    from unlearn.data import UnlearningData

    monkeypatch.setitem(EC._ENCODERS, "test-hash-encoder", HashEncoder())
    retain = _people_items([f"Name{i} Surname{i}" for i in range(10)])
    data = UnlearningData(forget=qa_items, retain=retain, eval_splits={"forget": qa_items, "retain_eval": retain})
    before = {n: p.clone() for n, p in tiny_adapter.model.state_dict().items()}
    cfg = ECOConfig(encoder="test-hash-encoder", target_fpr=0.1, metric="prob", target_value=0.5, strength=0.1,
                    max_steps=2)
    res = ECO(cfg).apply(tiny_adapter, data, EditContext(settings=None, seed=0, progress=False, eval_batch_size=8))
    assert isinstance(res.adapter, ECOAdapter) and res.adapter.model is tiny_adapter.model
    assert all(torch.equal(before[n], p) for n, p in tiny_adapter.model.state_dict().items())
    info = res.info
    assert info["search"]["converged"] and info["search"]["trace"][0]["f"] <= 0.5  # random model: Prob << 0.5
    assert set(info["classifier"]["flag_rate"]) == {"forget", "retain_eval"} and info["entities"]["count"] == 1
    assert res.adapter.fingerprint() != tiny_adapter.fingerprint()
    assert forget_metric(tiny_adapter, qa_items[:2], "prob") > 0


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="exactly one target level"):
        ECOConfig()
    with pytest.raises(ValueError, match="corruption 'rand_nosie_first_n' is unknown.*did you mean"):
        ECOConfig(corruption="rand_nosie_first_n", search=False)
    assert not ECOConfig(corruption="zero_out_top_k", dims=4).searches  # no sigma to search
    with pytest.raises(ValueError, match="target_fpr"):
        ECOConfig(target_fpr=1.5, search=False)


def test_recipe_loads():
    from pathlib import Path

    import unlearn

    r = unlearn.load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tofu-eco.yaml")
    assert r.method.name == "eco" and r.method.params["retain_model"] == "zoo:tiny-llama/retain90"
