"""Metrics as data: a declared spec (name, direction, version) and a result record.

A metric that cannot be computed returns ``MetricResult(value=None, note="not computable: ...")``;
a result never carries NaN or inf as its value (the constructor refuses them), so a missing
reference artefact can never masquerade as a number in a results table.

Direction convention (``higher_is_better``): unlearning flips directions, so each spec states
the direction on the set its description names. ``True``/``False`` mean higher/lower is
better there; ``None`` means the statistic has no fixed direction (e.g. the forget-set truth
ratio, whose target is the retain model's value, not an extreme). Functions that compute a
knowledge metric (probability, ROUGE, memorisation) on either a forget or a retain set set
``higher_is_better`` on the *result* according to the set they were told they are scoring.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class MetricSpec:
    """Declaration of a metric.

    Attributes:
        name: registry-style name (lower_snake_case), also the ``name`` of its results.
        higher_is_better: direction on the set described in ``description``; ``None`` when
            the statistic has no fixed direction (say why in ``description``).
        version: bump when the definition changes (numbers with different versions are not
            comparable).
        modality: "text" or "image".
        description: formula and the set it is meant for, in one or two sentences.
        paper: citation.
    """

    name: str
    higher_is_better: bool | None
    version: str
    modality: str = "text"
    description: str = ""
    paper: str = ""


def _plain(x: Any) -> Any:
    """numpy / torch scalars -> Python floats (JSON-serialisable); None and containers kept."""
    if x is None or isinstance(x, (str, bool, int)):
        return x
    if isinstance(x, float):
        return x
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item"):  # numpy / torch scalar
        return x.item()
    return x


@dataclass
class MetricResult:
    """One computed metric.

    Attributes:
        name: the metric's name (a key of some ``SPECS`` table).
        value: the aggregate, or ``None`` when not computable (then ``note`` says why).
        per_item: per-item values in item order (what exactly is documented per metric),
            or ``None`` for set-level statistics.
        higher_is_better: direction for the set this result was computed on (see module doc).
        version: the spec's version.
        note: free text: why the value is missing, or which convention produced it.
    """

    name: str
    value: float | None
    per_item: list | None
    higher_is_better: bool | None
    version: str
    note: str = ""

    def __post_init__(self) -> None:
        if self.value is not None:
            v = float(self.value)
            if not math.isfinite(v):
                raise ValueError(
                    f"metric {self.name!r}: value {v!r} is not finite; a metric that cannot be "
                    "computed must return value=None with a note saying why"
                )
            self.value = v
        elif not self.note:
            raise ValueError(f"metric {self.name!r}: value=None needs a note saying why")
        if self.per_item is not None:
            self.per_item = _plain(list(self.per_item))

    @property
    def computable(self) -> bool:
        return self.value is not None

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))
