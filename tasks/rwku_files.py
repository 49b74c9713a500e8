"""Real RWKU data (``jinzhuoran/RWKU``) read from a local directory: no hub, no network.

Three real layouts are read (see ``docs/passages_files.md`` for the sources):

* **config files** -- one file per ``datasets`` config, named after it: ``forget_target``,
  ``forget_level1/2/3``, ``neighbor_level1/2``, ``mia_forget``, ``mia_retain``,
  ``utility_{general,reason,truthfulness,factuality,fluency}``, ``train_original_passage``
  (``.json`` array or JSON lines, ``.jsonl``, ``.parquet``, shards ``name-*.parquet`` or the
  hub's parquet export ``name/test/0000.parquet``), in the directory or its ``data/``;
* **the hub repository's ``All/`` folder** -- the files those configs point at, under their
  own names: ``intro.json`` (forget_target), ``forget_level1.json`` ..., ``forget_mia.json``,
  ``retain_mia.json``, ``retain_mmlu.json`` (utility_general), ``retain_bbh.json``
  (utility_reason), ``truthful.json``, ``triviaqa.json``, ``fluency.json``, ``passage.json``;
* **per-target folders** -- ``Target/{n}_{Name_With_Underscores}/`` (the hub's ``Target/``
  and the GitHub repo's processed ``LLaMA-Factory/data/RWKU/Target``), each holding the
  ``All/`` file names for one target, JSON arrays.

:func:`load_rwku` returns plain dicts of items; every item has ``question`` and ``answer``
strings (``question`` is ``""`` for raw text). Every problem is one ``ValueError`` line that
names the file, the record (0-based index in the file) and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

from unlearn.registry import did_you_mean
from unlearn.tasks.tofu_files import _read_json, _read_parquet, find_split_files

__all__ = ["RWKU_SPLITS", "OPTIONAL_SPLITS", "SUBJECT_SPLITS", "load_rwku", "read_file_records"]

# canonical key -> (hub config name, file name in All/ and Target/<n>_<name>/)
RWKU_SPLITS: dict[str, tuple[str, str]] = {
    "forget_target": ("forget_target", "intro"),
    "forget_level1": ("forget_level1", "forget_level1"),
    "forget_level2": ("forget_level2", "forget_level2"),
    "forget_level3": ("forget_level3", "forget_level3"),
    "neighbor_level1": ("neighbor_level1", "neighbor_level1"),
    "neighbor_level2": ("neighbor_level2", "neighbor_level2"),
    "mia_forget": ("mia_forget", "forget_mia"),
    "mia_retain": ("mia_retain", "retain_mia"),
    "utility_general": ("utility_general", "retain_mmlu"),
    "utility_reason": ("utility_reason", "retain_bbh"),
    "utility_truthfulness": ("utility_truthfulness", "truthful"),
    "utility_factuality": ("utility_factuality", "triviaqa"),
    "utility_fluency": ("utility_fluency", "fluency"),
    "corpus": ("train_original_passage", "passage"),
}
# absent files give [] for these keys; the others must exist
OPTIONAL_SPLITS = ("mia_forget", "mia_retain", "utility_general", "utility_reason", "utility_truthfulness",
                   "utility_factuality", "utility_fluency", "corpus")
# splits whose items belong to one target (filtered by ``targets``)
SUBJECT_SPLITS = ("forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2",
                  "mia_forget", "mia_retain", "utility_general", "utility_reason", "utility_truthfulness",
                  "utility_factuality", "utility_fluency", "corpus")
_SUBJECT_REQUIRED = ("forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2",
                     "mia_forget", "corpus")
_TARGET_DIR = re.compile(r"^(\d+)_(.+)$")
_SUFFIXES = (".json", ".jsonl", ".parquet")


# -- reading ----------------------------------------------------------------------------------
def read_file_records(path: Path, label: str, *, strings_ok: bool = False) -> list[Any]:
    """The records of one ``.json`` (array, object or JSON lines), ``.jsonl`` or ``.parquet``
    file; ``.txt`` gives one record, the whole text. Records must be objects (or, with
    ``strings_ok``, strings). ``label`` prefixes errors (``"rwku file"``)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            records: list[Any] = _read_parquet(path)
        elif suffix in (".json", ".jsonl"):
            records = _read_json(path, lines_only=(suffix == ".jsonl"))
        elif suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            records = [text] if text.strip() else []
        else:
            raise ValueError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}")
    except UnicodeDecodeError as e:
        raise ValueError(f"{label} {path}: not UTF-8 text ({e})") from None
    except ValueError as e:
        raise ValueError(f"{label} {e}") from None
    for i, rec in enumerate(records):
        if isinstance(rec, dict) or (strings_ok and isinstance(rec, str)):
            continue
        want = "a JSON object or a string" if strings_ok else "a JSON object"
        raise ValueError(f"{label} {path}, record {i}: is a {type(rec).__name__}, not {want}")
    if not records:
        raise ValueError(f"{label} {path}: the file is empty (no records)")
    return records


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _fields(rec: dict) -> str:
    return ", ".join(str(k) for k in rec) or "none"


