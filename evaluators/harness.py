"""The evaluation harness: a suite of metrics on any adapter, each forward pass once per split.

A **metric** declares the *passes* it needs on a split (``requests``) and computes its result
from them (``compute``). The harness collects the requests of every metric of a split,
merges requests that share a forward pass (one teacher-forced pass over the answers yields
NLLs, token log-probs, full-vocabulary statistics and memorisation at once), runs each
merged pass once, and hands the results to the metrics. Passes know the modality (a
teacher-forced pass needs a text adapter; an image pass will need an image adapter); the
harness only merges, runs and routes, so the image side adds passes and metrics, not a
second harness.

Three kinds of metric:

* :class:`Metric` -- one split of one model (Prob on forget10);
* :class:`MultiSplitMetric` -- several splits of one model (MIA AUC: forget vs holdout);
* :class:`Aggregate` -- computed afterwards from finished results, possibly against a
  reference model's results (forget quality vs the retain model; model utility; privleak).

Results are plain JSON-able dicts: per split ``{"metrics": {name: MetricResult.to_dict()},
...extras}``, with the protocol settings recorded next to them.

With several processes every pass runs on ``items[rank::N]`` and its per-item outputs are
gathered back in item order (:func:`unlearn.distributed.run_sharded`): the metrics are those
of one process, each item is seen once (``docs/distributed.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tqdm.auto import tqdm

from unlearn.distributed import run_sharded, world
from unlearn.evaluators.base import MetricResult, MetricSpec


# ============================================================================== passes
class PassRequest:
    """A forward computation over the items of a split. Subclasses are frozen dataclasses.

    ``group()`` names the underlying forward pass: requests with the same group are merged
    with :meth:`merge` and run once.
    """

    modality: ClassVar[str] = "text"

    def group(self) -> tuple:
        raise NotImplementedError

    def merge(self, other: "PassRequest") -> "PassRequest":
        return self

    def run(self, adapter, items: list[dict], batch_size: int) -> Any:
        raise NotImplementedError

    def joint_key(self) -> tuple | None:
        """Requests (of different groups) with the same non-None joint key may be computed
        together by :meth:`run_joint` -- e.g. teacher-forced passes over several answers to one
        question, sharing the question's forward pass. ``None``: always run alone."""
        return None

    @classmethod
    def run_joint(cls, adapter, items: list[dict], requests: list["PassRequest"], batch_size: int) -> list | None:
        """The results of ``requests`` (same joint key), in order, from one joint computation;
        ``None`` when this adapter cannot (each request then runs alone)."""
        return None


class PassStore:
    """Runs merged pass requests on demand, once, and serves their results."""

    def __init__(self, adapter, items: list[dict], batch_size: int) -> None:
        self.adapter, self.items, self.batch_size = adapter, items, batch_size
        self.planned: dict[tuple, PassRequest] = {}
        self.results: dict[tuple, Any] = {}
        self.seconds: dict[str, float] = {}

    def plan(self, req: PassRequest) -> None:
        g = req.group()
        self.planned[g] = self.planned[g].merge(req) if g in self.planned else req

    def _joint(self, req: PassRequest) -> bool:
        """Run every planned request sharing ``req``'s joint key at once (see ``joint_key``)."""
        key = req.joint_key()
        if key is None:
            return False
        todo = [r for g, r in self.planned.items() if r.joint_key() == key and g not in self.results]
        if req.group() not in self.planned:
            todo.append(req)
        todo = [r.merge(req) if r.group() == req.group() else r for r in todo]
        if len(todo) < 2:
            return False
        t0 = time.time()

        def joint(items):
            outs = type(req).run_joint(self.adapter, items, todo, self.batch_size)
            return None if outs is None else {str(i): o for i, o in enumerate(outs)}

        by_index = run_sharded(joint, self.items)  # shared between processes, if several
        if by_index is None:
            return False
        outs = [by_index[str(i)] for i in range(len(todo))]
        for r, out in zip(todo, outs):
            self.results[r.group()] = out
        self.seconds[f"joint:{':'.join(map(str, key))}:{len(todo)}"] = round(time.time() - t0, 3)
        return True

    def get(self, req: PassRequest) -> Any:
        g = req.group()
        if g not in self.results and self._joint(req):
            return self.results[g]
        if g not in self.results:
            todo = self.planned.get(g)
            todo = req if todo is None else todo.merge(req)
            t0 = time.time()
            self.results[g] = run_sharded(lambda items: todo.run(self.adapter, items, self.batch_size), self.items)
            self.seconds[str(g)] = round(time.time() - t0, 3)
        return self.results[g]

    @property
    def n_passes(self) -> int:
        return len(self.results)


# ============================================================================== metrics
@dataclass
class SplitInfo:
    """What a metric knows about the split it runs on."""

    name: str
    kind: str  # "forget" | "retain" | "mc" | "holdout"
    items: list[dict]

    @property
    def forget_set(self) -> bool:
        return self.kind == "forget"


