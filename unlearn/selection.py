"""Parameter selection: *what* is trained, separate from the objective (any combines with any).

* ``full``  -- every parameter.
* ``lora``  -- LoRA adapters via ``peft`` on ``target_modules``; merged into the weights on save.
* ``regex`` -- only parameters whose name matches ``pattern`` (``re.search``); all others frozen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

SELECTIONS = ("full", "lora", "regex")

_LORA_KEYS = {"r": int, "alpha": (int, float), "dropout": (int, float), "target_modules": (list, str)}


@dataclass
class SelectionInfo:
    name: str
    trainable: int
    total: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.trainable / max(1, self.total)

    def to_dict(self) -> dict:
        return {"name": self.name, "trainable": self.trainable, "total": self.total,
                "fraction": round(self.fraction, 6), "params": self.params}


def validate_selection(name: str, params: dict[str, Any], path: str = "method.selection") -> None:
    """Raise ValueError naming the bad key for an invalid selection spec."""
    if name not in SELECTIONS:
        raise ValueError(f"{path}.name {name!r} is unknown; allowed: {', '.join(SELECTIONS)}")
    if name == "full" and params:
        raise ValueError(f"{path}.params must be empty for 'full', got keys {sorted(params)}")
    if name == "regex":
        extra = set(params) - {"pattern"}
        if extra:
            raise ValueError(f"{path}.params.{sorted(extra)[0]} is unknown for 'regex'; allowed: pattern")
        if not isinstance(params.get("pattern"), str) or not params["pattern"]:
            raise ValueError(f"{path}.params.pattern is required for 'regex' (a regular expression over parameter names)")
        try:
            re.compile(params["pattern"])
        except re.error as e:
            raise ValueError(f"{path}.params.pattern {params['pattern']!r} is not a valid regex: {e}") from None
    if name == "lora":
        for k, v in params.items():
            if k not in _LORA_KEYS:
                raise ValueError(f"{path}.params.{k} is unknown for 'lora'; allowed: {', '.join(_LORA_KEYS)}")
            if isinstance(v, bool) or not isinstance(v, _LORA_KEYS[k]):
                raise ValueError(f"{path}.params.{k} has the wrong type ({type(v).__name__})")


def _count(model) -> tuple[int, int]:
    tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return tr, sum(p.numel() for p in model.parameters())


def apply_selection(adapter, name: str = "full", params: dict[str, Any] | None = None) -> SelectionInfo:
    """Make only the selected parameters trainable (wrapping the model for LoRA)."""
    params = dict(params or {})
    validate_selection(name, params)
    model = adapter.model
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        total = _count(model)[1]
        return SelectionInfo("full", total, total)
    if name == "regex":
        pat = re.compile(params["pattern"])
        hit = 0
        for n, p in model.named_parameters():
            on = bool(pat.search(n))
            p.requires_grad_(on)
            hit += on
        if not hit:
            names = [n for n, _ in model.named_parameters()][:6]
            raise ValueError(f"method.selection.params.pattern {params['pattern']!r} matches no parameter; names look like {names}")
        tr, total = _count(model)
        return SelectionInfo("regex", tr, total, params)
    from peft import LoraConfig, get_peft_model

    total = _count(model)[1]
    cfg = LoraConfig(r=int(params.get("r", 8)), lora_alpha=float(params.get("alpha", 16)),
                     lora_dropout=float(params.get("dropout", 0.0)),
                     target_modules=params.get("target_modules", "all-linear"), bias="none")
    adapter.model = get_peft_model(model, cfg)
    tr = _count(adapter.model)[0]
    return SelectionInfo("lora", tr, total, {**params, "r": cfg.r})


def finalize_selection(adapter) -> None:
    """Undo wrapping before saving: merge LoRA weights into the base model."""
    from peft import PeftModel

    if isinstance(adapter.model, PeftModel):
        adapter.model = adapter.model.merge_and_unload()
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    adapter.fingerprint(refresh=True)


def changed_parameters(before: dict[str, torch.Tensor], model) -> list[str]:
    """Names of parameters whose values differ from a ``state_dict`` snapshot."""
    after = model.state_dict()
    return [n for n, t in before.items() if n in after and not torch.equal(t, after[n])]
