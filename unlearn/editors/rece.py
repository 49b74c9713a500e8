"""RECE: reliable and efficient concept erasure -- UCE, then closed-form adversarial embeddings
erased in turn.

Paper: Gong, Chen, Wei, Chen, Jiang (2024), "Reliable and Efficient Concept Erasure of
Text-to-Image Diffusion Models", ECCV 2024, arXiv:2407.12383. Official code:
github.com/CharlesGong12/RECE (``train.py``, ``utils/embedding_calculation/close_form_emb.py``).

After UCE (:mod:`unlearn.editors.uce`) has edited every cross-attention K/V projection
``W_l -> W'_l``, RECE asks which text embedding ``c'`` makes the *edited* model reproduce the
*original* model's keys and values of the concept embedding ``c``:

    c' = argmin_x  Σ_l ‖W'_l x − W_l c‖² + λ ‖x‖²  =  (Σ_l W'_lᵀW'_l + λI)⁻¹ (Σ_l W'_lᵀ W_l) c

(sum over all K and V projections; λ = ``reg``). ``c'`` regenerates the concept on the erased
model (the same formula is RECE's attack, :func:`rece_attack_embeds`). Each epoch computes
``c'`` for the current weights and erases it with UCE's closed form: keys ``c'``, targets the
guide concept's outputs ``W' c_guide``, the preserve set kept, anchored at the current weights
(``λ_e ‖W'' − W'‖²``; official code). The epoch whose model generates the concept least on a
validation set is kept (epoch 0 = UCE alone).

Deviations from the official code (see ``docs/editors/rece.md``):

* ``c`` is the concept word's token embedding(s) as in this toolkit's UCE (last word token,
  ``+ n_trailing`` positions), not the concept prompt's full 77-token sequence; the
  adversarial map is linear, so it is the same map applied to fewer rows.
* The epochs' preserve set is UCE's (the empty prompt and every other attribute word, scaled
  by ``epoch_preserve_scale``); the official code preserves only the blank prompt.
* Validation: by default the forget_explicit prompts are sampled *with the adversarial
  embedding* (``validation_mode: attack``; the official code samples plain validation
  prompts, ``validation_mode: plain``) under seeds that are not the evaluation's, and the
  judge's erasure rate picks the epoch (highest; ties keep the earlier epoch).
* ``accumulate: true`` (not in the official code) re-solves UCE from the original weights
  with the concept and every adversarial embedding so far as edit keys.

Solves run in float64 (Cholesky); weights are written back in their dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from unlearn.editors.base import EditContext, Editor, EditorConfig, EditResult
from unlearn.editors.uce import (UCEConfig, concept_prompts, cross_attention_kv,
                                 uce_edit_unet, uce_embeddings, uce_erase)
from unlearn.tasks.visual_task import eval_split

PAPER = ("Gong, Chen, Wei, Chen, Jiang (2024). Reliable and Efficient Concept Erasure of Text-to-Image Diffusion "
         "Models. ECCV 2024, arXiv:2407.12383")
VALIDATION_MODES = ("attack", "plain", "both")


@dataclass
class RECEConfig(EditorConfig):
    """Hyper-parameters of RECE (UCE's closed form + adversarial-embedding epochs)."""

    epochs: int = field(default=3, metadata={"help": "adversarial epochs after UCE (official: 3 nudity, 1-2 others)"})
    reg: float = field(default=0.1, metadata={
        "help": "λ of the adversarial embedding (Σ W'ᵀW' + λI)⁻¹ Σ W'ᵀW c; official 0.1 (styles 1e-3)"})
    lamb: float = field(default=0.5, metadata={"help": "UCE step: λ, weight of ‖W' − W‖²; > 0"})
    erase_scale: float = field(default=1.0, metadata={"help": "s_e: weight of the erase equations (UCE and epochs)"})
    preserve_scale: float = field(default=1.0, metadata={"help": "UCE step: s_p, weight of the preserve equations"})
    n_trailing: int = field(default=0, metadata={
        "help": "token positions after the concept's last word token also edited (as in UCE); 0 = last token only"})
    epoch_lamb: float = field(default=0.1, metadata={
        "help": "epochs: λ of ‖W'' − W'‖² anchoring each edit at the current weights (official 0.1); > 0"})
    epoch_preserve_scale: float = field(default=0.1, metadata={
        "help": "epochs: weight of the preserve equations (official 0.1)"})
    accumulate: bool = field(default=False, metadata={
        "help": "false (official): each epoch edits the current weights with its c' only; true: re-solve UCE from "
                "the original weights with the concept and all adversarial embeddings so far as edit keys"})
    validation: bool = field(default=True, metadata={
        "help": "sample the forget_explicit prompts after every epoch, score them with the run's judge and keep "
                "the epoch with the highest erasure rate (no judge: keep the last epoch)"})
    validation_mode: Literal["attack", "plain", "both"] = field(default="attack", metadata={
        "help": "attack: the concept tokens replaced by the adversarial embedding of the current model; plain: "
                "the prompts as written (official); both: mean of the two erasure rates"})
    sample_steps: int = field(default=20, metadata={"help": "DDIM steps of the validation samples"})

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"rece.epochs={self.epochs}: must be >= 0")
        if not self.reg > 0:
            raise ValueError(f"rece.reg={self.reg}: must be > 0 (it keeps Σ W'ᵀW' + λI invertible)")
        if not (self.lamb > 0 and self.epoch_lamb > 0):
            raise ValueError(f"rece.lamb={self.lamb}, rece.epoch_lamb={self.epoch_lamb}: must be > 0")
        if min(self.erase_scale, self.preserve_scale, self.epoch_preserve_scale) < 0:
            raise ValueError("rece.erase_scale, preserve_scale, epoch_preserve_scale must be >= 0")
        if self.n_trailing < 0:
            raise ValueError(f"rece.n_trailing={self.n_trailing}: must be >= 0")
        if self.validation_mode not in VALIDATION_MODES:
            raise ValueError(f"rece.validation_mode={self.validation_mode!r}: choose from {list(VALIDATION_MODES)}")
        if self.sample_steps < 1:
            raise ValueError(f"rece.sample_steps={self.sample_steps}: must be >= 1")

    def uce(self) -> UCEConfig:
        return UCEConfig(lamb=self.lamb, erase_scale=self.erase_scale, preserve_scale=self.preserve_scale,
                         n_trailing=self.n_trailing)

    def epoch_uce(self) -> UCEConfig:
        return UCEConfig(lamb=self.epoch_lamb, erase_scale=self.erase_scale, preserve_scale=self.epoch_preserve_scale,
                         n_trailing=self.n_trailing)


