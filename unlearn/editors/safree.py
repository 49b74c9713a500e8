"""SAFREE: a training-free guard that filters the prompt's token embeddings away from the
unsafe concept's subspace at sampling time.

Paper: Yoon, Yu, Patil, Bansal, Chen (2024), "SAFREE: Training-Free and Adaptive Guard for
Safe Text-to-Image and Video Generation", arXiv:2410.12761 (ICLR 2025). Official code:
github.com/jaehong31/SAFREE (``models/modified_stable_diffusion_pipeline.py``).

Nothing is trained; the target's weights are untouched. For a prompt with word tokens
``i = 1..n`` (between BOS and EOS) and token embeddings ``e_i`` (text-encoder outputs, the
UNet's condition):

1. **Concept subspace.** ``C = [p(k_1) … p(k_K)]`` ``(d, K)``: the pooled text embeddings of the
   unsafe keywords; ``P_C = C (CᵀC)⁺ Cᵀ``.
2. **Trigger tokens.** ``p_{\\i}`` = the pooled embedding of the prompt with token ``i`` masked
   (its id replaced by ``mask_token_id``); ``d_i = ‖(I − P_C) p_{\\i}‖``. Token ``i`` is a
   trigger when removing it moves the prompt away from the subspace:
   ``d_i ≥ (1 + α) · mean_{j≠i} d_j``.
3. **Projection.** ``P_M`` = the projection onto the span of the ``p_{\\i}`` (the prompt's own
   subspace); a trigger's embedding becomes ``(I − P_C) P_M e_i`` (orthogonal to ``C``, inside
   the prompt's span); other tokens (BOS, EOS, padding, safe words) are kept.
4. **Self-validating filtering.** ``β = 1 − mean_t cos((I − P_C) P_M e_t, e_t)`` over BOS..EOS;
   the filtered condition is used for the denoising steps ``i ≤ round(up_t · σ(2k(10β − t₀)))``
   (``k = 2.5``, ``t₀ = 5.333``, official non-artist constants), the original one afterwards.
   ``up_t`` = ``max_filtered_fraction`` × steps (official: 10 of 50 steps).

**SDXL** (two text encoders, the cross-attention input is ``[h₁ ; h₂]`` of widths ``d₁ + d₂``, plus
the pooled condition): as the official SDXL pipeline
(``models/modified_stable_diffusion_xl_pipeline.py``), ``C``, ``p_{\\i}`` and the trigger test use
``text_encoder_2``'s pooled projection (``text_embeds``; its width must equal ``d₂``, as SDXL's
1280 / 1280), and only the ``h₂`` columns of trigger tokens are projected; ``h₁`` and the pooled
condition are kept. ``sdxl_encoders: both`` (an extension) also projects the ``h₁`` columns with
``text_encoder``'s own subspaces (its pooled output for the keywords and the masked prompts); the
trigger tokens stay those of ``text_encoder_2``. β is measured on the projected columns.

5. **Latent re-attention** (``latent_reattention: true``; the official ``-lra``). While a prompt
   uses its filtered condition, the skip features ``h`` that the UNet's first two decoder blocks
   read (``up_blocks[0]``, ``up_blocks[1]``, diffusers' FreeU stages) are compared in the Fourier
   domain with those of the same ``x_t`` under the original condition. In the low band (the
   ``2τ × 2τ`` centre of the shifted spectrum, ``τ = 1``) a coefficient of the filtered branch is
   kept where ``Re(F(h_orig) − F(h_proj)) > 0`` and otherwise attenuated, ``s · F(h_proj)``
   (``s`` = ``lra_scales``, official 0.9 / 0.2); ``lra_rule: official`` replaces it by the constant
   ``s`` as ``free_lunch_utils.SafeGuard_Low_Fourier_filter`` does.

Deviations from the official code (see ``docs/editors/safree.md``): latent re-attention is
applied only while the filtered condition is used (the released script's ``-lra`` registers the
blocks with ``safree=None``, which leaves the features unchanged); the keywords are not also passed as the negative prompt
(the official script does, which changes the unconditional branch of every prompt); ``up_t`` is
a share of the sampling steps. A prompt without trigger tokens samples exactly as the target.

:class:`SAFREEAdapter` wraps an :class:`~unlearn.adapters.image.ImageAdapter` and keeps its
contract: only :meth:`SAFREEAdapter.sample` is guarded (training losses, ``noise_pred`` outside
sampling and ``item_loss`` see the unguarded model).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from unlearn.adapters.image import ImageAdapter
from unlearn.editors.base import EditContext, Editor, EditorConfig, EditResult, load_wrapper_base, save_wrapper_base
from unlearn.tasks.visual_task import concept_value
from unlearn.tasks.visual_world import _SYNONYMS

PAPER = ("Yoon, Yu, Patil, Bansal, Chen (2024). SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image "
         "and Video Generation. arXiv:2410.12761")
SDXL_ENCODERS = ("text_encoder_2", "both")
LRA_RULES = ("scale", "official")


@dataclass
class SAFREEConfig(EditorConfig):
    """Settings of the SAFREE guard."""

    keywords: list[str] | None = field(default=None, metadata={
        "help": "unsafe keywords spanning the concept subspace; null: each erase concept's word and its synonyms"})
    alpha: float = field(default=0.01, metadata={
        "help": "α: token i is a trigger when d_i >= (1 + α) · mean of the other d_j (official 0.01)"})
    self_validation: bool = field(default=True, metadata={
        "help": "self-validating filtering: filtered condition for the first steps only, more of them the more "
                "the projection changed the prompt; false: filtered condition at every step"})
    max_filtered_fraction: float = field(default=0.2, metadata={
        "help": "up_t as a share of the sampling steps (official up_t = 10 of 50 steps); in [0, 1]"})
    svf_k: float = field(default=2.5, metadata={
        "help": "k of the step rule round(up_t·σ(2k(10β − t0))) (official 2.5)"})
    svf_t0: float = field(default=5.333, metadata={
        "help": "t0 of the step rule (official 5.333; artists 5.5 with k 3.5)"})
    filter_following: bool = field(default=False, metadata={
        "help": "also project every position after a prompt's first trigger (EOS, padding): a causal text encoder "
                "carries the concept into them; false = the paper's filter (trigger tokens only). An extension"})
    sdxl_encoders: str = field(default="text_encoder_2", metadata={
        "help": "SDXL only: which text encoders' token embeddings trigger tokens are projected in: text_encoder_2 "
                "(the official SDXL code: the OpenCLIP half, subspaces from its pooled projection) or both (an "
                "extension: also the CLIP-L half, with text_encoder's own subspaces)"})
    mask_token_id: int = field(default=0, metadata={
        "help": "token id that replaces a token when measuring its effect (official: 0, '!' in CLIP's vocabulary; "
                "'<pad>' in the tiny zoo's)"})
    latent_reattention: bool = field(default=False, metadata={
        "help": "latent re-attention (official -lra): while a prompt is filtered, attenuate the low-frequency "
                "skip features of the first two decoder blocks where the filtered branch's exceed the original's"})
    lra_scales: list[float] = field(default_factory=lambda: [0.9, 0.2], metadata={
        "help": "[s1, s2]: attenuation of up_blocks[0] and up_blocks[1] (official --freeu_hyp 1.0-1.0-0.9-0.2)"})
    lra_threshold: int = field(default=1, metadata={
        "help": "τ: the low band is the 2τ x 2τ centre of the shifted spectrum (official 1)"})
    lra_rule: str = field(default="scale", metadata={
        "help": "scale: s · F(h_proj) (the paper's attenuation); official: the constant s, as the released "
                "SafeGuard_Low_Fourier_filter writes"})

    def __post_init__(self) -> None:
        if self.keywords is not None:
            if isinstance(self.keywords, str) or not all(isinstance(k, str) and k.strip() for k in self.keywords):
                raise ValueError(f"safree.keywords={self.keywords!r}: give a list of non-empty strings (or null)")
            self.keywords = list(self.keywords)
            if not self.keywords:
                raise ValueError("safree.keywords is empty: name at least one keyword, or null for the defaults")
        if self.alpha < 0:
            raise ValueError(f"safree.alpha={self.alpha}: must be >= 0")
        if not 0.0 <= self.max_filtered_fraction <= 1.0:
            raise ValueError(f"safree.max_filtered_fraction={self.max_filtered_fraction}: must be in [0, 1]")
        if self.sdxl_encoders not in SDXL_ENCODERS:
            raise ValueError(f"safree.sdxl_encoders={self.sdxl_encoders!r}: one of {', '.join(SDXL_ENCODERS)}")
        if self.mask_token_id < 0:
            raise ValueError(f"safree.mask_token_id={self.mask_token_id}: must be a token id (>= 0)")
        if (isinstance(self.lra_scales, str) or len(self.lra_scales) != 2
                or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in self.lra_scales)):
            raise ValueError(f"safree.lra_scales={self.lra_scales!r}: give two scales [s1, s2] in [0, 1]")
        self.lra_scales = [float(v) for v in self.lra_scales]
        if self.lra_threshold < 1:
            raise ValueError(f"safree.lra_threshold={self.lra_threshold}: must be >= 1")
        if self.lra_rule not in LRA_RULES:
            raise ValueError(f"safree.lra_rule={self.lra_rule!r}: one of {', '.join(LRA_RULES)}")


# ---------------------------------------------------------------------------- pure functions
def concept_projection(C: torch.Tensor) -> torch.Tensor:
    """``P = C (CᵀC)⁺ Cᵀ``: the ``(d, d)`` orthogonal projection onto the span of the columns of
    ``C`` ``(d, K)`` (float64; rank-deficient ``C`` is fine)."""
    if C.dim() != 2:
        raise ValueError(f"C must be a (d, K) matrix whose columns span the subspace, got {tuple(C.shape)}")
    c = C.detach().to(torch.float64)
    return c @ torch.linalg.pinv(c.T @ c) @ c.T


def trigger_tokens(token_embeds: torch.Tensor, mask: torch.Tensor, P: torch.Tensor, alpha: float) -> torch.Tensor:
    """SAFREE's trigger-token test.

    Args:
        token_embeds: ``(B, T, d)``; row ``[b, i]`` is the pooled embedding of prompt ``b`` with
            token ``i`` masked out (``p_{\\i}``).
        mask: ``(B, T)`` bool, the candidate (word) positions; others are never triggers and do
            not enter the means.
        P: ``(d, d)`` projection onto the concept subspace.
        alpha: α >= 0.
    Returns:
        ``(B, T)`` bool: ``d_i >= (1 + α) · mean_{j≠i} d_j`` with ``d_i = ‖(I − P) p_{\\i}‖``
        (False where a prompt has fewer than 2 candidates).
    """
    if token_embeds.dim() != 3 or mask.shape != token_embeds.shape[:2]:
        raise ValueError(f"token_embeds must be (B, T, d) and mask (B, T); got {tuple(token_embeds.shape)} and "
                         f"{tuple(mask.shape)}")
    d = token_embeds.shape[-1]
    if P.shape != (d, d):
        raise ValueError(f"P must be ({d}, {d}), got {tuple(P.shape)}")
    x = token_embeds.to(torch.float64)
    p = P.to(x.device, torch.float64)
    dist = torch.linalg.vector_norm(x - x @ p.T, dim=-1)  # (B, T): ‖(I − P) p_{\i}‖
    m = mask.to(x.device).bool()
    dist = torch.where(m, dist, torch.zeros_like(dist))
    n = m.sum(-1, keepdim=True)  # (B, 1)
    mean_others = (dist.sum(-1, keepdim=True) - dist) / (n - 1).clamp(min=1)  # (B, T)
    return m & (n >= 2) & (dist >= (1.0 + alpha) * mean_others)


def project_out(embeds: torch.Tensor, triggers: torch.Tensor, P_C: torch.Tensor,
                P_M: torch.Tensor | None = None) -> torch.Tensor:
    """Trigger tokens' embeddings replaced by ``(I − P_C) P_M e``; the others kept bit-for-bit.

    Args:
        embeds: ``(B, T, d)`` token embeddings.
        triggers: ``(B, T)`` bool.
        P_C: ``(d, d)`` concept projection.
        P_M: ``(B, d, d)`` or ``(d, d)`` projection onto each prompt's span; None = identity.
    Returns:
        ``(B, T, d)`` in the dtype of ``embeds``.
    """
    if embeds.dim() != 3 or triggers.shape != embeds.shape[:2]:
        raise ValueError(f"embeds must be (B, T, d) and triggers (B, T); got {tuple(embeds.shape)} and "
                         f"{tuple(triggers.shape)}")
    return torch.where(triggers.to(embeds.device)[..., None], _filtered(embeds, P_C, P_M).to(embeds.dtype), embeds)


def _filtered(embeds: torch.Tensor, P_C: torch.Tensor, P_M: torch.Tensor | None) -> torch.Tensor:
    """``(I − P_C) P_M e`` for every token: ``(B, T, d)`` float64."""
    e = embeds.to(torch.float64)
    if P_M is not None:
        pm = P_M.to(e.device, torch.float64)
        e = e @ pm.transpose(-1, -2)  # (B, T, d): rows P_M e (P_M (B, d, d) broadcasts per prompt)
    pc = P_C.to(e.device, torch.float64)
    return e - e @ pc.T


def filtered_steps(beta: float, up_t: float, k: float = 2.5, t0: float = 5.333) -> int:
    """Self-validating filtering: the last step index that uses the filtered condition,
    ``round(up_t · σ(2k (10β − t0)))`` (official ``f_beta``); steps ``0..result`` are filtered."""
    z = max(min(2.0 * k * (10.0 * beta - t0), 60.0), -60.0)
    return int(round(up_t / (1.0 + math.exp(-z))))


# ---------------------------------------------------------------------------- the guarded model
def reattend(h_proj: torch.Tensor, h_orig: torch.Tensor, scale: float, threshold: int = 1,
             rule: str = "scale") -> torch.Tensor:
    """SAFREE's latent re-attention of one skip feature map.

    ``h_proj``, ``h_orig`` ``(B, C, H, W)``: the features under the filtered and the original
    condition (same ``x_t``). With ``F = fftshift(fft2(·))`` and the low band ``L`` = rows and
    columns ``[H/2 − τ, H/2 + τ)`` × ``[W/2 − τ, W/2 + τ)``: inside ``L``,
    ``F'(h_proj) = F(h_proj)`` where ``Re(F(h_orig) − F(h_proj)) > 0``, else ``s · F(h_proj)``
    (``rule="scale"``) or the constant ``s`` (``rule="official"``); outside ``L`` unchanged.
    Returns ``Re(ifft2(ifftshift(F')))`` ``(B, C, H, W)`` in ``h_proj``'s dtype.
    """
    if h_proj.shape != h_orig.shape or h_proj.dim() != 4:
        raise ValueError(f"reattend needs two (B, C, H, W) maps of one shape, got {tuple(h_proj.shape)} and "
                         f"{tuple(h_orig.shape)}")
    if rule not in LRA_RULES:
        raise ValueError(f"rule={rule!r}: one of {', '.join(LRA_RULES)}")
    dims = (-2, -1)
    fp = torch.fft.fftshift(torch.fft.fftn(h_proj.float(), dim=dims), dim=dims)  # (B, C, H, W) complex
    fo = torch.fft.fftshift(torch.fft.fftn(h_orig.float(), dim=dims), dim=dims)
    hh, ww = h_proj.shape[-2:]
    rows = slice(max(hh // 2 - threshold, 0), hh // 2 + threshold)
    cols = slice(max(ww // 2 - threshold, 0), ww // 2 + threshold)
    low_p, low_o = fp[..., rows, cols], fo[..., rows, cols]
    keep = (low_o - low_p).real > 0
    damped = low_p * scale if rule == "scale" else torch.full_like(low_p, scale)
    fp[..., rows, cols] = torch.where(keep, low_p, damped)
    return torch.fft.ifftn(torch.fft.ifftshift(fp, dim=dims), dim=dims).real.to(h_proj.dtype)


class SAFREEAdapter(ImageAdapter):
    """An :class:`ImageAdapter` whose :meth:`sample` applies SAFREE's filtering.

    Args:
        base: the target (its modules are shared, not copied).
        keywords: the unsafe keywords (the concept subspace).
        config: :class:`SAFREEConfig` (its ``keywords`` field is ignored here).

    ``last_filter`` holds the diagnostics of the latest :meth:`sample` call (per prompt: trigger
    words, β, filtered steps); ``counts`` accumulates prompts / triggered prompts / trigger tokens.
    """

    def __init__(self, base: ImageAdapter, keywords: list[str], config: SAFREEConfig | None = None) -> None:
        if isinstance(base, SAFREEAdapter):
            raise ValueError("the model is already SAFREE-guarded; wrap the unguarded target")
        keywords = [k for k in keywords if isinstance(k, str) and k.strip()]
        if not keywords:
            raise ValueError("SAFREE needs at least one keyword to span the concept subspace")
        if getattr(base, "is_sdxl", False):
            te2 = base.text_encoder_2.config
            if te2.projection_dim != te2.hidden_size:
                raise ValueError(f"SAFREE on SDXL measures text_encoder_2's token embeddings (width {te2.hidden_size}) "
                                 f"against its pooled projection (width {te2.projection_dim}); they must be equal "
                                 "(SDXL base: 1280 and 1280)")
        super().__init__(base.unet, base.text_encoder, base.tokenizer, base.scheduler, **base.parts(),
                         timesteps_per_item=base.timesteps_per_item, source=base.source)
        self.base = base
        self.keywords = list(dict.fromkeys(keywords))
        self.config = config or SAFREEConfig()
        self.counts = {"prompts": 0, "triggered": 0, "trigger_tokens": 0}
        self.last_filter: list[dict] = []
        self._switch: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---------------------------------------------------------------- filtering
    @property
    def trigger_encoder(self) -> str:
        """The text encoder whose pooled embeddings find trigger tokens: ``text_encoder``, or
        ``text_encoder_2`` on SDXL (as the official SDXL pipeline)."""
        return "text_encoder_2" if self.is_sdxl else "text_encoder"

    def segments(self) -> list[tuple[str, slice]]:
        """``[(encoder, columns)]``: which columns of the cross-attention input are projected, and
        with which encoder's subspaces. SD 1.x / 2.x: all ``d`` with ``text_encoder``; SDXL: the
        ``text_encoder_2`` columns ``d₁:d₁+d₂`` (``sdxl_encoders: both``: also ``text_encoder``'s ``0:d₁``)."""
        d1 = self.text_encoder.config.hidden_size
        if not self.is_sdxl:
            return [("text_encoder", slice(0, d1))]
        second = ("text_encoder_2", slice(d1, d1 + self.text_encoder_2.config.hidden_size))
        return [("text_encoder", slice(0, d1)), second] if self.config.sdxl_encoders == "both" else [second]

    @torch.no_grad()
    def _pooled(self, input_ids: torch.Tensor, model=None, encoder: str | None = None) -> torch.Tensor:
        """``(N, w)`` pooled embeddings of ``input_ids`` (``tokenizer``'s ids): ``text_encoder``'s
        ``pooler_output``, or ``text_encoder_2``'s ``text_embeds`` (SDXL, ids mapped to ``tokenizer_2``'s)."""
        m = model if model is not None else self.model
        enc = encoder or self.trigger_encoder
        ids = input_ids.to(self.device)
        if enc == "text_encoder_2":
            return m["text_encoder_2"](input_ids=self._ids_2(ids)).text_embeds
        return m["text_encoder"](input_ids=ids).pooler_output

    @torch.no_grad()
    def concept_basis(self, model=None, encoder: str | None = None) -> torch.Tensor:
        """``C`` ``(w, K)``: pooled embeddings of the keywords (by ``encoder``, default
        :attr:`trigger_encoder`), one column each."""
        return self._pooled(self.tokenize(self.keywords), model, encoder).T

    def word_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` bool: positions strictly between BOS (position 0) and the first EOS."""
        eos = self.tokenizer.eos_token_id
        out = torch.zeros(input_ids.shape, dtype=torch.bool)
        for b, row in enumerate(input_ids.tolist()):
            end = row.index(eos) if eos in row else len(row)
            out[b, 1:end] = True
        return out

    @torch.no_grad()
    def filter(self, prompts: list[str], steps: int, prompt_embeds: torch.Tensor | None = None, model=None) -> dict:
        """SAFREE's filtering of ``prompts`` (no sampling).

        Returns ``{"embeds": (B, R, d) original condition, "filtered": (B, R, d), "triggers":
        (B, T) bool, "beta": (B,), "n_steps": (B,) long}`` (``R = T``, SDXL ``T + 1``: the pooled
        row, never changed); ``n_steps`` = how many of the first ``steps`` denoising steps use
        ``filtered`` (0 for a prompt without triggers).
        """
        cfg = self.config
        ids = self.tokenize(prompts)  # (B, T)
        emb = prompt_embeds if prompt_embeds is not None else self.encode_prompts(ids, model)  # (B, R, d)
        b, t = ids.shape
        rows = t + (1 if self.is_sdxl else 0)
        if emb.shape[:2] != (b, rows):
            raise ValueError(f"prompt_embeds {tuple(emb.shape)} does not match the {tuple(ids.shape)} token ids of "
                             f"the prompts (expected {b} x {rows} rows, as encode_prompts gives)")
        tok = emb[:, :t]  # (B, T, d): the cross-attention input per token
        cand = self.word_positions(ids)  # (B, T)
        bi, ti = cand.nonzero(as_tuple=True)
        masked = ids[bi].clone()  # (N, T): one copy per candidate token, that token masked
        masked[torch.arange(len(bi)), ti] = cfg.mask_token_id

        def masked_pooled(encoder: str) -> torch.Tensor:
            """``(B, T, w)``: row ``[b, i]`` = pooled embedding of prompt b with token i masked (p_{\\i})."""
            m = model if model is not None else self.model
            w = m[encoder].config.projection_dim if encoder == "text_encoder_2" else m[encoder].config.hidden_size
            out = torch.zeros(b, t, w, dtype=torch.float64, device=emb.device)
            if len(bi):
                out[bi, ti] = self._pooled(masked, model, encoder).to(out.device, torch.float64)
            return out

        trig_pooled = masked_pooled(self.trigger_encoder)
        p_c = concept_projection(self.concept_basis(model))  # (w, w)
        triggers = trigger_tokens(trig_pooled, cand, p_c, cfg.alpha)  # (B, T)
        if cfg.filter_following:  # extension: the trigger and every later position
            triggers = triggers.cumsum(-1) > 0
        proj = tok.to(torch.float64).clone()  # (B, T, d): (I − P_C) P_M e on the filtered columns
        cols = torch.zeros(emb.shape[-1], dtype=torch.bool)
        for encoder, sl in self.segments():
            mp = trig_pooled if encoder == self.trigger_encoder else masked_pooled(encoder)  # (B, T, w)
            w = mp.shape[-1]  # == sl.stop - sl.start (checked for SDXL's text_encoder_2 in __init__)
            pc = p_c if encoder == self.trigger_encoder else concept_projection(self.concept_basis(model, encoder))
            eye = torch.eye(w, dtype=torch.float64, device=emb.device)
            p_m = torch.stack([concept_projection(mp[i, cand[i]].T) if cand[i].any() else eye
                               for i in range(b)])  # (B, w, w)
            proj[..., sl] = _filtered(tok[..., sl], pc, p_m)
            cols[sl] = True
        filtered = torch.where(triggers.to(emb.device)[..., None], proj.to(emb.dtype), tok)  # (B, T, d)
        filtered = torch.cat([filtered, emb[:, t:]], dim=1)  # SDXL: the pooled row as it was
        active = cand.clone()
        active[:, 0] = True  # BOS
        for i, row in enumerate(ids.tolist()):  # and the first EOS
            if self.tokenizer.eos_token_id in row:
                active[i, row.index(self.tokenizer.eos_token_id)] = True
        c = cols.to(emb.device)
        cos = torch.nn.functional.cosine_similarity(proj[..., c], tok[..., c].to(torch.float64), dim=-1)  # (B, T)
        act = active.to(emb.device)
        beta = 1.0 - (cos * act).sum(-1) / act.sum(-1)  # (B,)
        up_t = cfg.max_filtered_fraction * steps
        n_steps = []
        for i in range(b):
            if not triggers[i].any():
                n_steps.append(0)
            elif cfg.self_validation:
                n_steps.append(min(filtered_steps(float(beta[i]), up_t, cfg.svf_k, cfg.svf_t0) + 1, steps))
            else:
                n_steps.append(steps)
        return {"embeds": emb, "filtered": filtered, "triggers": triggers, "beta": beta.float().cpu(),
                "n_steps": torch.tensor(n_steps, dtype=torch.long)}

    # ---------------------------------------------------------------- sampling
    def noise_pred(self, x_t, t, cond, model=None):
        """As :meth:`ImageAdapter.noise_pred`; inside a guarded :meth:`sample` call the
        conditional half of the ``[uncond, cond]`` batch switches, per prompt, from the filtered
        to the original condition once the timestep passes the prompt's last filtered step.
        With ``latent_reattention`` the rows still filtered get SAFREE's re-attended skip
        features (:func:`reattend`, against a second pass under the original condition)."""
        if self._switch is not None:
            original, t_last = self._switch  # (B, T, d), (B,) smallest filtered timestep per prompt
            n = original.shape[0]
            if cond.shape[0] == 2 * n:
                back = (t[n:].to(t_last.device) < t_last).to(cond.device)  # (B,) past the filtered steps
                if back.any():
                    c = cond[n:].clone()
                    c[back] = original[back].to(c.dtype)
                    cond = torch.cat([cond[:n], c])
                if self.config.latent_reattention and not back.all():
                    return self._reattended(x_t, t, cond, original, (~back).nonzero().flatten() + n, model)
        return super().noise_pred(x_t, t, cond, model)

    def _reattended(self, x_t, t, cond, original, rows, model=None):
        """``noise_pred`` of ``[uncond, cond]`` where batch ``rows`` (filtered prompts, offset by
        the unconditional half) read re-attended skip features in ``up_blocks[0]`` and ``[1]``."""
        cfg = self.config
        unet = (model if model is not None else self.model)["unet"]
        blocks = list(unet.up_blocks)[: len(cfg.lra_scales)]
        n = original.shape[0]
        captured: dict[int, tuple] = {}

        def capture(i):
            def hook(module, args, kwargs):
                captured[i] = tuple(kwargs["res_hidden_states_tuple"])
            return hook

        def rewrite(i):
            def hook(module, args, kwargs):
                res = []
                for h, h_orig in zip(kwargs["res_hidden_states_tuple"], captured[i]):
                    h = h.clone()
                    h[rows] = reattend(h[rows], h_orig, cfg.lra_scales[i], cfg.lra_threshold, cfg.lra_rule)
                    res.append(h)
                return args, {**kwargs, "res_hidden_states_tuple": tuple(res)}
            return hook

        handles = [b.register_forward_pre_hook(capture(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:  # the original condition at the same x_t: the reference of the comparison
            super().noise_pred(x_t[rows], t[rows], original[rows - n].to(cond.dtype), model)
        finally:
            for h in handles:
                h.remove()
        handles = [b.register_forward_pre_hook(rewrite(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            return super().noise_pred(x_t, t, cond, model)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def sample_switched(self, prompts: list[str], original: torch.Tensor, filtered: torch.Tensor,
                        n_steps: torch.Tensor, seed=0, steps: int = 20, guidance: float = 3.0,
                        model=None) -> np.ndarray:
        """DDIM sampling where prompt ``b`` is conditioned on ``filtered[b]`` for its first
        ``n_steps[b]`` steps and on ``original[b]`` afterwards (the base sampler, unchanged)."""
        from diffusers import DDIMScheduler

        if n_steps.shape != (len(prompts),):
            raise ValueError(f"n_steps must have one entry per prompt, got {tuple(n_steps.shape)}")
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps)
        ts = ddim.timesteps.tolist()  # descending
        inf = max(ts) + 1
        t_last = torch.tensor([ts[min(int(k), steps) - 1] if int(k) > 0 else inf for k in n_steps])
        self._switch = (original, t_last)
        try:
            return super().sample(prompts, seed=seed, steps=steps, guidance=guidance, prompt_embeds=filtered,
                                  model=model)
        finally:
            self._switch = None

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int | list[int] = 0, steps: int = 20, guidance: float = 3.0,
               prompt_embeds: torch.Tensor | None = None, model=None) -> np.ndarray:
        """:meth:`ImageAdapter.sample` with SAFREE's filtering. Triggers are found from the
        prompts' tokens; the projection applies to ``prompt_embeds`` when given (an attack's
        conditions), else to the encoded prompts. A batch without triggers runs the base code."""
        prompts = list(prompts)
        if steps < 1:
            raise ValueError(f"steps={steps}: must be >= 1")
        f = self.filter(prompts, steps, prompt_embeds, model)
        trig = f["triggers"]
        self.counts["prompts"] += len(prompts)
        self.counts["triggered"] += int(trig.any(-1).sum())
        self.counts["trigger_tokens"] += int(trig.sum())
        ids = self.tokenize(prompts)
        self.last_filter = [{"trigger_words": [self.tokenizer.convert_ids_to_tokens(int(ids[b, t]))
                                               for t in trig[b].nonzero().flatten().tolist()],
                             "beta": round(float(f["beta"][b]), 6), "filtered_steps": int(f["n_steps"][b])}
                            for b in range(len(prompts))]
        if not trig.any():
            return super().sample(prompts, seed=seed, steps=steps, guidance=guidance, prompt_embeds=prompt_embeds,
                                  model=model)
        return self.sample_switched(prompts, f["embeds"], f["filtered"], f["n_steps"], seed=seed, steps=steps,
                                    guidance=guidance, model=model)

    # ---------------------------------------------------------------- contract
    def reference(self) -> "SAFREEAdapter":
        """A guarded frozen deep copy of the target (same keywords and config)."""
        ref = SAFREEAdapter(self.base.reference(), self.keywords, self.config)
        ref._fingerprint = self._fingerprint
        return ref

    def fingerprint(self, refresh: bool = False) -> str:
        """sha256 (16 hex) over the base model's weight fingerprint, the config and the keywords."""
        if self._fingerprint is None or refresh:
            h = hashlib.sha256(b"safree")
            h.update(self.base.fingerprint(refresh=True).encode())
            h.update(json.dumps({"config": asdict(self.config), "keywords": self.keywords}, sort_keys=True).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def save(self, path: str | Path) -> None:
        """Write the base model to ``path/base/`` and ``wrapper.json`` (``{"kind": "safree",
        "config", "keywords", "base", "base_fingerprint"}``) to ``path``."""
        save_wrapper_base(path, self.base, {"kind": SAFREE.name, "paper": PAPER, "config": asdict(self.config),
                                            "keywords": self.keywords})

    @classmethod
    def load(cls, source: str, **kwargs) -> "SAFREEAdapter":
        """Rebuild a guard saved by :meth:`save` (see :func:`load_safree`)."""
        return load_safree(source, **kwargs)


def load_safree(path: str | Path, **kwargs) -> SAFREEAdapter:
    """Rebuild a :class:`SAFREEAdapter` saved by :meth:`SAFREEAdapter.save` (``kwargs`` go to
    :meth:`ImageAdapter.load` of the base model)."""
    meta, base, _ = load_wrapper_base(path, SAFREE.name, **kwargs)
    return SAFREEAdapter(base, meta["keywords"], SAFREEConfig(**meta["config"]))


def default_keywords(data) -> list[str]:
    """Each erase concept's word followed by its synonyms in the visual world."""
    words = []
    for c in data.erase:
        v = concept_value(c)
        words += [v] + list(_SYNONYMS.get(v, []))
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------------------- the editor
class SAFREE(Editor):
    """Wrap the target in a :class:`SAFREEAdapter` (no weight changes; the target is not modified).

    ``EditResult.info``: ``keywords``, ``config``, per evaluation split the share of prompts
    with trigger tokens, the mean trigger tokens per prompt and the mean share of filtered
    steps (at 20 DDIM steps), ``edit_seconds``, ``headline``.
    """

    name = "safree"
    full_parameters = "it wraps the whole model to project the text encoder's embeddings at inference"
    Config = SAFREEConfig
    paper = PAPER
    modalities = ("image",)

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        import time

        c: SAFREEConfig = self.config
        t0 = time.perf_counter()
        keywords = list(c.keywords) if c.keywords else default_keywords(data)
        guarded = SAFREEAdapter(adapter, keywords, c)
        edit_seconds = time.perf_counter() - t0
        splits, steps = {}, 20
        for name, rows in (data.eval_splits or {}).items():
            prompts = [r["prompt"] for r in rows if "prompt" in r]
            if not prompts:
                continue
            trig, n_steps = [], []
            for s in range(0, len(prompts), ctx.eval_batch_size):
                f = guarded.filter(prompts[s: s + ctx.eval_batch_size], steps)
                trig.append(f["triggers"].sum(-1))
                n_steps.append(f["n_steps"])
            tr, ns = torch.cat(trig).float(), torch.cat(n_steps).float()
            splits[name] = {"triggered": round(float((tr > 0).float().mean()), 4),
                            "trigger_tokens": round(float(tr.mean()), 4),
                            "filtered_share": round(float(ns.mean()) / steps, 4)}
        info = {"keywords": keywords, "config": asdict(c), "splits": splits, "edit_seconds": round(edit_seconds, 4),
                "headline": f"SAFREE guard on {len(keywords)} keywords; prompts with trigger tokens: "
                            + ", ".join(f"{k} {v['triggered']:.2f}" for k, v in splits.items())}
        return EditResult(adapter=guarded, info=info)


__all__ = ["SAFREE", "SAFREEConfig", "SAFREEAdapter", "load_safree", "concept_projection", "trigger_tokens",
           "project_out", "filtered_steps", "default_keywords", "reattend"]
