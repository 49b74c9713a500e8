"""SalUn's random-label objective for text-to-image diffusion models.

Loss (Fan et al., 2024, "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency
in Both Image Classification and Generation", arXiv:2310.12508; ../shared/DIFFUSION.md):

    L = MSE(ε_θ(x_t, c_f, t), sg ε_θ(x_t, c', t)) + α · MSE(ε_θ(x_r,t, c_r, t), ε)

* ``x_t``: a forget image noised at the batch's timesteps; ``c_f`` its own caption; ``c'`` the
  caption of a randomly drawn item of the retain batch (another concept: the forget image gets a
  random other label, and the model learns to draw what it draws for that label);
* the second term is the plain denoising (DDPM) loss on the retain batch.

Pair it with the saliency mask, ``method.selection: {name: salun, params: {fraction: 0.5}}``
(:mod:`unlearn.selection`), for SalUn as published; any other selection works too.
Defaults: α 0.5 (the paper's image-generation setting).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from unlearn.objectives.base import Objective, ObjectiveConfig, mean_token_nll


@dataclass
class SalUnConfig(ObjectiveConfig):
    alpha: float = field(default=0.5, metadata={"help": "weight of the retain denoising loss"})

    def __post_init__(self):
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha}: must be >= 0")


def noised(adapter, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(x_t (B*K, C, h, w), t (B*K,), K)`` of an image batch (its own noise and timesteps)."""
    x0 = adapter.encode_images(batch["pixel_values"])  # (B, C, h, w)
    noise, ts = batch["noise"].to(adapter.device), batch["timesteps"].to(adapter.device)  # (B, K, C, h, w), (B, K)
    b, k = ts.shape
    x0k = x0.unsqueeze(1).expand(b, k, *x0.shape[1:]).reshape(b * k, *x0.shape[1:])
    tk = ts.reshape(b * k)
    return adapter.scheduler.add_noise(x0k, noise.reshape(b * k, *x0.shape[1:]).to(x0.dtype), tk), tk, k


class SalUn(Objective):
    """SalUn's random-label loss on the forget images plus α · the retain denoising loss."""

    name = "salun"
    modalities = ("image",)
    Config = SalUnConfig
    paper = ("Fan et al., 2024, SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both "
             "Image Classification and Generation (arXiv:2310.12508)")

    def needs_retain(self):
        return True  # the random labels are the retain batch's captions

    def setup(self, adapter, reference, forget_items):
        self._gen = torch.Generator().manual_seed(0)

    def loss(self, adapter, forget, retain):
        if retain is None:
            raise ValueError("salun draws its random labels from the retain batch: name task.retain_split")
        x_t, t, k = noised(adapter, forget)  # (B*K, C, h, w)
        b = forget["input_ids"].shape[0]
        pick = torch.randint(0, retain["input_ids"].shape[0], (b,), generator=self._gen)
        cond_f = adapter.encode_prompts(forget["input_ids"]).repeat_interleave(k, dim=0)
        with torch.no_grad():
            cond_r = adapter.encode_prompts(retain["input_ids"][pick]).repeat_interleave(k, dim=0)
            target = adapter.noise_pred(x_t, t, cond_r)  # sg ε_θ(x_t, c', t)
        f = F.mse_loss(adapter.noise_pred(x_t, t, cond_f).float(), target.float())
        loss, logs = f, {"forget_random_label_mse": f.item()}
        if self.config.alpha > 0:
            r = mean_token_nll(adapter, retain)
            loss = loss + self.config.alpha * r
            logs["retain_mse"] = r.item()
        return loss, logs


__all__ = ["SalUn", "SalUnConfig"]
