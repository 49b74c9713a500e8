"""Causal tracing: which hidden states carry a fact from the subject to the answer.

For a forget item ``"Question: What genre does Zy Thioth write?\\nAnswer: Zy Thioth writes" ->
o = " mystery"`` (the context is the prompt plus the answer up to the attribute value; ``o``
the value's tokens):

1. **clean run**: ``P_clean(o)``, and every decoder layer's output ``h_l[t]`` is recorded;
2. **corrupted run**: Gaussian noise ``N(0, (3 sigma)^2)`` is added to the input embeddings of
   every subject (author-name) token of the context, ``sigma`` = the std of the embedding
   matrix's entries: ``P_corrupt(o)``;
3. **restored run** for each context position ``t`` and layer ``l``: the corrupted run with
   ``h_l[t]`` set back to its clean value: ``P_restored(o)``.

Indirect effect ``IE(t, l) = P_restored(o) - P_corrupt(o)``; total effect
``TE = P_clean(o) - P_corrupt(o)``. Each quantity is the mean over ``n_noise`` noise draws
(the same draws for the corrupted and every restored run of an item). ``P(o)`` is the
probability of the whole value, ``prod_t p(o_t | ...)`` teacher-forced (``object_tokens: all``),
or of its first token as in ROME (``object_tokens: first``).

Items differ in length, so IE is averaged per token *role* before averaging over items
(ROME's Fig. 2): tokens before the subject, first / middle / last subject token, first token
after a subject, further tokens, last token (the one predicting ``o``). The name appears in
the question and again at the start of the answer; both occurrences are corrupted and count
as subject tokens.

How to read it: before unlearning the target shows where the fact flows (high IE at the last
subject token in early/middle layers and at the last token in late layers). After
unlearning, a map that keeps its shape while ``P_clean`` falls means the route is intact and
only the readout changed; a flat map with ``TE`` near zero means the subject no longer
drives the answer.

Reference: Meng et al., 2022, "Locating and Editing Factual Associations in GPT" (ROME,
arXiv:2202.05262), Sec. 2.1 (noise 3x the std of the embeddings, as in its official code).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from unlearn.evaluators.base import MetricResult, MetricSpec
from unlearn.probes.base import (Probe, ProbeConfig, ProbeResult, _model_of, authors_of, decoder_layers,
                                 locate_value, span_positions)

ROLES = ("before subject", "first subject", "middle subject", "last subject", "first after subject",
         "further tokens", "last token")


@dataclass
class CausalTracingConfig(ProbeConfig):
    max_items: int = field(default=20, metadata={"help": "forget items traced (spread over the forget authors)"})
    attributes: list[str] | None = field(default=None, metadata={
        "help": "only items asking these attributes (e.g. [genre, country]); null: any whose value is in the answer"})
    noise_multiplier: float = field(default=3.0, metadata={"help": "noise std = this x the std of the embedding matrix (ROME: 3)"})
    n_noise: int = field(default=3, metadata={"help": "noise draws per item (ROME: 10)"})
    object_tokens: Literal["all", "first"] = field(default="all", metadata={
        "help": "P(o): probability of all the value's tokens, or of its first token (ROME)"})
    batch_size: int = field(default=256, metadata={"help": "restored runs per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed of the noise"})

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.n_noise < 1 or self.batch_size < 1:
            raise ValueError("need max_items >= 1, n_noise >= 1 and batch_size >= 1")
        if self.noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if self.attributes is not None and not self.attributes:
            raise ValueError("attributes is empty; name attributes or write null")


# ------------------------------------------------------------------------------ one item
def prepare_item(adapter, item: dict, object_tokens: str = "all") -> dict[str, Any] | None:
    """Token ids of the context and the object for one QA item, or ``None`` when the value is
    not a whole-token span of the answer or the subject is not in the context.

    Returns:
        ``{"ids": context + object[:-1] (list), "ctx_len": int, "object": [int], "subject": [int]
        (positions, all occurrences in the context), "roles": [int] (index into ROLES per context
        position), "tokens": [str] (context tokens)}``.
    """
    subject = item["author"]
    found = locate_value(adapter, item)
    if found is None:
        return None
    ids, spans, text, obj = found
    ctx_len = obj[0]
    obj_ids = ids[obj[0]: obj[-1] + 1][: 1 if object_tokens == "first" else None]
    subj: list[int] = []
    at = text.find(subject)
    while 0 <= at:
        subj += [p for p in span_positions(spans, at, at + len(subject)) if p < ctx_len]
        at = text.find(subject, at + len(subject))
    subj = sorted(set(subj))
    if not subj:
        return None
    return {"ids": ids[:ctx_len] + obj_ids[:-1], "ctx_len": ctx_len, "object": obj_ids, "subject": subj,
            "roles": token_roles(ctx_len, subj), "tokens": adapter.tokenizer.convert_ids_to_tokens(ids[:ctx_len])}


def token_roles(ctx_len: int, subject: list[int]) -> list[int]:
    """Role (index into :data:`ROLES`) of each context position."""
    s = set(subject)
    roles = []
    for t in range(ctx_len):
        if t == ctx_len - 1:
            r = 6
        elif t in s:
            first, last = t - 1 not in s, t + 1 not in s
            r = 1 if first else (3 if last else 2)
        elif t < min(subject):
            r = 0
        elif t - 1 in s:
            r = 4
        else:
            r = 5
        roles.append(r)
    return roles


@torch.no_grad()
def trace(adapter, ids: list[int], ctx_len: int, obj: list[int], subject: list[int], noise: torch.Tensor,
          layers: list[int] | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Causal trace of one sequence.

    Args:
        ids: context + object[:-1] token ids (T,); ``ctx_len`` context tokens come first.
        obj: the object token ids; ``P(o) = prod_i p(obj_i | ids[:ctx_len + i])``.
        subject: positions (< ctx_len) whose input embeddings are corrupted.
        noise: (n_noise, len(subject), H) added to those embeddings, one draw per row block.
        layers: decoder layers restored; ``None``: all.
    Returns:
        ``{"p_clean": float, "p_corrupt": (n_noise,), "p_restored": (n_noise, ctx_len, n_layers)}``
        (numpy arrays of probabilities).
    """
    model = _model_of(adapter)
    blocks = decoder_layers(model)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    dev = adapter.device
    T, n_obj, D = len(ids), len(obj), noise.shape[0]
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    obj_t = torch.tensor(obj, dtype=torch.long, device=dev)
    subj_t = torch.tensor(subject, dtype=torch.long, device=dev)

    def prob(logits: torch.Tensor) -> torch.Tensor:  # (R, T, V) -> P(o) per row (R,)
        lp = torch.log_softmax(logits[:, ctx_len - 1: ctx_len - 1 + n_obj].float(), -1)  # (R, n_obj, V)
        return lp.gather(-1, obj_t.view(1, -1, 1).expand(lp.shape[0], -1, 1)).squeeze(-1).sum(-1).exp()

    # 1. clean run, recording every restored layer's output
    clean: dict[int, torch.Tensor] = {}

    def rec(L):
        def f(_m, _i, out):
            clean[L] = (out[0] if isinstance(out, tuple) else out).detach()[0].clone()  # (T, H)
        return f

    hs = [blocks[L].register_forward_hook(rec(L)) for L in layers]
    was_training = model.training
    model.eval()
    try:
        p_clean = float(prob(model(input_ids=x).logits)[0])
    finally:
        for h in hs:
            h.remove()
    # 2./3. rows: per draw d, one corrupted row (restore = None) and one row per (t, layer) whose
    # restoration can matter. Two kinds of cell equal the corrupted run exactly and are not run:
    # positions before the first subject token (the noise has not reached them: clean = corrupted)
    # and the last decoder layer at positions before the last context token (its output there
    # only feeds the unread logits of that position).
    last = len(blocks) - 1
    cells = [(t, li) for t in range(min(subject), ctx_len) for li, L in enumerate(layers)
             if L != last or t == ctx_len - 1]
    rows = [(d, None, None) for d in range(D)] + [(d, t, li) for d in range(D) for t, li in cells]
    out = np.empty(len(rows))
    emb = model.get_input_embeddings()
    noise = noise.to(dev)
    cur: list[tuple] = []

    def corrupt(_m, _i, e):  # (R, T, H)
        e = e.clone()
        for r, (d, _, _) in enumerate(cur):
            e[r, subj_t] += noise[d].to(e.dtype)
        return e

    def restore(li):
        def f(_m, _i, o):
            h = o[0] if isinstance(o, tuple) else o  # (R, T, H)
            for r, (_, t, lj) in enumerate(cur):
                if lj == li:
                    h[r, t] = clean[layers[li]][t]
            return o
        return f

    hs = [emb.register_forward_hook(corrupt)] + [blocks[L].register_forward_hook(restore(li)) for li, L in enumerate(layers)]
    try:
        for s in range(0, len(rows), batch_size):
            cur[:] = rows[s: s + batch_size]
            out[s: s + len(cur)] = prob(model(input_ids=x.expand(len(cur), T)).logits).cpu().numpy()
    finally:
        for h in hs:
            h.remove()
        model.train(was_training)
    p_restored = np.repeat(out[:D, None, None], ctx_len, 1).repeat(len(layers), 2)  # (D, ctx_len, n_layers)
    done = out[D:].reshape(D, len(cells))
    for k, (t, li) in enumerate(cells):
        p_restored[:, t, li] = done[:, k]
    return {"p_clean": p_clean, "p_corrupt": out[:D], "p_restored": p_restored}


