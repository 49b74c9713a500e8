"""Concept vectors: MLP value vectors whose vocabulary projection names a concept of the task.

Each decoder layer's MLP writes ``down_proj.weight @ a`` into the residual stream, a sum of
the columns ``v_j = W_down[:, j]`` (H,) weighted by the activations ``a_j``. Read through the
unembedding, a column promotes the tokens ``top-k(W_U @ v_j)`` (``W_U`` = ``lm_head.weight``,
(V, H); no final norm, as in Geva et al., 2022). A column is a *candidate* concept vector of
an author when its top-k tokens contain at least ``min_matches`` of the author's distinctive
name tokens (``token_fields`` can add e.g. the author's genre).

:func:`mlp_down_proj` finds ``W_down`` in each family (Llama-style ``mlp.down_proj``, GPT-NeoX
``mlp.dense_4h_to_h``, GPT-2's ``mlp.c_proj``, a Conv1D read transposed); a mixture-of-experts
layer has no single ``W_down`` and is refused with a ValueError naming the model.

Ranking: candidates are ordered by *activation specificity* -- the column's mean ``|a_j|`` on
the author's QA items over that on other authors' items (:func:`activation_specificity`) --
and the first ``max_candidates`` get the causal check. On the tiny zoo target, 12 of the 14
candidates (of 301) that pass the full check are among the 40 most specific.

Causal check (ConceptVectors, Sec. 3): add Gaussian noise ``N(0, noise_std^2)`` to the
column and measure the drop of the mean answer-token log-prob on the author's QA items and
on other authors' QA items (``n_control_items``); the column *passes* when

    drop_concept >= min_drop   and   drop_concept >= ratio * max(drop_control, 0)

(averaged over ``noise_draws`` draws; the weights are restored after each draw).

After unlearning, at the same (layer, column) positions:

* ``cos(v_before, v_after)``, ``||v_before - v_after||_2``,
* Jaccard ``|T_before ∩ T_after| / |T_before ∪ T_after|`` of the top-k token sets,

per vector, averaged over the validated columns, over all checked candidates, and over
``n_random_columns`` random columns of the same layers (the control: how much an arbitrary
column moved).

Name tokens: an author's name is tokenised as it appears in running text (``" " + name``);
a token counts only when it occurs in the names of at most ``max_token_share`` of the
authors in the data (forget + retain), so word pieces shared by many names (``ĠV``, ``ior``)
do not make every column a candidate. ``min_matches`` is capped at the number of distinctive
tokens an author has; an author with none has no candidates.

Deviation from the paper: ConceptVectors picks concept vectors by the top tokens judged by
hand/GPT-4 and validates with noise on a 7B model. Here the token match is automatic, and
the default noise (``noise_std = 1``, about 12x the norm of a tiny-zoo column; Needle's 0.1
moves the tiny model's answer log-probs by less than 1e-4 nats/token) is set so that single
columns of a tiny model have a measurable effect.

Reference: Hong et al., 2024, "Intrinsic Evaluation of Unlearning Using Parametric Knowledge
Traces" (arXiv:2406.11614); Geva et al., 2022, "Transformer Feed-Forward Layers Build
Predictions by Promoting Concepts in the Vocabulary Space" (arXiv:2203.14680).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from unlearn.evaluators.base import MetricResult, MetricSpec
from unlearn.probes.base import (Probe, ProbeConfig, ProbeResult, _model_of, authors_of, decoder_layers, model_name,
                                 stores_transposed)


@dataclass
class ConceptVectorsConfig(ProbeConfig):
    layers: list[int] | None = field(default=None, metadata={"help": "decoder layers (0-based) searched; null: all"})
    top_k: int = field(default=20, metadata={"help": "tokens read from each column's vocabulary projection"})
    min_matches: int = field(default=2, metadata={
        "help": "distinctive concept tokens that must be in a column's top-k (capped at the number the author has)"})
    token_fields: list[str] = field(default_factory=lambda: ["author"], metadata={
        "help": "what names a concept: 'author' (the name) and/or attribute names whose value is added (e.g. genre)"})
    max_token_share: float = field(default=0.02, metadata={
        "help": "a token is distinctive when it occurs in at most this fraction of the authors' concept texts (>= 1 author)"})
    max_candidates: int = field(default=100, metadata={
        "help": "candidates given the causal check, highest activation specificity first"})
    validate: bool = field(default=True, metadata={"help": "run the causal check (noise on the column)"})
    noise_std: float = field(default=1.0, metadata={"help": "std of the Gaussian noise added to a column in the causal check"})
    noise_draws: int = field(default=2, metadata={"help": "noise draws per candidate (drops are averaged)"})
    n_control_items: int = field(default=20, metadata={"help": "QA items of other authors the drop is compared with"})
    min_drop: float = field(default=0.05, metadata={
        "help": "a column passes only if the concept's drop of mean answer-token log-prob is at least this (nats/token)"})
    ratio: float = field(default=3.0, metadata={"help": "... and at least ratio x the control drop"})
    n_random_columns: int = field(default=50, metadata={"help": "random columns of the same layers compared as a control"})
    seed: int = field(default=0, metadata={"help": "seed of noise, control items and random columns"})

    def __post_init__(self) -> None:
        for name in ("top_k", "min_matches", "max_candidates", "noise_draws", "n_control_items"):
            v = getattr(self, name)
            if isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not 0.0 < self.max_token_share <= 1.0:
            raise ValueError(f"max_token_share must be in (0, 1], got {self.max_token_share}")
        if self.noise_std <= 0 or self.ratio <= 0 or self.min_drop < 0 or self.n_random_columns < 0:
            raise ValueError("need noise_std > 0, ratio > 0, min_drop >= 0 and n_random_columns >= 0")
        if not self.token_fields:
            raise ValueError("token_fields is empty; use ['author'] (optionally with attributes such as 'genre')")
        if self.layers is not None and (not self.layers or any(isinstance(x, bool) or x < 0 for x in self.layers)):
            raise ValueError(f"layers must be null or a non-empty list of layer indices >= 0, got {self.layers}")


@dataclass
class Candidate:
    """A column whose top-k tokens name a concept: ``W_down[layer][:, column]``."""

    layer: int
    column: int
    concept: Any  # the author_id
    name: str
    matches: int
    score: float  # max z-score (over the vocabulary) of a matched token's logit; ranks ties in matches
    specificity: float | None = None  # mean |activation| on the author's items / on other authors' items
    drop_concept: float | None = None
    drop_control: float | None = None
    passed: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


# --------------------------------------------------------------------------- the search
def concept_tokens(tokenizer, groups: dict[Any, list[dict]], token_fields: list[str],
                   max_token_share: float) -> dict[Any, dict[str, Any]]:
    """Distinctive token ids naming each author's concept.

    Args:
        groups: ``{author_id: items}`` of every author the distinctiveness is counted over.
        token_fields: ``"author"`` and/or attribute names (``item["value"]`` of the author's
            item with that ``attribute`` is added to the concept text).
    Returns:
        ``{author_id: {"name": str, "text": [str], "tokens": [int] (distinctive, sorted),
        "all_tokens": [int]}}``.
    """
    out: dict[Any, dict[str, Any]] = {}
    df: Counter = Counter()
    for aid, items in groups.items():
        texts = []
        for f in token_fields:
            if f == "author":
                texts.append(items[0]["author"])
            else:
                texts += [it["value"] for it in items if it.get("attribute") == f and it.get("value")][:1]
        toks = sorted({t for x in texts for t in tokenizer(" " + x, add_special_tokens=False)["input_ids"]})
        out[aid] = {"name": items[0]["author"], "text": texts, "all_tokens": toks}
        df.update(toks)
    limit = max(1, int(max_token_share * len(groups)))
    for c in out.values():
        c["tokens"] = [t for t in c["all_tokens"] if df[t] <= limit]
    return out


@torch.no_grad()
def projection_topk(model, layers: list[int], top_k: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Top-k vocabulary tokens of every down-projection column: ``{layer: (ids (I, k), z (I, k))}``,
    ``z`` = the logits' z-scores over the vocabulary (``logits = W_U @ W_down``, (V, I))."""
    W_U = model.get_output_embeddings().weight.detach().float()  # (V, H)
    out = {}
    for L in layers:
        W = mlp_down_proj(model, L)[1].detach().float()  # (H, I)
        logits = W_U @ W  # (V, I)
        z = (logits - logits.mean(0)) / logits.std(0).clamp_min(1e-12)  # (V, I)
        top = z.topk(top_k, dim=0)  # (k, I)
        out[L] = (top.indices.T.contiguous(), top.values.T.contiguous())
    return out