def _get(rec: dict, field: str, where: str, kind: type | tuple = str, *, optional: bool = False,
         nonempty: bool = True) -> Any:
    """``rec[field]`` checked for type; errors name ``where`` (file, record) and the field."""
    value = rec.get(field)
    if _is_missing(value):
        if optional:
            return None
        raise ValueError(f"{where}: field {field!r} is missing (fields: {_fields(rec)})")
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays from parquet
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {field!r} must be {names}, got {type(value).__name__} ({value!r:.60})")
    if nonempty and isinstance(value, str) and not value.strip():
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def _str_list(value: list, where: str, field: str) -> list[str]:
    for j, x in enumerate(value):
        if not isinstance(x, str):
            raise ValueError(f"{where}: field {field!r}[{j}] must be str, got {type(x).__name__} ({x!r:.60})")
    return list(value)


# -- one normaliser per split shape -----------------------------------------------------------
def _target(rec: dict, where: str) -> dict:
    name = rec.get("target", rec.get("subject"))
    if _is_missing(name):
        raise ValueError(f"{where}: field 'target' is missing (fields: {_fields(rec)})")
    name = _get({"target": name}, "target", where)
    out = {"question": "", "answer": name, "subject": name}
    intro = _get(rec, "intro", where, optional=True, nonempty=False)
    if intro is not None:
        out["intro"] = intro
    return out


def _probe(rec: dict, where: str) -> dict:
    out = {"question": _get(rec, "query", where), "answer": _get(rec, "answer", where)}
    subject = _get(rec, "subject", where, optional=True)
    if subject is not None:
        out["subject"] = subject
    level = _get(rec, "level", where, (str, int), optional=True)
    out["level"] = "" if level is None else str(level)
    kind = _get(rec, "type", where, optional=True, nonempty=False)
    out["type"] = kind or ""
    return out


def _text(rec: dict, where: str) -> dict:
    out = {"question": "", "answer": _get(rec, "text", where)}
    subject = _get(rec, "subject", where, optional=True)
    if subject is not None:
        out["subject"] = subject
    return out


def _with_subject(out: dict, rec: dict, where: str) -> dict:
    subject = _get(rec, "subject", where, optional=True)
    if subject is not None:
        out["subject"] = subject
    return out


def _mc(rec: dict, where: str) -> dict:
    """MMLU-style: ``question``, ``choices`` (list), ``answer`` (index of the right choice)."""
    choices = _str_list(_get(rec, "choices", where, (list, tuple)), where, "choices")
    index = _get(rec, "answer", where, int)
    if not 0 <= index < len(choices):
        raise ValueError(f"{where}: field 'answer' is {index}, not an index into the {len(choices)} choices")
    return {"question": _get(rec, "question", where), "answer": choices[index],
            "perturbed_answer": [c for j, c in enumerate(choices) if j != index],
            "choices": choices, "answer_index": index}


def _general(rec: dict, where: str) -> dict:
    out = _mc(rec, where)
    task = _get(rec, "task", where, optional=True)
    if task is not None:
        out["task"] = task
    examples = _get(rec, "examples", where, (list, tuple), optional=True)
    if examples is not None:
        shots = []
        for j, ex in enumerate(examples):
            if not isinstance(ex, dict):
                raise ValueError(f"{where}: field 'examples'[{j}] is a {type(ex).__name__}, not an object")
            shots.append(_mc(ex, f"{where}, field 'examples'[{j}]"))
        out["examples"] = shots
    return _with_subject(out, rec, where)


