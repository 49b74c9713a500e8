"""Adapters: the only place that knows a model family (``text.TextAdapter``, ``image.ImageAdapter``).

The contract they implement is in :mod:`unlearn.adapters.base` (``Adapter``, ``TextModel``,
``ImageModel``); ``unlearn.models.load_model`` loads any of them, saved wrapped models included."""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(module) -> str:
    """sha256 (16 hex) over a module's state-dict names and bytes (as float32): identifies the
    exact weights, whatever their dtype or device."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
