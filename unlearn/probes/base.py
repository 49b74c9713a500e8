"""The probe contract: look at parameters or activations, before and after unlearning.

A **probe** measures something about a model that behaviour-level metrics do not see
(concept vectors in the MLP weights, linearly decodable attributes in the hidden states, the
causal role of hidden states). It is run twice -- on the model before unlearning and on the
unlearned model -- and :meth:`Probe.compare` turns the two results into metrics
(:class:`~unlearn.evaluators.base.MetricResult`: name, value, direction, version), so probe
numbers sit in the same tables as the harness's.

* :meth:`Probe.run` ``(adapter, data, reference=None) -> ProbeResult``. ``reference`` is the
  result on the model before unlearning: a probe that must look at the *same* places in the
  unlearned model (the concept vectors found before) or reuse what it fitted (a linear
  probe's classifier) reads them from there.
* :meth:`Probe.compare` ``(before, after) -> {name: MetricResult}``.
* :func:`run_probes` runs a list of probes on two adapters; the runner uses the two halves,
  :func:`probe_before` (before training changes the model in place) and :func:`probe_after`.

The second half of this file holds helpers shared by the text probes: decoder-layer outputs
of every layer in one forward pass, and token positions of a subject (an author's name) in
a prompt, found from the tokenizer's character offsets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from unlearn.config import to_dict
from unlearn.evaluators.base import MetricResult, MetricSpec, _plain

__all__ = ["Probe", "ProbeConfig", "ProbeResult", "run_probes", "probe_before", "probe_after", "decoder_layers",
           "DECODER_LAYER_PATHS", "model_name", "stores_transposed",
           "layer_outputs", "encode_with_spans", "locate_value", "span_positions", "pad_right", "authors_of"]


@dataclass
class ProbeConfig:
    """Base class of every probe's config dataclass (fields carry ``metadata={"help": ...}``)."""


