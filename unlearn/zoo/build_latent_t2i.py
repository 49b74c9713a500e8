"""Build the latent tiny text-to-image family ``tiny-latent-t2i``: ``vae``-encoded ``target`` and ``judge``.

Stable Diffusion's recipe at toy size (Rombach et al., 2022, *High-Resolution Image Synthesis
with Latent Diffusion Models*, arXiv:2112.10752), in two stages:

1. **VAE** (diffusers ``AutoencoderKL``, two blocks, so a factor 2: 16 x 16 x 3 renders <->
   8 x 8 x 4 latents) trained on the visual world's distinct training renders with
   ``L = mean |D(z) − x| + β · KL(q(z|x) ‖ N(0, I))``, ``z ~ q(z|x)`` (β = 1e-6 as in the LDM
   KL-autoencoders; their perceptual and adversarial terms are left out: flat 16 x 16 renders
   need neither). Then, as in SD, ``scaling_factor = 1 / std(E(x).mean)`` over the training
   renders, so the latents the UNet sees have unit variance.
2. **target**: the tiny UNet (:func:`~unlearn.zoo.image_models.build_tiny_t2i` with the VAE: 4
   latent channels, sample size 8) + CLIP text encoder trained by
   :func:`~unlearn.zoo.build_t2i.build_t2i_family` exactly as tiny-t2i's, but on latents
   (``x0 = (E(x).mean − shift) · scaling_factor``); the VAE is frozen. Samples are decoded by
   the VAE and read by the family's judge (the same judge CNN as tiny-t2i's, retrained here with
   the same seed).

The target is saved as a diffusers pipeline directory (``model_index.json``, ``vae/``, ``unet/``,
...): the latent code path of :class:`~unlearn.adapters.image.ImageAdapter` (the one real SD
checkpoints take) loads it, so every image method and attack is measured on a latent model that
really knows the concepts. ``python -m unlearn.zoo.build_latent_t2i OUT`` rebuilds it
(single-threaded, fixed seeds; the shipped family trained its UNet in two stages,
:data:`SHIPPED_STAGES`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unlearn.adapters.image import images_to_tensor, tensor_to_images
from unlearn.tasks.visual_world import VisualWorldConfig, build_visual_world
from unlearn.zoo.build_t2i import T2IBuildSpec, build_t2i_family
from unlearn.zoo.image_models import TinyT2ISpec

FAMILY = "tiny-latent-t2i"


@dataclass
class VAESpec:
    """The tiny KL-autoencoder and how it is trained (recorded in the family's manifest)."""

    block_out_channels: tuple[int, ...] = (32, 64)  # two blocks: a factor 2
    latent_channels: int = 4
    layers_per_block: int = 1
    steps: int = 2500
    batch_size: int = 32
    lr: float = 2e-3  # peak of a cosine decay to 5 %
    kl_weight: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if any(c % 8 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={self.block_out_channels}: multiples of 8 (GroupNorm, 8 groups)")


def build_vae(spec: VAESpec, image_size: int):
    """A freshly initialised ``AutoencoderKL`` (deterministic from ``spec.seed``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(spec.seed)
    n = len(spec.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=spec.block_out_channels,
                         layers_per_block=spec.layers_per_block, latent_channels=spec.latent_channels,
                         norm_num_groups=8, sample_size=image_size)


def train_vae(images: torch.Tensor, spec: VAESpec, progress: bool = True):
    """Train a VAE on ``images`` ``(N, 3, S, S)`` in [-1, 1]; returns ``(vae, log)``.

    The VAE's ``scaling_factor`` is set to ``1 / std`` of the latent means of ``images``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, S, S), got {tuple(images.shape)}")
    vae = build_vae(spec, images.shape[-1])
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed)
    log, run = [], 0.0
    vae.train()
    for step in tqdm(range(spec.steps), desc="vae", mininterval=10, disable=not progress):
        for group in opt.param_groups:
            group["lr"] = spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / spec.steps)))
        x = images[torch.randint(0, len(images), (spec.batch_size,), generator=g)]  # (B, 3, S, S)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample  # (B, 3, S, S)
        loss = (rec - x).abs().mean() + spec.kl_weight * post.kl().mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"VAE training: loss is {loss.item()} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run += float(loss.detach())
        if (step + 1) % 500 == 0 or step + 1 == spec.steps:
            log.append({"step": step + 1, "loss": run / (500 if (step + 1) % 500 == 0 else (step + 1) % 500)})
            run = 0.0
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i: i + 128]).latent_dist.mean for i in range(0, len(images), 128)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.requires_grad_(False)
    return vae, log


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """``D(E(x).mean)`` for ``(N, 3, S, S)`` images in [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(images[i: i + 128]).latent_dist.mean).sample
                      for i in range(0, len(images), 128)])


def build_latent_t2i_family(out_dir: str | Path, vae_spec: VAESpec | None = None, spec: T2IBuildSpec | None = None,
                            continue_from: str | Path | None = None) -> dict:
    """Train the VAE, then ``judge`` and the latent ``target`` into ``out_dir``; returns the manifest.

    ``continue_from``: a finished build directory: its VAE, judge and target are kept and the
    target's UNet and text encoder train ``spec.steps`` more steps (a new warm-up + cosine stage,
    see :func:`~unlearn.zoo.build_t2i.build_t2i_family`)."""
    from unlearn.evaluators.image_judge import JudgeConfig, judge_accuracy, train_judge

    vae_spec = vae_spec or VAESpec()
    spec = spec or T2IBuildSpec(model=TinyT2ISpec(block_out_channels=(32, 64)), steps=4000, family=FAMILY)
    spec.family = FAMILY
    torch.set_num_threads(spec.threads)
    if continue_from is not None:
        prev = json.loads((Path(continue_from) / "manifest.json").read_text())
        return build_t2i_family(out_dir, spec, continue_from=continue_from, extra_manifest={"vae": prev["vae"]})
    world = build_visual_world(spec.world)
    train, holdout = world.split("train"), world.split("holdout")
    x = images_to_tensor([it["image"] for it in train])
    distinct = torch.unique(x.reshape(len(x), -1), dim=0).reshape(-1, *x.shape[1:])  # (N, 3, S, S)
    t0 = time.time()
    vae, vae_log = train_vae(distinct, vae_spec)
    vae_seconds = time.time() - t0
    judge, _ = train_judge(train, JudgeConfig(epochs=spec.judge_epochs, seed=spec.seed))
    rec = tensor_to_images(reconstruct(vae, images_to_tensor([it["image"] for it in holdout])))
    rec_acc = judge_accuracy(judge, [dict(it, image=im) for it, im in zip(holdout, rec)])
    tqdm.write(json.dumps({"vae_seconds": round(vae_seconds, 1), "reconstruction_judge_accuracy": rec_acc}))
    extra = {"vae": {"spec": asdict(vae_spec), "log": vae_log, "seconds": round(vae_seconds, 1),
                     "scaling_factor": vae.config.scaling_factor, "parameters": sum(p.numel() for p in vae.parameters()),
                     "holdout_reconstruction_judge_accuracy": rec_acc}}
    extra = json.loads(json.dumps(extra))  # as the manifest file holds it (lists, not tuples)
    # build_t2i_family trains (and saves) the same judge again: same seed, same data
    man = build_t2i_family(out_dir, spec, vae=vae, extra_manifest=extra)
    man["build_seconds"] = round(man["build_seconds"] + vae_seconds, 1)  # the VAE stage counts too
    (Path(out_dir) / "manifest.json").write_text(json.dumps(man, indent=1))
    return man


# UNet steps of the shipped family's stages: each a warm-up + cosine schedule continuing the last
SHIPPED_STAGES = (4000, 6000)


def build_latent_t2i_zoo(out_dir: str | Path, stages: tuple[int, ...] = SHIPPED_STAGES, vae_steps: int = VAESpec.steps,
                         threads: int = 1, eval_every: int = 500) -> dict:
    """Rebuild the shipped tiny-latent-t2i family into ``out_dir`` (``unlearn zoo build tiny-latent-t2i``):
    stage k (k < last) goes to ``out_dir/stage<k>``, the last to ``out_dir``."""
    out_dir, prev, man = Path(out_dir), None, {}
    for k, steps in enumerate(stages):
        target = out_dir if k == len(stages) - 1 else out_dir / f"stage{k + 1}"
        s = T2IBuildSpec(model=TinyT2ISpec(block_out_channels=(32, 64)), steps=steps, threads=threads,
                         eval_every=eval_every, family=FAMILY, world=VisualWorldConfig())
        man = build_latent_t2i_family(target, VAESpec(steps=vae_steps), s, continue_from=prev)
        prev = target
    return man


if __name__ == "__main__":  # python -m unlearn.zoo.build_latent_t2i OUT [--steps N] [--vae-steps N]
    import argparse

    ap = argparse.ArgumentParser(description="build the tiny-latent-t2i zoo family")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, nargs="+", default=list(SHIPPED_STAGES),
                    help="UNet training steps of each stage (each a warm-up + cosine schedule)")
    ap.add_argument("--continue-from", default=None, help="a finished build: train its target --steps more")
    ap.add_argument("--vae-steps", type=int, default=VAESpec.steps)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=500)
    a = ap.parse_args()
    if a.continue_from:
        s = T2IBuildSpec(model=TinyT2ISpec(block_out_channels=(32, 64)), steps=a.steps[0], threads=a.threads,
                         eval_every=a.eval_every, family=FAMILY, world=VisualWorldConfig())
        m = build_latent_t2i_family(a.out, spec=s, continue_from=a.continue_from)
    else:
        m = build_latent_t2i_zoo(a.out, tuple(a.steps), a.vae_steps, a.threads, a.eval_every)
    print(json.dumps({"vae": {k: v for k, v in m["vae"].items() if k != "log"}, **m["models"]}, indent=1))
