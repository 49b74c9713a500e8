"""SPM: a one-dimensional (rank-1) adapter that erases a concept, trained with the erasure loss
and latent anchoring, applied at inference with a strength that depends on the prompt.

Paper: Lyu, Yang, Hong, Chen, Jin, Ding, Han (2024), "One-dimensional Adapter to Rule Them All:
Concepts, Diffusion Models and Erasing Applications", CVPR 2024, arXiv:2312.16145.

**The adapter.** Every targeted ``nn.Linear`` ``W`` ``(d_out, d_in)`` of the UNet gets a rank-1
update with a per-prompt strength ``γ``:

    y = W x + γ · (α / r) · u (dᵀ x),   u (d_out, 1), d (1, d_in), r = 1, α = 1

``u`` starts at zero (the adapted model starts as the original), ``d`` small and random. The
UNet's own weights never change: the adapter is stored on its own (``spm.safetensors``: per
layer ``<module>.down`` ``(1, d_in)`` and ``<module>.up`` ``(d_out, 1)``, the erased and anchor
prompts in the metadata) and can be put on any model with the same architecture
(:func:`apply_spm`).

**Training** (γ = 1), with ε* the frozen original, c the erase concept's prompt, ∅ the empty
prompt, η the negative guidance and a anchor prompts (other concepts of the world):

    L = ‖ε_spm(x_t, c, t) − [ε*(x_t, ∅, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))]‖²        (erasure, ESD's target)
      + λ · mean_a ‖ε_spm(x^a_t, a, t) − ε*(x^a_t, a, t)‖²                           (latent anchoring)

``x_t`` / ``x^a_t``: the frozen model's guided DDIM run from noise for a random number of the
``ddim_steps`` steps with c / a (as in ESD).

**Facilitated Transport** (inference): the adapter's strength for prompt ``p`` is

    s(p) = max_k max( cos(flat E(p), flat E(c_k)),  |tok(p) ∩ tok(c_k)| / |tok(c_k)| )
    γ(p) = clip((s(p) − s₀) / (1 − s₀), 0, 1)

with ``E`` the text encoder's ``(T, d)`` output flattened, ``tok`` the prompt's word tokens
(special tokens left out) and ``c_k`` the erased prompts. The official code uses ``γ = s``
(``s₀ = 0``, the default here too): on Stable Diffusion's CLIP unrelated prompts have a small
cosine. ``floor: auto`` (an extension) sets ``s₀`` to the highest score of the anchor prompts: an
anchor-like prompt gets γ = 0, a prompt with the concept's word γ = 1, other prompts in between
by their similarity; it is for text encoders that give every pair of prompts a high cosine
(the tiny zoo's: 0.6–0.9), where ``γ = s`` applies most of the adapter to every prompt. Both branches of
classifier-free guidance use the prompt's γ (as the official pipeline does). Where only the
condition is known (:meth:`SPMAdapter.noise_pred` outside sampling, e.g. a relearning attack's
loss) the cosine term alone gives ``s``.

Deviations from the official code (``docs/editors/spm.md``): x_t comes from the frozen model
(official: the model being trained); ``floor: auto`` (above, optional); AdamW at the recipe's ``train.lr``;
pixel-space or latent models.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.adapters.image import ImageAdapter
from unlearn.editors.base import (EditContext, Editor, EditorConfig, EditResult, image_loop_start, load_wrapper_base,
                                  optimizer_step, restoring_train_state, save_wrapper_base)
from unlearn.editors.esd import esd_prompts, esd_target, retain_captions, sample_xt
from unlearn.trainer import TrainLog

PAPER = ("Lyu, Yang, Hong, Chen, Jin, Ding, Han (2024). One-dimensional Adapter to Rule Them All: Concepts, Diffusion "
         "Models and Erasing Applications. CVPR 2024, arXiv:2312.16145")
ADAPTER_FILE = "spm.safetensors"
LAYERS = ("cross_attention_kv", "cross_attention", "transformer")
_LAYER_PATTERNS = {
    "cross_attention_kv": r"\.attn2\.to_[kv]$",
    "cross_attention": r"\.attn2\.(to_[qkv]|to_out\.0)$",
    "transformer": r"\.transformer_blocks\.\d+\.",
}


@dataclass
class SPMConfig(EditorConfig):
    """Hyper-parameters of SPM (the learning rate and clipping come from ``train``).

    Official SD-1.4 values in brackets; the defaults here are for the tiny zoo."""

    layers: str = field(default="cross_attention_kv", metadata={
        "help": "which UNet Linear layers get the rank-1 adapter: cross_attention_kv (attn2 to_k/to_v), "
                "cross_attention (attn2), transformer (every Linear in the transformer blocks) [transformer]"})
    iterations: int = field(default=100, metadata={"help": "steps when train.max_steps is not set [3000]"})
    anchor_weight: float = field(default=10.0, metadata={"help": "λ of latent anchoring [1000]"})
    anchor_batch: int = field(default=2, metadata={"help": "anchor prompts per step"})
    negative_guidance: float = field(default=1.0, metadata={"help": "η of the erasure target [1.0]"})
    ddim_steps: int = field(default=20, metadata={"help": "DDIM steps x_t is sampled on [50]"})
    sample_guidance: float = field(default=3.0, metadata={"help": "guidance when sampling x_t [3.0]"})
    prompts: str = field(default="concept", metadata={
        "help": "concept: the erase words ('red'); captions: the forget items' explicit captions"})
    floor: str = field(default="0", metadata={
        "help": "s₀ of the prompt-dependent strength: a number in [0, 1) as a string ('0': the official γ = s) or "
                "auto (the highest score of the anchor prompts: anchor-like prompts get γ = 0) [0]"})
    scaling: str = field(default="facilitated", metadata={
        "help": "facilitated (γ from the prompt, Facilitated Transport) or constant (γ = 1 for every prompt)"})

    def __post_init__(self) -> None:
        if self.layers not in LAYERS:
            raise ValueError(f"spm.layers={self.layers!r}: must be one of {', '.join(LAYERS)}")
        if self.prompts not in ("concept", "captions"):
            raise ValueError(f"spm.prompts={self.prompts!r}: must be one of concept, captions")
        if self.scaling not in ("facilitated", "constant"):
            raise ValueError(f"spm.scaling={self.scaling!r}: must be one of facilitated, constant")
        for k in ("iterations", "anchor_batch", "ddim_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"spm.{k}={v!r}: must be an integer >= 1")
        for k in ("anchor_weight", "negative_guidance", "sample_guidance"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"spm.{k}={v!r}: must be a finite number >= 0")
        self.floor = str(self.floor)
        if self.floor != "auto":
            try:
                f = float(self.floor)
            except ValueError:
                f = float("nan")
            if not (0 <= f < 1):
                raise ValueError(f"spm.floor={self.floor!r}: must be 'auto' or a number in [0, 1)")


# ---------------------------------------------------------------------------- the adapter
def target_layers(unet, layers: str) -> dict[str, torch.nn.Linear]:
    """``{module name: nn.Linear}`` of the UNet that ``layers`` adapts (sorted by name)."""
    if layers not in _LAYER_PATTERNS:
        raise ValueError(f"spm.layers={layers!r}: must be one of {', '.join(LAYERS)}")
    pat = re.compile(_LAYER_PATTERNS[layers])
    out = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and pat.search(n)}
    if not out:
        raise ValueError(f"spm.layers={layers!r}: the UNet has no such Linear layer (no transformer blocks?)")
    return dict(sorted(out.items()))


def _key(name: str) -> str:
    return name.replace(".", "-")


class SPMNetwork(torch.nn.Module):
    """The rank-1 adapters: ``down[name]`` ``(1, d_in)`` and ``up[name]`` ``(d_out, 1)`` per adapted
    UNet module ``name`` (``alpha`` / rank = ``alpha``)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], layers: str, alpha: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = list(shapes)
        self.layers = layers
        self.alpha = float(alpha)
        self.down = torch.nn.ParameterDict({_key(n): torch.nn.Parameter(torch.randn(1, d_in, generator=g) / d_in ** 0.5)
                                            for n, (_, d_in) in shapes.items()})
        self.up = torch.nn.ParameterDict({_key(n): torch.nn.Parameter(torch.zeros(d_out, 1))
                                          for n, (d_out, _) in shapes.items()})

    @classmethod
    def for_unet(cls, unet, layers: str, seed: int = 0) -> "SPMNetwork":
        shapes = {n: (m.out_features, m.in_features) for n, m in target_layers(unet, layers).items()}
        net = cls(shapes, layers, seed=seed)
        p = next(unet.parameters())
        return net.to(p.device, p.dtype)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``α · u (dᵀ x)`` for ``x`` ``(..., d_in)`` -> ``(..., d_out)``."""
        k = _key(name)
        return self.alpha * (x @ self.down[k].T.to(x.dtype)) @ self.up[k].T.to(x.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"<module>.down": (1, d_in), "<module>.up": (d_out, 1)}`` (contiguous CPU copies)."""
        out = {}
        for n in self.names:
            out[f"{n}.down"] = self.down[_key(n)].detach().cpu().contiguous()
            out[f"{n}.up"] = self.up[_key(n)].detach().cpu().contiguous()
        return out


