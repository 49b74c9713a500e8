"""The ``tofu`` suite as one call: run a named suite through the harness, with a result cache.

The metrics themselves live in :mod:`unlearn.evaluators.suites` and the pass planning in
:mod:`unlearn.evaluators.harness`; this module adds the cache key (model identity:
weights, tokenizer, tokenisation, prompt; suite and version, settings, split contents) and the aggregates call
the TOFU task uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearn.evaluators import harness
from unlearn.evaluators.cache import cached_result
from unlearn.evaluators.suites import get_suite


def evaluate(adapter, splits: dict[str, list[dict]], *, batch_size: int = 32, max_new_tokens: int = 48,
             cache_dir: str | Path | None = None, progress: bool = True, label: str = "model",
             suite: str = "tofu") -> dict[str, Any]:
    """Run a named suite (default ``tofu``) through the harness on every split.

    Results are cached (when ``cache_dir`` is given) under a key made of the model's identity
    (weights, tokenizer, tokenisation, prompt), the suite and its version, the settings and
    the split contents -- never by metric name alone (:mod:`unlearn.evaluators.cache`).
    """
    st = get_suite(suite, max_new_tokens=max_new_tokens)
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "suite": st.name, "suite_version": st.version}
    protocol = {"tokenization": adapter.tokenization, "prompt_template": adapter.prompt_template,
                "decoding": "greedy", "memorization_convention": "reference", "max_new_tokens": max_new_tokens}
    parts = {"model": adapter.identity(), "settings": settings, "protocol": protocol}
    return cached_result(cache_dir, parts, splits,
                         lambda: harness.evaluate(adapter, splits, st, batch_size=batch_size, progress=progress,
                                                  label=label, protocol=protocol))


def summarize(res: dict[str, Any], retain_res: dict[str, Any] | None, forget_split: str = "forget") -> dict[str, Any]:
    """The suite's aggregates: forget quality (vs the retain model's forget truth ratios),
    model utility (harmonic mean of the nine utility values), and for ``tofu-full`` the MIA
    reference attack and privleak."""
    return harness.aggregate(res, get_suite(res.get("suite", "tofu")), retain_res)
