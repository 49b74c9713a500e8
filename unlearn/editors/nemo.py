"""NeMo: find the cross-attention value neurons that carry the memorisation of individual training
images, and deactivate them.

Paper: Hintersdorf, Struppek, Kersting, Dziedzic, Boenisch (2024), "Finding NeMo: Localizing
Neurons Responsible for Memorization in Diffusion Models", NeurIPS 2024, arXiv:2406.02366.
The search follows the official code (``ml-research/localizing_memorization_in_diffusion_models``).

A cross-attention value layer ``W_v`` (``attn2.to_v``, ``(d_out, d)``) sees only the text: for a
prompt with token embeddings ``c_1 .. c_T`` (the text encoder's output at every position of the
padded sequence, ``tokens: all``; or up to the first EOS, ``tokens: prompt``) the activation of
neuron ``j`` is

    a_j(p) = mean_t |(W_v c_t + b)_j|.

With ``μ_j``, ``σ_j`` the mean and standard deviation of ``a_j`` over ordinary (non-memorised)
prompts, neuron ``j`` is an outlier for a memorised prompt ``p`` when

    |z_j(p)| = |a_j(p) − μ_j| / σ_j  >  θ.

Per memorised prompt, over the value layers of the down and mid blocks (``layers: down_mid``, as
the official code; ``all`` adds the up blocks):

1. *Initial selection*: θ runs from ``theta_start`` (5) down to ``theta_min`` (1) in steps of
   ``theta_step`` (0.25) while k runs 0, 1, 2, ...; the candidates are the outliers ``|z| > θ`` plus
   each layer's k neurons of highest activation ``a_j(p)`` (``top_k``). The first set whose
   deactivation removes the memorisation is kept. When none down to ``theta_min`` does, the last
   (largest) set is kept and the refinement's threshold becomes that set's score, as in the
   official code (``on_failure: keep``; ``drop``: give up on the prompt).
2. *Refinement*: each layer's candidates are switched back on as a group and stay on if the
   memorisation stays removed; then each remaining neuron alone, likewise.

The union over the memorised prompts is deactivated: the neurons' rows of ``W_v`` (and bias
entries) are set to zero, which is exactly what masking the neurons' outputs at inference does
(``mask_value_neurons`` gives the masked model without editing it).

Memorisation check (``check``):

* ``noise`` (the paper's): the first DDIM step's conditional noise prediction minus the start
  noise, ``d = ε_θ(x_T, c) − x_T``, min-max scaled per image and channel, for ``seeds`` start noises.
  The memorised seeds are those whose ``d`` has an SSIM above ``ssim_threshold`` (0.428) with
  another seed's. The memorisation counts as removed when, for every memorised seed, the SSIM
  between ``d`` with the neurons deactivated and ``d`` without is below ``ssim_threshold``.
* ``sample``: a prompt is memorised when the max (or mean, ``statistic``) over ``seeds``
  generations of the near-copy similarity to its training image is at least ``threshold``:
  the cosine of the mean-centred pixels (``similarity: pixel``) or of the judge's penultimate
  features (``judge``), SSCD's role in the paper, with the tiny world's own encoders.

Deviations: the official code uses multi-scale SSIM (3 scales, 11 x 11 window); at the tiny
world's 16 x 16 a single-scale SSIM with a Gaussian window (σ 1.5, at most 11 wide) is used. The
official loop stops after evaluating θ = 1.25 (it breaks when θ reaches 1); here θ = ``theta_min``
is evaluated too. Reference prompts are the world's captions instead of LAION prompts.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.adapters.base import ImageModel
from unlearn.editors.base import EditContext, Editor, EditorConfig, EditResult

PAPER = ("Hintersdorf, Struppek, Kersting, Dziedzic, Boenisch (2024). Finding NeMo: Localizing Neurons Responsible "
         "for Memorization in Diffusion Models. NeurIPS 2024, arXiv:2406.02366")
MEMORISED_JSON = "memorised.json"  # {"captions": [...]} ; images in memorised.safetensors ("images": uint8 (N, S, S, 3))
MEMORISED_IMAGES = "memorised.safetensors"
CHECKS = ("noise", "sample")
SIMILARITIES = ("pixel", "judge")
STATISTICS = ("max", "mean")
LAYERS = ("down_mid", "all")
TOKENS = ("all", "prompt")
ON_FAILURE = ("keep", "drop")

Neurons = dict[str, list[int]]  # value-layer name -> neuron (output row) indices


@dataclass
class NeMoConfig(EditorConfig):
    """Hyper-parameters of NeMo's search (defaults: the official code's)."""

    memorised: str = field(default="", metadata={
        "help": "directory with memorised.json (captions) and memorised.safetensors (their training images)"})
    check: str = field(default="noise", metadata={
        "help": "memorisation check: noise (the paper's: SSIM of the first step's noise predictions) or sample "
                "(near-copy similarity of full generations to the training image)"})
    theta_start: float = field(default=5.0, metadata={"help": "first |z| threshold of the initial selection"})
    theta_min: float = field(default=1.0, metadata={"help": "lowest threshold tried"})
    theta_step: float = field(default=0.25, metadata={"help": "threshold decrement per step"})
    top_k: bool = field(default=True, metadata={"help": "add each layer's k most active neurons, k = 0, 1, 2, ... "
                                                        "along the threshold steps"})
    refine: bool = field(default=True, metadata={"help": "refine the selection (layers, then single neurons)"})
    on_failure: str = field(default="keep", metadata={
        "help": "when no threshold removes the memorisation: keep the last set and refine against its score "
                "(official) or drop the prompt"})
    layers: str = field(default="down_mid", metadata={"help": "value layers searched: down_mid (official) or all"})
    tokens: str = field(default="all", metadata={"help": "activation averaged over all positions of the padded "
                                                         "sequence (official) or the prompt's tokens up to its EOS"})
    seeds: int = field(default=10, metadata={"help": "start noises (noise) or generations (sample) per check"})
    ssim_threshold: float = field(default=0.428, metadata={"help": "check noise: SSIM below which the memorisation "
                                                                   "counts as removed"})
    threshold: float = field(default=0.7, metadata={"help": "check sample: near-copy similarity at or above which a "
                                                            "prompt is memorised"})
    sample_steps: int = field(default=20, metadata={"help": "DDIM steps (check noise uses the first)"})
    guidance: float = field(default=3.0, metadata={"help": "check sample: classifier-free guidance"})
    statistic: str = field(default="max", metadata={
        "help": "check sample: how the seeds' near-copy similarities combine, max or mean"})
    similarity: str = field(default="pixel", metadata={"help": "check sample: pixel (cosine of centred pixels) or "
                                                               "judge (cosine of the judge's features)"})
    reference_prompts: int = field(default=256, metadata={"help": "ordinary prompts that give μ and σ"})

    def __post_init__(self) -> None:
        for k in ("theta_start", "theta_step"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"nemo.{k}={v}: must be a finite number > 0")
        if not (math.isfinite(self.theta_min) and self.theta_min >= 0):
            raise ValueError(f"nemo.theta_min={self.theta_min}: must be a finite number >= 0 (0: every neuron off "
                             "its mean activation is a candidate)")
        if self.theta_min > self.theta_start:
            raise ValueError(f"nemo.theta_min={self.theta_min} is above nemo.theta_start={self.theta_start}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"nemo.threshold={self.threshold}: a cosine similarity, between -1 and 1")
        if not -1.0 <= self.ssim_threshold <= 1.0:
            raise ValueError(f"nemo.ssim_threshold={self.ssim_threshold}: an SSIM, between -1 and 1")
        for k in ("seeds", "sample_steps", "reference_prompts"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"nemo.{k}={v!r}: must be an integer >= 1")
        if self.check == "noise" and self.seeds < 2:
            raise ValueError(f"nemo.seeds={self.seeds}: check noise compares seeds with each other, give >= 2")
        for k, allowed in (("check", CHECKS), ("statistic", STATISTICS), ("similarity", SIMILARITIES),
                           ("layers", LAYERS), ("tokens", TOKENS), ("on_failure", ON_FAILURE)):
            if getattr(self, k) not in allowed:
                raise ValueError(f"nemo.{k}={getattr(self, k)!r}: must be one of {', '.join(allowed)}")

    @property
    def removed_below(self) -> float:
        """The check's threshold: the memorisation counts as removed when the score is below it."""
        return self.ssim_threshold if self.check == "noise" else self.threshold