def _reason(rec: dict, where: str) -> dict:
    out = {"question": _get(rec, "question", where), "answer": _get(rec, "answer", where)}
    for name in ("cot", "task"):
        value = _get(rec, name, where, optional=True, nonempty=False)
        if value is not None:
            out[name] = value
    return _with_subject(out, rec, where)


def _targets_of(rec: dict, where: str, field: str) -> tuple[list[str], list[str]]:
    block = _get(rec, field, where, dict)
    sub = f"{field}.choices"
    choices = _str_list(_get(block, "choices", f"{where}, field {field!r}", (list, tuple)), where, sub)
    labels = _get(block, "labels", f"{where}, field {field!r}", (list, tuple))
    if len(labels) != len(choices):
        raise ValueError(f"{where}: field '{field}.labels' has {len(labels)} entries for {len(choices)} choices")
    true = [c for c, lab in zip(choices, labels) if lab == 1]
    false = [c for c, lab in zip(choices, labels) if lab != 1]
    if not true or not false:
        raise ValueError(f"{where}: field '{field}.labels' needs at least one 1 and one 0, got {list(labels)}")
    return true, false


def _truthful(rec: dict, where: str) -> dict:
    true1, false1 = _targets_of(rec, where, "mc1_targets")
    out = {"question": _get(rec, "question", where), "answer": true1[0], "perturbed_answer": false1}
    if not _is_missing(rec.get("mc2_targets")):
        true2, false2 = _targets_of(rec, where, "mc2_targets")
        out |= {"mc2_correct": true2, "mc2_incorrect": false2}
    return _with_subject(out, rec, where)


def _factual(rec: dict, where: str) -> dict:
    answers = _get(rec, "answers", where, (list, tuple, str))
    answers = [answers] if isinstance(answers, str) else _str_list(answers, where, "answers")
    if not answers:
        raise ValueError(f"{where}: field 'answers' is empty")
    return _with_subject({"question": _get(rec, "question", where), "answer": answers[0], "answers": answers},
                         rec, where)


def _fluency(rec: dict, where: str) -> dict:
    ref = _get(rec, "output", where, optional=True, nonempty=False)
    return _with_subject({"question": _get(rec, "instruction", where), "answer": ref or ""}, rec, where)


_NORMALISE: dict[str, Callable[[dict, str], dict]] = {
    "forget_target": _target, "mia_forget": _text, "mia_retain": _text, "corpus": _text,
    "utility_general": _general, "utility_reason": _reason, "utility_truthfulness": _truthful,
    "utility_factuality": _factual, "utility_fluency": _fluency,
    **{k: _probe for k in ("forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2")},
}


# -- finding files ----------------------------------------------------------------------------
def _flat_files(root: Path, key: str) -> list[Path] | None:
    """Files of ``key`` in the config-file or ``All/`` layout, or None."""
    config, name = RWKU_SPLITS[key]
    for folder in (root, root / "data", root / "All"):
        if not folder.is_dir():
            continue
        for stem in dict.fromkeys((config, name)):
            try:
                return find_split_files(folder, stem)
            except ValueError:
                continue
    return None


def _target_dirs(root: Path) -> list[Path]:
    """The per-target folders ``{n}_{Name}`` under ``root/Target`` or ``root``, by ``n``."""
    for folder in (root / "Target", root):
        if folder.is_dir():
            dirs = [p for p in folder.iterdir() if p.is_dir() and _TARGET_DIR.match(p.name)
                    and any((p / f"forget_level1{s}").is_file() for s in _SUFFIXES)]
            if dirs:
                return sorted(dirs, key=lambda p: int(_TARGET_DIR.match(p.name).group(1)))
    return []


def _dir_file(folder: Path, key: str) -> Path | None:
    config, name = RWKU_SPLITS[key]
    for stem in dict.fromkeys((name, config)):
        for s in _SUFFIXES:
            if (folder / f"{stem}{s}").is_file():
                return folder / f"{stem}{s}"
    return None


