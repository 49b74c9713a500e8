"""ULD: unlearning from logit difference with a small trained *assistant* model.

Instead of pushing the target away from the forget set, ULD trains an assistant to do the
*reverse* task -- remember the forget set and forget the retain set -- and subtracts its
logits from the frozen target's at inference::

    assistant loss   L_a = NLL_a(D_f ∪ paraphrases) + w · KL(U ‖ p_a(D_r ∪ perturbed forget answers))
    ULD model        l_ULD = l_target − α · mask_τ(l_assist)

* ``NLL_a``: the answer-token mean NLL of the assistant (``objectives.base.mean_token_nll``).
* ``KL(U ‖ p_a) = Σ_v (1/V)·(log(1/V) − log p_a(v)) = −log V − mean_v log p_a(v)`` per
  position, averaged over the positions of the retain-side batch (:func:`uniform_kl`). Its
  minimum, 0, is a uniform next-token distribution: the assistant "knows nothing" there, so
  subtracting it changes little; where it remembers the forget answers, subtracting them
  removes them from the target.
* ``mask_τ``: the relative-top filter (:func:`uld_logits`). The assistant's logit of token
  ``v`` is set to 0 where the target's log-prob of ``v`` is below
  ``min(max_v log p_t + log τ, the int(τ·V)-th largest log p_t)``, so the subtraction only
  reorders tokens the target finds plausible and cannot promote junk.
* Defaults: α = 0.8, τ = 1e-2, w = 5, assistant = the target's embeddings + its first K
  decoder layers + final norm + LM head (K = 8 of 32 for Llama-2-7B), trained with LoRA
  (r 16, alpha 32, dropout 0.05, every linear layer but the head); the target is frozen.

Where the official code (github.com/UCSB-NLP-Chang/ULD) and the paper differ, this file follows
the code:

* the combination is ``l_t + weight · l_a`` with ``weight = −0.8`` at evaluation (the paper's
  Eq. writes ``l_t − α·l_a``; same thing, α = 0.8), and the filter is DoLa's relative-top
  filter with ``min_tokens_to_keep = int(τ·V)`` (the paper only states the ``max + log τ``
  threshold). Official code: when ``int(τ·V) == 0`` its index wraps to the *smallest*
  log-prob and the filter silently turns off; we keep at least 1 token (then the threshold
  is exactly ``max + log τ``).
* the uniform KL is averaged over every position of the sequence (prompt included), not only
  the answer tokens (``uniform_positions: all``). The official batches are padded to a fixed
  length and it averages over the padding as well; we average over real (attention-mask)
  positions only.
* the assistant's data (official data mode ``forget_more_retain_perturb``): the forget set
  plus 2 paraphrased (question, answer) pairs per item; the retain side is the *last*
  ``min(400, |D_f|)`` retain items plus 2 perturbed (wrong) answers per forget question.
  ``retain_items`` (default: that official rule) may name more retain items; on the tiny zoo
  the assistant must see every retain author to keep the retain set intact (its truncated
  start already knows them all).
  Official batches mix both sides at random; here each step takes one forget-side batch and a
  retain-side batch of the same size drawn at random (the toolkit trainer's pairing).
* The official paraphrases and perturbed answers are GPT-generated strings *different from*
  TOFU's evaluation fields. The only such strings a toolkit item carries are its own
  ``paraphrased_question`` / ``paraphrased_answer`` / ``perturbed_answer`` -- exactly the
  strings the truth ratio (and so forget quality) and the paraphrase attack score. Training on
  them makes those numbers optimistic, so both augmentations are **off by default**
  (``paraphrases_per_item: 0``, ``perturbed_per_item: 0``); set them to 2 for the official data
  mode's shape (docs/editors/uld.md measures both).

Saved form (``ULDAdapter.save``): ``wrapper.json`` (kind ``uld``: the target's source and
fingerprint, checked on load, the config and LoRA settings), ``assistant_lora.safetensors``
(only the LoRA weights: the assistant's base is rebuilt from the target) and, when the target
has no loadable source (or ``save_target: true``), the target itself under ``target/``.

Reference: Ji et al., 2024, "Reversing the Forget-Retain Objectives: An Efficient LLM
Unlearning Framework from Logit Difference", NeurIPS 2024 (arXiv:2406.08607).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from unlearn.adapters.text import _DTYPES, TextAdapter, _looks_like_path
from unlearn.editors.base import WRAPPER_FILE, EditContext, Editor, EditorConfig, EditResult
from unlearn.objectives.base import Objective, mean_token_nll
from unlearn.trainer import train

PAPER = ("Ji et al., 2024, Reversing the Forget-Retain Objectives: An Efficient LLM Unlearning Framework from "
         "Logit Difference, NeurIPS 2024 (arXiv:2406.08607)")
LORA_FILE = "assistant_lora.safetensors"
FORMAT_VERSION = 1
# decoder-layer index in a parameter name: model.layers.3. (Llama, Mistral, Qwen...), transformer.h.3. (GPT-2)
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


# ============================================================================== config
@dataclass
class ULDConfig(EditorConfig):
    alpha: float = field(default=0.8, metadata={
        "help": "weight of the assistant's logits subtracted from the target's (official eval: weight -0.8)"})
    tau: float = field(default=1e-2, metadata={
        "help": "relative-top filter: the assistant's logits count only for tokens whose target log-prob is >= "
                "max + log(tau) (and at least the int(tau*V) most likely ones); 0 turns the filter off"})
    num_layers: int | None = field(default=None, metadata={
        "help": "decoder layers of the assistant, copied from the target's first layers (paper: 8 of 32); "
                "null: a quarter of the target's layers, at least 1"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the assistant (official: 16)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (official: 32)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout while training (official: 0.05)"})
    lora_target_modules: list[str] | str = field(default="all-linear", metadata={
        "help": "modules that get LoRA adapters; all-linear: every linear layer but the LM head (official)"})
    retain_weight: float = field(default=5.0, metadata={
        "help": "weight w of the uniform-KL term on the retain side (official: 5)"})
    retain_items: int | None = field(default=None, metadata={
        "help": "how many retain items (the last ones of the retain set) the assistant learns to forget; "
                "null: the official rule, min(400, |forget set|); 0: none"})
    paraphrases_per_item: int = field(default=0, metadata={
        "help": "extra (question, answer) pairs per forget item the assistant remembers, from the item's "
                "paraphrased_question / paraphrased_answer (official: 2 GPT-written paraphrases). Default 0: "
                "these fields are what the truth ratio and the paraphrase attack score (see the module docstring)"})
    perturbed_per_item: int = field(default=0, metadata={
        "help": "perturbed (wrong) answers per forget question, from the item's perturbed_answer, added to the "
                "retain side (official: 2 GPT-written ones). Default 0: the truth ratio scores these very strings"})
    uniform_positions: Literal["all", "answer"] = field(default="all", metadata={
        "help": "positions of the uniform-KL term: all (every non-padding position, official) or answer tokens"})
    save_target: bool | None = field(default=None, metadata={
        "help": "also save the target's weights with the ULD model; null: only when its source cannot be "
                "reloaded (an in-memory model)"})

    def __post_init__(self) -> None:
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0 (the assistant is subtracted), got {self.alpha}")
        if not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau must be in [0, 1) (0 disables the relative-top filter), got {self.tau}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 or null, got {self.num_layers}")
        if self.lora_r < 1 or not self.lora_alpha > 0:
            raise ValueError(f"lora_r must be >= 1 and lora_alpha > 0, got r={self.lora_r}, alpha={self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.lora_target_modules, list) and not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; name modules (e.g. [q_proj, v_proj]) or use all-linear")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight must be >= 0, got {self.retain_weight}")
        for name in ("retain_items", "paraphrases_per_item", "perturbed_per_item"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.paraphrases_per_item > 3:
            raise ValueError(f"paraphrases_per_item must be <= 3 (the item fields give 3 distinct pairs: "
                             f"(paraphrased q, paraphrased a), (q, paraphrased a), (paraphrased q, a)), "
                             f"got {self.paraphrases_per_item}")

    def lora_settings(self) -> dict[str, Any]:
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": self.lora_target_modules}


# ============================================================================== the math
def relative_top_mask(target_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Tokens the target finds implausible: ``(..., V)`` logits -> ``(..., V)`` bool, True = filtered.

    ``logp = log_softmax(target_logits)``; threshold ``= min(max_v logp + log tau, k-th largest
    logp)`` with ``k = max(1, int(tau * V))`` (DoLa / official ULD: at least ``int(tau*V)`` tokens
    stay); True where ``logp < threshold``. ``tau == 0``: nothing is filtered.
    """
    if tau <= 0:
        return torch.zeros_like(target_logits, dtype=torch.bool)
    logp = torch.log_softmax(target_logits.float(), dim=-1)  # (..., V)
    k = max(1, int(tau * logp.shape[-1]))
    kth = logp.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    thresh = torch.minimum(logp.amax(dim=-1, keepdim=True) + math.log(tau), kth)  # (..., 1)
    return logp < thresh