def embedding_noise_std(model, multiplier: float = 3.0) -> float:
    """``multiplier`` x the std of the input-embedding matrix's entries."""
    return multiplier * float(model.get_input_embeddings().weight.detach().float().std())


# ------------------------------------------------------------------------------ the probe
class CausalTracing(Probe):
    """ROME-style causal tracing on forget items, averaged per token role."""

    name = "causal_tracing"
    Config = CausalTracingConfig
    paper = "Meng et al., 2022, Locating and Editing Factual Associations in GPT (ROME, arXiv:2202.05262)"
    version = "1"
    SPECS: dict[str, MetricSpec] = {}

    def pick(self, adapter, forget: list[dict]) -> tuple[list[dict], int]:
        """Up to ``max_items`` traceable forget items, round-robin over authors and attributes;
        also the number of inspected items that could not be traced."""
        cfg = self.config
        groups = list(authors_of(forget, "causal_tracing: forget").values())
        picked, skipped, k = [], 0, 0
        while len(picked) < cfg.max_items and k < max(len(g) for g in groups):
            for gi, g in enumerate(groups):
                it = g[(gi + k) % len(g)]
                if cfg.attributes is not None and it.get("attribute") not in cfg.attributes:
                    continue
                prep = prepare_item(adapter, it, cfg.object_tokens)
                if prep is None:
                    skipped += 1
                    continue
                picked.append({**prep, "item": it})
                if len(picked) == cfg.max_items:
                    break
            k += 1
        if not picked:
            raise ValueError("causal_tracing found no forget item whose attribute value is a token span of its answer "
                             f"(attributes: {cfg.attributes}); check causal_tracing.attributes")
        return picked, skipped

    def run(self, adapter, data, *, reference: ProbeResult | None = None) -> ProbeResult:
        """Trace ``max_items`` forget items (the same ones on every model: the pick depends
        only on the items and the tokenizer).

        Result: values ``n_items``, ``n_skipped``, ``noise_std``, ``p_clean``, ``p_corrupt``,
        ``total_effect`` (means), ``peak_ie`` with ``peak_role`` / ``peak_layer``; arrays
        ``roles``, ``layers``, ``ie`` (roles x layers, mean over items, None where no item has
        the role), per item ``p_clean_items``, ``p_corrupt_items``, ``attributes``, and
        ``example`` (the first item's tokens and its (tokens x layers) IE map)."""
        cfg = self.config
        model = _model_of(adapter)
        n_layers = len(decoder_layers(model))
        sigma = embedding_noise_std(model, cfg.noise_multiplier)
        picked, skipped = self.pick(adapter, data.forget)
        H = model.get_input_embeddings().weight.shape[1]
        maps, pc, pk = [], [], []
        example = None
        for i, p in enumerate(picked):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
            noise = torch.randn(cfg.n_noise, len(p["subject"]), H, generator=gen) * sigma
            r = trace(adapter, p["ids"], p["ctx_len"], p["object"], p["subject"], noise, batch_size=cfg.batch_size)
            ie = r["p_restored"].mean(0) - r["p_corrupt"].mean()  # (ctx_len, L)
            roles = np.asarray(p["roles"])
            m = np.full((len(ROLES), n_layers), np.nan)
            for ri in range(len(ROLES)):
                if (roles == ri).any():
                    m[ri] = ie[roles == ri].mean(0)
            maps.append(m)
            pc.append(r["p_clean"])
            pk.append(float(r["p_corrupt"].mean()))
            if example is None:
                example = {"tokens": p["tokens"], "object": adapter.tokenizer.decode(p["object"]),
                           "ie": ie.tolist(), "question": p["item"]["question"]}
        with warnings.catch_warnings():  # a role no item has stays NaN ("Mean of empty slice")
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(np.stack(maps), 0)  # (roles, L)
        flat = np.where(np.isnan(mean), -np.inf, mean)
        ri, li = np.unravel_index(int(np.argmax(flat)), flat.shape)
        values = {"n_items": len(picked), "n_skipped": skipped, "noise_std": sigma, "p_clean": float(np.mean(pc)),
                  "p_corrupt": float(np.mean(pk)), "total_effect": float(np.mean(np.subtract(pc, pk))),
                  "peak_ie": float(mean[ri, li]), "peak_role": ROLES[ri], "peak_layer": int(li)}
        arrays = {"roles": list(ROLES), "layers": list(range(n_layers)),
                  "ie": [[None if np.isnan(v) else float(v) for v in row] for row in mean],
                  "p_clean_items": pc, "p_corrupt_items": pk,
                  "attributes": [p["item"].get("attribute") for p in picked], "example": example}
        return self._result(values, arrays)

    def compare(self, before: ProbeResult, after: ProbeResult) -> dict[str, MetricResult]:
        vb, va = before.values, after.values
        mb = np.array(before.arrays["ie"], dtype=float)
        ma = np.array(after.arrays["ie"], dtype=float)
        both = ~(np.isnan(mb) | np.isnan(ma))
        return {
            "ct_p_clean_before": self.metric("ct_p_clean_before", vb["p_clean"], before.arrays["p_clean_items"]),
            "ct_p_clean_after": self.metric("ct_p_clean_after", va["p_clean"], after.arrays["p_clean_items"]),
            "ct_total_effect_before": self.metric("ct_total_effect_before", vb["total_effect"]),
            "ct_total_effect_after": self.metric("ct_total_effect_after", va["total_effect"]),
            "ct_peak_ie_before": self.metric("ct_peak_ie_before", vb["peak_ie"],
                                             note=f"at {vb['peak_role']}, layer {vb['peak_layer']}"),
            "ct_peak_ie_after": self.metric("ct_peak_ie_after", va["peak_ie"],
                                            note=f"at {va['peak_role']}, layer {va['peak_layer']}"),
            "ct_ie_map_change": self.metric("ct_ie_map_change", float(np.abs(mb - ma)[both].mean()) if both.any() else None),
        }


