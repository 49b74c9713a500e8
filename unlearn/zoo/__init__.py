"""The tiny model zoo: small models trained on the synthetic worlds, shipped with the package.

Names look like ``tiny-llama/target``; recipes write them as ``zoo:tiny-llama/target``.
Look-up order: ``$UNLEARN_ZOO_DIR``, the checkpoints shipped in the package
(``unlearn/zoo/assets``), then the user cache (``~/.cache/unlearn/zoo``) where
``unlearn zoo build`` writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from unlearn.registry import did_you_mean

ASSETS = Path(__file__).parent / "assets"

FAMILIES = {
    "tiny-llama": {
        "description": "Llama-family causal LM (~1.6M params) on the TOFU-style world: "
                       "target (all 200 authors) and retain90/95/99 (without forget10/05/01).",
        "models": ["target", "retain90", "retain95", "retain99"],
    },
    "tiny-moe": {
        "description": "Mixtral-style mixture-of-experts causal LM (8 experts, top-2, ~2.5M params) on the same world, "
                       "tiny-llama's tokenizer: target and retain90.",
        "models": ["target", "retain90"],
    },
    "tiny-reader": {
        "description": "tiny-llama's target and retain90 continued with a reading stage (answering from a "
                       "'Context: ...' prompt about fresh authors): the zoo on which the in_context attack can bite.",
        "models": ["target", "retain90"],
    },
    "tiny-passages": {
        "description": "Llama-family causal LM (~1.6M params) on the passages world (rwku / muse tasks): target "
                       "(all 60 known entities) and retain (without the 10 targets).",
        "models": ["target", "retain"],
        "build": "python -m unlearn.zoo.build_passages",
    },
    "tiny-t2i": {
        "description": "text-to-image: pixel-space UNet (~0.8M params) + CLIP text encoder on the I2P-style visual "
                       "world (16x16 images), and the judge CNN that scores its generations.",
        "models": ["target", "judge"],
    },
    "tiny-latent-t2i": {
        "description": "text-to-image, latent: Stable Diffusion's layout at toy size (a KL-VAE with factor 2, a UNet "
                       "on 8x8x4 latents, CLIP text encoder; saved as a diffusers pipeline directory) on the same "
                       "visual world, and its judge.",
        "models": ["target", "judge"],
    },
}

# a directory holds a zoo model when one of these files is in it
_MARKERS = ("config.json", "image_adapter.json", "judge.json")


def cache_dir() -> Path:
    return Path(os.environ.get("UNLEARN_CACHE", Path.home() / ".cache" / "unlearn"))


def _roots() -> list[Path]:
    roots = []
    if os.environ.get("UNLEARN_ZOO_DIR"):
        roots.append(Path(os.environ["UNLEARN_ZOO_DIR"]))
    return roots + [ASSETS, cache_dir() / "zoo"]


def available() -> dict[str, Path]:
    """Zoo models found on this machine: ``{"tiny-llama/target": path, ...}``."""
    out: dict[str, Path] = {}
    for root in _roots():
        for fam, info in FAMILIES.items():
            for m in info["models"]:
                p = root / fam / m
                if f"{fam}/{m}" not in out and any((p / f).exists() for f in _MARKERS):
                    out[f"{fam}/{m}"] = p
    return out


def zoo_path(name: str) -> Path:
    """Directory of a zoo model; a clear error names the known models and how to build them."""
    fam, _, model = name.partition("/")
    if fam not in FAMILIES or model not in FAMILIES[fam]["models"]:
        known = [f"{f}/{m}" for f, i in FAMILIES.items() for m in i["models"]]
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(known)}" + did_you_mean(name, known))
    found = available()
    if name not in found:
        raise ValueError(f"zoo model {name!r} is not on this machine; build it with "
                         f"`{FAMILIES[fam].get('build', 'unlearn zoo build ' + fam)}`")
    return found[name]


def entries() -> list[dict]:
    """Every zoo model, built or not: ``{"name": "zoo:<family>/<model>", "family", "model",
    "path" (None when not built), "build" (the command that builds its family)}``."""
    found = available()
    return [{"name": f"zoo:{fam}/{m}", "family": fam, "model": m,
             "path": str(found[f"{fam}/{m}"]) if f"{fam}/{m}" in found else None,
             "build": info.get("build", f"unlearn zoo build {fam}")}
            for fam, info in FAMILIES.items() for m in info["models"]]


def listing_lines() -> list[str]:
    """What ``unlearn zoo list`` prints: each family and its description, then its models and
    where they are (or the command that builds them)."""
    lines: list[str] = []
    by_family: dict[str, list[dict]] = {}
    for e in entries():
        by_family.setdefault(e["family"], []).append(e)
    for fam, info in FAMILIES.items():
        lines.append(f"{fam}: {info['description']}")
        for e in by_family[fam]:
            lines.append(f"  zoo:{fam}/{e['model']:<10} {e['path'] if e['path'] else '(not built: ' + e['build'] + ')'}")
    return lines


def manifest(family: str = "tiny-llama") -> dict | None:
    for root in _roots():
        p = root / family / "manifest.json"
        if p.exists():
            return json.loads(p.read_text())
    return None
