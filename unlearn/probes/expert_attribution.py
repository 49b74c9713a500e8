"""Expert attribution for mixture-of-experts models: which routed experts does the forget set use?

For a Mixtral-style MoE (each decoder layer ``l`` has a router ``mlp.gate`` with weight (E, H)
and E routed experts, top-k of which run per token) the router's probabilities on token ``t``
are ``g^l(x_t) = softmax(W_g^l h_t^l)`` (E,), ``h_t^l`` the layer's input after its norm
(DeepSeek-V3's sigmoid router: the sigmoid scores normalised to sum to one, :func:`router_probs`). The
probe reads them with forward hooks on the routers, over the tokens of the forget and the
retain items (``tokens``: every token of the teacher-forced question + answer, or only the
answer tokens), and reports:

* **router affinity** per (layer, expert): ``s_e^l = mean over forget tokens of g_e^l(x_t)``
  (and the same over retain tokens); the top-1 (layer, expert) by forget affinity
  (``select: forget``, UOE's expert attribution as METHODS.md writes it) or by the difference
  forget minus retain (``select: difference``); both are reported, ``select`` names the headline;
* **routing entropy** per layer: ``mean_t -sum_e g_e^l(x_t) log g_e^l(x_t)`` (nats; the maximum is
  ``log E``);
* **per-author expert usage** ``u_a^l(e)`` = share of the top-k slots of author ``a``'s forget
  tokens that go to expert ``e``, and a **specialisation** measure per layer:
  ``mean_a TV(u_a^l, u^l) = mean_a 1/2 sum_e |u_a^l(e) - u^l(e)|`` with ``u^l`` the usage over
  all forget tokens (0: every author is routed like the rest; it is biased upwards when an
  author has few tokens, so compare it between models on the same items, not with 0).

After unlearning the same items are read again (the same tokens, so the two runs align token
by token) and :meth:`ExpertAttribution.compare` reports the **routing shift**: the mean Jaccard
overlap ``|S_t ∩ S'_t| / |S_t ∪ S'_t|`` of the top-k expert sets before (``S_t``) and after
(``S'_t``) per token and layer, on the forget and the retain tokens (1.0: routing unchanged);
the forget affinity of the expert chosen before unlearning, before and after; and the change of
the forget routing entropy.

The module also holds the MoE helpers that the ``uoe`` selection and objective use:
:func:`moe_blocks`, :func:`router_logits`, :func:`routing` and :func:`top_expert`.

Reference: Zhuang et al., 2025, "UOE: Unlearning One Expert Is Enough for Mixture-of-experts
LLMs" (arXiv:2411.18797) -- expert attribution by router affinity on the forget set; routing
shift after unlearning. Mixtral: Jiang et al., 2024, "Mixtral of Experts" (arXiv:2401.04088).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from unlearn.evaluators.base import MetricResult, MetricSpec
from unlearn.probes.base import Probe, ProbeConfig, ProbeResult, _model_of, decoder_layers, model_name


# ------------------------------------------------------------------------------ MoE helpers
def moe_blocks(model) -> dict[int, torch.nn.Module]:
    """``{layer index: MoE block}`` of a causal LM: blocks ``layers[l].mlp`` with a router
    ``.gate`` (a 2-D ``weight`` (E, H)) and fused experts ``.experts`` (``gate_up_proj``
    (E, 2I, H), ``down_proj`` (E, H, I)), as Mixtral, Qwen2-MoE and DeepSeek-V2/V3 have them in
    transformers >= 5. A block may hold more (Qwen2-MoE's gated ``shared_expert``, DeepSeek's
    ``shared_experts``): the shared experts run on every token, are not routed, and are not part
    of the attribution or of the ``uoe`` selection. Dense layers among MoE ones (DeepSeek's
    ``first_k_dense_replace``) are left out.

    Raises:
        ValueError: the model has no such block (a dense model)."""
    out = {}
    for i, blk in enumerate(decoder_layers(model)):
        mlp = getattr(blk, "mlp", None) or getattr(blk, "block_sparse_moe", None)
        gate, experts = getattr(mlp, "gate", None), getattr(mlp, "experts", None)
        w = getattr(gate, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
            out[i] = mlp
    if not out:
        raise ValueError(f"{model_name(model)} has no mixture-of-experts layers (layers[l].mlp.gate + "
                         "mlp.experts); expert attribution and the uoe selection need an MoE model such as "
                         "zoo:tiny-moe/target (build it with `unlearn zoo build tiny-moe`)")
    return out


def router_probs(gate: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The router's distribution over the E routed experts, from its logits (..., E) -> (..., E) float32.

    Softmax for softmax routers (Mixtral, Qwen2-MoE, DeepSeek-V2). A sigmoid router (DeepSeek-V3:
    the gate has ``e_score_correction_bias``) scores each expert with ``sigmoid(logit)`` and picks
    the top-k scores; its distribution is taken as the scores normalised to sum to one (what it
    weights the chosen experts by, with ``norm_topk_prob``, restricted to them). Either way the
    top-k of the result are the experts the router picks as long as DeepSeek-V3's load-balancing
    correction bias is zero (as at initialisation) and it has one expert group: neither the bias
    nor the group limit is applied here."""
    if hasattr(gate, "e_score_correction_bias"):
        s = torch.sigmoid(logits.float())
        return s / s.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.softmax(logits.float(), -1)