def save_spm(network: SPMNetwork, path: str | Path, meta: dict) -> None:
    """Write the adapter alone (safetensors; ``meta`` as JSON in the file's metadata)."""
    from safetensors.torch import save_file

    save_file(network.tensors(), str(path), metadata={"spm": json.dumps({**meta, "layers": network.layers,
                                                                          "alpha": network.alpha})})


def load_spm_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adapter file written by :func:`save_spm` -> ``(tensors, meta)``."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"SPM adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("spm")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 -- a corrupt file, whatever the library raises
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if raw is None:
        raise ValueError(f"{path} has no 'spm' metadata: not an SPM adapter written by save_spm")
    return tensors, json.loads(raw)


def network_from_tensors(unet, tensors: dict[str, torch.Tensor], layers: str, alpha: float = 1.0,
                         source: str = "<in-memory>") -> SPMNetwork:
    """An :class:`SPMNetwork` for ``unet`` holding ``tensors``; every layer must exist with matching
    shapes (a ValueError names the first that does not)."""
    want = {n: (m.out_features, m.in_features) for n, m in target_layers(unet, layers).items()}
    have = sorted({k.rsplit(".", 1)[0] for k in tensors})
    if set(have) != set(want):
        missing = sorted(set(want) - set(have))[:3]
        extra = sorted(set(have) - set(want))[:3]
        raise ValueError(f"{source}: the adapter's layers do not match this UNet ({layers}): missing {missing}, "
                         f"unknown {extra}; an SPM adapter transfers only to a model of the same architecture")
    net = SPMNetwork(want, layers, alpha)
    for n, (d_out, d_in) in want.items():
        down, up = tensors[f"{n}.down"], tensors[f"{n}.up"]
        if tuple(down.shape) != (1, d_in) or tuple(up.shape) != (d_out, 1):
            raise ValueError(f"{source}: layer {n} has down {tuple(down.shape)} / up {tuple(up.shape)}, this UNet needs "
                             f"(1, {d_in}) / ({d_out}, 1); an SPM adapter transfers only to the same architecture")
        net.down[_key(n)].data.copy_(down)
        net.up[_key(n)].data.copy_(up)
    p = next(unet.parameters())
    return net.to(p.device, p.dtype)


