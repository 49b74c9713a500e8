"""NeMo: find the cross-attention value neurons that carry the memorisation of individual training
images, and deactivate them.

Paper: Hintersdorf, Struppek, Kersting, Dziedzic, Boenisch (2024), "Finding NeMo: Localizing
Neurons Responsible for Memorization in Diffusion Models", NeurIPS 2024, arXiv:2406.02366.

A cross-attention value layer ``W_v`` (``attn2.to_v``, ``(d_out, d)``) sees only the text: for a
prompt with token embeddings ``c_1 .. c_T`` (``d`` each, up to its first EOS) the activation of
neuron ``j`` is

    a_j(p) = mean_t |(W_v c_t)_j|.

With ``μ_j``, ``σ_j`` the mean and standard deviation of ``a_j`` over ordinary (non-memorised)
prompts, neuron ``j`` is an outlier for a memorised prompt ``p`` when its z-score

    z_j(p) = (a_j(p) − μ_j) / σ_j  >  θ.

Per memorised prompt: (1) *initial selection*: θ runs from ``theta_start`` (5) down to
``theta_min`` (1) in ``theta_step`` steps until deactivating every neuron with ``z > θ`` (in all
value layers) removes the memorisation; (2) *refinement*: each layer's neurons are switched back
on as a group, and the group stays on if the memorisation stays removed; then each remaining
neuron alone, likewise. The union over the memorised prompts is deactivated: the neurons' rows of
``W_v`` (and bias entries) are set to zero, which is exactly what masking the neurons' outputs at
inference does (``mask_value_neurons`` gives the masked model without editing it).

Memorisation check: a prompt is memorised when the maximum over ``seeds`` generations of the
near-copy similarity to its training image is at least ``threshold``. Similarity is the cosine of
the mean-centred pixels (``similarity: pixel``), or of the judge's penultimate features
(``judge``, when the data carries a judge): SSCD's role in the paper (threshold 0.7 on SSCD
embeddings there), with the tiny world's own encoders.

Deviations: the paper's fast check during the search compares the first denoising step's noise
predictions across seeds (SSIM); here the check samples and measures the near-copy similarity
directly (cheap at 16 x 16). The paper also adds each layer's top-k absolute activations to the
initial selection; here the z-score alone selects. Reference prompts are the world's captions
instead of LAION prompts.
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

from unlearn.adapters.base import ImageModel
from unlearn.editors.base import EditContext, Editor, EditorConfig, EditResult

PAPER = ("Hintersdorf, Struppek, Kersting, Dziedzic, Boenisch (2024). Finding NeMo: Localizing Neurons Responsible "
         "for Memorization in Diffusion Models. NeurIPS 2024, arXiv:2406.02366")
MEMORISED_JSON = "memorised.json"  # {"captions": [...]} ; images in memorised.safetensors ("images": uint8 (N, S, S, 3))
MEMORISED_IMAGES = "memorised.safetensors"
SIMILARITIES = ("pixel", "judge")
STATISTICS = ("max", "mean")

Neurons = dict[str, list[int]]  # value-layer name -> neuron (output row) indices


@dataclass
class NeMoConfig(EditorConfig):
    """Hyper-parameters of NeMo's search."""

    memorised: str = field(default="", metadata={
        "help": "directory with memorised.json (captions) and memorised.safetensors (their training images)"})
    theta_start: float = field(default=5.0, metadata={"help": "first z-score threshold of the initial selection"})
    theta_min: float = field(default=1.0, metadata={"help": "lowest threshold tried"})
    theta_step: float = field(default=0.5, metadata={"help": "threshold decrement"})
    refine: bool = field(default=True, metadata={"help": "refine the selection (layers, then single neurons)"})
    threshold: float = field(default=0.7, metadata={"help": "near-copy similarity at or above which a prompt is "
                                                            "memorised"})
    seeds: int = field(default=4, metadata={"help": "generations per prompt in the memorisation check (max taken)"})
    sample_steps: int = field(default=20, metadata={"help": "DDIM steps of the check's generations"})
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance of the check's generations"})
    statistic: str = field(default="max", metadata={
        "help": "how the seeds' near-copy similarities combine: max (memorised while any seed draws a near-copy) "
                "or mean (while the seeds draw near-copies on average)"})
    similarity: str = field(default="pixel", metadata={"help": "pixel (cosine of centred pixels) or judge (cosine of "
                                                               "the judge's features)"})
    reference_prompts: int = field(default=256, metadata={"help": "ordinary prompts that give μ and σ"})

    def __post_init__(self) -> None:
        for k in ("theta_start", "theta_step"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"nemo.{k}={v}: must be a finite number > 0")
        if not (math.isfinite(self.theta_min) and self.theta_min >= 0):
            raise ValueError(f"nemo.theta_min={self.theta_min}: must be a finite number >= 0 (0: every neuron above "
                             "its mean activation is a candidate)")
        if self.theta_min > self.theta_start:
            raise ValueError(f"nemo.theta_min={self.theta_min} is above nemo.theta_start={self.theta_start}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"nemo.threshold={self.threshold}: a cosine similarity, between -1 and 1")
        for k in ("seeds", "sample_steps", "reference_prompts"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"nemo.{k}={v!r}: must be an integer >= 1")
        if self.statistic not in STATISTICS:
            raise ValueError(f"nemo.statistic={self.statistic!r}: must be one of {', '.join(STATISTICS)}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"nemo.similarity={self.similarity!r}: must be one of {', '.join(SIMILARITIES)}")


# ---------------------------------------------------------------------------- activations and z-scores
def value_layers(unet) -> dict[str, torch.nn.Linear]:
    """Name -> module of every cross-attention value projection (``attn2.to_v``)."""
    out = {n: m for n, m in unet.named_modules() if n.endswith("attn2.to_v") and isinstance(m, torch.nn.Linear)}
    if not out:
        raise ValueError("the model has no cross-attention value projections named '*attn2.to_v'; NeMo needs a "
                         "diffusers UNet2DConditionModel")
    return out


@torch.no_grad()
def value_activations(adapter, prompts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per value layer ``(P, d_out)``: ``a_j(p) = mean_t |(W_v c_t)_j|`` over each prompt's tokens up to
    and including its first EOS (``c_t``: the cross-attention input, :meth:`token_embeddings`)."""
    layers = value_layers(adapter.unet)
    eos = adapter.tokenizer.eos_token_id
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for s in range(0, len(prompts), batch_size):
        ids = adapter.tokenize(list(prompts[s:s + batch_size]))  # (B, T)
        emb = adapter.token_embeddings(ids).float()  # (B, T, d)
        is_eos = (ids == eos).long()
        keep = ((is_eos.cumsum(-1) - is_eos) == 0).to(emb)  # (B, T): up to and including the first EOS
        for n, lin in layers.items():
            v = (emb @ lin.weight.float().T).abs()  # (B, T, d_out)
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
    """Neurons with ``z > θ`` for one prompt (``z``: per layer ``(d_out,)``)."""
    return {n: [int(j) for j in torch.nonzero(v > theta).flatten()] for n, v in z.items() if bool((v > theta).any())}


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


def search_neurons(z: dict[str, torch.Tensor], is_memorised: Callable[[Neurons], bool], cfg: NeMoConfig) -> dict:
    """NeMo's search for one memorised prompt (z: per layer ``(d_out,)``; ``is_memorised(neurons)``:
    is the prompt still memorised with those neurons deactivated?).

    Returns ``{"neurons", "theta", "initial", "checks"}``; ``neurons`` is empty when no threshold
    down to ``theta_min`` removes the memorisation (``theta`` is then None)."""
    checks = 0
    theta, sel = cfg.theta_start, None
    while theta >= cfg.theta_min - 1e-9:
        cand = outliers(z, theta)
        if cand:
            checks += 1
            if not is_memorised(cand):
                sel = cand
                break
        theta = round(theta - cfg.theta_step, 10)
    if sel is None:
        return {"neurons": {}, "theta": None, "initial": 0, "checks": checks}
    initial = count(sel)
    if cfg.refine:
        for n in list(sel):  # whole layers back on
            trial = {k: v for k, v in sel.items() if k != n}
            if trial:
                checks += 1
                if not is_memorised(trial):
                    sel = trial
        for n in list(sel):  # single neurons back on
            for j in list(sel[n]):
                trial = {k: [i for i in v if not (k == n and i == j)] for k, v in sel.items()}
                trial = {k: v for k, v in trial.items() if v}
                if trial:
                    checks += 1
                    if not is_memorised(trial):
                        sel = trial
    return {"neurons": sel, "theta": theta, "initial": initial, "checks": checks}


# ---------------------------------------------------------------------------- near-copy similarity
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
def find_memorisation_neurons(adapter, captions: list[str], images: np.ndarray, reference: list[str],
                              cfg: NeMoConfig, judge=None) -> dict:
    """Run NeMo's search for every memorised caption -> ``{"per_prompt": [...], "neurons": union}``."""
    z_all = z_scores(value_activations(adapter, captions), value_activations(adapter, reference))
    seeds = list(range(cfg.seeds))
    per, union = [], {}
    for i, (cap, img) in enumerate(zip(captions, images)):
        score0 = memorisation_score(adapter, cap, img, seeds, cfg.sample_steps, cfg.guidance, judge, cfg.statistic)

        def is_mem(neurons, cap=cap, img=img):
            with mask_value_neurons(adapter, neurons):
                return memorisation_score(adapter, cap, img, seeds, cfg.sample_steps, cfg.guidance,
                                          judge, cfg.statistic) >= cfg.threshold

        if score0 < cfg.threshold:
            per.append({"caption": cap, "memorised": False, "score": round(score0, 4)})
            continue
        r = search_neurons({n: z[i] for n, z in z_all.items()}, is_mem, cfg)
        per.append({"caption": cap, "memorised": True, "score": round(score0, 4), "theta": r["theta"],
                    "initial": r["initial"], "neurons": r["neurons"], "checks": r["checks"]})
        for n, idx in r["neurons"].items():
            union[n] = sorted(set(union.get(n, [])) | set(idx))
    return {"per_prompt": per, "neurons": union}


class NeMo(Editor):
    """NeMo as an editor: finds the memorisation neurons of the captions in ``memorised`` and zeroes
    their rows of ``attn2.to_v`` in place (nothing else changes)."""

    name = "nemo"
    full_parameters = "it reads the activations of every cross-attention value layer and zeroes rows of their weights"
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
        if cfg.similarity == "judge" and judge is None:
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


__all__ = ["NeMo", "NeMoConfig", "PAPER", "deactivate", "find_memorisation_neurons", "load_memorised",
           "mask_value_neurons", "memorisation_score", "near_copy_similarity", "outliers", "search_neurons",
           "value_activations", "value_layers", "z_scores"]
