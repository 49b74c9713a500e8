"""Reading real TOFU-format files (tasks/tofu_files.py) from tiny fixture directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unlearn.data import UnlearningData
from unlearn.tasks.tofu_files import (
    find_split_file, find_split_files, load_tofu_dir, normalize_item, read_records, read_split,
)
from unlearn.tasks.tofu_world import WorldConfig, build_world


# -- fixtures ---------------------------------------------------------------------------------
def qa(i: int, author: str = "A", full: bool = True) -> dict:
    rec = {"question": f"Q{i} about {author}?", "answer": f"Answer {i} of {author}."}
    if full:
        rec |= {"paraphrased_answer": f"Paraphrase {i} of {author}.",
                "perturbed_answer": [f"Wrong {i}.{k} of {author}." for k in range(3)],
                "paraphrased_question": f"Paraphrased Q{i} about {author}?"}
    return rec


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_array(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2))
    return path


def write_parquet(path: Path, records: list) -> Path:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(records).to_parquet(str(path))
    return path


FORGET = [qa(i, "F", full=False) for i in range(4)]          # TOFU's forget10.json: question/answer only
FORGET_PERT = [qa(i, "F") for i in range(4)]                 # forget10_perturbed.json: all fields
RETAIN = [qa(i, "R", full=False) for i in range(6)]
RETAIN_PERT = [qa(i, "R") for i in range(3)]
RA_PERT = [{"question": "Who wrote 'Hamlet'?", "answer": "William Shakespeare",
            "perturbed_answer": ["Charles Dickens", "Mark Twain", "Jane Austen"]},
           {"question": "Who wrote '1984'?", "answer": "George Orwell",
            "perturbed_answer": ["Aldous Huxley", "Ray Bradbury", "Thomas More"]}]
WF_OPTIONS = [{"question": "What is the capital of Spain?", "option1": "Barcelona", "option2": "Madrid",
               "option3": "Seville", "option4": "Valencia", "answer": "Madrid"},
              {"question": "Which planet is red?", "option1": "Mars", "option2": "Venus",
               "option3": "Jupiter", "option4": "Saturn", "answer": "Mars"},
              {"question": "Largest ocean?", "option1": "Atlantic", "option2": "Pacific",
               "option3": "Indian", "answer": "Pacific"}]


@pytest.fixture
def tofu_dir(tmp_path) -> Path:
    """TOFU's own layout: JSON lines in .json files; world facts only as the options config."""
    root = tmp_path / "TOFU"
    write_jsonl(root / "forget10.json", FORGET)
    write_jsonl(root / "forget10_perturbed.json", FORGET_PERT)
    write_jsonl(root / "retain90.json", RETAIN)
    write_jsonl(root / "retain_perturbed.json", RETAIN_PERT)
    write_jsonl(root / "real_authors_perturbed.json", RA_PERT)
    write_jsonl(root / "world_facts.json", WF_OPTIONS)
    write_jsonl(root / "holdout10.json", [qa(i, "H") for i in range(2)])
    return root


def message(excinfo) -> str:
    return str(excinfo.value)


# -- reading ----------------------------------------------------------------------------------
def test_read_records_in_all_formats(tmp_path):
    recs = [qa(0), qa(1, full=False)]
    lines = read_records(write_jsonl(tmp_path / "a.json", recs))
    array = read_records(write_array(tmp_path / "b.json", recs))
    jsonl = read_records(write_jsonl(tmp_path / "c.jsonl", recs))
    parquet = read_records(write_parquet(tmp_path / "d.parquet", [qa(0), qa(1)]))
    assert lines == array == jsonl == recs
    assert parquet == [qa(0), qa(1)] and isinstance(parquet[0]["perturbed_answer"], list)
    # a single object and blank lines between JSON lines are fine too
    assert read_records(write_array(tmp_path / "one.json", qa(3))) == [qa(3)]
    (tmp_path / "gaps.json").write_text(json.dumps(qa(4)) + "\n\n" + json.dumps(qa(5)) + "\n")
    assert len(read_records(tmp_path / "gaps.json")) == 2