def router_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Router logits of the MoE layers in one forward pass: ``{layer: (B, T, E)}``.

    Read with forward hooks on the routers (output 0 of ``mlp.gate``), so gradients flow when
    called with grad enabled (the UOE router anchor needs them). ``layers``: None = all MoE layers.
    """
    blocks = moe_blocks(model)
    layers = sorted(blocks) if layers is None else layers
    got: dict[int, torch.Tensor] = {}
    B, T = input_ids.shape

    def hook(i):
        def f(_m, _inp, out):
            lg = out[0] if isinstance(out, tuple) else out
            got[i] = lg.reshape(B, T, -1)  # (B*T, E) -> (B, T, E)
        return f

    handles = [blocks[i].gate.register_forward_hook(hook(i)) for i in layers]
    try:
        dev = next(model.parameters()).device
        model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev))
    finally:
        for h in handles:
            h.remove()
    return got


def token_mask(batch: dict[str, torch.Tensor], tokens: str) -> torch.Tensor:
    """(B, T) bool: the tokens read -- ``all`` = every real token (attention mask), ``answer`` =
    the answer tokens (``labels != -100``)."""
    if tokens == "all":
        return batch["attention_mask"].bool()
    if tokens == "answer":
        return batch["labels"] != -100
    raise ValueError(f"tokens must be 'all' or 'answer', got {tokens!r}")


@torch.no_grad()
def routing(adapter, items: list[dict], tokens: str = "all", batch_size: int = 32) -> tuple[torch.Tensor, list]:
    """Router probabilities of every read token of ``items``: ``(probs (N, L, E) float32, owner
    (N,))`` with ``owner[n]`` the ``author_id`` (or None) of token n's item; layers in the order of
    :func:`moe_blocks`. Tokens are in item order, then position order."""
    model = _model_of(adapter)
    blocks = moe_blocks(model)
    was = model.training
    model.eval()
    probs, owner = [], []
    try:
        for s in range(0, len(items), batch_size):
            chunk = items[s: s + batch_size]
            batch = adapter.collate(chunk)
            lg = router_logits(model, batch["input_ids"], batch["attention_mask"])
            m = token_mask(batch, tokens)  # (B, T)
            p = torch.stack([router_probs(blocks[i].gate, lg[i]).cpu() for i in sorted(lg)], 2)  # (B, T, L, E)
            probs.append(p[m])  # (n, L, E)
            for b, it in enumerate(chunk):
                owner += [it.get("author_id")] * int(m[b].sum())
    finally:
        model.train(was)
    return torch.cat(probs), owner


def affinity(probs: torch.Tensor) -> torch.Tensor:
    """Router affinity ``s_e^l`` = mean router probability over tokens: (N, L, E) -> (L, E)."""
    return probs.mean(0)


def topk_sets(probs: torch.Tensor, k: int) -> torch.Tensor:
    """(N, L, E) router probabilities -> (N, L, E) bool membership of the top-k experts."""
    idx = probs.topk(k, dim=-1).indices
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, True)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per (token, layer) Jaccard overlap of two (N, L, E) bool expert sets: (N, L)."""
    return (a & b).sum(-1).float() / (a | b).sum(-1).clamp_min(1).float()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean routing entropy per layer (nats): (N, L, E) -> (L,)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(0)


def author_usage(sets: torch.Tensor, owner: list) -> dict[Any, torch.Tensor]:
    """Per-author expert usage ``u_a^l(e)``: share of the author's top-k slots given to expert e,
    ``{author_id: (L, E)}`` (rows sum to 1)."""
    out = {}
    for a in dict.fromkeys(owner):
        sel = torch.tensor([o == a for o in owner])
        s = sets[sel].float().sum(0)  # (L, E)
        out[a] = s / s.sum(-1, keepdim=True).clamp_min(1)
    return out


def specialisation(sets: torch.Tensor, owner: list) -> torch.Tensor:
    """Per layer ``mean_a 1/2 sum_e |u_a^l(e) - u^l(e)|`` (total variation between each author's
    usage and the pooled usage): (L,)."""
    s = sets.float().sum(0)
    pooled = s / s.sum(-1, keepdim=True).clamp_min(1)  # (L, E)
    per = [0.5 * (u - pooled).abs().sum(-1) for u in author_usage(sets, owner).values()]
    return torch.stack(per).mean(0)


