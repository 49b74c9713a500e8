"""TextAdapter: tokenisation and masking, teacher-forced scores, generation, save/load, sources.

All on the tiny 2-layer Llama built in ``conftest.py`` (no zoo checkpoint needed).
"""

from __future__ import annotations

import copy

import pytest
import torch

from unlearn.adapters.base import Adapter, ImageModel, TextModel
from unlearn.adapters.text import IGNORE, TextAdapter, resolve_source
from unlearn.models import load_model


def _prompt_ids(adapter, question, trailing_space=False):
    text = adapter.prompt(question) + (" " if trailing_space else "")
    return adapter.tokenizer(text, add_special_tokens=True)["input_ids"]


# -- tokenisation and masking -----------------------------------------------------------------
def test_split_mode_masks_exactly_the_prompt(tiny_adapter, qa_items):
    tok = tiny_adapter.tokenizer
    batch = tiny_adapter.collate(qa_items[:4])
    for i, it in enumerate(qa_items[:4]):
        n = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i, :n], batch["labels"][i, :n]
        p_ids = _prompt_ids(tiny_adapter, it["question"])
        assert ids[: len(p_ids)].tolist() == p_ids  # starts with BOS + the prompt
        assert p_ids[0] == tok.bos_token_id
        assert (labels[: len(p_ids)] == IGNORE).all()
        assert (labels[len(p_ids):] != IGNORE).all()  # every answer token and EOS is scored
        assert torch.equal(labels[len(p_ids):], ids[len(p_ids):])
        assert tok.decode(labels[labels != IGNORE]) == " " + it["answer"] + tok.eos_token


def test_reference_mode_masks_len_of_tokenized_prompt(tiny_adapter, qa_items):
    tok = tiny_adapter.tokenizer
    ref = TextAdapter(tiny_adapter.model, tok, tokenization="reference")
    batch = ref.collate(qa_items[:4])
    for i, it in enumerate(qa_items[:4]):
        n = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i, :n], batch["labels"][i, :n]
        prompt = ref.prompt(it["question"]) + " "
        full = tok(prompt + it["answer"], add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(prompt, add_special_tokens=True)["input_ids"])
        assert ids.tolist() == full
        assert int((labels == IGNORE).sum()) == n_prompt
        assert (labels[:n_prompt] == IGNORE).all()
        assert labels[n_prompt:].tolist() == full[n_prompt:]
    # The documented quirk: the prompt's trailing space merges into the first answer token of
    # `full`, so the reference convention masks that answer token (" Stouthin" here).
    lab = batch["labels"][0]
    scored = tok.decode(lab[lab != IGNORE])
    assert scored.endswith(tok.eos_token)
    assert (" " + qa_items[0]["answer"] + tok.eos_token).endswith(scored)
    assert len(scored) < len(" " + qa_items[0]["answer"] + tok.eos_token)


def test_padding_is_masked(tiny_adapter, qa_items):
    batch = tiny_adapter.collate(qa_items[:6])
    pad = batch["attention_mask"] == 0
    assert pad.any(), "the items must differ in length for this test to mean anything"
    assert (batch["labels"][pad] == IGNORE).all()
    assert (batch["input_ids"][pad] == tiny_adapter.tokenizer.pad_token_id).all()
    # right padding: once a row is padded it stays padded
    for row in batch["attention_mask"]:
        n = int(row.sum())
        assert row[:n].all() and not row[n:].any()
    assert batch["index"].tolist() == list(range(6))


def test_collate_errors(tiny_adapter, qa_items):
    with pytest.raises(ValueError, match="empty"):
        tiny_adapter.collate([])
    with pytest.raises(ValueError, match="'idk_missing'"):
        tiny_adapter.collate(qa_items[:1], answer_key="idk_missing")
    with pytest.raises(ValueError, match="answer_index"):
        tiny_adapter.collate(qa_items[:1], answer_key="perturbed_answer")
    batch = tiny_adapter.collate(qa_items[:1], answer_key="perturbed_answer", answer_index=2)
    lab = batch["labels"][0]
    assert tiny_adapter.tokenizer.decode(lab[lab != IGNORE]).startswith(" " + qa_items[0]["perturbed_answer"][2])


# -- teacher-forced scores --------------------------------------------------------------------
def test_item_nll_equals_manual_cross_entropy(tiny_adapter, qa_items):
    it = qa_items[0]
    batch = tiny_adapter.collate([it])
    with torch.no_grad():
        nll, n = tiny_adapter.item_nll(batch)
        logits = tiny_adapter.logits(batch)[0]  # (T, V)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    n_answer = len(tiny_adapter.tokenizer(" " + it["answer"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
    manual, count = 0.0, 0
    for t in range(len(ids) - 1):  # logits at t predict token t + 1
        if labels[t + 1] == IGNORE:
            continue
        row = logits[t].double()
        manual += float(torch.logsumexp(row, 0) - row[labels[t + 1]])
        count += 1
    assert nll.shape == (1,) and n.shape == (1,)
    assert int(n) == count == n_answer
    assert float(nll) == pytest.approx(manual, rel=1e-5)