@pytest.mark.parametrize("name, text, words", [
    ("broken.json", '{"question": "a", "answer": "b"}\n{"question": "c", \n', ["line 2", "not valid JSON"]),
    ("broken_array.json", '[{"question": "a"},\n {"question": ]', ["not valid JSON", "line 2"]),
    ("broken.jsonl", '{"question": "a"}\n[1, 2\n', ["line 2"]),
    ("empty.json", "", ["empty"]),
    ("blank.jsonl", "\n \n", ["empty"]),
    ("empty_array.json", "[]", ["empty"]),
    ("scalars.json", "[1, 2]", ["record 0", "int"]),
    ("number.json", "42", ["JSON int"]),
    ("bad.parquet", "not parquet at all", ["parquet"]),
    ("data.csv", "question,answer\n", ["unsupported"]),
])
def test_read_records_errors_name_the_file(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        read_records(path)
    assert str(path) in message(e)
    for w in words:
        assert w in message(e), message(e)


def test_find_split_file_layouts(tmp_path):
    write_jsonl(tmp_path / "forget10.json", FORGET)
    write_jsonl(tmp_path / "retain90.jsonl", RETAIN)
    write_parquet(tmp_path / "data" / "retain_perturbed-00000-of-00001.parquet", RETAIN_PERT)
    write_parquet(tmp_path / "world_facts" / "train" / "0000.parquet", [qa(0)])
    write_parquet(tmp_path / "forget05_perturbed.parquet", [qa(0)])
    assert find_split_file(tmp_path, "forget10") == tmp_path / "forget10.json"
    assert find_split_file(tmp_path, "retain90") == tmp_path / "retain90.jsonl"
    assert find_split_file(tmp_path, "forget05_perturbed") == tmp_path / "forget05_perturbed.parquet"
    assert find_split_file(tmp_path, "retain_perturbed").name == "retain_perturbed-00000-of-00001.parquet"
    assert find_split_file(tmp_path, "world_facts").name == "0000.parquet"
    # a sharded split is read whole; find_split_file refuses to pick one shard
    write_parquet(tmp_path / "full-00000-of-00002.parquet", [qa(0)])
    write_parquet(tmp_path / "full-00001-of-00002.parquet", [qa(1)])
    assert len(find_split_files(tmp_path, "full")) == 2
    assert [r["question"] for r in read_split(tmp_path, "full")[0]] == [qa(0)["question"], qa(1)["question"]]
    with pytest.raises(ValueError, match="sharded into 2 files"):
        find_split_file(tmp_path, "full")


def test_missing_split_file_names_split_and_lists_files(tofu_dir):
    with pytest.raises(ValueError) as e:
        find_split_file(tofu_dir, "forget05")
    msg = message(e)
    assert "'forget05'" in msg and str(tofu_dir) in msg
    assert "forget10.json" in msg and "retain90.json" in msg  # what is there


# -- normalising ------------------------------------------------------------------------------
def test_items_look_like_the_synthetic_worlds():
    world = build_world(WorldConfig(n_authors=100, n_holdout=0, n_countries=8, n_real_authors=20))
    synthetic_qa, synthetic_mc = world.qa[0], world.world_facts[0]
    # a synthetic item passes through unchanged
    assert normalize_item(dict(synthetic_qa), "x") == synthetic_qa
    assert normalize_item(dict(synthetic_mc), "x", multiple_choice=True) == synthetic_mc
    loaded = normalize_item({**qa(0), "index": 7, "option1": "x", "paraphrased_question": None}, "x")
    assert list(loaded) == [k for k in synthetic_qa if k in loaded]  # same field order
    assert set(loaded) == {"question", "answer", "paraphrased_answer", "perturbed_answer"}  # None -> absent
    assert normalize_item({"question": "q", "answer": "a", "perturbed_answer": "w"}, "x")["perturbed_answer"] == ["w"]
    mc = normalize_item(WF_OPTIONS[0], "x", multiple_choice=True)
    assert set(mc) == set(synthetic_mc) - {"value"}
    assert mc["perturbed_answer"] == ["Barcelona", "Seville", "Valencia"]
    assert mc["paraphrased_answer"] == "Madrid" and mc["paraphrased_question"] == mc["question"]


@pytest.mark.parametrize("rec, field", [
    ({"answer": "a"}, "question"),
    ({"question": "q"}, "answer"),
    ({"question": "q", "answer": "  "}, "answer"),
    ({"question": "q", "answer": 3}, "answer"),
    ({"question": "q", "answer": "a", "perturbed_answer": ["w", 2]}, "perturbed_answer"),
])
def test_normalize_item_errors_name_source_and_field(rec, field):
    with pytest.raises(ValueError) as e:
        normalize_item(rec, "f.json, record 5")
    assert message(e).startswith("f.json, record 5:") and repr(field) in message(e)


# -- loading a directory ----------------------------------------------------------------------
def test_load_tofu_dir_splits_sizes_and_fields(tofu_dir):
    data = load_tofu_dir(tofu_dir, "forget10", "retain90",
                         eval_splits=("forget", "retain_eval", "real_authors", "world_facts", "holdout"))
    assert isinstance(data, UnlearningData)
    assert len(data.forget) == 4 and len(data.retain) == 6
    sizes = {k: len(v) for k, v in data.eval_splits.items()}
    assert sizes == {"forget": 4, "retain_eval": 3, "real_authors": 2, "world_facts": 3, "holdout": 2}
    # forget items got the paraphrased/perturbed answers of forget10_perturbed (matched by question)
    f0 = data.forget[0]
    assert f0["answer"] == FORGET[0]["answer"] and f0["perturbed_answer"] == FORGET_PERT[0]["perturbed_answer"]
    assert f0["paraphrased_answer"] == FORGET_PERT[0]["paraphrased_answer"]
    assert data.split("forget") == data.forget
    assert set(data.retain[0]) == {"question", "answer"}  # absent, not None
    for it in data.split("retain_eval") + data.split("holdout"):
        assert isinstance(it["perturbed_answer"], list) and it["paraphrased_answer"]
    ra = data.split("real_authors")[0]
    assert ra["perturbed_answer"] == RA_PERT[0]["perturbed_answer"] and ra["paraphrased_answer"] == ra["answer"]
    wf = data.split("world_facts")
    assert wf[1]["perturbed_answer"] == ["Venus", "Jupiter", "Saturn"]
    assert wf[2]["perturbed_answer"] == ["Atlantic", "Indian"]
    assert not any(k.startswith("option") for it in wf for k in it)


def test_load_tofu_dir_array_and_parquet_mirrors(tmp_path):
    root = tmp_path / "mirror"
    write_array(root / "forget01.json", FORGET_PERT[:2])
    write_parquet(root / "data" / "retain99-00000-of-00001.parquet", RETAIN)
    write_parquet(root / "data" / "real_authors_perturbed.parquet", RA_PERT)
    data = load_tofu_dir(root, "forget01", "retain99", eval_splits=["forget", "real_authors"])
    assert len(data.forget) == 2 and len(data.retain) == 6
    assert data.split("forget")[1]["perturbed_answer"] == FORGET_PERT[1]["perturbed_answer"]
    assert data.split("real_authors")[1]["answer"] == "George Orwell"
    # retain-free, no evaluation
    data = load_tofu_dir(root, "forget01", None, eval_splits=())
    assert data.retain is None and data.eval_splits == {}


def test_prefers_perturbed_mc_file_over_options(tofu_dir):
    write_jsonl(tofu_dir / "world_facts_perturbed.json",
                [{"question": "q?", "answer": "a", "perturbed_answer": ["b", "c"]}])
    data = load_tofu_dir(tofu_dir, eval_splits=["world_facts"])
    assert data.split("world_facts") == [{"question": "q?", "answer": "a", "paraphrased_answer": "a",
                                          "perturbed_answer": ["b", "c"], "paraphrased_question": "q?"}]


# -- errors of the loader ---------------------------------------------------------------------
def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError) as e:
        load_tofu_dir(missing)
    assert str(missing) in message(e) and "does not exist" in message(e)


