"""Real TOFU data (``locuslab/TOFU``) read from a local directory: no hub, no network.

TOFU ships one file per config, named after the split: ``forget01.json``,
``forget10_perturbed.json``, ``retain90.json``, ``retain_perturbed.json``,
``real_authors_perturbed.json``, ``world_facts_perturbed.json``, ``holdout10.json``,
``full.json``, ... The ``.json`` files are JSON *lines* (one object per line); mirrors also
use a JSON array, ``.jsonl``, or parquet (``forget10.parquet``,
``forget10-00000-of-00001.parquet``, or the hub's ``forget10/train/0000.parquet``).

:func:`load_tofu_dir` turns such a directory into :class:`~unlearn.data.UnlearningData`
whose items have exactly the fields of the synthetic world's items
(:mod:`unlearn.tasks.tofu_world`): ``question``, ``answer``, ``paraphrased_answer``,
``perturbed_answer`` (a list of strings), ``paraphrased_question`` and, where the file has
them, ``author_id``, ``author``, ``attribute``, ``value``. A field the file does not have is
absent from the item, never ``None``.

Evaluation splits (the names of ``task.eval_splits``):

* ``forget`` -- the forget split; its ``paraphrased_answer``/``perturbed_answer`` come
  from ``{forget_split}_perturbed`` (matched by question) when the forget file lacks them;
* ``retain_eval`` -- ``retain_perturbed``;
* ``real_authors``/``world_facts`` -- ``real_authors_perturbed``/``world_facts_perturbed``,
  or ``real_authors``/``world_facts`` whose ``option1..option4`` become the wrong answers;
* ``holdout`` -- ``holdout{NN}`` of the forget split's percentage (``forget10`` ->
  ``holdout10``), or ``holdout``; its items need only ``question`` and ``answer`` (all that
  TOFU's holdout files have, and all that membership inference reads);
* any other name -- the file of that split.

See ``docs/data.md``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from unlearn.data import UnlearningData

__all__ = [
    "DEFAULT_EVAL_SPLITS", "EVAL_FIELDS", "FORGET_RETAIN_PAIRS", "HOLDOUT_FIELDS", "ITEM_FIELDS", "MC_SPLITS",
    "find_split_file", "find_split_files", "load_tofu_dir", "normalize_item", "read_records", "read_split",
]

# Fields of a synthetic-world item, in the order an item lists them.
ITEM_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question",
               "author_id", "author", "attribute", "value")
TRAIN_FIELDS = ("question", "answer")
EVAL_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
HOLDOUT_FIELDS = ("question", "answer")  # the holdout split serves MIA, which reads only these
MC_SPLITS = ("real_authors", "world_facts")
FORGET_RETAIN_PAIRS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
DEFAULT_EVAL_SPLITS = ("forget", "retain_eval", "real_authors", "world_facts")

_STR_FIELDS = ("question", "answer", "paraphrased_answer", "paraphrased_question", "author", "attribute", "value")
_OPTION = re.compile(r"^option(\d+)$")
_PCT = re.compile(r"^(forget|retain|holdout)(\d+)$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


# -- reading files ----------------------------------------------------------------------------
def read_records(path: str | Path, *, allow_empty: bool = False) -> list[dict]:
    """The records (dicts) of one data file, or of every data file under a directory.

    ``.json``: a JSON array of objects, one object, or JSON lines (TOFU's own ``.json``
    files are JSON lines); ``.jsonl``: JSON lines; ``.parquet``: read with pyarrow. A file
    that cannot be parsed, a record that is not an object, or (unless ``allow_empty``) a
    file without records is a ``ValueError`` that names the file.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: directory holds no .json, .jsonl or .parquet file")
        out = [r for f in files for r in read_records(f, allow_empty=True)]
        if not out and not allow_empty:
            raise ValueError(f"{path}: the files of this directory hold no records")
        return out
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records = _read_parquet(path)
    elif suffix in (".json", ".jsonl"):
        records = _read_json(path, lines_only=(suffix == ".jsonl"))
    else:
        raise ValueError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; use .json, .jsonl or .parquet")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is a {type(rec).__name__}, not a JSON object")
    if not records and not allow_empty:
        raise ValueError(f"{path}: the file is empty (no records)")
    return records


