"""MACE: mass concept erasure by closed-form cross-attention refinement, one attention-suppressing
LoRA per concept, and a closed-form fusion of those LoRAs into one update.

Paper: Lu, Wang, Li, Liu, Kong (2024), "MACE: Mass Concept Erasure in Diffusion Models", CVPR 2024,
arXiv:2403.06135.

Notation: ``W`` is one cross-attention key or value projection (``attn2.to_k`` / ``attn2.to_v``,
shape ``(d_out, d)``), ``c`` a text-encoder token embedding (the cross-attention input, ``d``).
For erase concept ``i`` with mapping (guide) concept ``g_i`` ("red" -> "blue"), each concept prompt
``p`` ("a picture of a solid red circle") has a mapped prompt ``p'`` (the word replaced: "... blue
circle").

1. **Closed-form refinement (CFR).** A causal text encoder leaks the concept into the words that
   co-exist with it in the prompt (every position after it, padding included). For every concept
   prompt, the embeddings ``c_f`` at the positions *outside* the concept's own tokens are mapped
   onto the projections of the mapped prompt's embeddings ``c_g`` at the matching positions:

       min_W'  Σ_f ‖W' c_f − W c_g‖² + s_p Σ_p ‖W' c_p − W c_p‖² + λ ‖W' − W‖²_F

   which is UCE's closed form with ``v* = W c_g`` (:func:`unlearn.editors.uce.uce_edit_unet` is
   called as is; ``c_p`` are the preserved words' embeddings, ``s_p`` = ``train_preserve_scale``).

2. **One LoRA per concept.** On the refined model, a rank-``r`` update ``ΔW_i = B A`` (``B (d_out, r)``
   zero-initialised, ``A (r, d)``) of every K/V projection is trained so that the cross-attention
   maps of the concept's tokens vanish inside the concept's region ``M``:

       L_i = Σ_layers ‖ A_l[:, :, concept tokens] ⊙ M ‖_F     (A_l: (B, heads, HW, T) softmax maps)

   on images of the concept drawn by the original model, noised at a timestep drawn by MACE's
   concept-focal importance sampling ``f(s) = σ(0.05 (s − 200)) − σ(0.05 (s − 400))`` (``s`` = t on
   a 1000-step scale). The paper's ``M`` is a Grounded-SAM segmentation mask; here ``region`` is
   ``image`` (M = 1 everywhere) or ``attention`` (M = the pixels where the concept token's
   head-mean attention in the original model exceeds its spatial mean): the tiny world has one
   object per image and no segmenter.

3. **Fusion.** With ``C_i`` the embeddings of every token position of concept ``i``'s prompts
   (``(n_i, d)``), the fused weight reproduces each LoRA on its own concept's inputs:

       min_W*  Σ_i ‖W* C_iᵀ − (W + ΔW_i) C_iᵀ‖² + s_f Σ_p ‖W* c_p − W c_p‖² + λ ‖W* − W‖²_F

   again UCE's closed form (:func:`unlearn.editors.uce.uce_closed_form`, keys ``C = [C_1; C_2; ...]``,
   values ``(W + ΔW_i) C_i`` per layer, ``s_f`` = ``fuse_preserve_scale``); one Cholesky factor
   serves every layer.

Official defaults (``configs/object/*.yaml`` of the authors' code, SD 1.4): λ 1e3, rank 1, LoRA
lr 1e-5, 50 steps, batch 1, train / fuse preserve scales 0, importance sampling on. Deviations:
the region (above); the mapping concept is the world's guide concept (``task.visual.guide``)
instead of a super-category; concept prompts are the world's explicit forget captions that
contain the word (the paper augments with 30 templates); the lr and steps come from the recipe
(``train.lr``, ``train.max_steps`` or ``lora_steps``) because the tiny zoo needs a far larger lr.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from unlearn.adapters.base import ImageModel
from unlearn.adapters.image import images_to_tensor
from unlearn.editors.base import EditContext, Editor, EditorConfig, EditResult, optimizer_step, restoring_train_state
from unlearn.editors.uce import UCEConfig, cross_attention_kv, uce_closed_form, uce_edit_unet, uce_factor
from unlearn.tasks.visual_task import concept_value
from unlearn.trainer import TrainLog

PAPER = ("Lu, Wang, Li, Liu, Kong (2024). MACE: Mass Concept Erasure in Diffusion Models. "
         "CVPR 2024, arXiv:2403.06135")
REGIONS = ("image", "attention")


@dataclass
class MACEConfig(EditorConfig):
    """Hyper-parameters of MACE (the LoRA's lr, clipping and weight decay come from ``train``)."""

    lamb: float = field(default=1e3, metadata={"help": "λ of ‖W' − W‖² in the refinement and the fusion; > 0"})
    cfr: bool = field(default=True, metadata={"help": "run the closed-form refinement of the co-existing words"})
    train_preserve_scale: float = field(default=0.0, metadata={
        "help": "s_p: weight of the preserved words' outputs in the refinement"})
    fuse_preserve_scale: float = field(default=0.0, metadata={
        "help": "s_f: weight of the preserved words' outputs in the fusion"})
    rank: int = field(default=1, metadata={"help": "LoRA rank r of each K/V update"})
    lora_steps: int = field(default=50, metadata={"help": "LoRA steps per concept when train.max_steps is not set"})
    batch_size: int = field(default=1, metadata={"help": "images per LoRA step"})
    images: int = field(default=8, metadata={"help": "images of each concept the original model draws"})
    max_prompts: int = field(default=32, metadata={"help": "concept prompts per concept (the word alone + captions)"})
    region: str = field(default="image", metadata={
        "help": "where attention is suppressed: image (everywhere) or attention (above-mean attention pixels)"})
    importance_sampling: bool = field(default=True, metadata={
        "help": "draw timesteps with MACE's concept-focal weights (else uniformly)"})
    sample_steps: int = field(default=20, metadata={"help": "DDIM steps of the concept images"})
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance of the concept images"})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lamb) and self.lamb > 0):
            raise ValueError(f"mace.lamb={self.lamb}: must be a finite number > 0 (it keeps the closed forms well posed)")
        for k in ("train_preserve_scale", "fuse_preserve_scale", "guidance"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"mace.{k}={v}: must be a finite number >= 0")
        for k in ("rank", "lora_steps", "batch_size", "images", "max_prompts", "sample_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"mace.{k}={v!r}: must be an integer >= 1")
        if self.region not in REGIONS:
            raise ValueError(f"mace.region={self.region!r}: must be one of {', '.join(REGIONS)}")


# ---------------------------------------------------------------------------- pure pieces
def importance_weights(num_train_timesteps: int) -> torch.Tensor:
    """MACE's concept-focal sampling weights over ``t = 0 .. n−1``: ``σ(0.05(s − 200)) − σ(0.05(s − 400))``
    with ``s = t · 1000 / n`` (mid-range timesteps, where the object's layout forms) -> ``(n,)``."""
    s = torch.arange(num_train_timesteps, dtype=torch.float64) * (1000.0 / num_train_timesteps)
    return torch.sigmoid(0.05 * (s - 200)) - torch.sigmoid(0.05 * (s - 400))


def fuse_loras(weight: torch.Tensor, concept_keys: list[torch.Tensor], deltas: list[torch.Tensor],
               preserve_keys: torch.Tensor | None = None, *, lamb: float = 1e3, preserve_scale: float = 0.0,
               factor: torch.Tensor | None = None) -> torch.Tensor:
    """MACE's multi-LoRA fusion for one projection (a pure function).

    Args:
        weight: ``(d_out, d)`` the refined W every LoRA was trained on.
        concept_keys: per concept ``i`` the ``(n_i, d)`` embeddings C_i of its prompts.
        deltas: per concept the ``(d_out, d)`` LoRA update ΔW_i = B_i A_i.
        preserve_keys: ``(m, d)`` embeddings whose outputs ``W c_p`` are kept (weight ``preserve_scale``).
        factor: optional :func:`unlearn.editors.uce.uce_factor` of ``cat(concept_keys)`` (shared by all layers).
    Returns:
        ``(d_out, d)``: ``argmin Σ_i ‖W* C_iᵀ − (W + ΔW_i) C_iᵀ‖² + s_f ‖W* C_pᵀ − W C_pᵀ‖² + λ‖W* − W‖²``.
    """
    if len(concept_keys) != len(deltas) or not deltas:
        raise ValueError(f"got {len(concept_keys)} concept key sets and {len(deltas)} LoRA updates: give one "
                         "update per concept (at least one)")
    for i, dw in enumerate(deltas):
        if dw.shape != weight.shape:
            raise ValueError(f"deltas[{i}] has shape {tuple(dw.shape)}, the weight {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    keys = torch.cat([c.detach().to(torch.float64) for c in concept_keys])  # (Σ n_i, d)
    values = torch.cat([c.detach().to(torch.float64) @ (w + dw.detach().to(torch.float64)).T
                        for c, dw in zip(concept_keys, deltas)])  # (Σ n_i, d_out)
    return uce_closed_form(weight, keys, values, preserve_keys, lamb=lamb, erase_scale=1.0,
                           preserve_scale=preserve_scale, factor=factor)


def word_positions(adapter, prompts: list[str], word: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, T), mask (B, T) bool)``: the prompts' token ids and the positions of ``word``'s
    tokens in each (every occurrence). A prompt without the word raises ``ValueError``."""
    ids = adapter.tokenize(list(prompts))  # (B, T)
    w = adapter.tokenize([word])[0].tolist()
    eos = adapter.tokenizer.eos_token_id
    w = w[1:w.index(eos)] if eos in w else w[1:]  # strip BOS / EOS / padding
    if not w:
        raise ValueError(f"concept word {word!r} tokenizes to nothing")
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        for s in range(len(row) - len(w) + 1):
            if row[s:s + len(w)] == w:
                mask[b, s:s + len(w)] = True
        if not mask[b].any():
            raise ValueError(f"prompt {prompts[b]!r} does not contain the concept word {word!r} (as tokens {w})")
    return ids, mask


def matching_positions(old: list[int], new: list[int], length: int) -> tuple[list[int], list[int]]:
    """Positions of two token sequences (unpadded, ``old`` with the concept, ``new`` with the mapped
    word) that hold the same co-existing words: the common prefix, the common suffix and every
    padding position after it, paired one to one (up to ``length`` positions) -> (old idx, new idx)."""
    pre = 0
    while pre < min(len(old), len(new)) and old[pre] == new[pre]:
        pre += 1
    suf = 0
    while suf < min(len(old), len(new)) - pre and old[-1 - suf] == new[-1 - suf]:
        suf += 1
    o = list(range(pre)) + list(range(len(old) - suf, length))
    n = list(range(pre)) + list(range(len(new) - suf, length))
    k = min(len(o), len(n))
    return o[:k], n[:k]


# ---------------------------------------------------------------------------- on a model
def concept_prompt_sets(data, max_prompts: int = 32) -> list[dict]:
    """Per erase concept: ``{"word", "guide", "prompts"}``, prompts = the word alone and the distinct
    explicit forget captions containing it (at most ``max_prompts`` in all)."""
    erase = [concept_value(c) for c in (getattr(data, "erase", None) or [])]
    guide = [concept_value(c) for c in (getattr(data, "guide", None) or [])]
    if not erase:
        raise ValueError("mace needs visual data with erase concepts (task.visual.erase)")
    if len(guide) != len(erase):
        raise ValueError(f"mace maps each erase concept onto a mapping concept: task.visual.guide needs one concept "
                         f"per erase concept (erase {erase}, guide {guide})")
    caps = list(dict.fromkeys(it["caption"] for it in data.forget if it.get("phrasing", "explicit") == "explicit"))
    out = []
    for e, g in zip(erase, guide):
        pat = re.compile(rf"\b{re.escape(e)}\b")
        prompts = [e] + [c for c in caps if pat.search(c)]
        out.append({"word": e, "guide": g, "prompts": prompts[:max_prompts]})
    return out


@torch.no_grad()
def cfr_embeddings(adapter, sets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_f (n, d), C_g (n, d))``: the co-existing words' embeddings in every concept prompt and the
    mapped prompt's embeddings at the matching positions (the concept's own tokens left out)."""
    cf, cg = [], []
    for s in sets:
        pat = re.compile(rf"\b{re.escape(s['word'])}\b")
        old_p = s["prompts"]
        new_p = [pat.sub(s["guide"], p) for p in old_p]
        ids_o, ids_n = adapter.tokenize(old_p), adapter.tokenize(new_p)  # (B, T)
        emb_o, emb_n = adapter.token_embeddings(ids_o), adapter.token_embeddings(ids_n)  # (B, T, d)
        length = ids_o.shape[1]
        for b in range(len(old_p)):
            o_ids = adapter.tokenizer(old_p[b], truncation=True, max_length=length)["input_ids"]
            n_ids = adapter.tokenizer(new_p[b], truncation=True, max_length=length)["input_ids"]
            oi, ni = matching_positions(o_ids, n_ids, length)
            cf.append(emb_o[b, oi])
            cg.append(emb_n[b, ni])
    return torch.cat(cf), torch.cat(cg)


class _LowRank(torch.nn.Module):
    """``W -> W + B A`` (a parametrization of one projection's weight)."""

    def __init__(self, d_out: int, d: int, rank: int, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        self.A = torch.nn.Parameter((torch.randn(rank, d, generator=gen) / math.sqrt(d)).to(like))  # (r, d)
        self.B = torch.nn.Parameter(torch.zeros(d_out, rank).to(like))  # (d_out, r)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.B @ self.A


class _AttentionMaps:
    """Records every ``attn2``'s query and key projections during a UNet forward and turns them into
    softmax attention maps ``(B, heads, HW, T)``."""

    def __init__(self, unet) -> None:
        self.attn = {n: m for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_q")}
        if not self.attn:
            raise ValueError("the UNet has no cross-attention modules named '*attn2'; MACE needs a diffusers UNet")
        self.q, self.k, self.handles = {}, {}, []
        for n, m in self.attn.items():
            self.handles.append(m.to_q.register_forward_hook(lambda mod, i, o, n=n: self.q.__setitem__(n, o)))
            self.handles.append(m.to_k.register_forward_hook(lambda mod, i, o, n=n: self.k.__setitem__(n, o)))

    def maps(self):
        for n, m in self.attn.items():
            q, k = self.q[n], self.k[n]  # (B, HW, inner), (B, T, inner)
            h = m.heads
            b, hw, inner = q.shape
            q = q.reshape(b, hw, h, inner // h).transpose(1, 2)  # (B, h, HW, dh)
            k = k.reshape(b, k.shape[1], h, inner // h).transpose(1, 2)  # (B, h, T, dh)
            yield n, torch.softmax((q @ k.transpose(-1, -2)).float() * m.scale, dim=-1)  # (B, h, HW, T)

    def clear(self) -> None:
        self.q.clear()
        self.k.clear()

    def remove(self) -> None:
        for hnd in self.handles:
            hnd.remove()


def attention_loss(maps, mask: torch.Tensor, regions: dict | None = None) -> torch.Tensor:
    """``Σ_layers ‖A[:, :, :, concept] ⊙ M‖_F`` for maps ``(B, h, HW, T)``, concept ``mask (B, T)`` and
    optional per-layer spatial regions ``(B, HW)`` (else the whole image)."""
    total = 0.0
    for name, a in maps:
        sel = a * mask[:, None, None, :].to(a)  # (B, h, HW, T): only the concept tokens' columns
        if regions is not None:
            sel = sel * regions[name][:, None, :, None].to(a)
        total = total + sel.norm()
    return total


class MACE(Editor):
    """MACE as an editor: CFR on every ``attn2.to_k`` / ``to_v``, one LoRA per erase concept trained
    on the refined model, fused in closed form. Edits the target in place (only K/V weights)."""

    name = "mace"
    full_parameters = "it edits the cross-attention weight matrices in closed form and trains LoRAs outside accelerate"
    Config = MACEConfig
    paper = PAPER
    modalities = ("image",)

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        cfg, settings = self.config, ctx.settings
        if not isinstance(adapter, ImageModel):
            raise ValueError("mace edits text-to-image diffusion models (use an ImageAdapter)")
        sets = concept_prompt_sets(data, cfg.max_prompts)
        steps = settings.max_steps if settings.max_steps is not None else cfg.lora_steps
        if steps < 1:
            raise ValueError(f"train.max_steps={steps}: mace needs at least one LoRA step per concept")
        torch.manual_seed(ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed)
        rng = random.Random(f"mace-{ctx.seed}")
        t0 = time.perf_counter()
        unet = adapter.unet
        layers = cross_attention_kv(unet)  # name -> nn.Linear

        # images of each concept from the original model (before any edit)
        with torch.no_grad():
            for s in sets:
                idx = [j % len(s["prompts"]) for j in range(cfg.images)]
                seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) for _ in idx]
                imgs = adapter.sample([s["prompts"][i] for i in idx], seed=seeds, steps=cfg.sample_steps,
                                      guidance=cfg.guidance)
                s["x0"] = adapter.encode_images(images_to_tensor(imgs))  # (N, C, h, w)
                ids, mask = word_positions(adapter, [s["prompts"][i] for i in idx], s["word"])
                s["cond"] = adapter.encode_prompts(ids)  # (N, T(+1), d): the text encoder never trains
                s["mask"] = mask.to(adapter.device)  # (N, T)
                all_ids = adapter.tokenize(s["prompts"])
                s["keys"] = adapter.token_embeddings(all_ids).reshape(-1, s["cond"].shape[-1])  # (P*T, d)
            preserve = [""] + [w for w in data.preserve_words()] if hasattr(data, "preserve_words") else [""]
            cp = adapter.token_embeddings(adapter.tokenize(list(dict.fromkeys(preserve))))
            cp = cp.reshape(-1, cp.shape[-1])  # (m*T, d): every position of every preserved word's prompt

        info: dict = {"concepts": [s["word"] for s in sets], "mapping": [s["guide"] for s in sets],
                      "n_prompts": [len(s["prompts"]) for s in sets]}
        # 1. closed-form refinement of the co-existing words
        if cfg.cfr:
            cf, cg = cfr_embeddings(adapter, sets)
            r = uce_edit_unet(unet, cf, cg, cp, UCEConfig(lamb=cfg.lamb, erase_scale=1.0,
                                                          preserve_scale=cfg.train_preserve_scale))
            info["cfr"] = {"keys": int(cf.shape[0]), "max_abs_change": r["max_abs_change"]}
        refined = {n: lin.weight.detach().clone() for n, lin in layers.items()}

        # 2. one LoRA per concept on the refined K/V
        n_t = adapter.scheduler.config.num_train_timesteps
        tw = importance_weights(n_t) if cfg.importance_sampling else torch.ones(n_t, dtype=torch.float64)
        log = TrainLog(seed=ctx.seed)
        deltas: list[dict[str, torch.Tensor]] = []
        rec = _AttentionMaps(unet)
        with restoring_train_state(adapter):  # flags, train/eval modes and gradients back afterwards
            try:
                for p in adapter.model.parameters():
                    p.requires_grad_(False)
                for ci, s in enumerate(sets):
                    regions = self._regions(adapter, rec, s, tw, gen) if cfg.region == "attention" else None
                    lora = {}
                    for n, lin in layers.items():
                        lora[n] = _LowRank(*lin.weight.shape, cfg.rank, gen, lin.weight)
                        parametrize.register_parametrization(lin, "weight", lora[n])
                    params = [p for m in lora.values() for p in m.parameters()]
                    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=getattr(settings, "weight_decay", 0.0))
                    unet.train()
                    losses = []
                    try:
                        for it in range(steps):
                            b = [rng.randrange(len(s["x0"])) for _ in range(min(cfg.batch_size, len(s["x0"])))]
                            loss = self._step_loss(adapter, rec, s, b, tw, gen, regions)
                            if not torch.isfinite(loss):
                                raise FloatingPointError(f"mace: non-finite attention loss at step {it + 1} of concept "
                                                         f"{s['word']!r}; lower train.lr")
                            optimizer_step(loss, opt, params, settings.max_grad_norm,
                                           f"mace at LoRA step {it + 1} of concept {s['word']!r}; lower train.lr")
                            losses.append(loss.item())
                            log.steps += 1
                            log.history.append({"step": log.steps, "concept": s["word"], "loss": round(loss.item(), 6),
                                                "lr": settings.lr})
                    finally:
                        deltas.append({n: (m.B @ m.A).detach().clone() for n, m in lora.items()})
                        for n, lin in layers.items():
                            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
                        for n, lin in layers.items():  # the refined weight, exactly
                            lin.weight.data.copy_(refined[n])
                            lin.weight.requires_grad_(False)
                    info.setdefault("lora_loss", {})[s["word"]] = {"first": round(losses[0], 6) if losses else None,
                                                                   "last": round(losses[-1], 6) if losses else None}
            finally:
                rec.remove()

        # 3. closed-form fusion of the LoRAs
        with torch.no_grad():
            keys = [s["keys"] for s in sets]
            factor = uce_factor(torch.cat(keys), cp, lamb=cfg.lamb, erase_scale=1.0,
                                preserve_scale=cfg.fuse_preserve_scale)
            max_change = 0.0
            for n, lin in layers.items():
                new = fuse_loras(refined[n], keys, [d[n] for d in deltas], cp, lamb=cfg.lamb,
                                 preserve_scale=cfg.fuse_preserve_scale, factor=factor)
                max_change = max(max_change, float((new - lin.weight).abs().max()))
                lin.weight.copy_(new)
        adapter._fingerprint = None
        log.seconds = time.perf_counter() - t0
        info.update(edited=[f"unet.{n}.weight" for n in layers], lora_steps=steps, rank=cfg.rank,
                    fusion_max_abs_change=max_change, edit_seconds=round(log.seconds, 3),
                    headline=f"MACE: {len(sets)} concepts, CFR {'on' if cfg.cfr else 'off'}, {steps} LoRA steps each, "
                             f"fused in {log.seconds:.1f} s")
        return EditResult(adapter=adapter, log=log, info=info)

    @staticmethod
    def _noised(adapter, s, b, tw, gen):
        x = s["x0"][b]
        eps = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        t = torch.multinomial(tw, len(b), replacement=True, generator=gen).to(x.device)
        return adapter.scheduler.add_noise(x, eps, t), t

    def _step_loss(self, adapter, rec, s, b, tw, gen, regions):
        x_t, t = self._noised(adapter, s, b, tw, gen)
        rec.clear()
        adapter.noise_pred(x_t, t, s["cond"][b])
        sub = None if regions is None else {n: r[b] for n, r in regions.items()}
        return attention_loss(rec.maps(), s["mask"][b], sub)

    @torch.no_grad()
    def _regions(self, adapter, rec, s, tw, gen) -> dict:
        """Per layer ``(N, HW)`` 0/1: pixels where the concept tokens' head-mean attention in the refined
        model exceeds its spatial mean (the stand-in for the paper's segmentation mask)."""
        b = list(range(len(s["x0"])))
        x_t, t = self._noised(adapter, s, b, tw, gen)
        rec.clear()
        adapter.noise_pred(x_t, t, s["cond"])
        out = {}
        for n, a in rec.maps():
            m = (a * s["mask"][:, None, None, :].to(a)).sum(-1).mean(1)  # (N, HW)
            out[n] = (m > m.mean(-1, keepdim=True)).float()
        return out


__all__ = ["MACE", "MACEConfig", "PAPER", "attention_loss", "cfr_embeddings", "concept_prompt_sets", "fuse_loras",
           "importance_weights", "matching_positions", "word_positions"]