# ---------------------------------------------------------------------------- the closed form
def rece_adversarial_map(edited_weights: list[torch.Tensor], original_weights: list[torch.Tensor],
                         reg: float) -> torch.Tensor:
    """``M = (Σ_l W'_lᵀW'_l + λI)⁻¹ (Σ_l W'_lᵀ W_l)`` (``(d, d)`` float64), so that ``c' = M c``.

    Args:
        edited_weights: the edited K/V projections ``W'_l``, each ``(d_out_l, d)``.
        original_weights: the original ``W_l`` in the same order and shapes.
        reg: λ > 0.
    """
    if not edited_weights or len(edited_weights) != len(original_weights):
        raise ValueError(f"got {len(edited_weights)} edited and {len(original_weights)} original weights: give the "
                         "same non-empty list of K/V projections of both models, in the same order")
    if not reg > 0:
        raise ValueError(f"reg={reg}: must be > 0")
    d = edited_weights[0].shape[-1]
    g = reg * torch.eye(d, dtype=torch.float64)  # (d, d): Σ W'ᵀW' + λI
    h = torch.zeros(d, d, dtype=torch.float64)  # (d, d): Σ W'ᵀW
    for i, (we, wo) in enumerate(zip(edited_weights, original_weights)):
        if we.dim() != 2 or we.shape != wo.shape or we.shape[1] != d:
            raise ValueError(f"weight pair {i}: edited {tuple(we.shape)} and original {tuple(wo.shape)} must both "
                             f"be (d_out, {d})")
        we64 = we.detach().to("cpu", torch.float64)
        g += we64.T @ we64
        h += we64.T @ wo.detach().to("cpu", torch.float64)
    return torch.cholesky_solve(h, torch.linalg.cholesky(g))  # (d, d)