# ---------------------------------------------------------------------------- strength
def matching_scores(prompt_ids: torch.Tensor, prompt_embeds: torch.Tensor | None, concept_ids: torch.Tensor,
                    concept_embeds: torch.Tensor, special: set[int]) -> torch.Tensor:
    """``s(p)`` ``(B,)``: max over the K erased prompts of max(cosine of the flattened ``(T, d)``
    embeddings, share of the erased prompt's word tokens found in ``p``).

    Args:
        prompt_ids: ``(B, T)`` token ids, or None (then only the cosine term).
        prompt_embeds: ``(B, T', d)`` text-encoder outputs; concept_embeds ``(K, T', d)``.
        concept_ids: ``(K, T)``; special: token ids left out of the token term.
    """
    cos = F.cosine_similarity(prompt_embeds.flatten(1).double()[:, None], concept_embeds.flatten(1).double()[None],
                              dim=-1)  # (B, K)
    score = cos
    if prompt_ids is not None:
        tok = torch.zeros_like(cos)
        for b, row in enumerate(prompt_ids.tolist()):
            ps = set(row) - special
            for k, crow in enumerate(concept_ids.tolist()):
                cs = set(crow) - special
                tok[b, k] = len(ps & cs) / max(len(cs), 1)
        score = torch.maximum(cos, tok)
    return score.max(-1).values.float().cpu()