def test_item_nll_does_not_depend_on_padding(tiny_adapter, qa_items):
    with torch.no_grad():
        batch_nll, batch_n = tiny_adapter.item_nll(tiny_adapter.collate(qa_items[:5]))
        alone = [tiny_adapter.item_nll(tiny_adapter.collate([it])) for it in qa_items[:5]]
    assert batch_n.tolist() == [int(n) for _, n in alone]
    assert torch.allclose(batch_nll, torch.cat([nll for nll, _ in alone]), rtol=1e-5, atol=1e-5)


def test_token_logprobs_sum_to_minus_item_nll(tiny_adapter, qa_items):
    batch = tiny_adapter.collate(qa_items[:4])
    with torch.no_grad():
        logp, mask = tiny_adapter.token_logprobs(batch)  # (B, T-1)
        nll, n = tiny_adapter.item_nll(batch)
    assert logp.shape == mask.shape == (4, batch["input_ids"].shape[1] - 1)
    assert torch.equal(mask, batch["labels"][:, 1:] != IGNORE)
    assert (logp[~mask] == 0).all() and (logp[mask] < 0).all()
    assert torch.equal(mask.sum(-1), n)
    assert torch.allclose(logp.sum(-1), -nll, rtol=1e-5, atol=1e-5)


def test_item_nll_is_differentiable(tiny_adapter, qa_items):
    tiny_adapter.model.train()
    nll, _ = tiny_adapter.item_nll(tiny_adapter.collate(qa_items[:2]))
    nll.sum().backward()
    assert tiny_adapter.model.lm_head.weight.grad is not None


# -- generation -------------------------------------------------------------------------------
def test_greedy_generate_is_deterministic_and_left_padding_matches_batch_of_one(tiny_adapter, tiny_qa):
    questions = [tiny_qa[i]["question"] for i in (0, 3, 7, 12)]
    lengths = {len(tiny_adapter.generation_prompt_ids(q)) for q in questions}
    assert len(lengths) > 1, "the prompts must differ in length so that left padding happens"
    tiny_adapter.model.train()
    first = tiny_adapter.generate(questions, max_new_tokens=8)
    assert tiny_adapter.model.training, "generate must restore training mode"
    assert tiny_adapter.generate(questions, max_new_tokens=8) == first
    one_by_one = [tiny_adapter.generate([q], max_new_tokens=8)[0] for q in questions]
    assert one_by_one == first
    assert tiny_adapter.generate(questions, max_new_tokens=8, batch_size=3) == first
    assert all(isinstance(a, str) and a == a.strip() for a in first)


# -- saving and loading -----------------------------------------------------------------------
def test_save_load_round_trip_in_safetensors(tiny_adapter, qa_items, tmp_path):
    tiny_adapter.save(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith(".bin")], files
    loaded = TextAdapter.load(str(tmp_path / "m"))
    a, b = tiny_adapter.collate(qa_items[:3]), loaded.collate(qa_items[:3])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    with torch.no_grad():
        assert torch.equal(tiny_adapter.logits(a), loaded.logits(b))
    assert loaded.fingerprint() == tiny_adapter.fingerprint()
    assert loaded.source == str(tmp_path / "m")


def test_fingerprint_changes_with_the_weights(tiny_adapter):
    before = tiny_adapter.fingerprint()
    with torch.no_grad():
        tiny_adapter.model.lm_head.weight[0, 0] += 1e-3
    assert tiny_adapter.fingerprint() == before  # cached until refreshed
    assert tiny_adapter.fingerprint(refresh=True) != before


def test_reference_is_a_frozen_copy(tiny_adapter, qa_items):
    ref = tiny_adapter.reference()
    assert ref.model is not tiny_adapter.model and not ref.model.training
    assert not any(p.requires_grad for p in ref.model.parameters())
    with torch.no_grad():
        tiny_adapter.model.lm_head.weight.add_(1.0)
    batch = tiny_adapter.collate(qa_items[:2])
    with torch.no_grad():
        assert not torch.equal(ref.logits(batch), tiny_adapter.logits(batch))


# -- model sources ----------------------------------------------------------------------------
def test_resolve_source_missing_path_names_it():
    with pytest.raises(ValueError, match=r"'\./nope/model' does not exist"):
        resolve_source("./nope/model")
    with pytest.raises(ValueError, match="nope/model"):
        TextAdapter.load("./nope/model")


