"""The evaluation result cache, shared by every suite.

A result is stored as JSON under a key made of everything that determines it: the model's
weights fingerprint and whatever else the caller passes (suite name and version, protocol,
judge, settings), plus the content of every split. Never by metric name alone: a changed item,
setting or weight is a different key. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from unlearn.data import items_fingerprint
from unlearn.runs import atomic_write_text
from unlearn.zoo import cache_dir

CACHE_VERSION = "2"  # bump when the layout of a cached result changes


def default_cache_dir() -> Path:
    """Where runs cache evaluation results: ``<unlearn cache>/eval`` (``UNLEARN_CACHE``)."""
    return cache_dir() / "eval"


def cache_key(parts: dict[str, Any], splits: dict[str, list[dict]]) -> str:
    """24 hex characters of sha256 over ``parts`` (JSON, sorted keys), the cache version and the
    split contents."""
    h = hashlib.sha256()
    h.update(json.dumps({**parts, "cache": CACHE_VERSION,
                         "splits": {k: items_fingerprint(v) for k, v in sorted(splits.items())}},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def cached_result(cache_dir: str | Path | None, parts: dict[str, Any], splits: dict[str, list[dict]],
                  compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, or the stored result of the same key; ``cache_dir=None`` disables the cache."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{cache_key(parts, splits)}.json"
    if path.exists():
        return json.loads(path.read_text())
    res = compute()
    atomic_write_text(path, json.dumps(res))
    return res
