"""Real MUSE data (``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books``) read from a local directory.

Two real layouts are read (sources in ``docs/passages_files.md``):

* **the hub repository** -- one folder per config with parquet shards named after the
  split: ``raw/{forget,retain1,retain2,holdout}-00000-of-00001.parquet`` (field ``text``),
  ``knowmem/{forget_qa,retain_qa,forget_qa_icl,retain_qa_icl}-*.parquet`` (``question``,
  ``answer``; MUSE-Books and older MUSE-News revisions say ``retain2_qa``),
  ``verbmem/forget-*.parquet`` (``prompt``, ``gt``), ``privleak/{forget,retain,holdout}-*.parquet``
  (``text``; older revisions ``retain2``), ``scal/forget_{1..4}``, ``sust/forget_{1..4}``; and
  next to them the JSON files of the first upload (``verbmem/forget.json``,
  ``privleak/retain2.json``, ``knowmem/forget-qa.json``, ``knowmem/retain2-qa-icl.json`` ...);
* **the GitHub repo's ``data/{news,books}/``** -- ``raw/forget.txt``, ``raw/retain1.txt``,
  ``raw/retain2.txt``, ``raw/holdout.txt`` (one whole text each), ``verbmem/forget.json``,
  ``privleak/{forget,retain,holdout}.json``, ``knowmem/{forget_qa,forget_qa_icl,retain_qa,
  retain_qa_icl}.json``.

Per split, the first name of :data:`MUSE_SPLITS` that has a file wins; each name is tried as
``.txt``, ``.json``, ``.jsonl``, ``.parquet`` and ``-*.parquet`` shards. Text records may be
objects with ``text`` or plain strings. Every problem is one ``ValueError`` line naming the
file, the record (0-based index) and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearn.tasks.rwku_files import _get, read_file_records

__all__ = ["MUSE_SPLITS", "OPTIONAL_SPLITS", "load_muse"]

# canonical key -> (folder, split names to try in order)
MUSE_SPLITS: dict[str, tuple[str, tuple[str, ...]]] = {
    "forget": ("raw", ("forget",)),
    "retain": ("raw", ("retain1",)),
    "retain2": ("raw", ("retain2",)),
    "holdout": ("raw", ("holdout",)),
    "verbmem_forget": ("verbmem", ("forget",)),
    "knowmem_forget": ("knowmem", ("forget_qa", "forget-qa")),
    "knowmem_retain": ("knowmem", ("retain_qa", "retain2_qa", "retain-qa", "retain2-qa")),
    "knowmem_forget_icl": ("knowmem", ("forget_qa_icl", "forget-qa-icl")),
    "knowmem_retain_icl": ("knowmem", ("retain_qa_icl", "retain2_qa_icl", "retain-qa-icl", "retain2-qa-icl")),
    "privleak_forget": ("privleak", ("forget",)),
    "privleak_retain": ("privleak", ("retain", "retain2")),
    "privleak_holdout": ("privleak", ("holdout",)),
    **{f"scal_forget_{k}": ("scal", (f"forget_{k}",)) for k in range(1, 5)},
    **{f"sust_forget_{k}": ("sust", (f"forget_{k}",)) for k in range(1, 5)},
}
# absent files leave these keys out of the result; the others must exist
OPTIONAL_SPLITS = ("retain2", "holdout", "knowmem_forget_icl", "knowmem_retain_icl",
                   *(f"{m}_forget_{k}" for m in ("scal", "sust") for k in range(1, 5)))
_TEXT_KEYS = ("forget", "retain", "retain2", "holdout", "privleak_forget", "privleak_retain", "privleak_holdout",
              *(f"{m}_forget_{k}" for m in ("scal", "sust") for k in range(1, 5)))
_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")


def _files(folder: Path, names: tuple[str, ...]) -> list[Path] | None:
    if not folder.is_dir():
        return None
    for name in names:
        for s in _SUFFIXES:
            if (folder / f"{name}{s}").is_file():
                return [folder / f"{name}{s}"]
        shards = sorted(p for p in folder.glob(f"{name}-*.parquet") if p.is_file())
        if shards:
            return shards
    return None


def _text_item(rec: Any, where: str) -> dict:
    if isinstance(rec, str):
        if not rec.strip():
            raise ValueError(f"{where}: the text is empty")
        return {"question": "", "answer": rec}
    return {"question": "", "answer": _get(rec, "text", where)}


def _verbmem_item(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: is a {type(rec).__name__}, not an object with fields 'prompt' and 'gt'")
    return {"question": "", "prefix": _get(rec, "prompt", where), "answer": _get(rec, "gt", where)}


def _qa_item(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: is a {type(rec).__name__}, not an object with fields 'question' and 'answer'")
    return {"question": _get(rec, "question", where), "answer": _get(rec, "answer", where)}


def load_muse(path: str | Path) -> dict[str, list[dict]]:
    """MUSE-News or MUSE-Books from a local directory, as canonical item lists.

    Args:
        path: the dataset directory (the hub repository, or the GitHub repo's
            ``data/news`` / ``data/books``); a ``data/`` sub-folder is searched too.

    Returns ``forget``, ``retain`` (= ``raw/retain1``, MUSE's retain set for unlearning),
    ``verbmem_forget``, ``knowmem_forget``, ``knowmem_retain``, ``privleak_forget``,
    ``privleak_retain``, ``privleak_holdout`` always, and ``retain2``, ``holdout``,
    ``knowmem_forget_icl``, ``knowmem_retain_icl``, ``scal_forget_{1..4}``,
    ``sust_forget_{1..4}`` when their files exist.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"muse data directory {str(root)!r} does not exist or is not a directory "
                         "(expected MUSE's raw/, knowmem/, verbmem/ and privleak/ folders)")
    if not (root / "raw").is_dir() and (root / "data" / "raw").is_dir():
        root = root / "data"
    out: dict[str, list[dict]] = {}
    for key, (folder, names) in MUSE_SPLITS.items():
        files = _files(root / folder, names)
        if files is None:
            if key in OPTIONAL_SPLITS:
                continue
            tried = ", ".join(f"{folder}/{n}.txt/.json/.jsonl/.parquet/-*.parquet" for n in names)
            there = (", ".join(sorted(p.name for p in (root / folder).iterdir())) or "nothing") \
                if (root / folder).is_dir() else f"no folder {folder}/"
            raise ValueError(f"muse data directory {str(root)!r}: no file for split {key!r} "
                             f"(looked for {tried}); {folder}/ holds: {there}")
        if key in _TEXT_KEYS:
            make, strings_ok = _text_item, True
        elif key == "verbmem_forget":
            make, strings_ok = _verbmem_item, False
        else:
            make, strings_ok = _qa_item, False
        items = []
        for f in files:
            records = read_file_records(f, "muse file", strings_ok=strings_ok)
            items += [make(rec, f"muse file {f}, record {i}") for i, rec in enumerate(records)]
        out[key] = items
    return out