def _read_json(path: Path, *, lines_only: bool) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    text = text.lstrip("\ufeff")
    body = text.strip()
    if not body:
        return []
    if not lines_only:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if body.startswith("["):  # a JSON array that is broken: say where
                raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
            whole = None  # JSON lines (several objects) fail as one document: read line by line
        else:
            if isinstance(whole, list):
                return whole
            if isinstance(whole, dict):
                return [whole]
            raise ValueError(f"{path}: holds a JSON {type(whole).__name__}, not an array or objects")
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg}, column {e.colno})") from None
    return out


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with datasets
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow): {e}") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


# -- finding files ----------------------------------------------------------------------------
def _candidates(folder: Path, split: str) -> list[list[Path]]:
    """Possible files of ``split`` directly in ``folder``, best first; each entry lists shards."""
    out: list[list[Path]] = []
    for name in (f"{split}.json", f"{split}.jsonl", f"{split}.parquet"):
        if (folder / name).is_file():
            out.append([folder / name])
    shards = sorted(p for p in folder.glob(f"{glob_escape(split)}-*.parquet") if p.is_file())
    if shards:
        out.append(shards)
    sub = folder / split
    if sub.is_dir():  # the hub's parquet export: <split>/train/0000.parquet
        files = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES)
        if files:
            out.append(files)
    return out


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _listing(root: Path) -> str:
    names = []
    for folder, prefix in ((root, ""), (root / "data", "data/")):
        if folder.is_dir():
            names += sorted(prefix + p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "the directory is empty"
    shown = ", ".join(names[:40]) + (f", ... ({len(names) - 40} more)" if len(names) > 40 else "")
    return f"files there: {shown}"


def find_split_files(root: str | Path, split: str) -> list[Path]:
    """All files of ``split`` under ``root`` (several when the split is sharded), in order.

    Looked for, in ``root`` and then in ``root/data``: ``{split}.json``, ``{split}.jsonl``,
    ``{split}.parquet``, ``{split}-*.parquet`` (shards), and a folder ``{split}/`` of data
    files (the hub's parquet export, ``{split}/train/0000.parquet``). The first that exists
    wins. None found: a ``ValueError`` naming the split and listing the files that are there.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"TOFU data directory {str(root)!r} does not exist or is not a directory")
    for folder in (root, root / "data"):
        if folder.is_dir():
            found = _candidates(folder, split)
            if found:
                return found[0]
    raise ValueError(
        f"no file for split {split!r} in {str(root)!r} (looked for {split}.json, {split}.jsonl, {split}.parquet, "
        f"{split}-*.parquet and {split}/, also under data/); {_listing(root)}"
    )


def find_split_file(root: str | Path, split: str) -> Path:
    """The one file of ``split`` under ``root`` (see :func:`find_split_files` for the names
    looked for). A split sharded into several files is an error here: read it with
    :func:`find_split_files` or :func:`read_split`."""
    files = find_split_files(root, split)
    if len(files) > 1:
        raise ValueError(f"split {split!r} in {str(root)!r} is sharded into {len(files)} files "
                         f"({', '.join(p.name for p in files[:4])}{', ...' if len(files) > 4 else ''}); "
                         "use find_split_files() or read_split() to read them all")
    return files[0]


def read_split(root: str | Path, split: str, *, allow_empty: bool = False) -> tuple[list[dict], str]:
    """The records of ``split`` under ``root`` and a label naming the file(s) they came from."""
    files = find_split_files(root, split)
    records = [r for f in files for r in read_records(f, allow_empty=True)]
    label = str(files[0]) if len(files) == 1 else f"{files[0].parent}/{{{', '.join(p.name for p in files)}}}"
    if not records and not allow_empty:
        raise ValueError(f"{label}: split {split!r} is empty (no records)")
    return records, label


# -- normalising items ------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN from a dataframe-written file
        return True
    return False


def _as_str_list(value: Any, source: str, name: str) -> list[str]:
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, (bytes, dict))):
        items = list(value.tolist() if hasattr(value, "tolist") else value)
    else:
        raise ValueError(f"{source}: field {name!r} must be a string or a list of strings, got {type(value).__name__}")
    for j, x in enumerate(items):
        if not isinstance(x, str):
            raise ValueError(f"{source}: field {name!r}[{j}] must be a string, got {type(x).__name__} ({x!r})")
    return items


def _options(rec: dict) -> list[tuple[int, Any]]:
    found = [(int(m.group(1)), v) for k, v in rec.items() if (m := _OPTION.match(str(k))) and not _missing(v)]
    return sorted(found)


def normalize_item(rec: dict, source: str, *, required: Sequence[str] = TRAIN_FIELDS,
                   multiple_choice: bool = False) -> dict:
    """One TOFU record as an item of the synthetic world's schema.

    Keeps the fields of :data:`ITEM_FIELDS` (others, e.g. ``option1``, ``index``, are
    dropped); ``perturbed_answer`` becomes a list of strings; a field that is missing,
    ``None`` or NaN is absent from the result. With ``multiple_choice`` (real_authors,
    world_facts), a record without ``perturbed_answer`` takes as wrong answers its
    ``option1..optionN`` that differ from ``answer``, and ``paraphrased_answer`` /
    ``paraphrased_question`` default to ``answer`` / ``question`` as in the synthetic world.

    ``source`` names the record in errors (e.g. ``"/data/TOFU/forget10.json, record 3"``).
    A field of ``required`` that is missing or empty is a ``ValueError`` naming ``source``
    and the field.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"{source}: is a {type(rec).__name__}, not an object with question/answer fields")
    out: dict[str, Any] = {}
    for name in ITEM_FIELDS:
        value = rec.get(name)
        if _missing(value):
            continue
        if name == "perturbed_answer":
            items = _as_str_list(value, source, name)
            if items:
                out[name] = items
        elif name == "author_id":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                raise ValueError(f"{source}: field 'author_id' must be an integer, got {type(value).__name__} ({value!r})")
            out[name] = int(value)
        else:
            if not isinstance(value, str):
                raise ValueError(f"{source}: field {name!r} must be a string, got {type(value).__name__} ({value!r})")
            out[name] = value
    if multiple_choice:
        if "perturbed_answer" not in out and "answer" in out:
            opts = _options(rec)
            if opts:
                for n, v in opts:
                    if not isinstance(v, str):
                        raise ValueError(f"{source}: field 'option{n}' must be a string, got {type(v).__name__} ({v!r})")
                wrong = [v for _, v in opts if v.strip() != out["answer"].strip()]
                if wrong:
                    out["perturbed_answer"] = wrong
        if "answer" in out:
            out.setdefault("paraphrased_answer", out["answer"])
        if "question" in out:
            out.setdefault("paraphrased_question", out["question"])
    for name in required:
        if name not in out:
            hint = ""
            if name == "perturbed_answer" and multiple_choice:
                hint = " (and no option1..optionN that differ from the answer)"
            raise ValueError(f"{source}: missing required field {name!r}{hint}")
        if name != "perturbed_answer" and name in _STR_FIELDS and not out[name].strip():
            raise ValueError(f"{source}: required field {name!r} is empty")
    return {k: out[k] for k in ITEM_FIELDS if k in out}