class Metric:
    """A metric on one split. Subclasses set ``spec`` and implement ``requests``/``compute``.

    ``kinds`` lists the split kinds it applies to (a suite skips it elsewhere).
    """

    spec: ClassVar[MetricSpec]
    kinds: ClassVar[tuple[str, ...]] = ("forget", "retain", "mc", "holdout")

    @property
    def name(self) -> str:
        return self.spec.name

    def requests(self, split: SplitInfo) -> list[PassRequest]:
        raise NotImplementedError

    def compute(self, store: PassStore, split: SplitInfo) -> MetricResult:
        raise NotImplementedError

    def extras(self, store: PassStore, split: SplitInfo) -> dict[str, Any]:
        """Extra per-split values to keep in the results (e.g. raw truth ratios)."""
        return {}


class MultiSplitMetric:
    """A metric over several splits of one model (e.g. MIA AUC on forget vs holdout)."""

    spec: ClassVar[MetricSpec]
    splits: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    def requests(self, split: SplitInfo) -> list[PassRequest]:
        raise NotImplementedError

    def compute(self, stores: dict[str, PassStore], splits: dict[str, SplitInfo]) -> MetricResult:
        raise NotImplementedError


class Aggregate:
    """Computed from finished results (``res``) and optionally a reference model's results."""

    spec: ClassVar[MetricSpec]

    @property
    def name(self) -> str:
        return self.spec.name

    def compute(self, res: dict[str, Any], reference: dict[str, Any] | None) -> MetricResult:
        raise NotImplementedError


# ============================================================================== suites
def split_kind(name: str, overrides: dict[str, str] | None = None) -> str:
    """The kind of a split, which decides the metrics that run on it: ``overrides[name]`` (a
    suite's own split kinds), else ``forget`` for ``forget*``, ``holdout`` for ``holdout*``,
    ``retain`` for anything else."""
    if overrides and name in overrides:
        return overrides[name]
    if name.startswith("forget"):
        return "forget"
    if name.startswith("holdout"):
        return "holdout"
    return "retain"


@dataclass
class Suite:
    """A named, versioned list of metrics; ``multi`` and ``aggregates`` run after the
    per-split metrics. ``splits`` restricts a per-split metric to some split names."""

    name: str
    version: str
    metrics: list[Metric]
    multi: list[MultiSplitMetric] = field(default_factory=list)
    aggregates: list[Aggregate] = field(default_factory=list)
    description: str = ""
    split_kinds: dict[str, str] = field(default_factory=dict)  # split name -> kind, beyond the defaults


def evaluate(adapter, splits: dict[str, list[dict]], suite: Suite, *, batch_size: int = 32,
             progress: bool = True, label: str = "model", protocol: dict | None = None,
             only_splits: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Run ``suite`` on ``adapter`` over ``splits``; returns the JSON-able results.

    ``only_splits`` optionally maps a metric name to the split names it runs on.
    """
    t0 = time.time()
    res: dict[str, Any] = {
        "model_fingerprint": adapter.fingerprint() if hasattr(adapter, "fingerprint") else None,
        "suite": suite.name, "suite_version": suite.version,
        "protocol": {**(protocol or {}), "batch_size": batch_size}, "splits": {}, "multi": {}, "passes": {},
    }
    stores: dict[str, PassStore] = {}
    infos: dict[str, SplitInfo] = {}
    for name, items in splits.items():
        info = SplitInfo(name, split_kind(name, suite.split_kinds), items)
        infos[name] = info
        store = PassStore(adapter, items, batch_size)
        active = [m for m in suite.metrics if info.kind in m.kinds
                  and (only_splits is None or m.name not in only_splits or name in only_splits[m.name])]
        for m in active:
            for r in m.requests(info):
                store.plan(r)
        for mm in suite.multi:
            if name in mm.splits:
                for r in mm.requests(info):
                    store.plan(r)
        stores[name] = store
        infos[name].active = active  # type: ignore[attr-defined]
    bar = tqdm(list(splits), desc=f"eval {label}", disable=not progress, leave=False)
    for name in bar:
        info, store = infos[name], stores[name]
        out: dict[str, Any] = {"metrics": {}}
        for m in info.active:  # type: ignore[attr-defined]
            out["metrics"][m.name] = m.compute(store, info).to_dict()
            out.update(m.extras(store, info))
        res["splits"][name] = out
    for mm in suite.multi:
        if all(s in stores for s in mm.splits):
            res["multi"][mm.name] = mm.compute({s: stores[s] for s in mm.splits},
                                              {s: infos[s] for s in mm.splits}).to_dict()
            res["multi"][mm.name]["split_sizes"] = {s: len(splits[s]) for s in mm.splits}
    res["passes"] = {name: {"count": st.n_passes, "seconds": st.seconds} for name, st in stores.items()}
    res["seconds"] = round(time.time() - t0, 2)
    res["processes"] = world()[1]  # each pass ran on 1/processes of the items in each process
    return res


def aggregate(res: dict[str, Any], suite: Suite, reference: dict[str, Any] | None) -> dict[str, Any]:
    """Compute the suite's aggregates (forget quality, model utility, privleak, ...)."""
    return {a.name: a.compute(res, reference).to_dict() for a in suite.aggregates}