def _listing(root: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    return ", ".join(names[:30]) + (f", ... ({len(names) - 30} more)" if len(names) > 30 else "") or "nothing"


def _read_items(files: Sequence[Path], key: str, subject: str | None = None) -> list[dict]:
    out = []
    for f in files:
        for i, rec in enumerate(read_file_records(f, "rwku file")):
            where = f"rwku file {f}, record {i}"
            item = _NORMALISE[key](rec, where)
            if subject is not None and key != "forget_target":
                item.setdefault("subject", subject)
            if key in _SUBJECT_REQUIRED and "subject" not in item:
                raise ValueError(f"{where}: field 'subject' is missing (fields: {_fields(rec)})")
            out.append(item)
    return out


# -- the loader -------------------------------------------------------------------------------
def load_rwku(path: str | Path, targets: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """RWKU's splits from a local directory, as canonical item lists (module doc for layouts).

    Args:
        path: the directory: a folder of config files, the hub repository (its ``All/`` is
            used; without one, its ``Target/``), ``All/`` itself, or a ``Target/`` folder.
        targets: keep only these targets' items in the subject-keyed splits (and in
            ``forget_target``); ``None`` keeps all. A name not in ``forget_target`` is an error.

    Returns the keys of :data:`RWKU_SPLITS`; those of :data:`OPTIONAL_SPLITS` are ``[]``
    when their file is absent. A file that exists but holds no records is an error.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"rwku data directory {str(root)!r} does not exist or is not a directory "
                         "(expected RWKU's config files, its All/ folder or its Target/<n>_<name>/ folders)")
    out: dict[str, list[dict]] = {}
    flat = {key: _flat_files(root, key) for key in RWKU_SPLITS}
    if flat["forget_level1"] is not None:
        for key, files in flat.items():
            if files is None:
                if key in OPTIONAL_SPLITS:
                    out[key] = []
                    continue
                config, name = RWKU_SPLITS[key]
                raise ValueError(f"rwku data directory {str(root)!r}: no file for split {key!r} (looked for "
                                 f"{config}.json/.jsonl/.parquet, {name}.json/... and {config}/, also under data/ "
                                 f"and All/); files there: {_listing(root)}")
            out[key] = _read_items(files, key)
    else:
        dirs = _target_dirs(root)
        if not dirs:
            raise ValueError(f"rwku data directory {str(root)!r}: no RWKU files (expected forget_level1.json or "
                             f"another config file, All/forget_level1.json, or Target/<n>_<name>/forget_level1.json); "
                             f"files there: {_listing(root)}")
        out = {key: [] for key in RWKU_SPLITS}
        shared = root / "All" if (root / "All").is_dir() else root.parent / "All"
        for d in dirs:
            intro = _dir_file(d, "forget_target")
            if intro is not None:
                tgt = _read_items([intro], "forget_target")
            else:  # the folder name: spaces became underscores
                name = _TARGET_DIR.match(d.name).group(2).replace("_", " ")
                tgt = [{"question": "", "answer": name, "subject": name}]
            out["forget_target"] += tgt
            name = tgt[0]["subject"]
            for key in RWKU_SPLITS:
                if key == "forget_target":
                    continue
                f = _dir_file(d, key)
                if f is None:
                    if key in OPTIONAL_SPLITS:
                        continue
                    raise ValueError(f"rwku target folder {d}: no file for split {key!r} (expected "
                                     f"{RWKU_SPLITS[key][1]}.json); files there: {_listing(d)}")
                out[key] += _read_items([f], key, subject=name)
        for key in ("mia_retain",):  # shipped only in All/ on the hub
            if not out[key] and shared.is_dir() and (f := _dir_file(shared, key)) is not None:
                out[key] = _read_items([f], key)
    if targets is not None:
        out = _filter(out, targets, root)
    return out


def _filter(out: dict[str, list[dict]], targets: Sequence[str], root: Path) -> dict[str, list[dict]]:
    if isinstance(targets, str):
        targets = [targets]
    known = [t["subject"] for t in out["forget_target"]]
    for t in targets:
        if not isinstance(t, str):
            raise ValueError(f"rwku targets: {t!r} is a {type(t).__name__}, not a target name")
        if t not in known:
            raise ValueError(f"rwku targets: unknown target {t!r} (not in forget_target of {str(root)!r}, "
                             f"{len(known)} targets){did_you_mean(t, known)}")
    keep = set(targets)
    filtered = {"forget_target": [t for t in out["forget_target"] if t["subject"] in keep]}
    for key, items in out.items():
        if key == "forget_target":
            continue
        if key in SUBJECT_SPLITS:  # items without a subject (utility sets may lack one) are shared
            items = [it for it in items if it.get("subject", None) in keep or "subject" not in it]
        filtered[key] = items
    return filtered