# ---------------------------------------------------------------------------- activations and z-scores
def value_layers(unet, which: str = "all") -> dict[str, torch.nn.Linear]:
    """Name -> module of the cross-attention value projections (``attn2.to_v``), in ``named_modules``
    order (diffusers: down blocks, up blocks, mid block): every one (``which="all"``) or those of
    the down and mid blocks (``"down_mid"``, the official search's)."""
    if which not in LAYERS:
        raise ValueError(f"layers={which!r}: must be one of {', '.join(LAYERS)}")
    out = {n: m for n, m in unet.named_modules() if n.endswith("attn2.to_v") and isinstance(m, torch.nn.Linear)}
    if not out:
        raise ValueError("the model has no cross-attention value projections named '*attn2.to_v'; NeMo needs a "
                         "diffusers UNet2DConditionModel")
    if which == "down_mid":
        out = {n: m for n, m in out.items() if n.startswith(("down_blocks.", "mid_block."))}
        if not out:
            raise ValueError("the model has no cross-attention value layers in its down or mid blocks; use "
                             "nemo.layers: all")
    return out


@torch.no_grad()
def value_activations(adapter, prompts: list[str], batch_size: int = 64, layers: str = "all",
                      tokens: str = "all") -> dict[str, torch.Tensor]:
    """Per value layer ``(P, d_out)``: ``a_j(p) = mean_t |(W_v c_t + b)_j|`` over every position of the
    padded sequence (``tokens="all"``) or the prompt's tokens up to and including its first EOS
    (``"prompt"``); ``c_t``: the cross-attention input, :meth:`token_embeddings`."""
    if tokens not in TOKENS:
        raise ValueError(f"tokens={tokens!r}: must be one of {', '.join(TOKENS)}")
    mods = value_layers(adapter.unet, layers)
    eos = adapter.tokenizer.eos_token_id
    out: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    for s in range(0, len(prompts), batch_size):
        ids = adapter.tokenize(list(prompts[s:s + batch_size]))  # (B, T)
        emb = adapter.token_embeddings(ids).float()  # (B, T, d)
        if tokens == "all":
            keep = torch.ones(ids.shape, dtype=emb.dtype, device=emb.device)
        else:
            is_eos = (ids == eos).long()
            keep = ((is_eos.cumsum(-1) - is_eos) == 0).to(emb)  # (B, T): up to and including the first EOS
        for n, lin in mods.items():
            v = F.linear(emb, lin.weight.float(), None if lin.bias is None else lin.bias.float()).abs()  # (B, T, d_out)
            out[n].append((v * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))  # (B, d_out)
    return {n: torch.cat(v) for n, v in out.items()}


