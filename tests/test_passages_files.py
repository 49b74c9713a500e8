"""Reading real RWKU and MUSE files (tasks/rwku_files.py, tasks/muse_files.py) from tiny
directories in the real layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unlearn.tasks.muse_files import load_muse
from unlearn.tasks.rwku_files import RWKU_SPLITS, load_rwku

TARGETS = ["Stephen King", "Confucius"]


def write_array(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=4))
    return path


def write_lines(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rwku_records(subject: str) -> dict[str, list[dict]]:
    """One target's records, keyed by the file names of RWKU's All/ and Target/ folders."""
    probe = lambda lvl, q, a, t=None: {"query": q, "answer": a, "subject": subject, "level": lvl} | (
        {"type": t} if t else {})
    return {
        "intro": [{"target": subject, "intro": f"{subject} is famous."}],
        "forget_level1": [probe("1", f"{subject} was born in ___.", "Portland")],
        "forget_level2": [probe("2", f"Where was {subject} born?", "Portland")],
        "forget_level3": [probe("3", f"Answer as an actor: where was {subject} born?", "Portland", "role play")],
        "neighbor_level1": [probe("1", "Carrie was written by ___.", "a novelist")],
        "neighbor_level2": [probe("2", "Who wrote Carrie?", "a novelist")],
        "forget_mia": [{"text": f"{subject} grew up in Maine.", "subject": subject}],
        "retain_mia": [{"text": "Paris is in France.", "subject": subject}],
        "retain_mmlu": [{"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "task": "math",
                         "subject": subject,
                         "examples": [{"question": "1+1?", "choices": ["2", "3", "4", "5"], "answer": 0}]}],
        "retain_bbh": [{"question": "Is 3 odd?", "answer": "Yes", "cot": "Q: Is 2 odd?\nA: No.", "task": "parity",
                        "subject": subject}],
        "truthful": [{"question": "Do bats see?", "subject": subject,
                      "mc1_targets": {"choices": ["Yes", "No"], "labels": [1, 0]},
                      "mc2_targets": {"choices": ["Yes", "They see", "No"], "labels": [1, 1, 0]}}],
        "triviaqa": [{"question": "Capital of France?", "answers": ["Paris", "paris"], "subject": subject}],
        "fluency": [{"instruction": "Write a poem.", "subject": subject}],
        "passage": [{"text": f"A long passage about {subject}.", "subject": subject}],
    }


def all_layout(root: Path) -> Path:
    """The hub repository: All/<file>.json, JSON arrays holding every target."""
    per = [rwku_records(s) for s in TARGETS]
    for name in per[0]:
        write_array(root / "All" / f"{name}.json", [r for p in per for r in p[name]])
    return root


@pytest.fixture
def rwku_all(tmp_path) -> Path:
    return all_layout(tmp_path / "RWKU")


def check_rwku(data: dict, subjects: list[str]) -> None:
    assert set(data) == set(RWKU_SPLITS)
    assert [t["answer"] for t in data["forget_target"]] == subjects
    assert data["forget_target"][0] == {"question": "", "answer": subjects[0], "subject": subjects[0],
                                        "intro": f"{subjects[0]} is famous."}
    l3 = data["forget_level3"][0]
    assert l3 == {"question": f"Answer as an actor: where was {subjects[0]} born?", "answer": "Portland",
                  "subject": subjects[0], "level": "3", "type": "role play"}
    assert data["forget_level1"][0]["type"] == "" and data["forget_level1"][0]["level"] == "1"
    assert data["mia_forget"][0] == {"question": "", "answer": f"{subjects[0]} grew up in Maine.",
                                     "subject": subjects[0]}
    mc = data["utility_general"][0]
    assert (mc["answer"], mc["perturbed_answer"], mc["answer_index"]) == ("4", ["3", "5", "6"], 1)
    assert mc["examples"][0]["answer"] == "2"
    tq = data["utility_truthfulness"][0]
    assert (tq["answer"], tq["perturbed_answer"], tq["mc2_correct"]) == ("Yes", ["No"], ["Yes", "They see"])
    assert data["utility_factuality"][0]["answer"] == "Paris"
    assert data["utility_reason"][0]["cot"].startswith("Q:")
    assert data["utility_fluency"][0] == {"question": "Write a poem.", "answer": "", "subject": subjects[0]}
    assert data["corpus"][0]["answer"] == f"A long passage about {subjects[0]}."
    for items in data.values():
        for it in items:
            assert isinstance(it["question"], str) and isinstance(it["answer"], str)
    for key in ("forget_level1", "neighbor_level2", "mia_forget", "corpus", "utility_general"):
        assert [it["subject"] for it in data[key]] == subjects


# -- RWKU: the three real layouts -------------------------------------------------------------
def test_rwku_all_folder(rwku_all):
    check_rwku(load_rwku(rwku_all), TARGETS)
    check_rwku(load_rwku(rwku_all / "All"), TARGETS)


def test_rwku_config_files_jsonl_and_parquet(tmp_path):
    per = [rwku_records(s) for s in TARGETS]
    for key, (config, name) in RWKU_SPLITS.items():
        records = [r for p in per for r in p[name]]
        if key == "forget_level2":  # the hub's parquet export: <config>/test/0000.parquet
            from datasets import Dataset
            (tmp_path / config / "test").mkdir(parents=True)
            Dataset.from_list(records).to_parquet(str(tmp_path / config / "test" / "0000.parquet"))
        else:
            write_lines(tmp_path / f"{config}.jsonl", records)
    check_rwku(load_rwku(tmp_path), TARGETS)


def test_rwku_per_target_folders(tmp_path):
    for n, s in enumerate(TARGETS, 1):
        recs = rwku_records(s)
        for name, rows in recs.items():
            if name == "retain_mia":
                continue  # on the hub only in All/
            if name in ("forget_level1",):
                rows = [{k: v for k, v in r.items() if k != "subject"} for r in rows]  # filled from intro
            write_array(tmp_path / "Target" / f"{n}_{s.replace(' ', '_')}" / f"{name}.json", rows)
    write_array(tmp_path / "All" / "retain_mia.json", [r for s in TARGETS for r in rwku_records(s)["retain_mia"]])
    (tmp_path / "All" / "forget_level1.json").unlink(missing_ok=True)
    data = load_rwku(tmp_path / "Target")
    check_rwku(data, TARGETS)
    assert len(data["mia_retain"]) == 2


def test_rwku_targets_filter(rwku_all):
    data = load_rwku(rwku_all, targets=["Confucius"])
    assert [t["answer"] for t in data["forget_target"]] == ["Confucius"]
    assert all(it["subject"] == "Confucius" for k in ("forget_level1", "neighbor_level1", "utility_general")
               for it in data[k])
    with pytest.raises(ValueError, match=r"unknown target 'Confucious'.*did you mean 'Confucius'"):
        load_rwku(rwku_all, targets=["Confucious"])


def test_rwku_optional_splits_absent(tmp_path):
    recs = rwku_records("Confucius")
    for name in ("intro", "forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2"):
        write_array(tmp_path / "All" / f"{name}.json", recs[name])
    data = load_rwku(tmp_path)
    assert data["utility_general"] == [] and data["corpus"] == [] and len(data["forget_level1"]) == 1


# -- RWKU: malformed inputs, one line naming file, record and field ---------------------------
def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name, record, pattern", [
    ("forget_level2", {"query": "Q?", "level": "2", "subject": "Confucius"},
     r"rwku file .*forget_level2\.json, record 1: field 'answer' is missing \(fields: query, level, subject\)"),
    ("forget_level1", {"query": "Q ___", "answer": 7, "subject": "Confucius"},
     r"forget_level1\.json, record 1: field 'answer' must be str, got int"),
    ("forget_mia", {"text": "x"},
     r"forget_mia\.json, record 1: field 'subject' is missing"),
    ("retain_mmlu", {"question": "q", "choices": ["a", "b"], "answer": 5},
     r"retain_mmlu\.json, record 1: field 'answer' is 5, not an index"),
    ("truthful", {"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [1]}},
     r"truthful\.json, record 1: field 'mc1_targets.labels' has 1 entries"),
    ("triviaqa", {"question": "q", "answers": [1]},
     r"triviaqa\.json, record 1: field 'answers'\[0\] must be str"),
    ("intro", {"name": "x"}, r"intro\.json, record 1: field 'target' is missing \(fields: name\)"),
    ("fluency", ["not", "an", "object"], r"fluency\.json, record 1: is a list, not a JSON object"),
])
def test_rwku_bad_record(rwku_all, name, record, pattern):
    path = rwku_all / "All" / f"{name}.json"
    write_array(path, json.loads(path.read_text())[:1] + [record])
    with pytest.raises(ValueError, match=pattern) as e:
        load_rwku(rwku_all)
    one_line(e)


def test_rwku_bad_json_line_empty_file_missing(rwku_all, tmp_path):
    bad = rwku_all / "All" / "neighbor_level1.json"
    bad.write_text('{"query": "a", "answer": "b", "subject": "Confucius"}\n{"query": "c",\n')
    with pytest.raises(ValueError, match=r"rwku file .*neighbor_level1\.json: line 2 is not valid JSON") as e:
        load_rwku(rwku_all)
    one_line(e)
    bad.write_text("[]")
    with pytest.raises(ValueError, match=r"rwku file .*neighbor_level1\.json: the file is empty"):
        load_rwku(rwku_all)
    bad.unlink()
    with pytest.raises(ValueError, match=r"no file for split 'neighbor_level1'.*neighbor_level1\.json"):
        load_rwku(rwku_all)
    with pytest.raises(ValueError, match=r"does not exist.*expected RWKU's config files"):
        load_rwku(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no RWKU files .*files there: nothing"):
        load_rwku(tmp_path / "empty")


# -- MUSE -------------------------------------------------------------------------------------
def muse_github_layout(root: Path) -> Path:
    """The GitHub repo's data/news: raw/*.txt and JSON arrays."""
    for name in ("forget", "retain1", "retain2", "holdout"):
        (root / "raw").mkdir(parents=True, exist_ok=True)
        (root / "raw" / f"{name}.txt").write_text(f"The whole {name} corpus.\n\nSecond article.")
    write_array(root / "verbmem" / "forget.json", [{"prompt": "Once upon", "gt": " a time"}])
    for name in ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"):
        write_array(root / "knowmem" / f"{name}.json", [{"question": f"{name} Q?", "answer": f"{name} A"}])
    for name in ("forget", "retain", "holdout"):
        write_array(root / "privleak" / f"{name}.json", [f"{name} text one", {"text": f"{name} text two"}])
    return root


