"""UCE: closed-form concept erasure on the cross-attention key/value projections.

Paper: Gandikota, Orgad, Belinkov, Materzynska, Bau (2024), "Unified Concept Editing in
Diffusion Models", WACV 2024, arXiv:2308.14761.

In a text-to-image UNet every cross-attention layer projects the text-encoder token
embeddings ``c`` (dim ``d``) to keys and values with linear maps ``W`` (``attn2.to_k``,
``attn2.to_v`` in diffusers; shape ``(d_out, d)``, no bias). UCE edits each such ``W`` so
that the embeddings of the erased concept ``c_i`` map to the outputs of a guide concept
``v*_i = W c_guide_i`` (the empty prompt for objects, "art" for styles), while preserved
embeddings ``c_j`` keep their outputs ``W c_j`` and the weights stay near ``W``. This is the
ridge least-squares problem

    min_W'  s_e Σ_i ‖W' c_i − v*_i‖² + s_p Σ_j ‖W' c_j − W c_j‖² + λ ‖W' − W‖²_F

with the closed-form solution (the paper's Eq. 7 with the λ term of the official code)

    W' = (λW + s_e Σ_i v*_i c_iᵀ + s_p Σ_j W c_j c_jᵀ) (λI + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ)⁻¹.

Implementation note (exact algebra, not an approximation): with ``A = λI + s_e C_e C_eᵀ +
s_p C_p C_pᵀ`` the numerator equals ``W A + s_e (V* − W C_e) C_eᵀ``, so

    W' = W + s_e (V* − W C_e) (A⁻¹ C_e)ᵀ,

where ``A⁻¹ C_e`` (``(d, k)``) does not depend on the layer: one Cholesky solve of the
``d x d`` matrix serves every K and V projection of the UNet, and each layer costs only
``O(d_out · d · k)``. Solves run in float64; the weights are written back in their dtype.

Defaults follow DIFFUSION.md / the official code: λ = 0.5, s_e = s_p = 1; the preserve set
should always include the empty prompt's embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unlearn.editors.base import EditContext, Editor, EditorConfig, EditResult
from unlearn.tasks.visual_task import concept_value

PAPER = ("Gandikota, Orgad, Belinkov, Materzynska, Bau (2024). Unified Concept Editing in Diffusion Models. "
         "WACV 2024, arXiv:2308.14761")


@dataclass
class UCEConfig(EditorConfig):
    """Hyper-parameters of UCE's closed form."""

    lamb: float = field(default=0.5, metadata={"help": "λ: weight of ‖W' − W‖² (keeps the edit small); > 0"})
    erase_scale: float = field(default=1.0, metadata={"help": "s_e: weight of the erase (edit) equations"})
    preserve_scale: float = field(default=1.0, metadata={"help": "s_p: weight of the preserve equations"})
    n_trailing: int = field(default=0, metadata={
        "help": "token positions after the concept's last word token (EOS, padding) also edited; 0 = last token only"})

    def __post_init__(self) -> None:
        if not self.lamb > 0:
            raise ValueError(f"uce.lamb={self.lamb}: must be > 0 (it keeps the system well posed)")
        if self.erase_scale < 0 or self.preserve_scale < 0:
            raise ValueError(f"uce.erase_scale={self.erase_scale}, uce.preserve_scale={self.preserve_scale}: "
                             "scales must be >= 0")
        if self.n_trailing < 0:
            raise ValueError(f"uce.n_trailing={self.n_trailing}: must be >= 0")


def _check_keys(name: str, x: torch.Tensor | None, d: int) -> torch.Tensor | None:
    if x is None:
        return None
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must have shape (n, {d}) (one embedding per row), got {tuple(x.shape)}")
    return x