def test_resolve_source_file_and_dir_without_config(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_source(str(f))
    with pytest.raises(ValueError, match="config.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)) == str(tmp_path)


def test_resolve_source_unknown_zoo_name_says_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'tiny-llama/target'"):
        resolve_source("zoo:tiny-lama/target")


def test_resolve_source_passes_hub_ids_through():
    assert resolve_source("someone/some-model") == "someone/some-model"
    with pytest.raises(ValueError, match="non-empty"):
        resolve_source("")


def test_mismatched_tokenizer_is_refused(tiny_adapter, tmp_path):
    tok = copy.deepcopy(tiny_adapter.tokenizer)
    vocab = tiny_adapter.model.config.vocab_size
    tok.add_tokens([f"<extra{i}>" for i in range(vocab - len(tok) + 3)])
    assert len(tok) > vocab
    with pytest.raises(ValueError, match=f"tokenizer has {len(tok)} tokens but the model's vocabulary is {vocab}"):
        TextAdapter(tiny_adapter.model, tok)
    # the same through loading a directory whose tokenizer does not belong to its model
    tiny_adapter.save(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="does not belong to this model"):
        TextAdapter.load(str(tmp_path / "m"))


def test_constructor_checks(tiny_adapter):
    with pytest.raises(ValueError, match="tokenization"):
        TextAdapter(tiny_adapter.model, tiny_adapter.tokenizer, tokenization="whole")
    with pytest.raises(ValueError, match="question"):
        TextAdapter(tiny_adapter.model, tiny_adapter.tokenizer, prompt_template="Q: {q}")
    with pytest.raises(ValueError, match="dtype"):
        TextAdapter.load("./nope/model", dtype="float64")


# -- parameter groups -------------------------------------------------------------------------
def test_parameter_groups_cover_every_parameter(tiny_adapter):
    groups = tiny_adapter.parameter_groups()
    names = [n for n, _ in tiny_adapter.model.named_parameters()]
    n_layers = tiny_adapter.model.config.num_hidden_layers
    for i in range(n_layers):
        expected = [n for n in names if f".layers.{i}." in n]
        assert expected and groups[f"layer.{i}"] == expected
    assert sorted(k for k in groups if k.startswith("layer.")) == [f"layer.{i}" for i in range(n_layers)]
    assert set().union(*groups.values()) == set(names)  # every parameter is in some group
    assert groups["lm_head"] == ["lm_head.weight"]
    assert groups["embeddings"] == ["model.embed_tokens.weight"]
    assert all(".mlp." in n for n in groups["mlp"]) and len(groups["mlp"]) == 3 * n_layers
    assert len(groups["attention"]) == 4 * n_layers


# -- the contract and load_model --------------------------------------------------------------
def test_text_adapter_implements_the_text_contract(tiny_adapter):
    assert isinstance(tiny_adapter, TextModel) and isinstance(tiny_adapter, Adapter)
    assert not isinstance(tiny_adapter, ImageModel)
    assert tiny_adapter.modality == "text" and not TextAdapter.__abstractmethods__
    assert isinstance(tiny_adapter.reference(), TextAdapter)
    with pytest.raises(TypeError, match="abstract"):
        TextModel()  # the contract itself cannot be instantiated

    class Half(TextModel):  # a partial implementation is refused by name
        def logits(self, batch, model=None):
            return batch["logits"]

    with pytest.raises(TypeError, match="generate"):
        Half()
    with pytest.raises(TypeError, match="modality must be one of"):
        type("Audio", (Adapter,), {"modality": "audio"})


def test_load_model_loads_plain_text_models(tiny_adapter, qa_items, tmp_path):
    tiny_adapter.save(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), "text", prompt_template="Q: {question}\nA:", tokenization="reference")
    assert type(loaded) is TextAdapter and loaded.fingerprint() == tiny_adapter.fingerprint()
    assert loaded.prompt_template == "Q: {question}\nA:" and loaded.tokenization == "reference"
    assert next(load_model(str(tmp_path / "m"), "text", dtype="bfloat16").model.parameters()).dtype == torch.bfloat16


def test_load_model_errors_name_the_source_and_the_fix(tiny_adapter, tmp_path):
    with pytest.raises(ValueError, match="modality must be one of 'text', 'image', got 'audio'"):
        load_model("zoo:tiny-llama/target", "audio")
    with pytest.raises(ValueError, match=r"'\./nope/model' does not exist"):
        load_model("./nope/model", "text")
    with pytest.raises(ValueError, match="did you mean 'tiny-llama/target'"):
        load_model("zoo:tiny-lama/target", "text")
    with pytest.raises(ValueError, match="non-empty"):
        load_model("", "text")
    tiny_adapter.save(tmp_path / "m")
    with pytest.raises(ValueError, match="is a text model, but an image model was asked for; load it with "
                                         "modality='text'"):
        load_model(str(tmp_path / "m"), "image")
