"""The modality-free data model: a forget set, an optional retain set, named evaluation splits.

Items are plain dicts. Text items carry ``question``/``answer`` (and, for TOFU-style
evaluation, ``paraphrased_answer``, ``perturbed_answer``, ``paraphrased_question``);
image items carry ``prompt``/``concept``/... The core never looks inside an item: objectives
hand batches to the adapter, which knows the modality.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


def items_fingerprint(items: list[dict]) -> str:
    """A short content hash of a list of items (order-sensitive), for provenance and caches."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class UnlearningData:
    """What to forget, what to keep, and what to evaluate on.

    Args:
        forget: items to forget; must be non-empty.
        retain: items whose behaviour should be kept; ``None`` for retain-free settings
            (FLAT, zero-shot RWKU-style). An empty list is an error: say ``None`` instead.
        eval_splits: named evaluation splits, e.g. ``{"forget": [...], "retain": [...],
            "real_authors": [...], "world_facts": [...], "holdout": [...]}``.
        name: a label used in reports.
    """

    forget: list[dict]
    retain: list[dict] | None = None
    eval_splits: dict[str, list[dict]] = field(default_factory=dict)
    name: str = "data"

    def __post_init__(self) -> None:
        if not isinstance(self.forget, list) or not self.forget:
            raise ValueError(f"{self.name}: the forget set is empty; give at least one item to forget")
        if self.retain is not None and not self.retain:
            raise ValueError(f"{self.name}: the retain set is empty; pass retain=None for a retain-free setting")
        for split, items in self.eval_splits.items():
            if not items:
                raise ValueError(f"{self.name}: evaluation split {split!r} is empty")

    def split(self, name: str) -> list[dict]:
        """An evaluation split by name; a missing name is an error that lists the known ones."""
        if name not in self.eval_splits:
            raise ValueError(f"{self.name}: no evaluation split {name!r}; available: {sorted(self.eval_splits)}")
        return self.eval_splits[name]

    def warnings(self) -> list[str]:
        """What looks wrong but may be meant: the same question twice in the forget (or retain)
        set, and questions in both the forget and the retain set (training then pulls the same
        item both ways). Items are compared by their ``question`` text, whitespace-normalised
        and case-folded. Items without a question (image renders, where one caption is drawn
        with many seeds on purpose) are not checked."""
        key = "question"
        if not all(isinstance(it, dict) and key in it for it in self.forget):
            return []

        def texts(items):
            return [" ".join(str(it.get(key, "")).split()).casefold() for it in items]

        out = []
        f = texts(self.forget)
        for name, t in (("forget", f), ("retain", texts(self.retain) if self.retain else [])):
            dup = len(t) - len(set(t))
            if dup:
                first = next(x for x in t if t.count(x) > 1)
                out.append(f"{self.name}: the {name} set repeats {dup} {key}(s), e.g. {first[:60]!r}")
        if self.retain:
            both = set(f) & set(texts(self.retain))
            if both:
                out.append(f"{self.name}: {len(both)} {key}(s) are in both the forget and the retain set, e.g. "
                           f"{sorted(both)[0][:60]!r}; training pushes them both ways")
        return out

    def fingerprints(self) -> dict[str, str]:
        out = {"forget": items_fingerprint(self.forget)}
        if self.retain is not None:
            out["retain"] = items_fingerprint(self.retain)
        out.update({f"eval/{k}": items_fingerprint(v) for k, v in self.eval_splits.items()})
        return out