def uld_logits(target_logits: torch.Tensor, assistant_logits: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """The ULD model's logits: ``l_t − alpha · l_a``, with ``l_a`` zeroed where
    :func:`relative_top_mask` filters. Inputs ``(..., V)`` each; output ``(..., V)`` float32."""
    a = assistant_logits.float().masked_fill(relative_top_mask(target_logits, tau), 0.0)
    return target_logits.float() - alpha * a


def uniform_kl(adapter, batch: dict[str, Any], positions: str = "all") -> torch.Tensor:
    """``KL(U ‖ p)`` averaged over positions: ``mean_t [−log V − mean_v log p_t(v)]``.

    ``positions="all"``: every position with ``attention_mask == 1`` (prompt, answer and the
    last token; the official code also counts padding). ``"answer"``: the positions that
    predict an answer token (labels != -100 after the shift). Differentiable.
    """
    logits = adapter.logits(batch)  # (B, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    V = logp.shape[-1]
    per_pos = -math.log(V) - logp.mean(dim=-1)  # (B, T)
    if positions == "all":
        mask = batch["attention_mask"].to(per_pos.device).bool()  # (B, T)
    elif positions == "answer":
        _, _, m = adapter.shift(logits, batch["labels"])  # (B, T-1)
        mask = torch.zeros_like(per_pos, dtype=torch.bool)
        mask[:, :-1] = m
    else:
        raise ValueError(f"uniform_positions must be 'all' or 'answer', got {positions!r}")
    if not mask.any():
        return logits.sum() * 0.0
    return per_pos[mask].mean()


class ULDAssistantLoss(Objective):
    """The assistant's loss: ``NLL(forget side) + retain_weight · KL(U ‖ p_a(retain side))``.

    Used with :func:`unlearn.trainer.train` on the *assistant* adapter; the forget/retain lists
    are the ones :func:`assistant_data` builds (forget side: D_f + paraphrases; retain side:
    retain items + perturbed forget answers).
    """

    name = "uld_assistant"
    Config = ULDConfig
    paper = PAPER

    def needs_retain(self) -> bool:
        return self.config.retain_weight > 0

    def loss(self, adapter, forget, retain):
        remember = mean_token_nll(adapter, forget)
        loss = remember
        logs = {"remember_nll": remember.item()}
        if self.config.retain_weight > 0 and retain is not None:
            u = uniform_kl(adapter, retain, self.config.uniform_positions)
            loss = loss + self.config.retain_weight * u
            logs["uniform_kl"] = u.item()
        return loss, logs


# ============================================================================== data
def assistant_data(data, config: ULDConfig) -> tuple[list[dict], list[dict], dict[str, int]]:
    """The assistant's training lists from :class:`~unlearn.data.UnlearningData`.

    Returns ``(forget_side, retain_side, counts)``: forget side = every forget item +
    ``paraphrases_per_item`` pairs per item from (paraphrased_question, paraphrased_answer),
    (question, paraphrased_answer), (paraphrased_question, answer), skipping duplicates;
    retain side = the last ``retain_items`` retain items (``None``: ``min(400, |D_f|)``, the
    official rule) + the first ``perturbed_per_item`` perturbed answers of every forget item
    (as answers to its question). Items are reduced to ``{"question", "answer"}``.
    """
    forget = [{"question": it["question"], "answer": it["answer"]} for it in data.forget]
    paraphrases, perturbed = [], []
    for i, it in enumerate(data.forget):
        if config.paraphrases_per_item:
            if "paraphrased_answer" not in it and "paraphrased_question" not in it:
                raise ValueError(f"forget item {i} has no paraphrased_question / paraphrased_answer field; "
                                 "set method.params.paraphrases_per_item: 0")
            q, a = it["question"], it["answer"]
            pq, pa = it.get("paraphrased_question") or q, it.get("paraphrased_answer") or a
            seen = {(q, a)}
            picked = []
            for pair in ((pq, pa), (q, pa), (pq, a)):
                if pair not in seen and len(picked) < config.paraphrases_per_item:
                    seen.add(pair)
                    picked.append({"question": pair[0], "answer": pair[1]})
            paraphrases += picked
        if config.perturbed_per_item:
            pert = it.get("perturbed_answer")
            if not isinstance(pert, list) or not pert:
                raise ValueError(f"forget item {i} has no perturbed_answer list; set method.params.perturbed_per_item: 0")
            perturbed += [{"question": it["question"], "answer": p} for p in pert[: config.perturbed_per_item]]
    retain = []
    n_retain = min(400, len(data.forget)) if config.retain_items is None else config.retain_items
    if n_retain and data.retain is not None:
        retain = [{"question": it["question"], "answer": it["answer"]} for it in data.retain[-n_retain:]]
    counts = {"forget": len(forget), "paraphrases": len(paraphrases), "retain": len(retain),
              "perturbed": len(perturbed)}
    return forget + paraphrases, retain + perturbed, counts


# ============================================================================== the assistant
def default_num_layers(n_layers: int) -> int:
    """The paper's ratio (8 of 32 layers): a quarter of the target's layers, at least 1."""
    return max(1, round(n_layers / 4))


def build_assistant(target, num_layers: int):
    """A new causal LM of the target's class: its embeddings, its first ``num_layers`` decoder
    layers, final norm and LM head, copied (the assistant never shares tensors with the target).

    Args:
        target: a plain ``transformers`` ``PreTrainedModel`` (not a PEFT wrapper).
        num_layers: ``1 <= num_layers <= target.config.num_hidden_layers``.
    Returns:
        the assistant in eval mode, same dtype and device as the target.
    """
    if hasattr(target, "get_base_model"):
        raise ValueError("the ULD target is a PEFT-wrapped model; merge its adapters first (merge_and_unload)")
    cfg = copy.deepcopy(target.config)
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError(f"{type(target).__name__} has no config.num_hidden_layers; ULD's assistant is built "
                         "by truncating a decoder-only transformer")
    if not 1 <= num_layers <= n:
        raise ValueError(f"method.params.num_layers must be in 1..{n} for this {n}-layer target, got {num_layers}")
    cfg.num_hidden_layers = num_layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:num_layers]
    state = {}
    for k, v in target.state_dict().items():
        m = _LAYER_RE.search(k)
        if m is None or int(m.group(1)) < num_layers:
            state[k] = v
    ref = next(target.parameters())
    assistant = type(target)(cfg)
    missing, unexpected = assistant.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"cannot build the ULD assistant from a {type(target).__name__}: the truncated model's "
                         f"weights do not match the target's (missing {missing[:3]}, unexpected {unexpected[:3]})")
    assistant.to(device=ref.device, dtype=ref.dtype)
    assistant.eval()
    return assistant