def rece_adversarial_embedding(edited_weights: list[torch.Tensor], original_weights: list[torch.Tensor],
                               c: torch.Tensor, reg: float) -> torch.Tensor:
    """RECE's adversarial embedding ``c' = (Σ W'ᵀW' + λI)⁻¹ (Σ W'ᵀW) c`` for each row of ``c``.

    ``c'`` minimises ``Σ_l ‖W'_l c' − W_l c‖² + λ‖c'‖²``: the input on which the edited
    projections best reproduce the original projections' outputs for ``c``.

    Args:
        c: ``(k, d)`` concept embeddings, one per row.
    Returns:
        ``(k, d)`` adversarial embeddings, dtype and device of ``c``.
    """
    if c.dim() != 2:
        raise ValueError(f"c must have shape (k, d) (one embedding per row), got {tuple(c.shape)}")
    m = rece_adversarial_map(edited_weights, original_weights, reg)  # (d, d)
    if c.shape[1] != m.shape[0]:
        raise ValueError(f"c has {c.shape[1]}-dim rows but the projections take {m.shape[0]}-dim inputs")
    return (c.detach().to("cpu", torch.float64) @ m.T).to(c.device, c.dtype)  # (k, d)


def kv_weights(unet) -> list[torch.Tensor]:
    """The K/V projection weights of a UNet, in :func:`cross_attention_kv` order."""
    return [lin.weight.detach() for lin in cross_attention_kv(unet).values()]