def uce_factor(edit_keys: torch.Tensor, preserve_keys: torch.Tensor | None, *, lamb: float = 0.5,
               erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """The layer-independent part of UCE: ``F = s_e · A⁻¹ C_e``.

    Args:
        edit_keys: ``(k, d)`` embeddings c_i of the erased concept (one per row).
        preserve_keys: ``(m, d)`` embeddings c_j to preserve, or None.
    Returns:
        ``(d, k)`` float64 tensor F with ``W' = W + (V* − W C_e) Fᵀ`` for every layer.
    """
    d = edit_keys.shape[-1]
    _check_keys("edit_keys", edit_keys, d)
    _check_keys("preserve_keys", preserve_keys, d)
    ce = edit_keys.detach().to(torch.float64).T  # (d, k)
    a = lamb * torch.eye(d, dtype=torch.float64) + erase_scale * ce @ ce.T  # (d, d)
    if preserve_keys is not None and preserve_keys.shape[0]:
        cp = preserve_keys.detach().to(torch.float64).T  # (d, m)
        a = a + preserve_scale * cp @ cp.T
    chol = torch.linalg.cholesky(a)  # A is symmetric positive definite (λ > 0)
    return erase_scale * torch.cholesky_solve(ce, chol)  # (d, k)


def uce_closed_form(weight: torch.Tensor, edit_keys: torch.Tensor, edit_values: torch.Tensor,
                    preserve_keys: torch.Tensor | None = None, *, lamb: float = 0.5, erase_scale: float = 1.0,
                    preserve_scale: float = 1.0, factor: torch.Tensor | None = None) -> torch.Tensor:
    """UCE's closed form for one projection matrix (a pure function).

    Args:
        weight: ``(d_out, d)`` the projection W (``nn.Linear.weight``).
        edit_keys: ``(k, d)`` c_i, the erased concept's embeddings.
        edit_values: ``(k, d_out)`` v*_i, the outputs they should map to (erasure: ``W c_guide_i``).
        preserve_keys: ``(m, d)`` c_j whose outputs ``W c_j`` are kept, or None.
        factor: optional precomputed :func:`uce_factor` (``(d, k)``) for the same keys/scales.
    Returns:
        ``(d_out, d)`` the edited W', same dtype/device as ``weight``:
        ``(λW + s_e Σ v*_i c_iᵀ + s_p Σ W c_j c_jᵀ)(λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ)⁻¹``.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be a (d_out, d) matrix, got shape {tuple(weight.shape)}")
    d_out, d = weight.shape
    _check_keys("edit_keys", edit_keys, d)
    if edit_values.shape != (edit_keys.shape[0], d_out):
        raise ValueError(f"edit_values must have shape ({edit_keys.shape[0]}, {d_out}) (one target output per "
                         f"edit key), got {tuple(edit_values.shape)}")
    if factor is None:
        factor = uce_factor(edit_keys, preserve_keys, lamb=lamb, erase_scale=erase_scale,
                            preserve_scale=preserve_scale)
    w = weight.detach().to(torch.float64)
    resid = edit_values.detach().to(torch.float64).T - w @ edit_keys.detach().to(torch.float64).T  # (d_out, k)
    return (w + resid @ factor.T).to(weight.dtype)


def cross_attention_kv(unet) -> dict[str, torch.nn.Linear]:
    """Name -> module of every cross-attention K/V projection (``attn2.to_k`` / ``attn2.to_v``)
    of a diffusers ``UNet2DConditionModel``."""
    out = {name: mod for name, mod in unet.named_modules()
           if name.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(mod, torch.nn.Linear)}
    if not out:
        raise ValueError("the model has no cross-attention projections named '*attn2.to_k' / '*attn2.to_v'; "
                         "UCE needs a diffusers UNet2DConditionModel")
    return out


@torch.no_grad()
def uce_edit_unet(unet, edit_keys: torch.Tensor, guide_keys: torch.Tensor, preserve_keys: torch.Tensor | None,
                  config: UCEConfig | None = None) -> dict:
    """Apply UCE erasure in place to every cross-attention K/V projection of ``unet``.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (edited in place).
        edit_keys: ``(k, d)`` token embeddings of the erased concept (text-encoder outputs).
        guide_keys: ``(k, d)`` token embeddings of the guide concept at the matching positions;
            each layer's target is ``v*_i = W guide_i``.
        preserve_keys: ``(m, d)`` embeddings to preserve (include the empty prompt's), or None.
    Returns:
        ``{"edited": [parameter names], "max_abs_change": float}``.
    """
    cfg = config or UCEConfig()
    if guide_keys.shape != edit_keys.shape:
        raise ValueError(f"guide_keys {tuple(guide_keys.shape)} must match edit_keys {tuple(edit_keys.shape)}: "
                         "one guide embedding per edited embedding")
    factor = uce_factor(edit_keys, preserve_keys, lamb=cfg.lamb, erase_scale=cfg.erase_scale,
                        preserve_scale=cfg.preserve_scale)
    ce = edit_keys.detach().to(torch.float64).T  # (d, k)
    cg = guide_keys.detach().to(torch.float64).T  # (d, k)
    edited, max_change = [], 0.0
    for name, lin in cross_attention_kv(unet).items():
        w = lin.weight.detach().to(torch.float64)  # (d_out, d)
        if w.shape[1] != ce.shape[0]:
            raise ValueError(f"{name} takes {w.shape[1]}-dim inputs but the embeddings are {ce.shape[0]}-dim")
        delta = (w @ (cg - ce)) @ factor.T  # (d_out, d): (V* − W C_e) Fᵀ with V* = W C_g
        lin.weight.add_(delta.to(lin.weight.dtype))
        edited.append(f"{name}.weight")
        max_change = max(max_change, float(delta.abs().max()))
    return {"edited": edited, "max_abs_change": max_change}


@torch.no_grad()
def concept_token_embeddings(text_encoder, tokenizer, prompts: list[str], n_trailing: int = 0,
                             max_length: int | None = None) -> torch.Tensor:
    """Text-encoder outputs at each prompt's last word token (and ``n_trailing`` positions after it).

    The last word token is the one before the first EOS. Returns ``(len(prompts) * (1 +
    n_trailing), d)`` rows in prompt order, positions clipped at the sequence end (so a prompt
    near ``max_length`` contributes fewer rows; pair concept and guide prompts of similar length).
    """
    max_length = max_length or getattr(tokenizer, "model_max_length", 77)
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    hid = text_encoder(input_ids=enc["input_ids"].to(text_encoder.device)).last_hidden_state  # (B, T, d)
    return _concept_rows(enc["input_ids"], hid, tokenizer.eos_token_id, prompts, n_trailing)


def _concept_rows(input_ids: torch.Tensor, hid: torch.Tensor, eos: int, prompts: list[str],
                  n_trailing: int) -> torch.Tensor:
    """Rows of ``hid`` ``(B, T, d)`` at each prompt's last word token (the one before the first
    EOS) and ``n_trailing`` positions after it -> ``(n, d)``."""
    rows = []
    for b, ids in enumerate(input_ids):
        pos = (ids == eos).nonzero()
        if len(pos) == 0:
            raise ValueError(f"prompt {prompts[b]!r} has no EOS token within max_length={input_ids.shape[1]}")
        last = max(int(pos[0]) - 1, 0)
        rows.append(hid[b, last:min(last + 1 + n_trailing, hid.shape[1])])
    return torch.cat(rows, dim=0)


@torch.no_grad()
def adapter_concept_embeddings(adapter, prompts: list[str], n_trailing: int = 0) -> torch.Tensor:
    """:func:`concept_token_embeddings` through an image adapter: the cross-attention input
    (``adapter.token_embeddings``; SDXL: both text encoders' penultimate states concatenated) at
    each prompt's last word token (+ ``n_trailing``) -> ``(n, d)``. For a single CLIP encoder it
    is :func:`concept_token_embeddings` with the adapter's text encoder and tokenizer."""
    ids = adapter.tokenize(list(prompts))  # (B, T)
    embed = getattr(adapter, "token_embeddings", None) or adapter.encode_prompts
    hid = embed(ids)[:, :ids.shape[1]]  # (B, T, d)
    return _concept_rows(ids, hid, adapter.tokenizer.eos_token_id, list(prompts), n_trailing)


@torch.no_grad()
def uce_embeddings(adapter, erase_prompts: list[str], guide_prompts: list[str], preserve_prompts: list[str],
                   n_trailing: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C_e (k, d), C_g (k, d), C_p (m, d))``: the concept embeddings :func:`uce_erase` edits with
    (the empty prompt is always preserved)."""
    if len(erase_prompts) != len(guide_prompts) or not erase_prompts:
        raise ValueError(f"got {len(erase_prompts)} erase and {len(guide_prompts)} guide prompts: "
                         "give one guide prompt per erase prompt (at least one)")
    ce = adapter_concept_embeddings(adapter, list(erase_prompts), n_trailing)
    cg = adapter_concept_embeddings(adapter, list(guide_prompts), n_trailing)
    if ce.shape != cg.shape:
        raise ValueError(f"erase prompts give {ce.shape[0]} embeddings but guide prompts {cg.shape[0]}: with "
                         "n_trailing > 0 pair prompts of similar length or use n_trailing=0")
    keep = list(dict.fromkeys([""] + list(preserve_prompts)))
    return ce, cg, adapter_concept_embeddings(adapter, keep, n_trailing)


@torch.no_grad()
def uce_erase(adapter, erase_prompts: list[str], guide_prompts: list[str], preserve_prompts: list[str],
              config: UCEConfig | None = None,
              embeddings: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Erase concepts from an :class:`~unlearn.adapters.image.ImageAdapter` in place.

    Each erase prompt (e.g. ``"red"``) is paired with a guide prompt (``"blue"``, or ``""`` for
    objects); the preserve prompts (``""`` is always added) keep their K/V outputs. Embeddings
    are the text encoder's outputs at each prompt's last word token (+ ``n_trailing``).

    ``embeddings``: :func:`uce_embeddings` of the same prompts, when the caller has them already.

    Returns ``{"edited": [names in adapter.model], "max_abs_change", "n_edit", "n_preserve"}``.
    """
    cfg = config or UCEConfig()
    ce, cg, cp = embeddings if embeddings is not None else uce_embeddings(
        adapter, erase_prompts, guide_prompts, preserve_prompts, cfg.n_trailing)
    info = uce_edit_unet(adapter.unet, ce, cg, cp, cfg)
    adapter._fingerprint = None
    return {"edited": [f"unet.{n}" for n in info["edited"]], "max_abs_change": info["max_abs_change"],
            "n_edit": int(ce.shape[0]), "n_preserve": int(cp.shape[0])}


# ---------------------------------------------------------------------------- the editor
def concept_prompts(data) -> tuple[list[str], list[str], list[str]]:
    """``(erase, guide, preserve)`` prompts of a :class:`~unlearn.tasks.visual_task.VisualData`:
    the erase concepts' words, their guide concepts' words, every other attribute value."""
    return ([concept_value(c) for c in data.erase], [concept_value(c) for c in data.guide], data.preserve_words())


class UCE(Editor):
    """UCE as an editor: the closed form on every ``attn2.to_k`` / ``attn2.to_v`` of the UNet,
    mapping each erase concept's word onto its guide concept's and preserving every other
    attribute word of the world and the empty prompt. Edits the target in place."""

    name = "uce"
    full_parameters = "it edits the cross-attention weight matrices in closed form"
    Config = UCEConfig
    paper = PAPER
    modalities = ("image",)

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        import time

        erase, guide, preserve = concept_prompts(data)
        t0 = time.perf_counter()
        info = uce_erase(adapter, erase, guide, preserve, self.config)
        info["edit_seconds"] = round(time.perf_counter() - t0, 4)
        info.update(erase_prompts=erase, guide_prompts=guide, preserve_prompts=preserve,
                    headline=f"UCE: {len(info['edited'])} K/V matrices edited in {info['edit_seconds']:.3f} s")
        return EditResult(adapter=adapter, info=info)
