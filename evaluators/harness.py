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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

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


TF_OUTPUTS = frozenset({"nll", "token_logprobs", "vocab_stats", "memorization"})


@dataclass(frozen=True)
class TeacherForced(PassRequest):
    """Teacher-forced scores of ``item[answer_key]`` (``[answer_index]`` for lists) given the
    question. ``outputs`` selects what to keep from the one forward pass:

    * ``nll``: ``{"nll": (N,), "n": (N,)}`` summed answer NLL and answer token count;
    * ``token_logprobs``: ``{"token_logprobs": [array (n_i,)]}`` log p of each answer token;
    * ``vocab_stats``: ``{"mu": [(n_i,)], "sigma": [(n_i,)]}`` Min-K%++ statistics;
    * ``memorization``: ``{"exact_memorization": [...], "extraction_strength": [...]}``.
    """

    answer_key: str = "answer"
    answer_index: int | None = None
    question_key: str = "question"
    outputs: frozenset = frozenset({"nll"})

    def group(self):
        return ("teacher_forced", self.answer_key, self.answer_index, self.question_key)

    def merge(self, other):
        return TeacherForced(self.answer_key, self.answer_index, self.question_key, self.outputs | other.outputs)

    @torch.no_grad()
    def run(self, adapter, items, batch_size):
        acc = _TFAccumulator(self.outputs)
        for s in range(0, len(items), batch_size):
            b = adapter.collate(items[s: s + batch_size], answer_key=self.answer_key,
                                answer_index=self.answer_index, question_key=self.question_key)
            logits = adapter.logits(b)  # (B, T, V)
            acc.add(adapter, logits, b["labels"])
        return acc.result()