@dataclass
class ProbeResult:
    """What one probe found on one model.

    Attributes:
        probe: the probe's name.
        version: the probe's version (results with different versions are not comparable).
        values: JSON-able headline values (counts, means).
        arrays: JSON-able per-item / per-layer values (lists, nested lists), written to
            ``metrics.json`` with the values.
        tensors: larger state that :meth:`Probe.compare` needs (weight vectors, classifier
            coefficients); kept in memory, not written to JSON (``to_dict`` lists their shapes).
        config: the probe's config as a dict.
        seconds: wall time of the run.
        note: free text (what was skipped and why).
    """

    probe: str
    version: str
    values: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: everything but the tensors, which appear as ``{name: shape}``."""
        return {"probe": self.probe, "version": self.version, "config": _plain(self.config),
                "values": _plain(self.values), "arrays": _plain(_lists(self.arrays)),
                "tensors": {k: list(v.shape) for k, v in self.tensors.items()},
                "seconds": round(self.seconds, 2), "note": self.note}


def _lists(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


class Probe:
    """Base class. Subclasses set the class attributes and implement :meth:`run` and :meth:`compare`.

    Class attributes:
        name: registry name used in recipes (``eval.probes``).
        Config: the config dataclass; ``eval.probe_params.<name>`` is validated against it.
        paper: citation.
        version: bump when what the probe measures changes.
        SPECS: the metrics :meth:`compare` returns, by name.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = ProbeConfig
    paper: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    SPECS: ClassVar[dict[str, MetricSpec]] = {}

    def __init__(self, config: ProbeConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def run(self, adapter, data, *, reference: ProbeResult | None = None) -> ProbeResult:
        """Probe ``adapter`` on ``data`` (an :class:`~unlearn.data.UnlearningData`).

        ``reference``: this probe's result on the model before unlearning, or ``None`` when
        this *is* the model before unlearning."""
        raise NotImplementedError

    def compare(self, before: ProbeResult, after: ProbeResult) -> dict[str, MetricResult]:
        """Metrics from the results before and after unlearning, by name."""
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------
    def _result(self, values=None, arrays=None, tensors=None, note: str = "") -> ProbeResult:
        return ProbeResult(self.name, self.version, values or {}, arrays or {}, tensors or {},
                           to_dict(self.config), note=note)

    def metric(self, name: str, value: float | None, per_item: list | None = None, note: str = "") -> MetricResult:
        spec = self.SPECS[name]
        return MetricResult(name, value, per_item, spec.higher_is_better, spec.version,
                            note=note or ("" if value is not None else "not computable"))


# ------------------------------------------------------------------------------ running
def probe_before(probes: list[Probe], adapter, data) -> dict[str, ProbeResult]:
    """Run each probe on the model before unlearning. Errors propagate: nothing has been
    trained yet, so a probe that cannot run stops the run early."""
    out = {}
    for p in probes:
        t0 = time.time()
        res = p.run(adapter, data)
        res.seconds = time.time() - t0
        out[p.name] = res
    return out


def probe_after(probes: list[Probe], adapter, data, before: dict[str, ProbeResult]) -> dict[str, Any]:
    """Run each probe on the unlearned model and compare with ``before``.

    Returns (JSON-able) ``{probe name: {"paper", "before": ProbeResult dict, "after": ...,
    "metrics": {metric name: MetricResult dict}}}``. A probe that cannot look inside the
    unlearned model (``ValueError``, e.g. a wrapped model without the weights it reads) gets
    ``"after": None`` and metrics with ``value=None`` and a note saying why."""
    out: dict[str, Any] = {}
    for p in probes:
        b = before[p.name]
        entry: dict[str, Any] = {"paper": p.paper, "before": b.to_dict()}
        t0 = time.time()
        try:
            a = p.run(adapter, data, reference=b)
        except ValueError as e:
            note = f"not computable on the unlearned model: {e}"
            entry.update(after=None, metrics={n: p.metric(n, None, note=note).to_dict() for n in p.SPECS})
        else:
            a.seconds = time.time() - t0
            entry.update(after=a.to_dict(), metrics={n: m.to_dict() for n, m in p.compare(b, a).items()})
        out[p.name] = entry
    return out


def run_probes(probes: list[Probe], adapter_before, adapter_after, data) -> dict[str, Any]:
    """Run ``probes`` on two models (before / after unlearning) and compare them; the result
    is that of :func:`probe_after`."""
    return probe_after(probes, adapter_after, data, probe_before(probes, adapter_before, data))


# ------------------------------------------------------------------ shared text helpers
def model_name(model) -> str:
    """``"<class> (<model_type>)"`` of a (possibly PEFT-wrapped) transformers model, for messages
    that name the family a method does not fit (e.g. ``"GPT2LMHeadModel (gpt2)"``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    return f"{type(base).__name__} ({model_type})" if model_type else type(base).__name__


# where a family keeps its decoder blocks: Llama, Mistral, Qwen2, Phi-3, Gemma, OLMo, Mixtral,
# Qwen2-MoE, DeepSeek (model.layers); GPT-2, GPT-J, Falcon (transformer.h); GPT-NeoX/Pythia
# (gpt_neox.layers); OPT (model.decoder.layers)
DECODER_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM, found under the paths of :data:`DECODER_LAYER_PATHS`
    (Llama-style ``model.model.layers``, GPT-2 ``transformer.h``, GPT-NeoX ``gpt_neox.layers``);
    ValueError naming the model when there are none to find."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in DECODER_LAYER_PATHS:
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {model_name(base)} (looked for "
                     f"{', '.join(DECODER_LAYER_PATHS)}); this method needs a plain transformers causal LM")


def stores_transposed(module) -> bool:
    """True for a transformers ``Conv1D`` (GPT-2's linear layers): it stores its weight as
    (in, out), the transpose of ``nn.Linear``'s (out, in)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _model_of(adapter):
    model = getattr(adapter, "model", None)
    if model is None or not hasattr(model, "config"):
        raise ValueError(f"{type(adapter).__name__} exposes no transformers model (.model); this probe reads "
                         "weights and activations of one")
    return model


@torch.no_grad()
def layer_outputs(adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  layers: list[int]) -> dict[int, torch.Tensor]:
    """Outputs of decoder layers ``layers`` (0-based) in one forward pass: ``{layer: (B, T, H)}``.

    Read with forward hooks on the decoder blocks, so the last layer is its raw output (before
    the final norm); for the other layers this equals :meth:`TextAdapter.hidden_states`.
    """
    model = _model_of(adapter)
    blocks = decoder_layers(model)
    got: dict[int, torch.Tensor] = {}

    def hook(i):
        def f(_m, _inp, out):
            got[i] = (out[0] if isinstance(out, tuple) else out).detach()
        return f

    handles = [blocks[i].register_forward_hook(hook(i)) for i in layers]
    try:
        dev = adapter.device
        model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev))
    finally:
        for h in handles:
            h.remove()
    return got