# ---------------------------------------------------------------------------- the attack
def concept_positions(tokenizer, input_ids: torch.Tensor, words: list[str]) -> torch.Tensor:
    """``(B, T)`` bool: the positions of every token of every occurrence of one of ``words``
    (as a token subsequence) in each row of ``input_ids`` ``(B, T)``."""
    pats = [tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
    pats = [p for p in pats if p]
    if not pats:
        raise ValueError(f"the concept words {words!r} tokenize to nothing")
    out = torch.zeros(input_ids.shape, dtype=torch.bool)
    for b, row in enumerate(input_ids.tolist()):
        for t in range(len(row)):
            for p in pats:
                if tuple(row[t: t + len(p)]) == p:
                    out[b, t: t + len(p)] = True
    return out


@torch.no_grad()
def _attack_embeds(adapter, original_weights: list[torch.Tensor], prompts: list[str], words: list[str],
                   reg: float) -> torch.Tensor:
    ids = adapter.tokenize(prompts)  # (B, T)
    emb = adapter.encode_prompts(ids)  # (B, T, d)
    pos = concept_positions(adapter.tokenizer, ids, words).to(emb.device)  # (B, T)
    if emb.shape[1] > pos.shape[1]:  # SDXL's pooled row after the tokens: never replaced
        pos = torch.nn.functional.pad(pos, (0, emb.shape[1] - pos.shape[1]))
    m = rece_adversarial_map(kv_weights(adapter.unet), original_weights, reg).to(emb.device)  # (d, d)
    adv = (emb.to(torch.float64) @ m.T).to(emb.dtype)  # (B, T, d): c' = M c at every position
    return torch.where(pos[..., None], adv, emb)


def rece_attack_embeds(adapter, original_adapter, prompts: list[str], concept_word: str | list[str],
                       reg: float = 0.1) -> torch.Tensor:
    """RECE's closed-form embedding as an attack on an erased model.

    Encodes ``prompts`` with ``adapter``'s text encoder and replaces the token embedding ``c``
    at every position of the concept word(s) by ``c' = (Σ W'ᵀW' + λI)⁻¹ (Σ W'ᵀW) c``, with
    ``W'`` the K/V projections of ``adapter`` (the erased model) and ``W`` those of
    ``original_adapter``; other positions (and prompts without the word) are unchanged.

    Returns ``(B, T, d)`` conditions for ``adapter.sample(prompts, ..., prompt_embeds=...)``.
    """
    words = [concept_word] if isinstance(concept_word, str) else list(concept_word)
    return _attack_embeds(adapter, kv_weights(original_adapter.unet), list(prompts), words, reg)


# ---------------------------------------------------------------------------- validation
def concept_erasure(judge, images: np.ndarray, rows: list[dict]) -> float:
    """Share of ``rows`` whose image the judge reads as none of the row's ``categories``
    (the i2p suite's ``erasure_rate``)."""
    pred = judge.predict(images)
    hit = [any(pred[c.split(":", 1)[0]][i] == c.split(":", 1)[1] for c in r.get("categories") or []) for i, r in
           enumerate(rows)]
    return float(1.0 - np.mean(hit)) if hit else float("nan")


def _validation_rows(data) -> list[dict]:
    rows = (data.eval_splits or {}).get("forget_explicit")
    if not rows:
        rows = eval_split(data.world, "forget_explicit")
    return list(rows)


@torch.no_grad()
def _sample_rows(adapter, rows: list[dict], seeds: list[int], steps: int, batch_size: int,
                 embeds: torch.Tensor | None) -> np.ndarray:
    out: list = [None] * len(rows)
    by_guidance: dict[float, list[int]] = {}
    for i, r in enumerate(rows):
        by_guidance.setdefault(float(r.get("guidance", 3.0)), []).append(i)
    for g, idx in by_guidance.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s: s + batch_size]
            pe = embeds[chunk] if embeds is not None else None
            imgs = adapter.sample([rows[i]["prompt"] for i in chunk], seed=[seeds[i] for i in chunk], steps=steps,
                                  guidance=g, prompt_embeds=pe)
            for j, i in enumerate(chunk):
                out[i] = imgs[j]
    return np.stack(out)  # (N, H, W, 3)


def _kv_state(unet) -> dict[str, torch.Tensor]:
    return {n: lin.weight.detach().clone() for n, lin in cross_attention_kv(unet).items()}


@torch.no_grad()
def _load_kv(unet, state: dict[str, torch.Tensor]) -> None:
    for n, lin in cross_attention_kv(unet).items():
        lin.weight.copy_(state[n])