def _normalize_all(records: Iterable[dict], label: str, **kw) -> list[dict]:
    return [normalize_item(r, f"{label}, record {i}", **kw) for i, r in enumerate(records)]


# -- the loader -------------------------------------------------------------------------------
def _check_pair(forget_split: str, retain_split: str | None) -> None:
    """``forgetNN`` pairs with ``retain{100-NN}`` (forget01/retain99, forget05/retain95,
    forget10/retain90); splits with other names are not checked."""
    if retain_split is None:
        return
    f, r = _PCT.match(forget_split), _PCT.match(retain_split)
    if not (f and r and f.group(1) == "forget" and r.group(1) == "retain"):
        return
    want = FORGET_RETAIN_PAIRS.get(forget_split)
    if want is None and int(f.group(2)) <= 100:
        want = f"retain{100 - int(f.group(2)):02d}"
    if want is not None and retain_split != want:
        raise ValueError(f"retain split {retain_split!r} does not pair with forget split {forget_split!r}: "
                         f"the retain set of {forget_split} is its complement, {want!r}")


def _merge_perturbed(forget: list[dict], root: Path, forget_split: str) -> None:
    """Fill missing paraphrased/perturbed fields of forget records from ``{forget_split}_perturbed``."""
    if all(not _missing(r.get("perturbed_answer")) and not _missing(r.get("paraphrased_answer")) for r in forget):
        return
    try:
        pert, label = read_split(root, f"{forget_split}_perturbed", allow_empty=True)
    except ValueError as e:
        if str(e).startswith("no file for split"):
            return  # optional: only the 'forget' evaluation needs these fields
        raise
    by_question: dict[str, dict] = {}
    for i, r in enumerate(pert):
        if not isinstance(r, dict):
            raise ValueError(f"{label}, record {i}: is a {type(r).__name__}, not an object")
        q = r.get("question")
        if isinstance(q, str):
            by_question.setdefault(q.strip(), r)
    for rec in forget:
        q = rec.get("question")
        match = by_question.get(q.strip()) if isinstance(q, str) else None
        if match is None:
            continue
        for name in ("paraphrased_answer", "perturbed_answer", "paraphrased_question"):
            if _missing(rec.get(name)) and not _missing(match.get(name)):
                rec[name] = match[name]