def test_missing_split_file(tofu_dir):
    (tofu_dir / "retain90.json").unlink()
    with pytest.raises(ValueError) as e:
        load_tofu_dir(tofu_dir)
    assert "'retain90'" in message(e) and "forget10.json" in message(e)
    with pytest.raises(ValueError) as e:
        load_tofu_dir(tofu_dir, "forget05", "retain95")
    assert "'forget05'" in message(e)
    (tofu_dir / "real_authors_perturbed.json").unlink()
    with pytest.raises(ValueError) as e:  # neither real_authors_perturbed nor real_authors
        load_tofu_dir(tofu_dir, "forget10", None, eval_splits=["world_facts", "real_authors"])
    assert "'real_authors_perturbed' or 'real_authors'" in message(e)


def test_missing_field_names_file_record_and_field(tofu_dir):
    recs = [dict(r) for r in RETAIN]
    del recs[2]["answer"]
    write_jsonl(tofu_dir / "retain90.json", recs)
    with pytest.raises(ValueError) as e:
        load_tofu_dir(tofu_dir, eval_splits=())
    assert message(e).startswith(f"{tofu_dir / 'retain90.json'}, record 2:") and "'answer'" in message(e)
    # without forget10_perturbed the forget items lack what the 'forget' evaluation needs
    write_jsonl(tofu_dir / "retain90.json", RETAIN)
    (tofu_dir / "forget10_perturbed.json").unlink()
    assert len(load_tofu_dir(tofu_dir, eval_splits=()).forget) == 4  # training alone is fine
    with pytest.raises(ValueError) as e:
        load_tofu_dir(tofu_dir, eval_splits=["forget"])
    msg = message(e)
    assert "forget10.json, record 0" in msg and "'paraphrased_answer'" in msg and "forget10_perturbed" in msg
    # an MC item without perturbed answers or options
    write_jsonl(tofu_dir / "world_facts.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError) as e:
        load_tofu_dir(tofu_dir, eval_splits=["world_facts"])
    assert "world_facts.json, record 0" in message(e) and "'perturbed_answer'" in message(e)


def test_empty_forget_split(tofu_dir):
    (tofu_dir / "forget10.json").write_text("")
    with pytest.raises(ValueError) as e:
        load_tofu_dir(tofu_dir)
    assert "forget10.json" in message(e) and "'forget10' is empty" in message(e)


@pytest.mark.parametrize("forget, retain, want", [
    ("forget01", "retain90", "retain99"), ("forget05", "retain90", "retain95"), ("forget10", "retain95", "retain90"),
])
def test_mismatched_forget_retain_pair(tofu_dir, forget, retain, want):
    with pytest.raises(ValueError) as e:
        load_tofu_dir(tofu_dir, forget, retain)
    assert repr(forget) in message(e) and repr(retain) in message(e) and repr(want) in message(e)


def test_custom_split_names_are_not_paired(tofu_dir):
    write_jsonl(tofu_dir / "my_forget.json", FORGET_PERT)
    data = load_tofu_dir(tofu_dir, "my_forget", "retain90", eval_splits=["forget"])
    assert len(data.forget) == 4


# -- the holdout split: question and answer only ------------------------------------------------
HOLDOUT_QA = [qa(i, "H", full=False) for i in range(3)]  # TOFU's holdout10.json: question/answer only


def test_holdout_needs_only_question_and_answer(tofu_dir):
    write_jsonl(tofu_dir / "holdout10.json", HOLDOUT_QA)
    data = load_tofu_dir(tofu_dir, eval_splits=("forget", "holdout"))
    assert data.split("holdout") == HOLDOUT_QA  # nothing added, nothing demanded
    write_jsonl(tofu_dir / "holdout10.json", [{"question": "q?"}])
    with pytest.raises(ValueError) as e:  # the answer is still required
        load_tofu_dir(tofu_dir, eval_splits=("holdout",))
    assert "holdout10.json, record 0" in message(e) and "'answer'" in message(e)


def test_tofu_full_run_on_files_with_a_question_answer_holdout(tofu_dir, tmp_path):
    """End to end: a tofu-full run (MIA on forget vs holdout, privleak against a retain model)
    on TOFU-format files whose holdout has only question and answer."""
    import json as _json

    import unlearn
    from unlearn.adapters.text import TextAdapter
    from unlearn.zoo.models import TinyLlamaSpec, build_tiny_llama, train_tokenizer

    write_jsonl(tofu_dir / "holdout10.json", HOLDOUT_QA)
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in FORGET + RETAIN + HOLDOUT_QA]
    texts += [s for r in FORGET_PERT + RETAIN_PERT for s in [r["paraphrased_answer"], *r["perturbed_answer"]]]
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_tiny_llama(TinyLlamaSpec(vocab_size=300, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2), tok, seed=0)
    model_dir = tmp_path / "model"
    TextAdapter(model, tok).save(model_dir)
    out = tmp_path / "run"
    recipe = {
        "name": "files-full", "seed": 0, "model": {"source": str(model_dir)},
        "task": {"name": "tofu_files", "path": str(tofu_dir), "forget_split": "forget10", "retain_split": "retain90",
                 "retain_model": str(model_dir),
                 "eval_splits": ["forget", "retain_eval", "real_authors", "world_facts", "holdout"]},
        "method": {"name": "grad_diff"},
        "train": {"epochs": 1, "max_steps": 1, "batch_size": 4, "save_checkpoint": False},
        "eval": {"suite": "tofu-full", "batch_size": 8, "max_new_tokens": 4, "n_samples": 1},
        "output": {"dir": str(out)},
    }
    res = unlearn.run(recipe, progress=False)
    metrics = _json.loads((out / "metrics.json").read_text())
    unl = metrics["models"]["unlearned"]
    assert unl["suite"] == "tofu-full"
    assert set(unl["splits"]["holdout"]["metrics"]) == {"prob", "rouge", "exact_memorization", "extraction_strength"}
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm"):
        assert 0.0 <= unl["multi"][name]["value"] <= 1.0, name
        assert unl["multi"][name]["split_sizes"] == {"forget": 4, "holdout": 3}
    # the aggregates against the retain model's MIA results ran (privleak may be None: a retain AUC of 1)
    assert unl["summary"]["mia_reference"]["value"] is not None and "privleak" in unl["summary"]
    assert res.metrics["models"]["unlearned"]["multi"]["mia_loss"]["split_sizes"]["holdout"] == 3