def encode_with_spans(adapter, question: str, answer: str | None = None) -> tuple[list[int], list[tuple[int, int]], str]:
    """Token ids of ``question`` (+ ``answer``) exactly as the adapter feeds them to the model,
    with each token's character span in one string ``text``.

    ``answer=None``: the generation prompt (``adapter.generation_prompt_ids``). Otherwise the
    teacher-forced sequence ``adapter.encode(question, answer)`` without its final EOS.
    Special tokens (BOS) have the span ``(0, 0)``.

    Returns:
        ``(ids, spans, text)``; ``text[s:e]`` is the text of a token with span ``(s, e)``.
    """
    tok = adapter.tokenizer
    prompt = adapter.prompt(question)
    if answer is None or adapter.tokenization == "reference":
        text = prompt + (" " if adapter.tokenization == "reference" else "") + ("" if answer is None else answer)
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    else:  # "split": prompt and " " + answer tokenised apart
        p = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)
        a = tok(" " + answer.strip(), add_special_tokens=False, return_offsets_mapping=True)
        text = prompt + " " + answer.strip()
        ids = list(p["input_ids"]) + list(a["input_ids"])
        spans = [tuple(o) for o in p["offset_mapping"]] + [(s + len(prompt), e + len(prompt)) for s, e in a["offset_mapping"]]
    want = adapter.generation_prompt_ids(question) if answer is None else adapter.encode(question, answer)[0]
    if answer is not None and want and want[-1] == tok.eos_token_id and ids[-1:] != want[-1:]:
        want = want[:-1]
    if ids != list(want):
        raise ValueError("the tokenizer's offsets do not reproduce the adapter's encoding of "
                         f"{question!r}; this probe needs a fast tokenizer with offset mapping")
    return ids, spans, text


def locate_value(adapter, item: dict) -> tuple[list[int], list[tuple[int, int]], str, list[int]] | None:
    """The teacher-forced sequence of ``item`` with the token positions of ``item["value"]`` in
    the answer: ``(ids, spans, text, value_positions)`` (see :func:`encode_with_spans`), or
    ``None`` when the value is not in the answer or its first token also holds text before it
    (then there is no clean "context -> value" split)."""
    value = str(item.get("value") or "")
    if not value:
        return None
    ids, spans, text = encode_with_spans(adapter, item["question"], item["answer"])
    start = text.find(value, len(adapter.prompt(item["question"])))
    if start < 0:
        return None
    pos = span_positions(spans, start, start + len(value))
    if not pos or text[spans[pos[0]][0]: start].strip():
        return None
    return ids, spans, text, pos


def span_positions(spans: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Positions of the tokens whose character span overlaps ``[start, end)``."""
    return [i for i, (s, e) in enumerate(spans) if s < end and e > start and e > s]


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids (B, T), attention_mask (B, T))``; positions of real tokens
    are unchanged by right padding, so per-position reads need no shift."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def authors_of(items: list[dict], what: str) -> dict[Any, list[dict]]:
    """Items grouped by ``author_id`` (insertion order); ValueError when items lack the fields."""
    out: dict[Any, list[dict]] = {}
    for it in items:
        if "author_id" not in it or "author" not in it:
            raise ValueError(f"{what} items need 'author_id' and 'author' fields (the generated TOFU-style world "
                             f"has them); got fields {sorted(it)}")
        out.setdefault(it["author_id"], []).append(it)
    return out
