"""Parameter selection: *what* is trained, separate from the objective (any combines with any).

* ``full``  -- every parameter.
* ``lora``  -- LoRA adapters via ``peft`` on ``target_modules``; merged into the weights on save.
* ``regex`` -- only parameters whose name matches ``pattern`` (``re.search``); all others frozen.
* ``columns`` -- only chosen columns of chosen 2-D weights (``{parameter name: [column indices]}``,
  e.g. concept vectors of an MLP down-projection, ConceptVectors' "Needle"), given in
  ``params.columns`` or chosen by the objective (``objective.parameter_columns()``). Each weight
  gets a parametrization ``W -> W + delta`` scattered into its columns; only ``delta``
  (out, n_columns) trains, so no other entry can change (weight decay included); merged on save.
  A column is one of the layer's (out, in) matrix: for a GPT-2 ``Conv1D``, which stores (in, out),
  it is a row of the stored weight.
* ``uoe`` -- one routed expert of a mixture-of-experts model (UOE, Zhuang et al., 2025,
  arXiv:2411.18797): expert ``params.expert``'s FFN in layer ``params.layer`` and that layer's
  router weight; without ``params`` the objective picks them (``objective.expert_target()``).
  The experts of a layer are fused 3-D tensors (transformers >= 5), so the expert gets a
  parametrization ``W -> W + delta`` on its slice ``W[e]`` (only ``delta`` trains); merged on save.
* ``salun`` -- SalUn's weight saliency mask (Fan et al., 2024, arXiv:2310.12508): the gradient of
  the forget loss (the adapter's own per-item loss -- answer NLL, or the denoising loss -- averaged
  over up to ``params.items`` forget items) at the model before training; the top ``fraction`` of
  entries by ``|gradient|``, over all parameters in scope (``params.group`` / ``params.pattern``;
  default every parameter), one global threshold. Each parameter with a kept entry gets a
  parametrization ``W -> W + mask ⊙ delta``; only ``delta`` trains, so no entry outside the mask
  can change (weight decay included); merged on save. Any objective trains through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from unlearn.adapters.base import Adapter
from unlearn.probes.base import stores_transposed
from unlearn.probes.expert_attribution import moe_blocks

SELECTIONS = ("full", "lora", "regex", "columns", "uoe", "group", "salun")

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
    if name == "columns":
        extra = set(params) - {"columns"}
        if extra:
            raise ValueError(f"{path}.params.{sorted(extra)[0]} is unknown for 'columns'; allowed: columns")
        cols = params.get("columns")
        if cols is not None and (not isinstance(cols, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool)
                                                                       and i >= 0 for i in v) for k, v in cols.items())):
            raise ValueError(f"{path}.params.columns must map parameter names to non-empty lists of column indices >= 0, "
                             f"got {cols!r}")
    if name == "uoe":
        extra = set(params) - {"layer", "expert"}
        if extra:
            raise ValueError(f"{path}.params.{sorted(extra)[0]} is unknown for 'uoe'; allowed: layer, expert")
        for k in ("layer", "expert"):
            v = params.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{path}.params.{k} must be an int >= 0, got {v!r}")
        if ("layer" in params) != ("expert" in params):
            raise ValueError(f"{path}.params: give both layer and expert, or neither (the objective picks them)")
    if name == "group":
        extra = set(params) - {"group"}
        if extra:
            raise ValueError(f"{path}.params.{sorted(extra)[0]} is unknown for 'group'; allowed: group")
        if not isinstance(params.get("group"), str) or not params["group"]:
            raise ValueError(f"{path}.params.group is required for 'group' (a parameter group of the adapter, "
                             "e.g. cross_attention)")
    if name == "salun":
        extra = set(params) - {"fraction", "group", "pattern", "items", "batch_size"}
        if extra:
            raise ValueError(f"{path}.params.{sorted(extra)[0]} is unknown for 'salun'; allowed: fraction, group, "
                             "pattern, items, batch_size")
        f = params.get("fraction", 0.5)
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"{path}.params.fraction must be in (0, 1], got {f!r}")
        for k in ("items", "batch_size"):
            v = params.get(k, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{path}.params.{k} must be an int >= 1, got {v!r}")
        if params.get("group") is not None and params.get("pattern") is not None:
            raise ValueError(f"{path}.params: give group or pattern, not both")
    if name == "lora":
        for k, v in params.items():
            if k not in _LORA_KEYS:
                raise ValueError(f"{path}.params.{k} is unknown for 'lora'; allowed: {', '.join(_LORA_KEYS)}")
            if isinstance(v, bool) or not isinstance(v, _LORA_KEYS[k]):
                raise ValueError(f"{path}.params.{k} has the wrong type ({type(v).__name__})")


def _count(model) -> tuple[int, int]:
    tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return tr, sum(p.numel() for p in model.parameters())


class ColumnDelta(torch.nn.Module):
    """Parametrization of a 2-D weight: ``W -> W + delta`` on the columns ``columns``.

    ``delta`` (out, n_columns) starts at zero and is the only trainable tensor; column
    ``columns[i]`` of the effective weight is ``W[:, columns[i]] + delta[:, i]``. With
    ``transposed`` (a weight stored (in, out), GPT-2's ``Conv1D``) the same columns of the
    (out, in) matrix are rows of the stored weight: ``W[columns[i], :] + delta[:, i]``.
    """

    def __init__(self, columns: list[int], rows: int, dtype: torch.dtype, device: torch.device,
                 transposed: bool = False) -> None:
        super().__init__()
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long, device=device))
        self.delta = torch.nn.Parameter(torch.zeros(rows, len(columns), dtype=dtype, device=device))
        self.transposed = bool(transposed)

    def forward(self, W: torch.Tensor) -> torch.Tensor:  # stored shape -> stored shape
        d = self.delta.to(W.dtype)
        return W.index_add(0, self.columns, d.T) if self.transposed else W.index_add(1, self.columns, d)


class ExpertDelta(torch.nn.Module):
    """Parametrization of a fused expert weight (E, a, b): ``W -> W + delta`` on row ``expert``.

    ``delta`` (a, b) starts at zero and is the only trainable tensor, so the other experts'
    slices cannot change."""

    def __init__(self, expert: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("expert", torch.tensor([expert], dtype=torch.long, device=device))
        self.delta = torch.nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))

    def forward(self, W: torch.Tensor) -> torch.Tensor:  # (E, a, b) -> (E, a, b)
        return W.index_add(0, self.expert, self.delta.to(W.dtype).unsqueeze(0))


class MaskedDelta(torch.nn.Module):
    """Parametrization of any parameter: ``W -> W + mask ⊙ delta`` (SalUn's saliency mask).

    ``delta`` (W's shape) starts at zero and is the only trainable tensor; entries where the
    boolean ``mask`` is False never change (their gradient is zero and weight decay on ``delta``
    is multiplied by zero)."""

    def __init__(self, mask: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(dtype))
        self.delta = torch.nn.Parameter(torch.zeros(mask.shape, dtype=dtype, device=mask.device))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + (self.delta * self.mask).to(W.dtype)


def salun_scores(adapter, forget: list[dict], names: list[str], items: int = 64,
                 batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{name: |∂ L_f / ∂ W|}`` for the parameters ``names`` of ``adapter.model``: ``L_f`` the mean
    of the adapter's per-item loss (``item_nll`` per token / timestep) over the first ``items`` forget
    items, in batches of ``batch_size``. Nothing is written to ``.grad``."""
    named = dict(adapter.model.named_parameters())
    params = [named[n] for n in names]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    chunk = forget[:items]
    try:
        for s in range(0, len(chunk), batch_size):
            part = chunk[s:s + batch_size]
            nll, n = adapter.item_nll(adapter.collate(part))
            loss = (nll / n.clamp(min=1)).sum() / len(chunk)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a += g.float()
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    return {n: a.abs() for n, a in zip(names, acc)}


def salun_masks(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly ``round(fraction · N)`` entries (at least 1) of the ``N`` in
    ``scores``: the largest, one global threshold (ties broken by ``torch.topk``)."""
    flat = torch.cat([v.reshape(-1) for v in scores.values()])
    k = max(1, int(round(fraction * flat.numel())))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices.cpu()] = True
    out, i = {}, 0
    for n, v in scores.items():
        out[n] = keep[i:i + v.numel()].reshape(v.shape).to(v.device)
        i += v.numel()
    return out


def _apply_salun(adapter, params: dict[str, Any], forget: list[dict] | None) -> SelectionInfo:
    from torch.nn.utils import parametrize

    if not forget:
        raise ValueError("method.selection 'salun' computes its mask from the forget set's loss gradient, but got no "
                         "forget items (apply_selection(..., forget=data.forget))")
    model = adapter.model
    names = [n for n, _ in model.named_parameters()]
    if params.get("group") is not None:
        if not hasattr(adapter, "parameter_groups"):
            raise ValueError("method.selection.params.group needs an adapter with parameter groups; use pattern")
        groups = adapter.parameter_groups()
        if params["group"] not in groups:
            raise ValueError(f"method.selection.params.group {params['group']!r} is unknown; the adapter has "
                             f"{', '.join(groups)}")
        names = [n for n in names if n in set(groups[params["group"]])]
    elif params.get("pattern") is not None:
        pat = re.compile(params["pattern"])
        names = [n for n in names if pat.search(n)]
    if not names:
        raise ValueError(f"method.selection 'salun': no parameter in scope (params {params})")
    fraction = float(params.get("fraction", 0.5))
    scores = salun_scores(adapter, forget, names, int(params.get("items", 64)), int(params.get("batch_size", 8)))
    masks = salun_masks(scores, fraction)
    total = _count(model)[1]
    in_scope = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    masked = 0
    for n, m in masks.items():
        if not m.any():
            continue
        mod_name, _, attr = n.rpartition(".")
        module = modules[mod_name]
        parametrize.register_parametrization(module, attr, MaskedDelta(m, getattr(module, attr).dtype))
        masked += 1
    for mod in model.modules():
        if isinstance(mod, MaskedDelta):
            mod.delta.requires_grad_(True)
    info = {**params, "fraction": fraction, "kept": kept, "in_scope": in_scope, "masked_parameters": masked,
            "forget_items": min(len(forget), int(params.get("items", 64)))}
    return SelectionInfo("salun", kept, total, info)


def _apply_uoe(adapter, params: dict[str, Any], objective) -> SelectionInfo:
    from torch.nn.utils import parametrize

    model = adapter.model
    blocks = moe_blocks(model)  # ValueError for a dense model
    source = "params"
    if params.get("layer") is None:
        if objective is None or not hasattr(objective, "expert_target"):
            raise ValueError("method.selection 'uoe' needs params.layer and params.expert, or an objective that picks "
                             "the expert (method uoe)")
        layer, expert = objective.expert_target()
        source = f"objective {getattr(objective, 'name', '?')}"
    else:
        layer, expert = int(params["layer"]), int(params["expert"])
    if layer not in blocks:
        raise ValueError(f"method.selection.params.layer {layer} is not an MoE layer of this model; MoE layers: "
                         f"{sorted(blocks)}")
    mlp = blocks[layer]
    n_exp = mlp.gate.weight.shape[0]
    if not 0 <= expert < n_exp:
        raise ValueError(f"method.selection.params.expert {expert} is out of range: layer {layer} has {n_exp} experts "
                         f"(0..{n_exp - 1})")
    total = _count(model)[1]
    for p in model.parameters():
        p.requires_grad_(False)
    for wname in ("gate_up_proj", "down_proj"):
        W = getattr(mlp.experts, wname)
        parametrize.register_parametrization(mlp.experts, wname, ExpertDelta(expert, tuple(W.shape[1:]), W.dtype, W.device))
    for m in mlp.experts.modules():
        if isinstance(m, ExpertDelta):
            m.delta.requires_grad_(True)
    mlp.gate.weight.requires_grad_(True)
    return SelectionInfo("uoe", _count(model)[0], total, {"layer": layer, "expert": expert, "source": source})


def _apply_columns(adapter, params: dict[str, Any], objective) -> SelectionInfo:
    from torch.nn.utils import parametrize

    model = adapter.model
    cols = params.get("columns")
    source = "params"
    if not cols:
        if objective is None or not hasattr(objective, "parameter_columns"):
            raise ValueError("method.selection 'columns' needs params.columns ({parameter name: [column indices]}) "
                             "or an objective that chooses its columns (e.g. needle)")
        cols, source = objective.parameter_columns(), f"objective {getattr(objective, 'name', '?')}"
        if not cols:
            raise ValueError(f"{source} chose no columns to train")
    named = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for k, idx in cols.items():
        W = named.get(k)
        if W is None or W.dim() != 2 or not k.endswith(".weight"):
            close = [n for n in named if n.endswith(".weight") and named[n].dim() == 2][:4]
            raise ValueError(f"method.selection.params.columns names {k!r}, which is not a 2-D weight of this model "
                             f"(names look like {close})")
        n_in = W.shape[0] if stores_transposed(modules[k[: -len(".weight")]]) else W.shape[1]
        if len(set(idx)) != len(idx) or max(idx) >= n_in:
            raise ValueError(f"method.selection.params.columns[{k!r}] must be distinct indices < {n_in}, got {idx}")
    total = _count(model)[1]
    for p in model.parameters():
        p.requires_grad_(False)
    for k, idx in cols.items():
        W, module = named[k], modules[k[: -len(".weight")]]
        t = stores_transposed(module)
        parametrize.register_parametrization(module, "weight",
                                             ColumnDelta(sorted(idx), W.shape[1 if t else 0], W.dtype, W.device, t))
    for m in model.modules():
        if isinstance(m, ColumnDelta):
            m.delta.requires_grad_(True)
    return SelectionInfo("columns", _count(model)[0], total,
                         {"columns": {k: sorted(v) for k, v in cols.items()}, "source": source})


def apply_selection(adapter, name: str = "full", params: dict[str, Any] | None = None, objective=None,
                    forget: list[dict] | None = None) -> SelectionInfo:
    """Make only the selected parameters trainable (wrapping the model for LoRA, parametrizing
    the chosen weights for ``columns`` and ``salun``). ``objective``: asked for its columns by
    ``columns`` without ``params.columns``. ``forget``: the forget items (``salun``'s gradient)."""
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
    if name == "group":
        if not isinstance(adapter, Adapter):
            raise ValueError("method.selection 'group' needs an adapter with named parameter groups "
                             f"(unlearn.adapters.base.Adapter), got {type(adapter).__name__}; use regex")
        groups = adapter.parameter_groups()
        if params["group"] not in groups:
            raise ValueError(f"method.selection.params.group {params['group']!r} is unknown; the adapter has "
                             f"{', '.join(groups)}")
        chosen = set(groups[params["group"]])
        for n, p in model.named_parameters():
            p.requires_grad_(n in chosen)
        tr, total = _count(model)
        return SelectionInfo("group", tr, total, params)
    if name == "columns":
        return _apply_columns(adapter, params, objective)
    if name == "uoe":
        return _apply_uoe(adapter, params, objective)
    if name == "salun":
        return _apply_salun(adapter, params, forget)
    from peft import LoraConfig, get_peft_model

    total = _count(model)[1]
    cfg = LoraConfig(r=int(params.get("r", 8)), lora_alpha=float(params.get("alpha", 16)),
                     lora_dropout=float(params.get("dropout", 0.0)),
                     target_modules=params.get("target_modules", "all-linear"), bias="none")
    adapter.model = get_peft_model(model, cfg)
    tr = _count(adapter.model)[0]
    return SelectionInfo("lora", tr, total, {**params, "r": cfg.r})


def finalize_selection(adapter) -> None:
    """Undo wrapping before saving: merge LoRA weights into the base model, column deltas
    into their weights."""
    from peft import PeftModel
    from torch.nn.utils import parametrize

    if isinstance(adapter.model, PeftModel):
        adapter.model = adapter.model.merge_and_unload()
    merged = [m for m in adapter.model.modules() if parametrize.is_parametrized(m, "weight")
              and any(isinstance(f, ColumnDelta) for f in m.parametrizations.weight)]
    for m in merged:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    experts = [(m, k) for m in adapter.model.modules() if parametrize.is_parametrized(m)
               for k in list(m.parametrizations.keys()) if any(isinstance(f, ExpertDelta) for f in m.parametrizations[k])]
    for m, k in experts:
        parametrize.remove_parametrizations(m, k, leave_parametrized=True)
    salient = [(m, k) for m in adapter.model.modules() if parametrize.is_parametrized(m)
               for k in list(m.parametrizations.keys()) if any(isinstance(f, MaskedDelta) for f in m.parametrizations[k])]
    for m, k in salient:
        parametrize.remove_parametrizations(m, k, leave_parametrized=True)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    adapter.fingerprint(refresh=True)


def changed_parameters(before: dict[str, torch.Tensor], model) -> list[str]:
    """Names of parameters whose values differ from a ``state_dict`` snapshot."""
    after = model.state_dict()
    return [n for n, t in before.items() if n in after and not torch.equal(t, after[n])]