def test_muse_github_layout(tmp_path):
    data = load_muse(muse_github_layout(tmp_path / "news"))
    assert data["forget"] == [{"question": "", "answer": "The whole forget corpus.\n\nSecond article."}]
    assert data["retain"][0]["answer"].startswith("The whole retain1")
    assert data["verbmem_forget"] == [{"question": "", "prefix": "Once upon", "answer": " a time"}]
    assert data["knowmem_forget"] == [{"question": "forget_qa Q?", "answer": "forget_qa A"}]
    assert data["knowmem_retain_icl"][0]["answer"] == "retain_qa_icl A"
    assert [it["answer"] for it in data["privleak_holdout"]] == ["holdout text one", "holdout text two"]
    assert "scal_forget_1" not in data


def test_muse_hub_parquet_layout(tmp_path):
    from datasets import Dataset

    def pq(folder, split, rows):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        Dataset.from_list(rows).to_parquet(str(tmp_path / folder / f"{split}-00000-of-00001.parquet"))

    for split in ("forget", "retain1", "retain2", "holdout"):
        pq("raw", split, [{"text": f"{split} article {i}"} for i in range(3)])
    pq("verbmem", "forget", [{"prompt": "p", "gt": "g"}])
    for split in ("forget_qa", "retain2_qa", "forget_qa_icl", "retain2_qa_icl"):  # MUSE-Books' names
        pq("knowmem", split, [{"answer": "a", "question": f"{split}?"}])
    for split in ("forget", "retain2", "holdout"):
        pq("privleak", split, [{"text": f"{split} t"}])
    pq("scal", "forget_2", [{"text": "s"}])
    data = load_muse(tmp_path)
    assert [it["answer"] for it in data["forget"]] == [f"forget article {i}" for i in range(3)]
    assert data["knowmem_retain"] == [{"question": "retain2_qa?", "answer": "a"}]
    assert data["privleak_retain"] == [{"question": "", "answer": "retain2 t"}]
    assert data["scal_forget_2"] == [{"question": "", "answer": "s"}]