def _first_split(root: Path, names: Sequence[str]) -> str:
    """The first of ``names`` that has a file under ``root``; none: an error naming them all."""
    for name in names:
        try:
            find_split_files(root, name)
            return name
        except ValueError:
            continue
    tried = " or ".join(repr(n) for n in names)
    raise ValueError(f"no file for split {tried} in {str(root)!r} (looked for <split>.json, .jsonl, .parquet, "
                     f"<split>-*.parquet and <split>/, also under data/); {_listing(root)}")


def load_tofu_dir(root: str | Path, forget_split: str = "forget10", retain_split: str | None = "retain90",
                  eval_splits: Sequence[str] = DEFAULT_EVAL_SPLITS) -> UnlearningData:
    """:class:`UnlearningData` from a directory of TOFU-format files (see the module doc).

    Args:
        root: the directory (``/data/TOFU``); its ``data/`` sub-folder is searched too.
        forget_split: the forget split's file name without suffix (``forget01/05/10``, or any).
        retain_split: the retain split (``retain99/95/90`` pair with ``forget01/05/10``), or
            ``None`` for a retain-free setting.
        eval_splits: names of the evaluation splits to load (module doc); ``()`` for none.

    Every problem is a ``ValueError`` that names the directory, file, record or field.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise ValueError(f"TOFU data directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"TOFU data path {str(root)!r} is not a directory")
    if not isinstance(forget_split, str) or not forget_split.strip():
        raise ValueError("forget_split is empty; name the forget split, e.g. 'forget10'")
    if isinstance(eval_splits, str):
        eval_splits = (eval_splits,)
    seen: set[str] = set()
    for s in eval_splits:
        if s in seen:
            raise ValueError(f"evaluation split {s!r} is named twice")
        seen.add(s)
    _check_pair(forget_split, retain_split)

    # forget: training items need question/answer; the 'forget' evaluation needs the rest
    raw, label = read_split(root, forget_split, allow_empty=True)
    if not raw:
        raise ValueError(f"{label}: forget split {forget_split!r} is empty; there is nothing to forget")
    raw = [dict(r) if isinstance(r, dict) else r for r in raw]
    _merge_perturbed(raw, root, forget_split)
    forget = _normalize_all(raw, label, required=TRAIN_FIELDS)

    retain = None
    if retain_split is not None:
        r_raw, r_label = read_split(root, retain_split, allow_empty=True)
        if not r_raw:
            raise ValueError(f"{r_label}: retain split {retain_split!r} is empty; set retain_split to None "
                             "for a retain-free setting")
        retain = _normalize_all(r_raw, r_label, required=TRAIN_FIELDS)

    evals: dict[str, list[dict]] = {}
    pct = _PCT.match(forget_split)
    for name in eval_splits:
        if name == "forget":
            hint = f" (from {forget_split!r} or {forget_split + '_perturbed'!r})"
            try:
                evals[name] = _normalize_all(raw, label, required=EVAL_FIELDS)
            except ValueError as e:
                raise ValueError(f"{e}{hint}; the 'forget' evaluation split needs {', '.join(EVAL_FIELDS)}") from None
            continue
        if name in MC_SPLITS:
            split = _first_split(root, (f"{name}_perturbed", name))
            items, lab = read_split(root, split)
            evals[name] = _normalize_all(items, lab, required=EVAL_FIELDS, multiple_choice=True)
            continue
        if name == "retain_eval":
            split = "retain_perturbed"
        elif name == "holdout":
            names = ([f"holdout{pct.group(2)}"] if pct else []) + ["holdout"]
            items, lab = read_split(root, _first_split(root, names))
            evals[name] = _normalize_all(items, lab, required=HOLDOUT_FIELDS)
            continue
        else:
            split = name
        items, lab = read_split(root, split)
        evals[name] = _normalize_all(items, lab, required=EVAL_FIELDS)
    return UnlearningData(forget=forget, retain=retain, eval_splits=evals, name=f"tofu_files/{forget_split}")