def strength(scores: torch.Tensor, floor: float) -> torch.Tensor:
    """``γ = clip((s − s₀) / (1 − s₀), 0, 1)``."""
    return ((scores - floor) / (1.0 - floor)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------- the adapted model
class SPMAdapter(ImageAdapter):
    """An :class:`ImageAdapter` whose UNet carries an SPM adapter (``model["spm"]``), applied with the
    prompt's strength γ (:meth:`strengths`) in :meth:`sample` and :meth:`noise_pred`.

    Args:
        base: the model (its modules are shared, not copied; its weights are never changed).
        network: the :class:`SPMNetwork` (layers must exist in ``base.unet``).
        concepts: the erased prompts (``c_k``); anchors: the anchor prompts (for ``floor: auto``).
        config: :class:`SPMConfig` (``floor``, ``scaling``).
    """

    def __init__(self, base: ImageAdapter, network: SPMNetwork, concepts: list[str], anchors: list[str],
                 config: SPMConfig | None = None) -> None:
        if isinstance(base, SPMAdapter):
            raise ValueError("the model already carries an SPM adapter; apply it to the plain model")
        super().__init__(base.unet, base.text_encoder, base.tokenizer, base.scheduler, **base.parts(),
                         timesteps_per_item=base.timesteps_per_item, source=base.source)
        self.base = base
        self.model["spm"] = network
        self.modules_by_name = target_layers(base.unet, network.layers)
        if set(self.modules_by_name) != set(network.names):
            raise ValueError("the SPM adapter's layers do not match the UNet (use network_from_tensors to check)")
        self.concepts = list(dict.fromkeys(concepts))
        if not self.concepts:
            raise ValueError("SPM needs at least one erased prompt")
        self.anchors = list(dict.fromkeys(anchors))
        self.config = config or SPMConfig()
        self._gamma: torch.Tensor | None = None  # per-prompt γ during sample()
        self._const: float | None = None  # a fixed γ (training)
        self.last_strength: list[float] = []
        self.floor = self._floor()

    # ---------------------------------------------------------------- strength
    @property
    def network(self) -> SPMNetwork:
        return self.model["spm"]

    def _special(self) -> set[int]:
        tok = self.tokenizer
        return {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if i is not None}

    @torch.no_grad()
    def _concept_embeds(self, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenize(self.concepts)
        return ids, self.encode_prompts(ids, model)

    @torch.no_grad()
    def scores(self, prompts: list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
               model=None) -> torch.Tensor:
        """``s(p)`` ``(B,)`` for ``prompts`` (token and cosine terms) or, without prompts, for the
        conditions ``prompt_embeds`` ``(B, T, d)`` (cosine term only)."""
        c_ids, c_emb = self._concept_embeds(model)
        ids = self.tokenize(list(prompts)) if prompts is not None else None
        if prompt_embeds is None:
            if ids is None:
                raise ValueError("scores needs prompts or prompt_embeds")
            prompt_embeds = self.encode_prompts(ids, model)
        return matching_scores(ids, prompt_embeds, c_ids, c_emb.to(prompt_embeds.dtype), self._special())

    def _floor(self) -> float:
        if self.config.floor != "auto":
            return float(self.config.floor)
        if not self.anchors:
            return 0.0
        s = float(self.scores(self.anchors).max())
        return min(max(s, 0.0), 0.999)

    def strengths(self, prompts: list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                  model=None) -> torch.Tensor:
        """γ ``(B,)`` of each prompt (1 for every prompt with ``scaling: constant``)."""
        if self.config.scaling == "constant":
            n = len(prompts) if prompts is not None else prompt_embeds.shape[0]
            return torch.ones(n)
        return strength(self.scores(prompts, prompt_embeds, model), self.floor)

    @contextlib.contextmanager
    def fixed_strength(self, gamma: float):
        """Within the block every prediction uses γ = ``gamma`` (training uses 1)."""
        old, self._const = self._const, float(gamma)
        try:
            yield
        finally:
            self._const = old

    # ---------------------------------------------------------------- predictions
    def noise_pred(self, x_t, t, cond, model=None):
        """:meth:`ImageAdapter.noise_pred` with the adapter added at strength γ per batch row: the
        fixed strength, else the strengths of the prompts being sampled (both guidance halves), else
        γ from ``cond`` (cosine term)."""
        m = model if model is not None else self.model
        if "spm" not in m:
            return super().noise_pred(x_t, t, cond, model)
        net = m["spm"]
        b = cond.shape[0]
        if self._const is not None:
            gamma = torch.full((b,), self._const)
        elif self._gamma is not None and b in (len(self._gamma), 2 * len(self._gamma)):
            gamma = self._gamma if b == len(self._gamma) else torch.cat([self._gamma, self._gamma])
        else:
            gamma = self.strengths(None, cond.detach(), m)
        gamma = gamma.to(x_t.device, x_t.dtype)  # (B,)
        if not bool((gamma != 0).any()):
            return super().noise_pred(x_t, t, cond, model)
        modules = dict(m["unet"].named_modules())
        handles = []
        for name in net.names:
            def hook(_mod, inputs, out, name=name):
                x = inputs[0]  # (B, N, d_in)
                g = gamma.view(-1, *([1] * (x.dim() - 1))) if x.shape[0] == len(gamma) else gamma.mean()
                return out + g * net.delta(name, x)
            handles.append(modules[name].register_forward_hook(hook))
        try:
            return super().noise_pred(x_t, t, cond, model)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int | list[int] = 0, steps: int = 20, guidance: float = 3.0,
               prompt_embeds: torch.Tensor | None = None, model=None) -> np.ndarray:
        """:meth:`ImageAdapter.sample` with the adapter at each prompt's strength (from its tokens and
        its condition: ``prompt_embeds`` when given, else the encoded prompt). ``last_strength``
        records the γ used."""
        prompts = list(prompts)
        gamma = self.strengths(prompts, prompt_embeds, model)
        self.last_strength = [round(float(g), 6) for g in gamma]
        old, self._gamma = self._gamma, gamma
        try:
            return super().sample(prompts, seed=seed, steps=steps, guidance=guidance, prompt_embeds=prompt_embeds,
                                  model=model)
        finally:
            self._gamma = old

    # ---------------------------------------------------------------- contract
    def parameter_groups(self) -> dict[str, list[str]]:
        """The base groups plus ``spm`` (the adapter's parameters)."""
        groups = super().parameter_groups()
        groups["spm"] = [n for n, _ in self.model.named_parameters() if n.startswith("spm.")]
        return groups

    def meta(self) -> dict:
        return {"concepts": self.concepts, "anchors": self.anchors, "config": asdict(self.config), "paper": PAPER}

    def reference(self) -> "SPMAdapter":
        """A frozen deep copy (base and adapter)."""
        net = copy.deepcopy(self.network)
        for p in net.parameters():
            p.requires_grad_(False)
        ref = SPMAdapter(self.base.reference(), net, self.concepts, self.anchors, self.config)
        ref._fingerprint = self._fingerprint
        return ref

    def fingerprint(self, refresh: bool = False) -> str:
        """sha256 (16 hex) over the base weights, the adapter's tensors and its prompts and config."""
        if self._fingerprint is None or refresh:
            h = hashlib.sha256(b"spm")
            h.update(self.base.fingerprint(refresh=True).encode())
            for k, v in sorted(self.network.tensors().items()):
                h.update(k.encode())
                h.update(v.float().numpy().tobytes())
            h.update(json.dumps(self.meta(), sort_keys=True).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def save_adapter(self, path: str | Path) -> None:
        """The adapter alone (safetensors), transferable with :func:`apply_spm`."""
        save_spm(self.network, path, self.meta())

    def save(self, path: str | Path) -> None:
        """``path/base/`` (the unchanged model), ``path/spm.safetensors`` (the adapter) and
        ``wrapper.json`` (``{"kind": "spm", ...}``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.save_adapter(path / ADAPTER_FILE)
        save_wrapper_base(path, self.base, {"kind": SPM.name, "paper": PAPER, "adapter": ADAPTER_FILE})

    @classmethod
    def load(cls, source: str, **kwargs) -> "SPMAdapter":
        return load_spm(source, **kwargs)


def apply_spm(model: ImageAdapter, adapter_file: str | Path, **config_overrides) -> SPMAdapter:
    """Put the SPM adapter saved in ``adapter_file`` on ``model`` (any checkpoint of the architecture it
    was trained on); ``floor: auto`` is recomputed with ``model``'s text encoder."""
    tensors, meta = load_spm_file(adapter_file)
    cfg = SPMConfig(**{**meta.get("config", {}), **config_overrides})
    net = network_from_tensors(model.unet, tensors, meta.get("layers", cfg.layers), meta.get("alpha", 1.0),
                               source=str(adapter_file))
    return SPMAdapter(model, net, meta["concepts"], meta.get("anchors", []), cfg)


def load_spm(path: str | Path, **kwargs) -> SPMAdapter:
    """Rebuild an :class:`SPMAdapter` saved by :meth:`SPMAdapter.save` (``kwargs`` go to
    :meth:`ImageAdapter.load` of the base model)."""
    meta, base, path = load_wrapper_base(path, SPM.name, **kwargs)
    return apply_spm(base, path / meta.get("adapter", ADAPTER_FILE))


def anchor_prompts(data) -> list[str]:
    """The distinct explicit captions of the retain items (the anchor concepts)."""
    return retain_captions(data, "spm's latent anchoring needs anchor prompts", "method.params.anchor_weight: 0")


# ---------------------------------------------------------------------------- the editor
class SPM(Editor):
    """SPM as an editor: trains a rank-1 adapter on the frozen target and returns the target wrapped
    in an :class:`SPMAdapter` (the target's weights are not changed)."""

    name = "spm"
    full_parameters = "it trains an adapter on the whole frozen UNet in its own loop and wraps the model"
    Config = SPMConfig
    paper = PAPER
    modalities = ("image",)

    def needs_retain(self) -> bool:
        return self.config.anchor_weight > 0

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        from diffusers import DDIMScheduler
        from tqdm.auto import tqdm

        cfg, settings = self.config, ctx.settings
        n_iter, rng, gen = image_loop_start(adapter, settings, cfg.iterations, self.name, ctx.seed)
        if not isinstance(adapter, ImageAdapter):
            raise ValueError("spm edits text-to-image diffusion models (use an ImageAdapter)")
        prompts = esd_prompts(data, cfg.prompts)
        anchors = anchor_prompts(data) if cfg.anchor_weight > 0 else []
        t0 = time.perf_counter()

        reference = adapter.reference()  # ε*
        net = SPMNetwork.for_unet(adapter.unet, cfg.layers, seed=ctx.seed)
        wrapped = SPMAdapter(adapter, net, prompts, anchors, cfg)
        ddim = DDIMScheduler.from_config(adapter.scheduler.config)
        ddim.set_timesteps(cfg.ddim_steps)
        with torch.no_grad():
            conds = reference.encode_prompts(reference.tokenize(prompts))  # (P, T, d)
            uncond = reference.encode_prompts(reference.tokenize([""]))  # (1, T, d)
            a_conds = reference.encode_prompts(reference.tokenize(anchors)) if anchors else None  # (A, T, d)

        params = list(net.parameters())
        log = TrainLog(seed=ctx.seed)
        with restoring_train_state(adapter):
            for p in adapter.model.parameters():
                p.requires_grad_(False)
            for m in adapter.model.values():
                m.eval()
            opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=getattr(settings, "weight_decay", 0.0))
            bar = tqdm(range(n_iter), desc="SPM", disable=not ctx.progress, mininterval=1)
            with wrapped.fixed_strength(1.0):
                for it in bar:
                    p_i = rng.randrange(len(prompts))
                    k = rng.randrange(cfg.ddim_steps)
                    a_idx = [rng.randrange(len(anchors)) for _ in range(cfg.anchor_batch)] if anchors else []
                    c_all = torch.cat([conds[p_i:p_i + 1]] + ([a_conds[a_idx]] if anchors else []))  # (1+A, T, d)
                    x_all, t_all = sample_xt(reference, ddim, c_all, uncond.expand(len(c_all), -1, -1), k,
                                             cfg.sample_guidance, gen)
                    with torch.no_grad():
                        e_u = reference.noise_pred(x_all[:1], t_all[:1], uncond)
                        e_c = reference.noise_pred(x_all[:1], t_all[:1], conds[p_i:p_i + 1])
                        target = esd_target(e_u, e_c, cfg.negative_guidance)  # (1, C, h, w)
                        e_a = reference.noise_pred(x_all[1:], t_all[1:], a_conds[a_idx]) if anchors else None
                    # one batch through the adapted UNet: the concept row and the anchor rows
                    pred = wrapped.noise_pred(x_all, t_all, c_all)  # (1+A, C, h, w)
                    erase = F.mse_loss(pred[:1].float(), target.float())
                    anchor = F.mse_loss(pred[1:].float(), e_a.float()) if anchors else torch.zeros(())
                    loss = erase + cfg.anchor_weight * anchor
                    optimizer_step(loss, opt, params, settings.max_grad_norm, f"spm at iteration {it + 1}; lower train.lr")
                    log.steps += 1
                    log.history.append({"step": it + 1, "loss": round(loss.item(), 6), "erase": round(erase.item(), 6),
                                        "anchor": round(anchor.item(), 8), "t": int(t_all[0]),
                                        "prompt": prompts[p_i], "lr": settings.lr})
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
        for p in params:  # the trained adapter is frozen inside the wrapper
            p.requires_grad_(False)
            p.grad = None
        log.seconds = time.perf_counter() - t0
        wrapped.floor = wrapped._floor()
        wrapped._fingerprint = None
        splits = {}
        for name, rows in (getattr(data, "eval_splits", None) or {}).items():
            ps = [r["prompt"] for r in rows if "prompt" in r]
            if ps:
                splits[name] = round(float(wrapped.strengths(ps).mean()), 4)
        info = {
            "layers": cfg.layers,
            "adapted_layers": len(net.names),
            "adapter_parameters": sum(p.numel() for p in params),
            "iterations": n_iter,
            "prompts": prompts,
            "anchor_prompts": len(anchors),
            "floor": round(wrapped.floor, 6),
            "mean_strength": splits,
            "losses": [h["loss"] for h in log.history[::10]],
            "edit_seconds": round(log.seconds, 3),
            "headline": f"SPM ({cfg.layers}, {len(net.names)} rank-1 adapters): {n_iter} iterations, "
                        f"{log.seconds:.1f} s; mean strength " + ", ".join(f"{k} {v:.2f}" for k, v in splits.items()),
        }
        return EditResult(adapter=wrapped, log=log, info=info)


__all__ = ["SPM", "SPMConfig", "SPMAdapter", "SPMNetwork", "apply_spm", "load_spm", "load_spm_file", "save_spm",
           "network_from_tensors", "matching_scores", "strength", "target_layers", "anchor_prompts"]