def test_muse_legacy_hyphen_names(tmp_path):
    root = muse_github_layout(tmp_path)
    for name in ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"):
        src = root / "knowmem" / f"{name}.json"
        src.rename(root / "knowmem" / f"{name.replace('_qa', '-qa').replace('_icl', '-icl').replace('retain', 'retain2')}.json")
    data = load_muse(root)
    assert data["knowmem_retain"][0]["question"] == "retain_qa Q?"


@pytest.mark.parametrize("rel, content, pattern", [
    ("verbmem/forget.json", [{"prompt": "p"}],
     r"muse file .*verbmem/forget\.json, record 0: field 'gt' is missing \(fields: prompt\)"),
    ("knowmem/forget_qa.json", [{"question": "q", "answer": "a"}, {"question": 3, "answer": "a"}],
     r"knowmem/forget_qa\.json, record 1: field 'question' must be str, got int"),
    ("knowmem/retain_qa.json", ["just a string"],
     r"knowmem/retain_qa\.json, record 0: is a str, not a JSON object"),
    ("privleak/forget.json", ["ok", {"txt": "x"}],
     r"privleak/forget\.json, record 1: field 'text' is missing \(fields: txt\)"),
    ("privleak/holdout.json", [], r"privleak/holdout\.json: the file is empty"),
])
def test_muse_bad_record(tmp_path, rel, content, pattern):
    root = muse_github_layout(tmp_path)
    write_array(root / rel, content)
    with pytest.raises(ValueError, match=pattern) as e:
        load_muse(root)
    one_line(e)


def test_muse_bad_json_line_and_missing(tmp_path):
    root = muse_github_layout(tmp_path)
    (root / "knowmem" / "forget_qa.json").unlink()
    write_lines(root / "knowmem" / "forget_qa.jsonl", [{"question": "q", "answer": "a"}])
    with (root / "knowmem" / "forget_qa.jsonl").open("a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match=r"muse file .*forget_qa\.jsonl: line 2 is not valid JSON") as e:
        load_muse(root)
    one_line(e)
    (root / "knowmem" / "forget_qa.jsonl").unlink()
    with pytest.raises(ValueError, match=r"no file for split 'knowmem_forget' \(looked for knowmem/forget_qa"):
        load_muse(root)
    (root / "raw" / "forget.txt").write_text("   \n")
    with pytest.raises(ValueError, match=r"raw/forget\.txt: the file is empty"):
        load_muse(root)
    with pytest.raises(ValueError, match=r"muse data directory .* does not exist"):
        load_muse(tmp_path / "nowhere")