# the output projection of a dense MLP, by family: down_proj (Llama, Mistral, Qwen2, Phi-3, Gemma,
# OLMo, DeepSeek's dense layers), dense_4h_to_h (GPT-NeoX/Pythia), c_proj (GPT-2, a Conv1D),
# fc2 (Phi-1/2), fc_out (GPT-J)
MLP_OUT_NAMES = ("down_proj", "dense_4h_to_h", "c_proj", "fc2", "fc_out")


def mlp_down_proj(model, layer: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The output projection of decoder layer ``layer``'s dense MLP and its value matrix.

    Returns:
        ``(module, W)``: the projection (``mlp.<name>`` for a name of :data:`MLP_OUT_NAMES`)
        and ``W`` (H, I), whose column j is the value vector ``v_j`` the MLP writes with
        activation ``a_j``. For ``nn.Linear`` ``W`` is the weight; for GPT-2's ``Conv1D``, which
        stores (I, H), it is the transposed view, so in-place writes to ``W`` change the weight.
        The module's forward input is the activation vector ``a`` (..., I) either way.
    Raises:
        ValueError naming the model: the layer is a mixture-of-experts block (its experts'
        down-projections are fused 3-D tensors, not one value matrix), or it has no MLP
        output projection under a known name.
    """
    blocks = decoder_layers(model)
    mlp = getattr(blocks[layer], "mlp", None)
    if mlp is not None and hasattr(mlp, "experts"):
        shared = [n for n in ("shared_expert", "shared_experts") if hasattr(mlp, n)]
        raise ValueError(
            f"decoder layer {layer} of {model_name(model)} is a mixture-of-experts block ({type(mlp).__name__}: "
            f"routed experts{' + ' + shared[0] if shared else ''}, fused 3-D weights); concept vectors, Needle and "
            "RMU's selection read the value vectors of one dense MLP down-projection per layer, so they need a dense "
            "MLP (choose dense layers with the `layers` setting where the model has some)")
    for name in MLP_OUT_NAMES:
        proj = getattr(mlp, name, None)
        W = getattr(proj, "weight", None)
        if isinstance(W, torch.Tensor) and W.dim() == 2:
            return proj, (W.T if stores_transposed(proj) else W)
    raise ValueError(f"decoder layer {layer} of {model_name(model)} has no dense MLP output projection "
                     f"(looked for mlp.{', mlp.'.join(MLP_OUT_NAMES)}); concept vectors need a dense MLP")


def find_candidates(topk: dict[int, tuple[torch.Tensor, torch.Tensor]], concepts: dict[Any, dict[str, Any]],
                    min_matches: int) -> list[Candidate]:
    """Every (layer, column, concept) whose top-k contains ``min(min_matches, n distinctive
    tokens)`` of the concept's distinctive tokens, best first (matches, then score)."""
    out = []
    for aid, c in concepts.items():
        toks = torch.tensor(c["tokens"], dtype=torch.long)
        if toks.numel() == 0:
            continue
        need = min(min_matches, toks.numel())
        for L, (ids, z) in topk.items():
            hit = (ids.unsqueeze(-1) == toks).any(-1)  # (I, k): top-k slot holds a concept token
            n = hit.sum(-1)  # (I,)
            for j in torch.nonzero(n >= need).flatten().tolist():
                out.append(Candidate(L, j, aid, c["name"], int(n[j]), float(z[j][hit[j]].max())))
    out.sort(key=lambda c: (-c.matches, -c.score, c.layer, c.column))
    return out


# --------------------------------------------------------------------------- causal check
@torch.no_grad()
def activation_specificity(adapter, candidates: list[Candidate], groups: dict[Any, list[dict]], concepts: list,
                           n_other_authors: int = 20, seed: int = 0) -> None:
    """Fill ``specificity`` of each candidate in place: the mean ``|a_j|`` of its column's
    activation (the input of ``down_proj``, over every token of the author's QA items) divided by
    the mean of the same quantity over the other authors (the other concept authors and up to
    ``n_other_authors`` others drawn from ``groups``). A concept vector should be *used* when its
    author is processed; ranking by this before the (costly) causal check puts the columns that
    can matter first. One forward pass per author."""
    if not candidates:
        return
    model = _model_of(adapter)
    layers = sorted({c.layer for c in candidates})
    rest = [a for a in groups if a not in set(concepts)]
    authors = list(concepts) + random.Random(f"concept-spec-{seed}").sample(rest, min(n_other_authors, len(rest)))
    if len(authors) < 2:
        raise ValueError("activation specificity compares an author with others, but the items hold one author")
    got: dict[int, torch.Tensor] = {}

    def hook(L):
        def f(_m, inp, _out):
            got[L] = inp[0].detach()  # (B, T, I)
        return f

    mean: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    hs = [mlp_down_proj(model, L)[0].register_forward_hook(hook(L)) for L in layers]
    was_training = model.training
    model.eval()
    try:
        for a in authors:
            b = adapter.collate(groups[a])
            model(input_ids=b["input_ids"].to(adapter.device), attention_mask=b["attention_mask"].to(adapter.device))
            m = b["attention_mask"].bool().to(adapter.device)  # (B, T)
            for L in layers:
                mean[L].append(got[L][m].abs().float().mean(0).cpu())  # (I,)
    finally:
        for h in hs:
            h.remove()
        model.train(was_training)
    table = {L: torch.stack(v) for L, v in mean.items()}  # (n_authors, I)
    row = {a: i for i, a in enumerate(authors)}
    for c in candidates:
        col = table[c.layer][:, c.column]  # (n_authors,)
        i = row[c.concept]
        other = torch.cat([col[:i], col[i + 1:]]).mean()
        c.specificity = float(col[i] / other.clamp_min(1e-12))


@torch.no_grad()
def mean_token_logprob(adapter, items: list[dict], batch_size: int = 64) -> torch.Tensor:
    """Mean answer-token log-prob of each item: (N,)."""
    out = []
    for s in range(0, len(items), batch_size):
        nll, n = adapter.item_nll(adapter.collate(items[s: s + batch_size]))
        out.append(-(nll.float() / n.clamp_min(1)).cpu())
    return torch.cat(out)


@torch.no_grad()
def causal_check(adapter, candidates: list[Candidate], groups: dict[Any, list[dict]], *, noise_std: float,
                 noise_draws: int, n_control_items: int, min_drop: float, ratio: float, seed: int = 0) -> None:
    """Fill ``drop_concept``, ``drop_control`` and ``passed`` of each candidate in place.

    ``groups``: ``{author_id: QA items}``; the concept items are the candidate author's, the
    control items ``n_control_items`` items of the other authors (drawn once per author).
    Each draw adds ``N(0, noise_std^2)`` to the column, scores both sets and restores it.
    """
    model = _model_of(adapter)
    rng = random.Random(f"concept-control-{seed}")
    base: dict[int, torch.Tensor] = {}
    key = {id(it): i for i, it in enumerate(it for items in groups.values() for it in items)}
    controls: dict[Any, list[dict]] = {}

    def base_lp(items):
        todo = [it for it in items if key[id(it)] not in base]
        if todo:
            for it, v in zip(todo, mean_token_logprob(adapter, todo)):
                base[key[id(it)]] = v
        return torch.stack([base[key[id(it)]] for it in items])

    was_training = model.training
    model.eval()
    try:
        for ci, c in enumerate(candidates):
            if c.concept not in controls:
                others = [it for a, items in groups.items() if a != c.concept for it in items]
                if not others:
                    raise ValueError("the causal check needs QA items of at least one other author (the control)")
                controls[c.concept] = rng.sample(others, min(n_control_items, len(others)))
            concept_items, control_items = groups[c.concept], controls[c.concept]
            both, n_c = concept_items + control_items, len(concept_items)  # scored in one pass per draw
            b_c, b_o = base_lp(concept_items), base_lp(control_items)
            W = mlp_down_proj(model, c.layer)[1]  # (H, I)
            orig = W[:, c.column].clone()  # (H,)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + ci)
            d_c, d_o = [], []
            try:
                for _ in range(noise_draws):
                    noise = torch.randn(orig.shape, generator=gen, dtype=torch.float32) * noise_std
                    W[:, c.column] = orig + noise.to(W.device, W.dtype)
                    lp = mean_token_logprob(adapter, both)  # (n_c + n_o,)
                    d_c.append(float((b_c - lp[:n_c]).mean()))
                    d_o.append(float((b_o - lp[n_c:]).mean()))
            finally:
                W[:, c.column] = orig
            c.drop_concept, c.drop_control = float(np.mean(d_c)), float(np.mean(d_o))
            c.passed = bool(c.drop_concept >= min_drop and c.drop_concept >= ratio * max(c.drop_control, 0.0))
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- comparison
def vector_changes(before: torch.Tensor, after: torch.Tensor, top_before: torch.Tensor,
                   top_after: torch.Tensor) -> dict[str, list[float]]:
    """Per vector: cosine, L2 distance, Jaccard of the top-k token sets.

    Args:
        before / after: (N, H) the same columns before and after unlearning.
        top_before / top_after: (N, k) their top-k token ids.
    """
    b, a = before.double(), after.double()
    cos = torch.nn.functional.cosine_similarity(b, a, dim=-1, eps=1e-12)  # (N,)
    dist = (b - a).norm(dim=-1)  # (N,)
    jac = []
    for tb, ta in zip(top_before.tolist(), top_after.tolist()):
        sb, sa = set(tb), set(ta)
        jac.append(len(sb & sa) / max(1, len(sb | sa)))
    return {"cos": cos.tolist(), "dist": dist.tolist(), "jaccard": jac}


def _spec(name, hib, desc):
    return MetricSpec(name, hib, ConceptVectors.version, description=desc, paper="Hong et al., 2024 (arXiv:2406.11614)")


class ConceptVectors(Probe):
    """Concept vectors of the forget authors: found, causally checked, compared after unlearning."""

    name = "concept_vectors"
    Config = ConceptVectorsConfig
    paper = ("Hong et al., 2024, Intrinsic Evaluation of Unlearning Using Parametric Knowledge Traces "
             "(arXiv:2406.11614)")
    version = "1"
    SPECS: dict[str, MetricSpec] = {}

    def _layers(self, model) -> list[int]:
        n = len(decoder_layers(model))
        layers = self.config.layers if self.config.layers is not None else list(range(n))
        bad = [x for x in layers if x >= n]
        if bad:
            raise ValueError(f"concept_vectors layers {bad} do not exist: the model has {n} decoder layers (0..{n - 1})")
        return sorted(set(layers))

    def search(self, adapter, data) -> tuple[list[Candidate], dict[Any, dict[str, Any]], dict[Any, list[dict]]]:
        """All candidates of the forget authors (best first), their concept tokens, and the QA
        items of every author (forget + retain) by author."""
        cfg = self.config
        model = _model_of(adapter)
        forget = authors_of(data.forget, "concept_vectors: forget")
        groups = authors_of(list(data.forget) + list(data.retain or []), "concept_vectors: retain")
        concepts = concept_tokens(adapter.tokenizer, groups, cfg.token_fields, cfg.max_token_share)
        concepts = {a: concepts[a] for a in forget}
        topk = projection_topk(model, self._layers(model), cfg.top_k)
        return find_candidates(topk, concepts, cfg.min_matches), concepts, groups

    def run(self, adapter, data, *, reference: ProbeResult | None = None) -> ProbeResult:
        """Before unlearning (``reference=None``): search, causal check of the best
        ``max_candidates``, and ``n_random_columns`` control columns. After: the search count
        and the vectors at the reference's positions.

        Result: values ``n_concepts``, ``n_concepts_with_tokens``, ``n_candidates`` (every match),
        ``n_checked``, ``n_validated``, ``n_concepts_validated``; arrays ``candidates`` (dicts) and
        ``kind`` (per vector: validated / candidate / random); tensors ``locations`` (N, 2)
        (layer, column), ``vectors`` (N, H), ``topk`` (N, k)."""
        cfg = self.config
        model = _model_of(adapter)
        cands, concepts, groups = self.search(adapter, data)
        values = {"n_concepts": len(concepts), "n_concepts_with_tokens": sum(1 for c in concepts.values() if c["tokens"]),
                  "n_candidates": len(cands),
                  "candidates_per_layer": {str(L): sum(1 for c in cands if c.layer == L) for L in self._layers(model)}}
        arrays: dict[str, Any] = {}
        if reference is None:
            activation_specificity(adapter, cands, groups, list(concepts), seed=cfg.seed)
            checked = sorted(cands, key=lambda c: -c.specificity)[: cfg.max_candidates]
            if cfg.validate and checked:
                causal_check(adapter, checked, groups, noise_std=cfg.noise_std, noise_draws=cfg.noise_draws,
                             n_control_items=cfg.n_control_items, min_drop=cfg.min_drop, ratio=cfg.ratio, seed=cfg.seed)
            taken = {(c.layer, c.column) for c in cands}
            rng = random.Random(f"concept-random-{cfg.seed}")
            n_cols = mlp_down_proj(model, self._layers(model)[0])[1].shape[1]
            pool = [(L, j) for L in self._layers(model) for j in range(n_cols) if (L, j) not in taken]
            rand = rng.sample(pool, min(cfg.n_random_columns, len(pool)))
            locs = [(c.layer, c.column) for c in checked] + rand
            kind = [("validated" if c.passed else "candidate") for c in checked] + ["random"] * len(rand)
            values.update(n_checked=len(checked), n_validated=sum(1 for c in checked if c.passed) if cfg.validate else None,
                          n_concepts_validated=len({c.concept for c in checked if c.passed}) if cfg.validate else None,
                          concept_names={str(a): c["name"] for a, c in concepts.items()},
                          concept_tokens={str(a): adapter.tokenizer.convert_ids_to_tokens(c["tokens"])
                                          for a, c in concepts.items()})
            arrays["candidates"] = [c.to_dict() for c in checked]
        else:
            locs = [tuple(x) for x in reference.tensors["locations"].tolist()]
            kind = list(reference.arrays["kind"])
        arrays["kind"] = kind
        vec, top = self.read(adapter, locs)
        note = "" if locs else "no concept-vector candidates found: nothing to compare"
        return self._result(values, arrays, {"locations": torch.tensor(locs, dtype=torch.long).reshape(-1, 2),
                                             "vectors": vec, "topk": top}, note=note)

    @torch.no_grad()
    def read(self, adapter, locations: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns at ``locations`` ``[(layer, column)]``: ``(vectors (N, H), top-k ids (N, k))``."""
        model = _model_of(adapter)
        W_U = model.get_output_embeddings().weight.detach().float()  # (V, H)
        H = W_U.shape[1]
        if not locations:
            return torch.zeros(0, H), torch.zeros(0, self.config.top_k, dtype=torch.long)
        vec = torch.stack([mlp_down_proj(model, L)[1].detach()[:, j].float().cpu() for L, j in locations])  # (N, H)
        logits = vec.to(W_U.device) @ W_U.T  # (N, V)
        z = (logits - logits.mean(-1, keepdim=True)) / logits.std(-1, keepdim=True).clamp_min(1e-12)
        return vec, z.topk(self.config.top_k, dim=-1).indices.cpu()

    def compare(self, before: ProbeResult, after: ProbeResult) -> dict[str, MetricResult]:
        kind = np.asarray(before.arrays["kind"])
        if not before.tensors["locations"].equal(after.tensors["locations"]):
            raise ValueError("concept_vectors: the 'after' result was not read at the 'before' result's columns; "
                             "run it with reference=<before result>")
        ch = vector_changes(before.tensors["vectors"], after.tensors["vectors"], before.tensors["topk"],
                            after.tensors["topk"])
        out = {"cv_validated": self.metric("cv_validated", before.values.get("n_validated"),
                                           note="" if before.values.get("n_validated") is not None
                                           else "not computable: the causal check was off (validate: false)")}
        groups = {"validated": kind == "validated", "candidates": kind != "random", "random": kind == "random"}
        for g, sel in groups.items():
            for m in ("cos", "dist", "jaccard"):
                per = [v for v, s in zip(ch[m], sel) if s]
                name = f"cv_{m}_{g}"
                out[name] = self.metric(name, float(np.mean(per)) if per else None, per,
                                        note="" if per else f"not computable: no {g} columns")
        n_b, n_a = before.values.get("n_candidates"), after.values.get("n_candidates")
        out["cv_candidates_after"] = self.metric("cv_candidates_after", n_a, note=f"before: {n_b}")
        return out


ConceptVectors.SPECS = {
    "cv_validated": _spec("cv_validated", None, "columns that passed the causal check on the model before unlearning"),
    **{f"cv_cos_{g}": _spec(f"cv_cos_{g}", False if g != "random" else None,
                            f"mean cos(v_before, v_after) over the {g} columns (lower: the trace moved more)")
       for g in ("validated", "candidates", "random")},
    **{f"cv_dist_{g}": _spec(f"cv_dist_{g}", True if g != "random" else None,
                             f"mean ||v_before - v_after||_2 over the {g} columns")
       for g in ("validated", "candidates", "random")},
    **{f"cv_jaccard_{g}": _spec(f"cv_jaccard_{g}", False if g != "random" else None,
                                f"mean Jaccard of the top-k token sets before/after over the {g} columns")
       for g in ("validated", "candidates", "random")},
    "cv_candidates_after": _spec("cv_candidates_after", False,
                                 "(column, author) matches of the top-k token search in the unlearned model"),
}