class _TFAccumulator:
    """Collects the outputs of a teacher-forced pass batch by batch from (logits, labels)."""

    def __init__(self, outputs: frozenset) -> None:
        self.outputs = outputs
        self.out: dict[str, list] = {k: [] for k in ("nll", "n", "token_logprobs", "mu", "sigma",
                                                     "exact_memorization", "extraction_strength")}

    def add(self, adapter, logits: torch.Tensor, labels: torch.Tensor) -> None:
        from unlearn.evaluators import privacy as P
        from unlearn.evaluators import tofu as M

        out = self.out
        lg, lb, mask = adapter.shift(logits, labels)  # (B, T-1, V), (B, T-1), (B, T-1)
        logp_all = torch.log_softmax(lg.float(), -1)  # (B, T-1, V)
        tok_lp = logp_all.gather(-1, lb.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask  # (B, T-1)
        out["nll"] += (-tok_lp.sum(-1)).tolist()
        out["n"] += mask.sum(-1).tolist()
        if "token_logprobs" in self.outputs or "vocab_stats" in self.outputs:
            for i in range(lg.shape[0]):
                m = mask[i]
                out["token_logprobs"].append(tok_lp[i][m].double().numpy())
                if "vocab_stats" in self.outputs:
                    mu, sigma = P.vocab_stats(lg[i][m])
                    out["mu"].append(np.asarray(mu))
                    out["sigma"].append(np.asarray(sigma))
        if "memorization" in self.outputs:
            out["exact_memorization"] += M.exact_memorization(logits, labels).per_item
            out["extraction_strength"] += M.extraction_strength(logits, labels).per_item

    def result(self) -> dict[str, Any]:
        res = {"nll": np.asarray(self.out["nll"]), "n": np.asarray(self.out["n"])}
        for k in ("token_logprobs", "mu", "sigma", "exact_memorization", "extraction_strength"):
            if self.out[k]:
                res[k] = self.out[k]
        return res


@torch.no_grad()
def run_shared_prefix(adapter, items: list[dict], requests: list[TeacherForced], batch_size: int) -> list[dict]:
    """Run several teacher-forced requests that share the question in one pass per batch:
    the prompt is encoded once (KV cache), then each answer variant continues from it.

    Only for adapters with ``tokenization == "split"`` (prompt tokens are then a prefix of the
    full sequence); the values equal the plain pass up to float rounding. Returns one result
    per request, in order.
    """
    from transformers import DynamicCache

    accs = [_TFAccumulator(r.outputs) for r in requests]
    tok = adapter.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    model = adapter.model
    dev = adapter.device
    qk = requests[0].question_key
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers renamed past_key_values -> cache (the old name warns until its removal)
    ckw = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    for s in range(0, len(items), batch_size):
        chunk = items[s: s + batch_size]
        prompts = [tok(adapter.prompt(it[qk]), add_special_tokens=True)["input_ids"] for it in chunk]
        B, Tp = len(chunk), max(len(p) for p in prompts)
        p_ids = torch.full((B, Tp), pad, dtype=torch.long)
        p_mask = torch.zeros((B, Tp), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column Tp-1
            p_ids[i, Tp - len(p):] = torch.tensor(p)
            p_mask[i, Tp - len(p):] = 1
        p_pos = (p_mask.cumsum(-1) - 1).clamp_min(0)  # (B, Tp)
        cache = DynamicCache()
        out = model(input_ids=p_ids.to(dev), attention_mask=p_mask.to(dev), position_ids=p_pos.to(dev),
                    use_cache=True, **{ckw: cache})
        last = out.logits[:, -1:, :]  # (B, 1, V) predicts the first answer token
        p_len = p_mask.sum(-1)  # (B,)
        for req, acc in zip(requests, accs):
            answers = []
            for it in chunk:
                a = it[req.answer_key]
                if req.answer_index is not None:
                    a = a[req.answer_index]
                answers.append(tok(" " + a.strip(), add_special_tokens=False)["input_ids"] + [eos])
            Ta = max(len(a) for a in answers)
            a_ids = torch.full((B, Ta), pad, dtype=torch.long)
            a_mask = torch.zeros((B, Ta), dtype=torch.long)
            for i, a in enumerate(answers):
                a_ids[i, : len(a)] = torch.tensor(a)
                a_mask[i, : len(a)] = 1
            a_pos = p_len.unsqueeze(1) + torch.arange(Ta).unsqueeze(0)  # (B, Ta)
            o = model(input_ids=a_ids.to(dev), attention_mask=torch.cat([p_mask, a_mask], 1).to(dev),
                      position_ids=a_pos.to(dev), use_cache=True, **{ckw: cache})
            cache.crop(-Ta)  # back to the prompt
            # logits[:, t] predicts labels[:, t+1]: position 0 (last prompt token) predicts answer 0
            logits = torch.cat([last, o.logits], 1)  # (B, Ta+1, V)
            labels = torch.full((B, Ta + 1), -100, dtype=torch.long)
            labels[:, 1:] = torch.where(a_mask.bool(), a_ids, torch.full_like(a_ids, -100))
            acc.add(adapter, logits, labels)
    return [a.result() for a in accs]


@dataclass(frozen=True)
class Generate(PassRequest):
    """Greedy answers to ``item[question_key]``: ``list[str]``."""

    max_new_tokens: int = 48
    question_key: str = "question"

    def group(self):
        return ("generate", self.question_key)

    def merge(self, other):
        return Generate(max(self.max_new_tokens, other.max_new_tokens), self.question_key)

    def run(self, adapter, items, batch_size):
        return adapter.generate([it[self.question_key] for it in items], max_new_tokens=self.max_new_tokens,
                                batch_size=batch_size)


@dataclass(frozen=True)
class GradNorms(PassRequest):
    """Per item, the mean over parameter tensors of the L2 norm of the gradient of the answer
    NLL (mean over answer tokens): ``np.ndarray (N,)``. One backward pass per item."""

    def group(self):
        return ("grad_norms",)

    def run(self, adapter, items, batch_size):
        model = adapter.model
        was_training = model.training
        model.train()  # as the reference does
        params = [p for p in model.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        norms = []
        try:
            for i in range(len(items)):
                b = adapter.collate(items[i: i + 1])
                nll, n = adapter.item_nll(b)
                loss = nll.sum() / n.sum().clamp_min(1)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                gn = [g.norm(2).item() for g in grads if g is not None]
                norms.append(float(np.mean(gn)))
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            model.train(was_training)
        return np.asarray(norms)


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

    def _shared_prefix(self, req: PassRequest) -> bool:
        """Run every planned teacher-forced request with this question at once, prompt shared."""
        if not isinstance(req, TeacherForced) or getattr(self.adapter, "tokenization", None) != "split" \
                or not getattr(self.adapter, "supports_shared_prefix", False):
            return False
        todo = [r for g, r in self.planned.items() if isinstance(r, TeacherForced)
                and r.question_key == req.question_key and g not in self.results]
        if req.group() not in self.planned:
            todo.append(req)
        todo = [r.merge(req) if r.group() == req.group() else r for r in todo]
        if len(todo) < 2:
            return False
        t0 = time.time()
        for r, out in zip(todo, run_shared_prefix(self.adapter, self.items, todo, self.batch_size)):
            self.results[r.group()] = out
        self.seconds[f"shared_prefix:{req.question_key}:{len(todo)}"] = round(time.time() - t0, 3)
        return True

    def get(self, req: PassRequest) -> Any:
        g = req.group()
        if g not in self.results and self._shared_prefix(req):
            return self.results[g]
        if g not in self.results:
            todo = self.planned.get(g)
            todo = req if todo is None else todo.merge(req)
            t0 = time.time()
            self.results[g] = todo.run(self.adapter, self.items, self.batch_size)
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
def split_kind(name: str) -> str:
    if name.startswith("forget"):
        return "forget"
    if name.startswith("holdout"):
        return "holdout"
    if name in ("real_authors", "world_facts"):
        return "mc"
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
        info = SplitInfo(name, split_kind(name), items)
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
    return res


def aggregate(res: dict[str, Any], suite: Suite, reference: dict[str, Any] | None) -> dict[str, Any]:
    """Compute the suite's aggregates (forget quality, model utility, privleak, ...)."""
    return {a.name: a.compute(res, reference).to_dict() for a in suite.aggregates}
