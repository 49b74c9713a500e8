"""Probes: look inside the weights and activations, before and after unlearning.

One file per probe, registered here explicitly; see :mod:`unlearn.probes.base` for the
contract and ``docs/probes.md`` for what each one measures.
"""

from __future__ import annotations

from typing import Any

from unlearn.config import from_dict
from unlearn.probes.base import (Probe, ProbeConfig, ProbeResult, probe_after, probe_before, run_probes)
from unlearn.probes.causal_tracing import CausalTracing
from unlearn.probes.concept_vectors import ConceptVectors
from unlearn.probes.expert_attribution import ExpertAttribution
from unlearn.probes.linear_probe import LinearProbe
from unlearn.registry import Registry

PROBES = Registry("probe")
for _cls in (ConceptVectors, LinearProbe, CausalTracing, ExpertAttribution):
    PROBES.register(_cls.name, _cls)


def make_probe(name: str, params: dict[str, Any] | None = None, path: str | None = None) -> Probe:
    """Build a registered probe from ``params`` (its Config's fields), checked strictly.

    Raises:
        ValueError (RecipeError): unknown probe (with a did-you-mean), unknown or mistyped
            parameter, naming the key ``path`` (default ``eval.probe_params.<name>``).
    """
    cls = PROBES.get(name)
    return cls(from_dict(cls.Config, dict(params or {}), path or f"eval.probe_params.{name}"))


__all__ = ["PROBES", "Probe", "ProbeConfig", "ProbeResult", "CausalTracing", "ConceptVectors", "ExpertAttribution",
           "LinearProbe", "make_probe", "probe_after", "probe_before", "run_probes"]
