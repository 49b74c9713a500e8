"""Adapters: the only place that knows a model family (``text.TextAdapter``, ``image.ImageAdapter``).

The contract they implement is in :mod:`unlearn.adapters.base` (``Adapter``, ``TextModel``,
``ImageModel``); ``unlearn.models.load_model`` loads any of them, saved wrapped models included."""

from __future__ import annotations

import hashlib
import json

import torch


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its class name if there is none)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def weights_fingerprint(module) -> str:
    """sha256 (16 hex) over a module's state-dict names and bytes (as float32): identifies the
    exact weights, whatever their dtype or device."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex) over what decides a tokenizer's ids: the serialised fast tokenizer (vocab,
    merges, normaliser, pre-tokeniser, post-processor) or, for a slow one, its vocabulary; its
    special tokens; and its padding/truncation sides and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {"special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
             "padding_side": getattr(tokenizer, "padding_side", None),
             "truncation_side": getattr(tokenizer, "truncation_side", None),
             "chat_template": str(getattr(tokenizer, "chat_template", None)),
             "class": type(tokenizer).__name__}
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:16]


def nonfinite_parameter(module) -> str | None:
    """The name of the first parameter of ``module`` holding NaN/Inf, or None."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not torch.isfinite(p).all():
                return name
    return None