def add_lora(assistant, config: ULDConfig, seed: int = 0):
    """Wrap the assistant with LoRA adapters (peft); only they are trainable. The LoRA ``A``
    matrices are initialised from ``seed`` (the global RNG is left as it was)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                     target_modules=config.lora_target_modules, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(assistant, cfg)
    return model


def lora_state(assistant) -> dict[str, torch.Tensor]:
    """The assistant's LoRA weights by parameter name (what ``save`` writes)."""
    return {n: p.detach().contiguous().cpu() for n, p in assistant.named_parameters() if "lora_" in n}


# ============================================================================== the wrapped model
class ULDModel(torch.nn.Module):
    """``target`` and ``assistant`` side by side; ``forward`` returns the ULD logits.

    Being one ``nn.Module`` makes every weight of the ULD model visible where the toolkit looks
    at ``adapter.model``: fingerprints, ``.to(device)``, the quantisation attack (both models are
    quantised), ``reference()`` copies, gradient-norm MIA.
    """

    def __init__(self, target, assistant, alpha: float, tau: float) -> None:
        super().__init__()
        self.target = target
        self.assistant = assistant
        self.alpha = float(alpha)
        self.tau = float(tau)

    @property
    def config(self):
        """The target's config (max length, vocabulary size, layers)."""
        return self.target.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """``input_ids`` (B, T) -> an object whose ``.logits`` are the ULD logits (B, T, V) float32."""
        t = self.target(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits  # (B, T, V)
        a = self.assistant(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits  # (B, T, V)
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=uld_logits(t, a, self.alpha, self.tau))


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` -> ``cache``; the name this model's forward takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


class ULDAdapter(TextAdapter):
    """The ULD model behind the :class:`TextAdapter` contract.

    ``model`` is a :class:`ULDModel` (target + LoRA assistant); :meth:`logits` returns the
    filtered logit difference, so ``item_nll``, ``token_logprobs``, every metric, the attacks
    and the lm-eval bridge score the ULD model. Build one with :meth:`wrap` (or
    :class:`ULD`'s ``apply``); reload a saved one with :meth:`load` (or
    ``unlearn.models.load_model(dir, "text")``).

    Args:
        model: the :class:`ULDModel`.
        tokenizer: the target's tokenizer.
        uld_config: the :class:`ULDConfig` it was built with.
        target_ref: ``{"source", "fingerprint", "dtype"}`` of the target as it was wrapped.
        num_layers: the assistant's decoder layers.
    """

    def __init__(self, model: ULDModel, tokenizer, *, uld_config: ULDConfig, target_ref: dict[str, Any],
                 num_layers: int, prompt_template: str, tokenization: str, source: str) -> None:
        if not isinstance(model, ULDModel):
            raise ValueError(f"ULDAdapter wraps a ULDModel, got {type(model).__name__}; use ULDAdapter.wrap")
        super().__init__(model, tokenizer, prompt_template=prompt_template, tokenization=tokenization, source=source)
        self.uld_config = uld_config
        self.target_ref = dict(target_ref)
        self.num_layers = num_layers

    @classmethod
    def wrap(cls, target: TextAdapter, assistant, config: ULDConfig, num_layers: int) -> "ULDAdapter":
        """Combine a target adapter and a (LoRA-wrapped) assistant model. Both are frozen."""
        if isinstance(target, ULDAdapter) or type(target).logits is not TextAdapter.logits:
            raise ValueError(f"the ULD target must be a plain TextAdapter, got {type(target).__name__}")
        ref = {"source": target.source, "fingerprint": target.fingerprint(),
               "dtype": str(next(target.model.parameters()).dtype).replace("torch.", "")}
        model = ULDModel(target.model, assistant, config.alpha, config.tau)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, target.tokenizer, uld_config=config, target_ref=ref, num_layers=num_layers,
                   prompt_template=target.prompt_template, tokenization=target.tokenization,
                   source=f"uld({target.source})")

    @classmethod
    def load(cls, source: str, **kwargs) -> "ULDAdapter":
        """Rebuild a ULD model saved by :meth:`save` (see :func:`load_uld`)."""
        return load_uld(source, **kwargs)

    # ------------------------------------------------------------------ scores
    def logits(self, batch: dict[str, Any], model=None) -> torch.Tensor:
        """ULD next-token logits (B, T, V) float32: ``l_t − α · mask_τ(l_a)``.

        ``model``: another :class:`ULDModel` to score with (default: this adapter's).
        """
        m = model if model is not None else self.model
        if not isinstance(m, ULDModel):
            raise ValueError(f"ULDAdapter.logits scores with a ULDModel, got {type(m).__name__}")
        dev = next(m.parameters()).device
        return m(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits

    def hidden_states(self, batch: dict[str, Any], layer: int, model=None) -> torch.Tensor:
        """The *target's* decoder-layer output (B, T, H): ULD leaves the target's weights, and so
        its representations, unchanged; only the output distribution is edited."""
        m = model if model is not None else self.model
        return TextAdapter.hidden_states(self, batch, layer, model=m.target)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, questions: list[str], *, max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
        """Greedy answers through the ULD logits (left padding; target and assistant each keep
        a KV cache), decoded without special tokens and stripped. Stops a row at EOS."""
        from transformers import DynamicCache

        tok, m = self.tokenizer, self.model
        pad, eos = tok.pad_token_id, tok.eos_token_id
        dev = self.device
        was_training = m.training
        m.eval()
        kw_t, kw_a = _cache_kwarg(m.target), _cache_kwarg(m.assistant)
        out: list[str] = []
        try:
            for s in range(0, len(questions), batch_size):
                chunk = [self.generation_prompt_ids(q) for q in questions[s: s + batch_size]]
                B, T = len(chunk), max(len(c) for c in chunk)
                ids = torch.full((B, T), pad, dtype=torch.long)
                attn = torch.zeros((B, T), dtype=torch.long)
                for i, c in enumerate(chunk):
                    ids[i, T - len(c):] = torch.tensor(c)
                    attn[i, T - len(c):] = 1
                ids, attn = ids.to(dev), attn.to(dev)
                pos = (attn.cumsum(-1) - 1).clamp_min(0)  # (B, T)
                caches = (DynamicCache(), DynamicCache())
                step_ids, step_pos = ids, pos
                gen = torch.zeros((B, 0), dtype=torch.long, device=dev)
                done = torch.zeros(B, dtype=torch.bool, device=dev)
                for _ in range(max_new_tokens):
                    lt = m.target(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=True,
                                  **{kw_t: caches[0]}).logits[:, -1]  # (B, V)
                    la = m.assistant(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=True,
                                     **{kw_a: caches[1]}).logits[:, -1]  # (B, V)
                    nxt = uld_logits(lt, la, m.alpha, m.tau).argmax(-1)  # (B,)
                    nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                    gen = torch.cat([gen, nxt[:, None]], 1)
                    done = done | (nxt == eos)
                    if done.all():
                        break
                    step_ids = nxt[:, None]
                    step_pos = step_pos[:, -1:] + 1
                    attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], 1)
                out += [t.strip() for t in tok.batch_decode(gen.cpu(), skip_special_tokens=True)]
        finally:
            m.train(was_training)
        return out

    # ------------------------------------------------------------------ copies, identity
    def reference(self) -> "ULDAdapter":
        """A frozen deep copy (target and assistant), as ``TextAdapter.reference``."""
        m = copy.deepcopy(self.model)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        ref = ULDAdapter(m, self.tokenizer, uld_config=self.uld_config, target_ref=self.target_ref,
                         num_layers=self.num_layers, prompt_template=self.prompt_template,
                         tokenization=self.tokenization, source=self.source)
        ref._fingerprint = self._fingerprint
        return ref

    def fingerprint(self, refresh: bool = False) -> str:
        """sha256 (16 hex) over every weight of target and assistant, alpha and tau."""
        if self._fingerprint is None or refresh:
            h = hashlib.sha256(f"uld:alpha={self.model.alpha!r}:tau={self.model.tau!r}".encode())
            for name, t in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def parameter_counts(self) -> dict[str, int]:
        """``{"target", "assistant" (all its weights, LoRA included), "assistant_lora"}``."""
        lora = sum(t.numel() for t in lora_state(self.model.assistant).values())
        return {"target": sum(p.numel() for p in self.model.target.parameters()),
                "assistant": sum(p.numel() for p in self.model.assistant.parameters()), "assistant_lora": lora}

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path, save_target: bool | None = None) -> None:
        """Write ``wrapper.json``, ``assistant_lora.safetensors`` and (if needed) ``target/``.

        ``save_target``: overrides ``uld_config.save_target``; ``None`` there means "only when
        the target's source cannot be reloaded" (an in-memory model). The target's current
        fingerprint must equal the one recorded when it was wrapped (else the saved reference
        would point at different weights).
        """
        from safetensors.torch import save_file

        path = Path(path)
        target = TextAdapter(self.model.target, self.tokenizer, prompt_template=self.prompt_template,
                             tokenization=self.tokenization, source=self.target_ref["source"])
        fp = target.fingerprint()
        if save_target is None:
            save_target = self.uld_config.save_target
        src = self.target_ref["source"]
        if save_target is None:
            save_target = not _reloadable(src)
        if not save_target:
            if not _reloadable(src):
                raise ValueError(f"the ULD target's source {src!r} cannot be reloaded; save with save_target=True "
                                 "(method.params.save_target: true)")
            if fp != self.target_ref["fingerprint"]:
                raise ValueError(f"the ULD target's weights changed since it was wrapped (fingerprint {fp} != "
                                 f"{self.target_ref['fingerprint']}); a reference to {src!r} would load other "
                                 "weights: save with save_target=True")
        path.mkdir(parents=True, exist_ok=True)
        if save_target:
            target.save(path / "target")
        else:
            self.tokenizer.save_pretrained(path)  # so the directory is self-describing for tokenizer readers
        save_file(lora_state(self.model.assistant), str(path / LORA_FILE))
        p = Path(src).expanduser()
        meta = {
            "kind": ULD.name, "format": FORMAT_VERSION, "paper": PAPER,
            "target": {"source": "target" if save_target else (str(p.resolve()) if p.is_dir() else src),
                       "saved": bool(save_target), "fingerprint": fp, "dtype": self.target_ref.get("dtype"),
                       "original_source": src},
            "assistant": {"num_layers": self.num_layers, "of_layers": self.model.target.config.num_hidden_layers,
                          "lora": self.uld_config.lora_settings(), "weights": LORA_FILE},
            "config": asdict(self.uld_config),
            "prompt_template": self.prompt_template, "tokenization": self.tokenization,
        }
        (path / WRAPPER_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _reloadable(source: str) -> bool:
    """A source ``TextAdapter.load`` can open again: a zoo name, an existing directory, a hub id."""
    if not isinstance(source, str) or not source or source.startswith("<") or source.startswith("uld("):
        return False
    if source.startswith("zoo:"):
        return True
    p = Path(source).expanduser()
    if p.is_dir():
        return True
    return not _looks_like_path(source)  # a hub id


def load_uld(path: str | Path, *, dtype: str = "float32", **kwargs) -> ULDAdapter:
    """Rebuild a saved :class:`ULDAdapter` from ``path`` (the directory ``save`` wrote).

    The target is loaded from its recorded source (or ``path/target``) and its fingerprint
    checked against the recorded one; the assistant is rebuilt from the target and gets the
    saved LoRA weights. ``kwargs`` (``prompt_template``, ``tokenization``) override the saved ones.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / WRAPPER_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path / WRAPPER_FILE}: ULD wrapper format {meta.get('format')!r} is not supported "
                         f"(this version reads {FORMAT_VERSION})")
    extra = set(kwargs) - {"prompt_template", "tokenization"}
    if extra:
        raise ValueError(f"load_uld got unknown arguments {sorted(extra)}; allowed: prompt_template, tokenization")
    t = meta["target"]
    src = str(path / "target") if t["saved"] else t["source"]
    saved_dtype = t.get("dtype") or "float32"
    target = TextAdapter.load(src, dtype=saved_dtype if saved_dtype in ("float32", "bfloat16", "float16") else dtype)
    fp = target.fingerprint()
    if fp != t["fingerprint"]:
        raise ValueError(f"{path}: the ULD target {t.get('original_source', src)!r} loaded from {src!r} has "
                         f"fingerprint {fp}, but this ULD model was saved on a target with fingerprint "
                         f"{t['fingerprint']}: the target changed (e.g. a rebuilt zoo). Retrain the assistant, "
                         "or save with save_target: true to keep the target's weights with the ULD model")
    if dtype != saved_dtype:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        target.model.to(_DTYPES[dtype])
        target._fingerprint = None
    target.source = t.get("original_source", src)
    cfg_fields = dict(meta["config"])
    config = ULDConfig(**cfg_fields)
    num_layers = int(meta["assistant"]["num_layers"])
    assistant = add_lora(build_assistant(target.model, num_layers), config)
    state = load_file(str(path / meta["assistant"].get("weights", LORA_FILE)))
    have = {n: p for n, p in assistant.named_parameters() if "lora_" in n}
    if set(have) != set(state):
        diff = sorted(set(have) ^ set(state))
        raise ValueError(f"{path / LORA_FILE} does not match the assistant's LoRA parameters "
                         f"(differing names, e.g. {diff[:3]}); the file belongs to another configuration")
    with torch.no_grad():
        for n, p in have.items():
            if p.shape != state[n].shape:
                raise ValueError(f"{path / LORA_FILE}: {n} has shape {tuple(state[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[n].to(p.dtype))
    target.prompt_template = kwargs.get("prompt_template", meta.get("prompt_template", target.prompt_template))
    target.tokenization = kwargs.get("tokenization", meta.get("tokenization", target.tokenization))
    adapter = ULDAdapter.wrap(target, assistant, config, num_layers)
    adapter.target_ref["source"] = t.get("original_source", src)
    return adapter


# ============================================================================== the editor
class ULD(Editor):
    """Train a small LoRA assistant to remember D_f and forget D_r; return the logit-difference
    model (:class:`ULDAdapter`). The target's weights are never changed.

    ``apply(adapter, data, ctx)``:
        adapter: the target (a plain :class:`TextAdapter`).
        data: :class:`~unlearn.data.UnlearningData` (forget items; retain items when
            ``retain_weight > 0`` and ``retain_items != 0``).
        ctx: :class:`EditContext`; ``ctx.settings`` (the recipe's ``train`` section) drives the
            assistant's training with :func:`unlearn.trainer.train`.
    Returns:
        ``EditResult(adapter=ULDAdapter, log=TrainLog of the assistant, info)`` with ``info``:
        parameter counts (target, assistant, trainable LoRA), the assistant's layers, the
        training data sizes, alpha/tau, seconds, and ``headline``.
    """

    name = "uld"
    full_parameters = "it builds an assistant from the target's first layers and subtracts its logits from the target's"
    Config = ULDConfig
    paper = PAPER

    def needs_retain(self) -> bool:
        return self.config.retain_weight > 0 and self.config.retain_items != 0

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        c = self.config
        if isinstance(adapter, ULDAdapter) or type(adapter).logits is not TextAdapter.logits:
            raise ValueError(f"ULD needs a plain TextAdapter as its target, got {type(adapter).__name__}")
        n_layers = adapter.model.config.num_hidden_layers
        K = c.num_layers if c.num_layers is not None else default_num_layers(n_layers)
        forget_side, retain_side, counts = assistant_data(data, c)
        objective = ULDAssistantLoss(c)
        if objective.needs_retain() and not retain_side:
            raise ValueError("ULD's uniform-KL term (retain_weight > 0) has no data: the retain set is empty and "
                             "perturbed_per_item is 0; name task.retain_split, set perturbed_per_item > 0, or set "
                             "retain_weight: 0")
        t0 = time.time()
        target_fp = adapter.fingerprint()
        assistant = add_lora(build_assistant(adapter.model, K), c, seed=ctx.seed)
        trainable = sum(p.numel() for p in assistant.parameters() if p.requires_grad)
        a_adapter = TextAdapter(assistant, adapter.tokenizer, prompt_template=adapter.prompt_template,
                                tokenization=adapter.tokenization, source="<uld-assistant>")
        with torch.random.fork_rng(devices=[]):  # LoRA dropout draws from the global RNG: seed it, then restore it
            torch.manual_seed(ctx.seed)
            log = train(a_adapter, objective, forget_side, retain_side or None, ctx.settings, seed=ctx.seed,
                        progress=ctx.progress)
        assistant = a_adapter.model
        if adapter.fingerprint(refresh=True) != target_fp:  # the assistant is a copy; this must hold
            raise RuntimeError("training ULD's assistant changed the target's weights")
        uld = ULDAdapter.wrap(adapter, assistant, c, K)
        counts_p = uld.parameter_counts()
        info = {
            "alpha": c.alpha, "tau": c.tau,
            "assistant": {"num_layers": K, "of_layers": n_layers, "parameters": counts_p["assistant"],
                          "trainable": trainable, "lora": c.lora_settings()},
            "target": {"parameters": counts_p["target"], "trainable": 0, "fingerprint": target_fp},
            "train_items": counts, "seconds": round(time.time() - t0, 2),
            "headline": {"assistant layers": f"{K}/{n_layers}", "trainable params (LoRA)": trainable,
                         "target params": counts_p["target"],
                         "trainable/target": f"{trainable / max(1, counts_p['target']):.2%}"},
        }
        return EditResult(adapter=uld, log=log, info=info)


__all__ = ["ULD", "ULDConfig", "ULDAdapter", "ULDModel", "ULDAssistantLoss", "assistant_data", "build_assistant",
           "add_lora", "relative_top_mask", "uld_logits", "uniform_kl", "load_uld", "default_num_layers"]