def top_expert(adapter, items: list[dict], tokens: str = "all", retain: list[dict] | None = None,
               batch_size: int = 32) -> tuple[int, int, torch.Tensor]:
    """UOE's expert attribution: ``(layer, expert, score (L, E))`` with the highest score, the
    forget affinity ``s_e^l`` (``retain=None``) or forget minus retain affinity. ``layer`` is the
    model's decoder-layer index."""
    layers = sorted(moe_blocks(_model_of(adapter)))
    score = affinity(routing(adapter, items, tokens, batch_size)[0])
    if retain:
        score = score - affinity(routing(adapter, retain, tokens, batch_size)[0])
    flat = int(score.argmax())
    return layers[flat // score.shape[1]], flat % score.shape[1], score


# ------------------------------------------------------------------------------ the probe
@dataclass
class ExpertAttributionConfig(ProbeConfig):
    tokens: Literal["all", "answer"] = field(default="all", metadata={
        "help": "tokens read: all tokens of question + answer, or only the answer tokens"})
    select: Literal["forget", "difference"] = field(default="forget", metadata={
        "help": "headline (layer, expert): top forget affinity (UOE) or top forget-minus-retain affinity"})
    top_k: int | None = field(default=None, metadata={
        "help": "experts per token for usage and routing shift; null: the model's num_experts_per_tok"})
    max_items: int | None = field(default=400, metadata={
        "help": "forget and retain items read, each (a seeded random subset); null: all"})
    batch_size: int = field(default=32, metadata={"help": "items per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed of the item subsets"})

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or null, got {self.top_k}")
        if self.max_items is not None and self.max_items < 1:
            raise ValueError(f"max_items must be >= 1 or null, got {self.max_items}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class ExpertAttribution(Probe):
    """Router affinity per (layer, expert) on forget vs retain tokens; routing shift after unlearning."""

    name = "expert_attribution"
    Config = ExpertAttributionConfig
    paper = ("Zhuang et al., 2025, UOE: Unlearning One Expert Is Enough for Mixture-of-experts LLMs "
             "(arXiv:2411.18797)")
    version = "1"
    SPECS: dict[str, MetricSpec] = {}

    def _subset(self, items: list[dict], what: str) -> list[dict]:
        n = self.config.max_items
        if n is None or len(items) <= n:
            return list(items)
        idx = sorted(random.Random(f"expert-attribution-{what}-{self.config.seed}").sample(range(len(items)), n))
        return [items[i] for i in idx]

    def run(self, adapter, data, *, reference: ProbeResult | None = None) -> ProbeResult:
        """Read the routers on the forget and retain items.

        Result: values ``n_forget_tokens``, ``n_retain_tokens``, ``n_experts``, ``top_k``,
        ``top_layer`` / ``top_expert`` (by ``select``), ``forget_top`` / ``difference_top``
        ([layer, expert] by each rule), ``top_forget_affinity``, ``top_retain_affinity``,
        ``uniform`` (1/E), ``entropy_forget`` / ``entropy_retain`` (mean over layers),
        ``max_entropy`` (log E), ``specialisation`` (mean over layers); arrays ``layers``,
        ``affinity_forget`` / ``affinity_retain`` (L, E), ``entropy_forget`` / ``entropy_retain``
        (L,), ``specialisation`` (L,), ``author_usage`` ({author_id: (L, E)}); tensors
        ``sets_forget`` / ``sets_retain`` (N, L, E) bool top-k memberships for the routing shift."""
        cfg = self.config
        model = _model_of(adapter)
        layers = sorted(moe_blocks(model))
        k = cfg.top_k or int(getattr(model.config, "num_experts_per_tok", 0) or 0)
        if k < 1:
            raise ValueError("expert_attribution: the model config has no num_experts_per_tok; set top_k")
        if not data.forget:
            raise ValueError("expert_attribution needs forget items")
        forget = self._subset(data.forget, "forget")
        retain = self._subset(data.retain or [], "retain")
        pf, owner = routing(adapter, forget, cfg.tokens, cfg.batch_size)
        E = pf.shape[-1]
        if k > E:
            raise ValueError(f"expert_attribution top_k {k} exceeds the number of experts {E}")
        af = affinity(pf)
        sets_f = topk_sets(pf, k)
        values: dict[str, Any] = {"n_forget_items": len(forget), "n_forget_tokens": pf.shape[0], "n_experts": E,
                                  "top_k": k, "uniform": 1.0 / E, "max_entropy": float(np.log(E)), "tokens": cfg.tokens}
        ent_f = entropy(pf)
        spec = specialisation(sets_f, owner)
        arrays: dict[str, Any] = {"layers": layers, "affinity_forget": af, "entropy_forget": ent_f,
                                  "specialisation": spec,
                                  "author_usage": {str(a): u for a, u in author_usage(sets_f, owner).items()}}
        tensors = {"sets_forget": sets_f}
        fl = int(af.argmax())
        values["forget_top"] = [layers[fl // E], fl % E]
        values["difference_top"] = None
        if retain:
            pr, _ = routing(adapter, retain, cfg.tokens, cfg.batch_size)
            ar = affinity(pr)
            dl = int((af - ar).argmax())
            values["difference_top"] = [layers[dl // E], dl % E]
            arrays.update(affinity_retain=ar, entropy_retain=entropy(pr))
            tensors["sets_retain"] = topk_sets(pr, k)
            values.update(n_retain_items=len(retain), n_retain_tokens=pr.shape[0],
                          entropy_retain=float(entropy(pr).mean()))
        if cfg.select == "difference" and values["difference_top"] is None:
            raise ValueError("expert_attribution select: difference needs retain items (task.retain_split)")
        top = values["forget_top"] if cfg.select == "forget" else values["difference_top"]
        li = layers.index(top[0])
        values.update(top_layer=top[0], top_expert=top[1], top_forget_affinity=float(af[li, top[1]]),
                      top_retain_affinity=float(arrays["affinity_retain"][li, top[1]]) if retain else None,
                      entropy_forget=float(ent_f.mean()), specialisation=float(spec.mean()))
        return self._result(values, arrays, tensors)

    def compare(self, before: ProbeResult, after: ProbeResult) -> dict[str, MetricResult]:
        def overlap(key):
            a, b = before.tensors.get(key), after.tensors.get(key)
            if a is None or b is None:
                return None, None, "not computable: no tokens"
            if a.shape != b.shape:
                return None, None, f"not computable: token sets differ ({tuple(a.shape)} vs {tuple(b.shape)})"
            j = jaccard(a, b)  # (N, L)
            return float(j.mean()), j.mean(0).tolist(), "per_item: per layer"

        out = {}
        for split in ("forget", "retain"):
            v, per, note = overlap(f"sets_{split}")
            name = f"moe_routing_overlap_{split}"
            out[name] = self.metric(name, v, per, note=note)
        L, e = before.values["top_layer"], before.values["top_expert"]
        li = before.arrays["layers"].index(L)
        note = f"layer {L}, expert {e} (chosen before unlearning, select={self.config.select})"
        out["moe_top_affinity_before"] = self.metric("moe_top_affinity_before", before.values["top_forget_affinity"],
                                                     note=note)
        out["moe_top_affinity_after"] = self.metric("moe_top_affinity_after", float(after.arrays["affinity_forget"][li][e]),
                                                    note=note)
        out["moe_entropy_change_forget"] = self.metric(
            "moe_entropy_change_forget", after.values["entropy_forget"] - before.values["entropy_forget"],
            [float(x - y) for x, y in zip(after.arrays["entropy_forget"], before.arrays["entropy_forget"])],
            note=f"nats; max entropy log E = {before.values['max_entropy']:.3f}")
        out["moe_specialisation_after"] = self.metric("moe_specialisation_after", after.values["specialisation"],
                                                      [float(x) for x in after.arrays["specialisation"]],
                                                      note=f"before: {before.values['specialisation']:.4f}")
        return out


def _spec(name, hib, desc):
    return MetricSpec(name, hib, ExpertAttribution.version, description=desc,
                      paper="Zhuang et al., 2025 (arXiv:2411.18797)")


ExpertAttribution.SPECS = {
    "moe_routing_overlap_forget": _spec("moe_routing_overlap_forget", None,
                                        "mean Jaccard overlap of each forget token's top-k expert set before vs after "
                                        "unlearning (1: routing unchanged; per_item: per layer); UOE expects the "
                                        "router anchor to keep it high"),
    "moe_routing_overlap_retain": _spec("moe_routing_overlap_retain", True,
                                        "mean Jaccard overlap of each retain token's top-k expert set before vs after "
                                        "unlearning (per_item: per layer); 1 = retain routing untouched"),
    "moe_top_affinity_before": _spec("moe_top_affinity_before", None,
                                     "forget affinity (mean router probability) of the top (layer, expert), before"),
    "moe_top_affinity_after": _spec("moe_top_affinity_after", None,
                                    "forget affinity of the same (layer, expert) on the unlearned model"),
    "moe_entropy_change_forget": _spec("moe_entropy_change_forget", None,
                                       "mean routing entropy on forget tokens after minus before (nats; per_item: per "
                                       "layer)"),
    "moe_specialisation_after": _spec("moe_specialisation_after", None,
                                      "mean over forget authors of the total variation between the author's top-k "
                                      "expert usage and the pooled usage, unlearned model (per_item: per layer)"),
}
