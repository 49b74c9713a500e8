"""Stand-ins shared by test files (imported as ``from _fakes import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

import hashlib

import numpy as np


class HashEncoder:
    """Bag of hashed words, L2-normalised: a deterministic stand-in for ECO's sentence encoder."""

    dim = 64

    def __init__(self, source: str = "test-hash-encoder", fingerprint: str = "hash-encoder-v1") -> None:
        self.source, self._fingerprint = source, fingerprint

    def fingerprint(self):
        return self._fingerprint

    def encode(self, texts):
        z = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace("?", " ").split():
                z[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-9)