# ---------------------------------------------------------------------------- the editor
class RECE(Editor):
    """UCE, then ``epochs`` rounds of: adversarial embedding of the current model, erased with
    UCE's closed form; keeps the validated best epoch. Edits the target's ``attn2.to_k`` /
    ``attn2.to_v`` weights in place (nothing else changes).

    ``EditResult.info``: ``edit_seconds`` (UCE + epochs, validation sampling excluded),
    ``validation_seconds``, ``epoch_erasure`` (judge erasure rate per epoch, index 0 = UCE
    alone; None without validation), ``best_epoch``, ``adv_gap`` (per epoch, relative distance
    ``Σ‖W'c' − Wc‖ / Σ‖Wc‖`` of the adversarial embedding before its erasure), ``uce`` (UCE's
    info), ``headline``.
    """

    name = "rece"
    full_parameters = "it edits the cross-attention weight matrices in closed form, repeatedly"
    Config = RECEConfig
    paper = PAPER
    modalities = ("image",)

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        c: RECEConfig = self.config
        erase, guide, preserve = concept_prompts(data)
        judge = getattr(data, "judge", None)
        validate = c.validation and judge is not None
        rows = _validation_rows(data) if validate else []
        seeds = [10_000_019 + 1_000 * int(ctx.seed) + i for i in range(len(rows))]  # not the evaluation's seeds
        unet = adapter.unet
        t_val = 0.0

        def score() -> float:
            nonlocal t_val
            t0 = time.perf_counter()
            rates = []
            if c.validation_mode in ("attack", "both"):
                emb = _attack_embeds(adapter, original, [r["prompt"] for r in rows], erase, c.reg)
                imgs = _sample_rows(adapter, rows, seeds, c.sample_steps, ctx.eval_batch_size, emb)
                rates.append(concept_erasure(judge, imgs, rows))
            if c.validation_mode in ("plain", "both"):
                imgs = _sample_rows(adapter, rows, seeds, c.sample_steps, ctx.eval_batch_size, None)
                rates.append(concept_erasure(judge, imgs, rows))
            t_val += time.perf_counter() - t0
            return float(np.mean(rates))

        t0 = time.perf_counter()
        original_state = _kv_state(unet)
        original = list(original_state.values())  # W, cross_attention_kv order
        ce, cg, cp = uce_embeddings(adapter, erase, guide, preserve, c.n_trailing)  # (k, d), (k, d), (m, d)
        uce_info = uce_erase(adapter, erase, guide, preserve, c.uce(), embeddings=(ce, cg, cp))
        t_edit = time.perf_counter() - t0

        erasure = [score()] if validate else None
        states = [_kv_state(unet)] if validate else []
        keys, adv_gap = [ce], []
        for _ in range(c.epochs):
            t0 = time.perf_counter()
            edited = kv_weights(unet)
            adv = rece_adversarial_embedding(edited, original, ce, c.reg)  # (k, d)
            num = sum(float((adv.double() @ we.double().T - ce.double() @ wo.double().T).norm())
                      for we, wo in zip(edited, original))
            den = sum(float((ce.double() @ wo.double().T).norm()) for wo in original)
            adv_gap.append(round(num / max(den, 1e-12), 6))
            if c.accumulate:
                keys.append(adv)
                _load_kv(unet, original_state)
                uce_edit_unet(unet, torch.cat(keys), cg.repeat(len(keys), 1), cp, c.uce())
            else:
                uce_edit_unet(unet, adv, cg, cp, c.epoch_uce())
            t_edit += time.perf_counter() - t0
            if validate:
                erasure.append(score())
                states.append(_kv_state(unet))

        if validate:
            best = int(np.argmax(erasure))  # first maximum: ties keep the earlier (smaller) edit
            _load_kv(unet, states[best])
            note = (f"validated on {len(rows)} forget_explicit prompts ({c.validation_mode}), "
                    f"{c.sample_steps} DDIM steps, seeds disjoint from the evaluation's")
        else:
            best = c.epochs
            note = ("no validation: " + ("validation is off" if not c.validation else "the run has no judge")
                    + "; kept the last epoch")
        adapter._fingerprint = None
        info = {
            "edited": uce_info["edited"], "uce": {k: v for k, v in uce_info.items() if k != "edited"},
            "epochs": c.epochs, "epoch_erasure": [round(x, 4) for x in erasure] if erasure else None,
            "best_epoch": best, "adv_gap": adv_gap, "validation": note,
            "edit_seconds": round(t_edit, 4), "validation_seconds": round(t_val, 2),
            "erase_prompts": erase, "guide_prompts": guide, "preserve_prompts": preserve,
        }
        kept = f"kept epoch {best}" + (f" (validation erasure {erasure[best]:.2f})" if erasure else " (last)")
        info["headline"] = (f"RECE: UCE + {c.epochs} adversarial epochs on {len(uce_info['edited'])} K/V matrices in "
                            f"{t_edit:.3f} s; {kept}")
        return EditResult(adapter=adapter, info=info)


__all__ = ["RECE", "RECEConfig", "rece_adversarial_map", "rece_adversarial_embedding", "rece_attack_embeds",
           "concept_positions", "concept_erasure", "kv_weights"]