def z_scores(acts: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer ``(P, d_out)``: ``(a − μ) / σ`` with μ, σ (unbiased) over the reference prompts' rows."""
    out = {}
    for n, a in acts.items():
        ref = reference[n]
        if ref.shape[0] < 2:
            raise ValueError("z-scores need at least 2 reference prompts")
        mu, sd = ref.mean(0), ref.std(0).clamp_min(1e-8)
        out[n] = (a - mu) / sd
    return out


def outliers(z: dict[str, torch.Tensor], theta: float) -> Neurons:
    """Neurons with ``|z| > θ`` for one prompt (``z``: per layer ``(d_out,)``)."""
    return {n: [int(j) for j in torch.nonzero(v.abs() > theta).flatten()] for n, v in z.items()
            if bool((v.abs() > theta).any())}


def candidates(z: dict[str, torch.Tensor], acts: dict[str, torch.Tensor], theta: float, k: int) -> Neurons:
    """The initial selection's candidates at ``(θ, k)`` for one prompt: ``|z| > θ`` plus each layer's
    ``k`` neurons of highest activation (``z``, ``acts``: per layer ``(d_out,)``)."""
    out = outliers(z, theta)
    if k > 0:
        for n, a in acts.items():
            top = torch.topk(a, min(k, a.shape[0])).indices.tolist()
            out[n] = sorted(set(out.get(n, [])) | {int(j) for j in top})
    return {n: sorted(v) for n, v in out.items() if v}


def count(neurons: Neurons) -> int:
    return sum(len(v) for v in neurons.values())


@contextlib.contextmanager
def mask_value_neurons(adapter, neurons: Neurons):
    """Inside the block the listed value neurons output 0 (forward hooks; weights untouched)."""
    layers = value_layers(adapter.unet)
    handles = []
    for n, idx in neurons.items():
        if n not in layers:
            raise ValueError(f"{n!r} is not a cross-attention value layer (known: {', '.join(layers)})")
        if not idx:
            continue
        m = torch.ones(layers[n].out_features)
        m[idx] = 0.0

        def hook(mod, inp, out, m=m):
            return out * m.to(out)

        handles.append(layers[n].register_forward_hook(hook))
    try:
        yield adapter
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def deactivate(adapter, neurons: Neurons) -> list[str]:
    """Zero the listed neurons' rows of ``W_v`` (and their bias entries) in place -> edited parameter names."""
    layers = value_layers(adapter.unet)
    edited = []
    for n, idx in neurons.items():
        if not idx:
            continue
        if n not in layers:
            raise ValueError(f"{n!r} is not a cross-attention value layer (known: {', '.join(layers)})")
        layers[n].weight[idx] = 0.0
        edited.append(f"unet.{n}.weight")
        if layers[n].bias is not None:
            layers[n].bias[idx] = 0.0
            edited.append(f"unet.{n}.bias")
    adapter._fingerprint = None
    return edited


def search_neurons(z: dict[str, torch.Tensor], acts: dict[str, torch.Tensor], score: Callable[[Neurons], float],
                   cfg: NeMoConfig) -> dict:
    """NeMo's search for one memorised prompt (``z``, ``acts``: per layer ``(d_out,)``; ``score(neurons)``:
    the memorisation score with those neurons deactivated; removed when below ``cfg.removed_below``).

    Returns ``{"neurons", "theta", "k", "initial", "removed", "score", "checks"}``: ``removed`` says
    whether the initial selection reached the threshold; when it did not, ``on_failure: keep``
    refines the last set against its own score and ``drop`` returns no neurons."""
    checks, threshold = 0, cfg.removed_below
    theta, k, sel, s = cfg.theta_start, 0, {}, math.inf
    removed = False
    while True:
        cand = candidates(z, acts, theta, k if cfg.top_k else 0)
        if cand:
            sel, s = cand, score(cand)
            checks += 1
            if s < threshold:
                removed = True
                break
        nxt = round(theta - cfg.theta_step, 10)
        if nxt < cfg.theta_min - 1e-9:
            break
        theta, k = nxt, k + 1
    if not sel or (not removed and cfg.on_failure == "drop"):  # here nothing was removed
        return {"neurons": {}, "theta": None, "k": k, "initial": count(sel), "removed": False,
                "score": None if not sel else round(float(s), 4), "checks": checks}
    if not removed:
        threshold = s  # official: refine against the score the largest set reached
    initial = count(sel)
    if cfg.refine:  # layers in reverse order, as the official code (down_mid: the mid block first)
        for n in reversed(list(sel)):  # whole layers back on
            trial = {q: v for q, v in sel.items() if q != n}
            if trial:
                checks += 1
                if score(trial) < threshold:
                    sel = trial
        for n in reversed(list(sel)):  # single neurons back on
            for j in list(sel[n]):
                trial = {q: [i for i in v if not (q == n and i == j)] for q, v in sel.items()}
                trial = {q: v for q, v in trial.items() if v}
                if trial:
                    checks += 1
                    if score(trial) < threshold:
                        sel = trial
    return {"neurons": sel, "theta": theta, "k": k, "initial": initial, "removed": removed,
            "score": round(float(s), 4), "checks": checks}


# ---------------------------------------------------------------------------- the noise check (the paper's)
def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Per item ``(B,)``: the mean SSIM of ``a``, ``b`` ``(B, C, H, W)`` (Wang et al. 2004; Gaussian window
    ``window`` wide, at most the image's size, odd; valid positions only; ``K1 = 0.01``, ``K2 = 0.03``)."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    w = min(window, a.shape[-1], a.shape[-2])
    w -= 1 - w % 2
    g = torch.exp(-((torch.arange(w, dtype=torch.float64) - (w - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    kern = (g[:, None] * g[None, :]).expand(a.shape[1], 1, w, w).to(a)  # (C, 1, w, w)

    def blur(x):
        return F.conv2d(x, kern, groups=a.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def first_step_noise_diff(adapter, prompt: str, seeds: list[int], steps: int = 20) -> torch.Tensor:
    """``(S, C, h, w)``: for each seed's start noise ``x_T`` (as :meth:`sample` draws it), the first DDIM
    step's conditional prediction minus the noise, ``ε_θ(x_T, c) − x_T``, min-max scaled to [0, 1] per
    image and channel (the paper's memorisation signal)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(adapter.scheduler.config)
    ddim.set_timesteps(steps)
    cond = adapter.encode_prompts(adapter.tokenize([prompt]))
    x = torch.stack([torch.randn(adapter.noise_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    x = x.to(adapter.device, cond.dtype) * ddim.init_noise_sigma  # (S, C, h, w)
    t = torch.full((len(seeds),), int(ddim.timesteps[0]), device=adapter.device, dtype=torch.long)
    d = (adapter.noise_pred(x, t, cond.expand(len(seeds), *cond.shape[1:])) - x).float()
    lo, hi = d.amin(dim=(2, 3), keepdim=True), d.amax(dim=(2, 3), keepdim=True)
    return (d - lo) / (hi - lo).clamp_min(1e-12)


def max_pairwise_ssim(d: torch.Tensor) -> torch.Tensor:
    """``(S,)``: for each seed the highest SSIM of its noise difference with another seed's."""
    n = d.shape[0]
    i, j = torch.triu_indices(n, n, 1)
    s = ssim(d[i], d[j])
    best = torch.full((n,), -math.inf)
    for a, b, v in zip(i.tolist(), j.tolist(), s.tolist()):
        best[a], best[b] = max(best[a], v), max(best[b], v)
    return best


# ---------------------------------------------------------------------------- the sample check
def near_copy_similarity(images: np.ndarray, target: np.ndarray, judge=None) -> np.ndarray:
    """``(N,)`` cosine similarities of N uint8 images ``(N, S, S, 3)`` to one training image ``(S, S, 3)``:
    of the mean-centred pixels, or of the judge's penultimate features when ``judge`` is given."""
    if judge is not None:
        f = torch.as_tensor(np.asarray(judge.features(np.concatenate([images, target[None]])))).float()
    else:
        f = torch.as_tensor(np.concatenate([images, target[None]])).float().reshape(len(images) + 1, -1) / 255.0
        f = f - f.mean(1, keepdim=True)
    f = torch.nn.functional.normalize(f, dim=1)
    return (f[:-1] @ f[-1]).numpy()


def memorisation_score(adapter, prompt: str, image: np.ndarray, seeds: list[int], steps: int = 20,
                       guidance: float = 3.0, judge=None, statistic: str = "max") -> float:
    """Max (``statistic="max"``) or mean over ``seeds`` of the near-copy similarity of the prompt's
    generations to its training image."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r}: must be one of {', '.join(STATISTICS)}")
    imgs = adapter.sample([prompt] * len(seeds), seed=list(seeds), steps=steps, guidance=guidance)
    sims = near_copy_similarity(imgs, image, judge)
    return float(sims.max() if statistic == "max" else sims.mean())


def load_memorised(path: str | Path) -> tuple[list[str], np.ndarray]:
    """``(captions, images uint8 (N, S, S, 3))`` from a directory written by ``scripts/memorisation.py``."""
    from safetensors.numpy import load_file

    p = Path(path)
    if not (p / MEMORISED_JSON).is_file() or not (p / MEMORISED_IMAGES).is_file():
        raise ValueError(f"nemo.memorised={str(path)!r}: needs {MEMORISED_JSON} and {MEMORISED_IMAGES} there "
                         "(python scripts/memorisation.py writes them)")
    caps = json.loads((p / MEMORISED_JSON).read_text())["captions"]
    imgs = load_file(str(p / MEMORISED_IMAGES))["images"]
    if len(caps) != len(imgs):
        raise ValueError(f"{p / MEMORISED_JSON} has {len(caps)} captions but {p / MEMORISED_IMAGES} {len(imgs)} images")
    return list(caps), imgs


def reference_captions(data, n: int, exclude: set[str]) -> list[str]:
    """Up to ``n`` distinct ordinary captions of the data (training renders' captions, every phrasing)."""
    items = list(getattr(data, "retain", []) or []) + list(getattr(data, "forget", []) or [])
    caps = [c for c in dict.fromkeys(it["caption"] for it in items) if c not in exclude]
    if len(caps) < 2:
        raise ValueError("nemo needs at least 2 ordinary (non-memorised) captions in the data for μ and σ")
    step = max(1, len(caps) // n)
    return caps[::step][:n]


# ---------------------------------------------------------------------------- the editor
def prompt_check(adapter, caption: str, image: np.ndarray, cfg: NeMoConfig, judge=None) -> tuple[dict, Callable]:
    """The memorisation check of one prompt -> ``(record, score)``: ``record["memorised"]`` and its
    numbers; ``score(neurons)`` is the score with those neurons masked (removed when below
    ``cfg.removed_below``)."""
    seeds = list(range(cfg.seeds))
    if cfg.check == "sample":
        def sample_score(neurons, seeds=seeds):
            with mask_value_neurons(adapter, neurons):
                return memorisation_score(adapter, caption, image, seeds, cfg.sample_steps, cfg.guidance, judge,
                                          cfg.statistic)

        s0 = sample_score({})
        return {"memorised": s0 >= cfg.threshold, "score": round(s0, 4)}, sample_score
    d0 = first_step_noise_diff(adapter, caption, seeds, cfg.sample_steps)
    pair = max_pairwise_ssim(d0)
    keep = pair > cfg.ssim_threshold  # the seeds whose first-step prediction is memorised
    rec = {"memorised": bool(keep.any()), "pairwise_ssim": round(float(pair.max()), 4),
           "memorised_seeds": int(keep.sum())}
    mem_seeds = [s for s, k in zip(seeds, keep.tolist()) if k]

    def noise_score(neurons):
        with mask_value_neurons(adapter, neurons):
            d = first_step_noise_diff(adapter, caption, mem_seeds, cfg.sample_steps)
        return float(ssim(d0[keep], d).max())

    return rec, noise_score


def find_memorisation_neurons(adapter, captions: list[str], images: np.ndarray, reference: list[str],
                              cfg: NeMoConfig, judge=None) -> dict:
    """Run NeMo's search for every memorised caption -> ``{"per_prompt": [...], "neurons": union}``."""
    acts = value_activations(adapter, captions, layers=cfg.layers, tokens=cfg.tokens)
    z_all = z_scores(acts, value_activations(adapter, reference, layers=cfg.layers, tokens=cfg.tokens))
    per, union = [], {}
    for i, (cap, img) in enumerate(zip(captions, images)):
        rec, score = prompt_check(adapter, cap, img, cfg, judge)
        rec = {"caption": cap, **rec}
        if not rec["memorised"]:
            per.append(rec)
            continue
        r = search_neurons({n: z[i] for n, z in z_all.items()}, {n: a[i] for n, a in acts.items()}, score, cfg)
        per.append({**rec, **r})
        for n, idx in r["neurons"].items():
            union[n] = sorted(set(union.get(n, [])) | set(idx))
    return {"per_prompt": per, "neurons": union}


class NeMo(Editor):
    """NeMo as an editor: finds the memorisation neurons of the captions in ``memorised`` and zeroes
    their rows of ``attn2.to_v`` in place (nothing else changes)."""

    name = "nemo"
    full_parameters = "it reads the activations of the cross-attention value layers and zeroes rows of their weights"
    Config = NeMoConfig
    paper = PAPER
    modalities = ("image",)

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        cfg = self.config
        if not isinstance(adapter, ImageModel):
            raise ValueError("nemo edits text-to-image diffusion models (use an ImageAdapter)")
        if not cfg.memorised:
            raise ValueError("nemo.memorised is empty: name the directory with memorised.json and "
                             "memorised.safetensors (python scripts/memorisation.py writes one)")
        captions, images = load_memorised(cfg.memorised)
        judge = getattr(data, "judge", None) if cfg.similarity == "judge" else None
        if cfg.check == "sample" and cfg.similarity == "judge" and judge is None:
            raise ValueError("nemo.similarity=judge but the data carries no judge; use similarity: pixel")
        t0 = time.perf_counter()
        ref = reference_captions(data, cfg.reference_prompts, set(captions))
        found = find_memorisation_neurons(adapter, captions, images, ref, cfg, judge)
        edited = deactivate(adapter, found["neurons"])
        secs = time.perf_counter() - t0
        n = count(found["neurons"])
        info = {"neurons": found["neurons"], "n_neurons": n, "per_prompt": found["per_prompt"], "edited": edited,
                "reference_prompts": len(ref), "edit_seconds": round(secs, 3),
                "headline": f"NeMo: {n} value neurons deactivated for {len(captions)} memorised prompts "
                            f"in {secs:.1f} s"}
        return EditResult(adapter=adapter, info=info)


__all__ = ["NeMo", "NeMoConfig", "PAPER", "candidates", "deactivate", "find_memorisation_neurons",
           "first_step_noise_diff", "load_memorised", "mask_value_neurons", "max_pairwise_ssim", "memorisation_score",
           "near_copy_similarity", "outliers", "prompt_check", "search_neurons", "ssim", "value_activations",
           "value_layers", "z_scores"]