def _spec(name, hib, desc):
    return MetricSpec(name, hib, CausalTracing.version, description=desc, paper="Meng et al., 2022 (arXiv:2202.05262)")


CausalTracing.SPECS = {
    "ct_p_clean_before": _spec("ct_p_clean_before", None, "mean P(o) of the traced forget items, model before unlearning"),
    "ct_p_clean_after": _spec("ct_p_clean_after", False, "mean P(o) of the traced forget items, unlearned model"),
    "ct_total_effect_before": _spec("ct_total_effect_before", None, "mean P_clean(o) - P_corrupt(o), before"),
    "ct_total_effect_after": _spec("ct_total_effect_after", False, "mean P_clean(o) - P_corrupt(o), unlearned model"),
    "ct_peak_ie_before": _spec("ct_peak_ie_before", None, "largest role x layer mean indirect effect, before"),
    "ct_peak_ie_after": _spec("ct_peak_ie_after", False, "largest role x layer mean indirect effect, unlearned model"),
    "ct_ie_map_change": _spec("ct_ie_map_change", None, "mean |IE_before - IE_after| over the role x layer map"),
}


# ------------------------------------------------------------------------------ plot
def plot_heatmap(path: str | Path, results: dict[str, dict[str, Any]]) -> bool:
    """Role x layer IE heat maps side by side, one per model: ``results`` = ``{label:
    ProbeResult.to_dict() of causal_tracing}`` (e.g. ``{"before": ..., "after": ...}``).
    Writes a PNG; returns False when there is nothing to draw."""
    res = {k: v for k, v in results.items() if v and v.get("arrays", {}).get("ie")}
    if not res:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = {k: np.array(v["arrays"]["ie"], dtype=float) for k, v in res.items()}
    vmax = max(np.nanmax(np.abs(m)) if np.isfinite(m).any() else 0.0 for m in maps.values()) or 1.0
    fig, axes = plt.subplots(1, len(maps), figsize=(3.3 * len(maps) + 1.6, 3.4), squeeze=False)
    im = None
    for ax, (label, m) in zip(axes[0], maps.items()):
        v = res[label]["values"]
        im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")  # 0 = white
        ax.set_xticks(range(m.shape[1]))
        ax.set_xlabel("layer")
        ax.set_yticks(range(m.shape[0]))
        ax.set_yticklabels(res[label]["arrays"]["roles"] if ax is axes[0][0] else [], fontsize=8)
        ax.set_title(f"{label}: P_clean {v['p_clean']:.2f}, TE {v['total_effect']:.2f}", fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), label="IE = P_restored(o) − P_corrupt(o)")
    fig.suptitle("Causal tracing (restore one hidden state)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
