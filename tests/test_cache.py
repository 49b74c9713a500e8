"""The evaluation cache: keyed on everything that changes a result; a bad entry is recomputed."""

from __future__ import annotations

import json

import pytest

from unlearn.adapters.text import TextAdapter
from unlearn.evaluators import cache as eval_cache
from unlearn.evaluators import tofu_suite


@pytest.fixture
def other_tokenizer(tiny_qa):
    """A tokenizer of the same size (the same weights fit it) trained on other text: other ids."""
    from unlearn.zoo.models import train_tokenizer

    texts = [f"{q['answer']} || {q['question']}"[::-1] for q in tiny_qa]
    return train_tokenizer(texts, vocab_size=300)


def _splits(tiny_qa):
    return {"retain_eval": tiny_qa[8:12]}


def test_same_weights_other_tokenizer_is_another_key(tiny_adapter, other_tokenizer, tiny_qa, tmp_path):
    other = TextAdapter(tiny_adapter.model, other_tokenizer, source="<other-tok>")
    assert other.fingerprint() == tiny_adapter.fingerprint()  # the weights are the very same
    assert other.identity()["tokenizer"] != tiny_adapter.identity()["tokenizer"]
    kw = dict(batch_size=4, max_new_tokens=4, progress=False, cache_dir=tmp_path)
    first = tofu_suite.evaluate(tiny_adapter, _splits(tiny_qa), **kw)
    cached_other = tofu_suite.evaluate(other, _splits(tiny_qa), **kw)
    fresh_other = tofu_suite.evaluate(other, _splits(tiny_qa), **{**kw, "cache_dir": None})
    prob = lambda r: r["splits"]["retain_eval"]["metrics"]["prob"]["value"]  # noqa: E731
    assert prob(cached_other) == pytest.approx(prob(fresh_other))
    assert prob(cached_other) != pytest.approx(prob(first))  # the stale answer would be this one
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_tokenisation_mode_and_prompt_are_part_of_the_key(tiny_adapter):
    base = tiny_adapter.identity()
    tiny_adapter.tokenization = "reference"
    assert tiny_adapter.identity() != base
    tiny_adapter.tokenization = "split"
    tiny_adapter.prompt_template = "Q: {question}\nA:"
    assert tiny_adapter.identity() != base
    key = lambda ident: eval_cache.cache_key({"model": ident}, {"a": [{"question": "q", "answer": "a"}]})  # noqa: E731
    assert key(tiny_adapter.identity()) != key(base)


def test_library_versions_are_part_of_the_key(monkeypatch):
    parts, splits = {"model": {"weights": "x"}}, {"a": [{"question": "q", "answer": "a"}]}
    k = eval_cache.cache_key(parts, splits)
    monkeypatch.setattr(eval_cache, "library_versions", lambda *libs: {"torch": "0.0-other"})
    assert eval_cache.cache_key(parts, splits) != k


@pytest.mark.parametrize("content", ["", '{"splits": {"forg', "[]", "\xff\xfe"])
def test_a_corrupt_entry_is_discarded_with_a_warning_and_recomputed(tmp_path, content):
    parts, splits = {"model": {"weights": "x"}}, {"a": [{"question": "q", "answer": "a"}]}
    path = tmp_path / f"{eval_cache.cache_key(parts, splits)}.json"
    path.write_bytes(content.encode("latin-1"))
    calls = []
    with pytest.warns(RuntimeWarning, match=f"discarded the unreadable evaluation cache entry {path}"):
        res = eval_cache.cached_result(tmp_path, parts, splits, lambda: calls.append(1) or {"v": 1.5})
    assert res == {"v": 1.5} and calls == [1]
    assert json.loads(path.read_text()) == {"v": 1.5}  # the entry is good again: the next call is a hit
    assert eval_cache.cached_result(tmp_path, parts, splits, lambda: calls.append(1) or {"v": 0}) == {"v": 1.5}
    assert calls == [1]
