"""The visual world's judge: a small CNN that reads shape, colour and texture off an image.

Concept-erasure papers score generations with an external classifier (NudeNet for nudity,
a ResNet-50 for objects, a style classifier for artists; see DIFFUSION.md "Metrics"). For the
synthetic visual world the toolkit trains its own: a 3-layer CNN with one linear head per
attribute, trained deterministically on the world's training renders and scored on its
held-out renders (never seen in training). Its penultimate features (``features``, ``(B, F)``)
define the Fréchet distance that stands in for FID (:func:`frechet_distance`), and agreement
of its predicted attributes with a prompt's attributes stands in for CLIP score.

Weights are stored as safetensors + a JSON config (:meth:`ImageJudge.save` / :meth:`ImageJudge.load`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.tasks.visual_world import ATTRIBUTES

JUDGE_VERSION = "1"


@dataclass
class JudgeConfig:
    """Training settings of the judge."""

    width: int = field(default=16, metadata={"help": "channels of the first conv layer (x2 per later layer)"})
    epochs: int = field(default=100, metadata={"help": "passes over the training renders"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=64, metadata={"help": "renders per step"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and shuffling"})

    def __post_init__(self) -> None:
        if self.width < 1 or self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"judge config {asdict(self)}: width, epochs, batch_size must be >= 1 and lr > 0")


class ImageJudge(torch.nn.Module):
    """CNN: uint8 images ``(B, H, W, 3)`` -> features ``(B, 4*width)`` -> one logit vector per attribute.

    Attributes and label order: ``ATTRIBUTES`` of the visual world (shape, colour, texture).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        w = width
        self.convs = torch.nn.ModuleList([
            torch.nn.Conv2d(3, w, 3, padding=1), torch.nn.Conv2d(w, 2 * w, 3, padding=1),
            torch.nn.Conv2d(2 * w, 4 * w, 3, padding=1)])
        self.proj = torch.nn.Linear(8 * w, 4 * w)  # pooled (mean, max) conv features -> penultimate features
        self.heads = torch.nn.ModuleDict({a: torch.nn.Linear(4 * w, len(v)) for a, v in ATTRIBUTES.items()})

    @staticmethod
    def to_input(images) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [0, 1]."""
        arr = np.stack([np.asarray(im) for im in images]) if isinstance(images, (list, tuple)) else np.asarray(images)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"judge input must be uint8 (B, H, W, 3) images, got shape {arr.shape}")
        return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()

    def features_from_tensor(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i < len(self.convs) - 1:
                x = F.max_pool2d(x, 2)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)  # (B, 8*width)
        return F.relu(self.proj(pooled))  # (B, 4*width)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features_from_tensor(x)  # (B, 4*width)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """Penultimate features ``(B, 4*width)`` (float64) of uint8 images: the FID-like space."""
        self.eval()
        return self.features_from_tensor(self.to_input(images)).double().numpy()

    @torch.no_grad()
    def predict(self, images) -> dict[str, list[str]]:
        """Predicted value per attribute: ``{"shape": [...], "colour": [...], "texture": [...]}``."""
        self.eval()
        out = self(self.to_input(images))
        return {a: [ATTRIBUTES[a][i] for i in out[a].argmax(-1).tolist()] for a in out}

    def save(self, path: str | Path) -> None:
        """``judge.safetensors`` + ``judge.json`` ({"width", "version"}) in directory ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "judge.safetensors"))
        (path / "judge.json").write_text(json.dumps({"width": self.width, "version": JUDGE_VERSION,
                                                     "attributes": {a: list(v) for a, v in ATTRIBUTES.items()}}))

    @classmethod
    def load(cls, path: str | Path) -> "ImageJudge":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "judge.json").is_file() or not (path / "judge.safetensors").is_file():
            raise ValueError(f"{path} holds no judge (judge.json + judge.safetensors); train one with train_judge")
        meta = json.loads((path / "judge.json").read_text())
        if meta.get("attributes") != {a: list(v) for a, v in ATTRIBUTES.items()}:
            raise ValueError(f"{path}/judge.json was trained on other attribute values than this visual world's")
        judge = cls(width=int(meta["width"]))
        judge.load_state_dict(load_file(str(path / "judge.safetensors")))
        judge.eval()
        return judge


def unique_renders(items: list[dict]) -> list[dict]:
    """One item per distinct render (items repeat each render once per caption phrasing)."""
    seen, out = set(), []
    for it in items:
        if it["image_seed"] not in seen:
            seen.add(it["image_seed"])
            out.append(it)
    return out


def _labels(items: list[dict]) -> dict[str, torch.Tensor]:
    return {a: torch.tensor([ATTRIBUTES[a].index(it[a]) for it in items]) for a in ATTRIBUTES}


def train_judge(items: list[dict], config: JudgeConfig | None = None) -> tuple[ImageJudge, list[float]]:
    """Train a judge on world items (deduplicated by render). Returns ``(judge, per-epoch mean loss)``.

    Loss: sum over attributes of the cross-entropy of that attribute's head.
    """
    cfg = config or JudgeConfig()
    renders = unique_renders(items)
    if not renders:
        raise ValueError("train_judge got no items; pass world.split('train')")
    torch.manual_seed(cfg.seed)
    judge = ImageJudge(cfg.width)
    x = ImageJudge.to_input([it["image"] for it in renders])  # (N, 3, H, W)
    y = _labels(renders)
    opt = torch.optim.Adam(judge.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    log = []
    judge.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(renders), generator=g)
        tot = 0.0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s: s + cfg.batch_size]
            out = judge(x[idx])
            loss = sum(F.cross_entropy(out[a], y[a][idx]) for a in ATTRIBUTES)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        log.append(tot / len(renders))
    judge.eval()
    return judge, log


def judge_accuracy(judge: ImageJudge, items: list[dict]) -> dict[str, float]:
    """Accuracy per attribute and ``all`` (every attribute right) on the distinct renders of ``items``."""
    renders = unique_renders(items)
    if not renders:
        raise ValueError("judge_accuracy got no items")
    pred = judge.predict([it["image"] for it in renders])
    acc = {a: float(np.mean([p == it[a] for p, it in zip(pred[a], renders)])) for a in ATTRIBUTES}
    acc["all"] = float(np.mean([all(pred[a][i] == it[a] for a in ATTRIBUTES) for i, it in enumerate(renders)]))
    return acc


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, F)``, ``(M, F)``:
    ``‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2})`` (FID's formula; ``eps``
    is added to the diagonals for stability with few samples)."""
    a, b = np.asarray(feat_a, dtype=np.float64), np.asarray(feat_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"feature sets must be (N>=2, F) with the same F, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = eps * np.eye(a.shape[1])
    sa, sb = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    wa, va = np.linalg.eigh(sa)
    sqrt_a = (va * np.sqrt(np.clip(wa, 0, None))) @ va.T  # Σ_a^{1/2}
    m = sqrt_a @ sb @ sqrt_a
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)
