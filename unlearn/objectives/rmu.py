"""RMU: Representation Misdirection for Unlearning.

Loss (minimised)::

    L = MSE(h_theta^l(x_f), c * u) + alpha * MSE(h_theta^l(x_r), h_ref^l(x_r))

* ``h^l(x)``: the output of decoder layer ``l`` (0-based, ``model.model.layers[l]``), for
  every token position of the forget / retain sequence (prompt and answer);
* ``u``: a random direction, ``uniform[0, 1)^H`` divided by its norm, drawn once per run from
  ``seed`` (the same ``u`` for every step); ``c``: the steering coefficient;
* ``h_ref``: the frozen model from before unlearning, so the retain term keeps the retain
  activations where they were;
* ``MSE`` averages the squared difference over the hidden dimension and over the token
  positions of the batch.

The forget term pushes the forget activations toward a fixed, large random vector, which
scrambles what later layers read from them; the retain term anchors the rest. RMU trains only
the MLP down-projections of layers ``l-2 .. l``: use :func:`rmu_selection` (or its pattern in a
recipe, ``selection: {name: regex, params: {pattern: ...}}``). Parameters above ``l`` get no
gradient from either term.

Official code (centerforaisafety/wmdp, ``rmu/unlearn.py``), followed here:

* the activations are the module output of ``model.layers[layer_id]`` (a forward hook), which
  is ``output_hidden_states[layer + 1]`` (:meth:`TextAdapter.hidden_states`);
* ``u = rand(H) / ||rand(H)||``, target ``c * u``, one ``u`` per run;
* both terms are ``torch.nn.functional.mse_loss`` over **all** positions of the tokenised
  text (no prompt mask), mean over batch, positions and hidden units; ``loss = forget +
  alpha * retain`` (no weight on the forget term).

Deviations: the official loss also averages over padding positions (its batches are padded
to the longest text). We average over the attention-masked positions only, which equals the
official value when a batch has no padding. ``positions: answer`` restricts both terms to
the answer tokens, as open-unlearning's ``RMU`` does (it also averages per item first; we
average over the batch's tokens).

Defaults, scaled for the tiny zoo model (4 layers, hidden size 160, layer-2 activation norm
about 100 per token): ``layer = 2``, ``steering_coeff = 100``, ``alpha = 100``, trained
parameters: down_proj of layers 0-2. Official (zephyr-7b, 32 layers, hidden size 4096):
``layer_id = 7``, ``layer_ids = 5,6,7`` (down_proj), ``steering_coeffs = 20`` (script
default; the paper reports 6.5 for zephyr-7b), ``alpha = 100`` (script default; 1200 in the
paper), ``lr = 5e-5``, batch size 4, 80 batches. ``c`` should be set relative to the norm of
the layer's activations; ``alpha`` relative to how fast the retain MSE grows.

Reference: Li et al., 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With
Unlearning" (arXiv:2403.03218).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from unlearn.objectives.base import Objective, ObjectiveConfig
from unlearn.probes.concept_vectors import mlp_down_proj


@dataclass
class RMUConfig(ObjectiveConfig):
    layer: int = field(default=2, metadata={
        "help": "decoder layer (0-based) whose output is steered; must be below the last layer (official: 7 of 32)"})
    steering_coeff: float = field(default=100.0, metadata={
        "help": "c: norm of the target vector c*u; set relative to the layer's activation norm (official: 6.5-20)"})
    alpha: float = field(default=10.0, metadata={"help": "weight of the retain activation MSE (official: 100-1200); 0: none"})
    positions: Literal["all", "answer"] = field(default="all", metadata={
        "help": "token positions of both MSEs: all (prompt + answer, official) or answer (open-unlearning)"})
    seed: int = field(default=0, metadata={"help": "seed of the random direction u (fixed for the run)"})

    def __post_init__(self):
        if isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        if self.steering_coeff <= 0:
            raise ValueError("steering_coeff must be > 0")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")


def rmu_param_pattern(layer: int, n_layers: int = 3, model=None) -> str:
    """Regex (for ``re.search``) matching the MLP down-projections of layers ``layer-n_layers+1 .. layer``.

    ``rmu_param_pattern(2)`` -> ``'model\\.layers\\.(0|1|2)\\.mlp\\.down_proj\\.weight$'``
    (Llama-style names; ``layers.1`` never matches ``layers.11``). With ``model`` the names are
    that model's own down-projection weights, found per family
    (:func:`~unlearn.probes.concept_vectors.mlp_down_proj`: GPT-2 ``transformer.h.<l>.mlp.c_proj``,
    GPT-NeoX ``gpt_neox.layers.<l>.mlp.dense_4h_to_h``, ...); a mixture-of-experts layer among
    them raises ValueError naming the model (RMU's selection trains one dense down-projection per layer).
    """
    if layer < 0 or n_layers < 1:
        raise ValueError(f"need layer >= 0 and n_layers >= 1, got layer={layer}, n_layers={n_layers}")
    layers = range(max(0, layer - n_layers + 1), layer + 1)
    if model is None:
        ids = "|".join(str(i) for i in layers)
        return rf"model\.layers\.({ids})\.mlp\.down_proj\.weight$"
    names = {id(p): n for n, p in model.named_parameters()}
    return "^(" + "|".join(re.escape(names[id(mlp_down_proj(model, i)[0].weight)]) for i in layers) + ")$"


def rmu_selection(layer: int = 2, n_layers: int = 3, model=None) -> dict:
    """RMU's default parameter selection, ready for ``apply_selection(adapter, **rmu_selection())``
    or a recipe's ``method.selection``: ``{"name": "regex", "params": {"pattern": ...}}``. Give
    ``model`` for a family whose parameter names are not Llama's (see :func:`rmu_param_pattern`)."""
    return {"name": "regex", "params": {"pattern": rmu_param_pattern(layer, n_layers, model)}}


def _masked_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the hidden units, then over the masked positions: scalar."""
    per_pos = ((h.float() - target.float()) ** 2).mean(-1)  # (B, T)
    mask = mask.to(per_pos.device, per_pos.dtype)
    return (per_pos * mask).sum() / mask.sum().clamp_min(1)


class RMU(Objective):
    name = "rmu"
    full_parameters = "it reads the activations of one decoder layer, and the layers above get no gradient"
    Config = RMUConfig
    paper = "Li et al., 2024, The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning (arXiv:2403.03218)"

    def uses_part_of_the_model(self) -> bool:
        return True  # the activations of one layer: the layers above it get no gradient

    def __init__(self, config: RMUConfig | None = None) -> None:
        super().__init__(config)
        self.reference = None
        self._target: torch.Tensor | None = None

    def needs_retain(self):
        return self.config.alpha > 0

    def needs_reference(self):
        return self.config.alpha > 0

    def setup(self, adapter, reference, forget_items):
        self.reference = reference

    def control_vector(self, hidden_size: int) -> torch.Tensor:
        """The target ``c * u`` (H,): ``u`` = uniform[0, 1)^H / its norm, drawn from ``config.seed``, once."""
        if self._target is None or self._target.shape[0] != hidden_size:
            gen = torch.Generator().manual_seed(self.config.seed)
            u = torch.rand(hidden_size, generator=gen)
            self._target = self.config.steering_coeff * u / u.norm()
        return self._target

    def _mask(self, batch) -> torch.Tensor:
        if self.config.positions == "answer":
            return batch["labels"] != -100  # (B, T): token t is an answer token
        return batch["attention_mask"].bool()  # (B, T)

    def loss(self, adapter, forget, retain):
        layer = self.config.layer
        h_f = adapter.hidden_states(forget, layer)  # (B, T, H)
        target = self.control_vector(h_f.shape[-1]).to(h_f.device)  # (H,), broadcast over (B, T)
        f = _masked_mse(h_f, target, self._mask(forget))
        loss, logs = f, {"rmu_forget": f.item()}
        if self.config.alpha > 0:
            if self.reference is None:
                raise ValueError("RMU's retain term needs the reference model: call setup(adapter, reference, ...) first")
            h_r = adapter.hidden_states(retain, layer)  # (B, T, H)
            with torch.no_grad():
                h_ref = self.reference.hidden_states(retain, layer).to(h_r.device)  # (B, T, H)
            r = _masked_mse(h_r, h_ref, self._mask(retain))
            loss = loss + self.config.alpha * r
            logs["rmu_retain"] = r.item()
        return loss, logs
