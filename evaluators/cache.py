"""The evaluation result cache, shared by every suite.

A result is stored as JSON under a key made of everything that determines it: the model's
:meth:`~unlearn.adapters.base.Adapter.identity` (weights, tokenizer files, tokenisation mode,
prompt; for images the scheduler), whatever else the caller passes (suite name and version,
protocol, judge, settings), the content of every split, and the versions of this toolkit and
of the libraries that compute the numbers. Never by metric name alone: a changed item, setting,
tokenizer or weight is a different key. Files are written atomically; an entry that cannot be
read back (truncated, not JSON, not a result) is discarded with a warning and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable

from unlearn._version import __version__
from unlearn.distributed import all_true, is_main
from unlearn.data import items_fingerprint
from unlearn.runs import atomic_write_text, library_versions
from unlearn.zoo import cache_dir

CACHE_VERSION = "3"  # bump when the layout of a cached result changes
# libraries whose version can change a number (tokenisation, kernels, schedulers, metrics)
KEY_LIBRARIES = ("torch", "transformers", "tokenizers", "diffusers", "scikit-learn", "scipy", "rouge-score", "numpy")



def default_cache_dir() -> Path:
    """Where runs cache evaluation results: ``<unlearn cache>/eval`` (``UNLEARN_CACHE``)."""
    return cache_dir() / "eval"


def cache_key(parts: dict[str, Any], splits: dict[str, list[dict]]) -> str:
    """24 hex characters of sha256 over ``parts`` (JSON, sorted keys), the cache version, the
    toolkit and library versions and the split contents."""
    h = hashlib.sha256()
    h.update(json.dumps({**parts, "cache": CACHE_VERSION, "unlearn": __version__, "libraries": library_versions(KEY_LIBRARIES),
                         "splits": {k: items_fingerprint(v) for k, v in sorted(splits.items())}},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def cached_result(cache_dir: str | Path | None, parts: dict[str, Any], splits: dict[str, list[dict]],
                  compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, or the stored result of the same key; ``cache_dir=None`` disables the cache."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{cache_key(parts, splits)}.json"
    res = None
    if path.exists():
        try:
            res = json.loads(path.read_text())
            if not (isinstance(res, dict) and res):
                res, problem = None, "not a result"
        except (OSError, UnicodeDecodeError, ValueError) as e:
            res, problem = None, (str(e).splitlines()[0] if str(e) else type(e).__name__)
        if res is None:
            warnings.warn(f"discarded the unreadable evaluation cache entry {path} ({problem}); recomputing",
                          RuntimeWarning, stacklevel=2)
            if is_main():
                path.unlink(missing_ok=True)
    # with several processes, a hit must be a hit everywhere: the computation is shared between them
    if all_true(res is not None):
        return res
    res = compute()
    if is_main():
        atomic_write_text(path, json.dumps(res))
    return res
