"""The text passes of the harness: teacher-forced scoring, greedy generation, gradient norms.

A metric on a text model asks for these (:class:`TeacherForced`, :class:`Generate`,
:class:`GradNorms`); the harness engine (:mod:`unlearn.evaluators.harness`) merges and runs
them. Teacher-forced requests over several answers to the same question share the
question's forward pass (:func:`run_shared_prefix`) when the adapter tokenises prompt and
answer apart.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from unlearn.adapters.base import IGNORE
from unlearn.evaluators import privacy as P
from unlearn.evaluators import tofu as M
from unlearn.evaluators.harness import PassRequest
from unlearn.evaluators.tofu import Convention

TF_OUTPUTS = frozenset({"nll", "token_logprobs", "vocab_stats", "memorization", "target_texts"})


@dataclass(frozen=True)
class TeacherForced(PassRequest):
    """Teacher-forced scores of ``item[answer_key]`` (``[answer_index]`` for lists) given the
    question. ``outputs`` selects what to keep from the one forward pass:

    * ``nll``: ``{"nll": (N,), "n": (N,)}`` summed answer NLL and answer token count;
    * ``token_logprobs``: ``{"token_logprobs": [array (n_i,)]}`` log p of each answer token;
    * ``vocab_stats``: ``{"mu": [(n_i,)], "sigma": [(n_i,)]}`` Min-K%++ statistics;
    * ``memorization``: ``{"exact_memorization": [...], "extraction_strength": [...]}``;
    * ``target_texts``: ``{"target_texts": [str]}`` the labelled (scored) tokens of each item
      decoded with ``skip_special_tokens=True`` (:func:`labelled_texts`): the text the ZLib
      attack compresses.
    """

    answer_key: str = "answer"
    answer_index: int | None = None
    question_key: str = "question"
    outputs: frozenset = frozenset({"nll"})

    def group(self):
        return ("teacher_forced", self.answer_key, self.answer_index, self.question_key)

    def merge(self, other):
        return TeacherForced(self.answer_key, self.answer_index, self.question_key, self.outputs | other.outputs)

    def joint_key(self):
        return ("shared_prefix", self.question_key)

    @classmethod
    def run_joint(cls, adapter, items, requests, batch_size):
        """One prompt pass per batch for every answer (:func:`run_shared_prefix`); only for
        adapters that tokenise prompt and answer apart and support it."""
        if getattr(adapter, "tokenization", None) != "split" or not getattr(adapter, "supports_shared_prefix", False):
            return None
        return run_shared_prefix(adapter, items, requests, batch_size)

    @torch.no_grad()
    def run(self, adapter, items, batch_size):
        acc = _TFAccumulator(self.outputs)
        for s in range(0, len(items), batch_size):
            b = adapter.collate(items[s: s + batch_size], answer_key=self.answer_key,
                                answer_index=self.answer_index, question_key=self.question_key)
            logits = adapter.logits(b)  # (B, T, V)
            acc.add(adapter, logits, b["labels"])
        return acc.result()


class _TFAccumulator:
    """Collects the outputs of a teacher-forced pass batch by batch from (logits, labels)."""

    def __init__(self, outputs: frozenset) -> None:
        self.outputs = outputs
        self.out: dict[str, list] = {k: [] for k in ("nll", "n", "token_logprobs", "mu", "sigma",
                                                     "exact_memorization", "extraction_strength", "target_texts")}

    def add(self, adapter, logits: torch.Tensor, labels: torch.Tensor) -> None:
        out = self.out
        lg, lb, mask = adapter.shift(logits, labels)  # (B, T-1, V), (B, T-1), (B, T-1)
        logp_all = torch.log_softmax(lg.float(), -1)  # (B, T-1, V)
        tok_lp = logp_all.gather(-1, lb.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask  # (B, T-1)
        out["nll"] += (-tok_lp.sum(-1)).tolist()
        out["n"] += mask.sum(-1).tolist()
        if "token_logprobs" in self.outputs or "vocab_stats" in self.outputs:
            for i in range(lg.shape[0]):
                m = mask[i]
                out["token_logprobs"].append(tok_lp[i][m].double().numpy())
                if "vocab_stats" in self.outputs:
                    mu, sigma = P.vocab_stats(lg[i][m])
                    out["mu"].append(np.asarray(mu))
                    out["sigma"].append(np.asarray(sigma))
        if "memorization" in self.outputs:
            out["exact_memorization"] += M.exact_memorization(logits, labels).per_item
            out["extraction_strength"] += M.extraction_strength(logits, labels).per_item
        if "target_texts" in self.outputs:
            out["target_texts"] += labelled_texts(adapter.tokenizer, labels)

    def result(self) -> dict[str, Any]:
        res = {"nll": np.asarray(self.out["nll"]), "n": np.asarray(self.out["n"])}
        for k in ("token_logprobs", "mu", "sigma", "exact_memorization", "extraction_strength", "target_texts"):
            if self.out[k]:
                res[k] = self.out[k]
        return res


@torch.no_grad()
def run_shared_prefix(adapter, items: list[dict], requests: list[TeacherForced], batch_size: int) -> list[dict]:
    """Run several teacher-forced requests that share the question in one pass per batch:
    the prompt is encoded once (KV cache), then each answer variant continues from it.

    Only for adapters with ``tokenization == "split"`` (prompt tokens are then a prefix of the
    full sequence); the values equal the plain pass up to float rounding. Returns one result
    per request, in order.
    """
    accs = [_TFAccumulator(r.outputs) for r in requests]
    tok = adapter.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    model = adapter.model
    dev = adapter.device
    qk = requests[0].question_key
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers renamed past_key_values -> cache (the old name warns until its removal)
    ckw = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    for s in range(0, len(items), batch_size):
        chunk = items[s: s + batch_size]
        prompts = [tok(adapter.prompt(it[qk]), add_special_tokens=True)["input_ids"] for it in chunk]
        B, Tp = len(chunk), max(len(p) for p in prompts)
        p_ids = torch.full((B, Tp), pad, dtype=torch.long)
        p_mask = torch.zeros((B, Tp), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column Tp-1
            p_ids[i, Tp - len(p):] = torch.tensor(p)
            p_mask[i, Tp - len(p):] = 1
        p_pos = (p_mask.cumsum(-1) - 1).clamp_min(0)  # (B, Tp)
        cache = DynamicCache()
        out = model(input_ids=p_ids.to(dev), attention_mask=p_mask.to(dev), position_ids=p_pos.to(dev),
                    use_cache=True, **{ckw: cache})
        last = out.logits[:, -1:, :]  # (B, 1, V) predicts the first answer token
        p_len = p_mask.sum(-1)  # (B,)
        for req, acc in zip(requests, accs):
            answers = []
            for it in chunk:
                a = it[req.answer_key]
                if req.answer_index is not None:
                    a = a[req.answer_index]
                answers.append(tok(" " + a.strip(), add_special_tokens=False)["input_ids"] + [eos])
            Ta = max(len(a) for a in answers)
            a_ids = torch.full((B, Ta), pad, dtype=torch.long)
            a_mask = torch.zeros((B, Ta), dtype=torch.long)
            for i, a in enumerate(answers):
                a_ids[i, : len(a)] = torch.tensor(a)
                a_mask[i, : len(a)] = 1
            a_pos = p_len.unsqueeze(1) + torch.arange(Ta).unsqueeze(0)  # (B, Ta)
            o = model(input_ids=a_ids.to(dev), attention_mask=torch.cat([p_mask, a_mask], 1).to(dev),
                      position_ids=a_pos.to(dev), use_cache=True, **{ckw: cache})
            cache.crop(-Ta)  # back to the prompt
            # logits[:, t] predicts labels[:, t+1]: position 0 (last prompt token) predicts answer 0
            logits = torch.cat([last, o.logits], 1)  # (B, Ta+1, V)
            labels = torch.full((B, Ta + 1), -100, dtype=torch.long)
            labels[:, 1:] = torch.where(a_mask.bool(), a_ids, torch.full_like(a_ids, -100))
            acc.add(adapter, logits, labels)
    return [a.result() for a in accs]


@dataclass(frozen=True)
class Generate(PassRequest):
    """Greedy answers to ``item[question_key]``: ``list[str]``."""

    max_new_tokens: int = 48
    question_key: str = "question"

    def group(self):
        return ("generate", self.question_key)

    def merge(self, other):
        return Generate(max(self.max_new_tokens, other.max_new_tokens), self.question_key)

    def run(self, adapter, items, batch_size):
        return adapter.generate([it[self.question_key] for it in items], max_new_tokens=self.max_new_tokens,
                                batch_size=batch_size)


def labelled_texts(tokenizer, labels: torch.Tensor) -> list[str]:
    """Per row of ``labels`` (B, T), the labelled tokens (``!= -100``) decoded with
    ``skip_special_tokens=True``: open-unlearning's ``extract_target_texts_from_processed_data``.

    These are the tokens the scores are computed over, so the text follows the tokenisation:
    under ``tokenization="reference"`` the first answer token is often masked (the prompt's
    trailing space merges into it) and is then absent from the text; under ``"split"`` the text
    is the answer tokenised as ``" " + answer.strip()``, decoded (a byte-level BPE gives back
    the leading space). EOS is a special token and is dropped in both.
    """
    out = []
    for row in labels:
        ids = row[row != IGNORE].tolist()
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def drop_last_labelled(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (B, T) bool with each row's last True position set to False: the positions
    open-unlearning's ``tokenwise_logprobs`` keeps ("ignore eos prediction")."""
    mask = mask.bool()
    count = mask.sum(-1, keepdim=True)  # (B, 1)
    last = mask & (mask.long().cumsum(-1) == count)  # (B, T): the last True of each row
    return mask & ~last


def scored_mean_nll(adapter, batch: dict[str, Any], convention: Convention = "reference") -> torch.Tensor:
    """Per item, the mean NLL of the scored answer tokens, differentiable: ``(B,)``.

    ``convention="reference"``: every labelled token but the last (the tokens of
    open-unlearning's ``tokenwise_logprobs``, on which its GradNorm attack takes its loss);
    ``"exact"``: every labelled token (``item_nll / n``). Log-probs from
    ``adapter.token_logprobs``. An item left with no token to score is a ValueError.
    """
    if convention not in ("reference", "exact"):
        raise ValueError(f"convention must be 'reference' or 'exact', got {convention!r}")
    logp, mask = adapter.token_logprobs(batch)  # (B, T-1), (B, T-1)
    keep = drop_last_labelled(mask) if convention == "reference" else mask.bool()
    n = keep.sum(-1)  # (B,)
    if (n == 0).any():
        i = int((n == 0).nonzero()[0, 0])
        raise ValueError(f"item {i} has {int(mask[i].sum())} answer token(s); convention={convention!r} leaves none "
                         "to score" + (" (it drops the last labelled token; use convention='exact')"
                                       if convention == "reference" else ""))
    return -(logp * keep).sum(-1) / n


@dataclass(frozen=True)
class GradNorms(PassRequest):
    """Per item, the mean over parameter tensors of the L2 norm of the gradient of the item's
    mean answer NLL (:func:`scored_mean_nll`): ``np.ndarray (N,)``. One backward pass per
    item, the model in ``train()`` mode, as open-unlearning's ``GradNormAttack``.

    ``convention="reference"`` (default, whatever the tokenisation) takes the loss over every
    labelled token but the last, as the reference (its loss comes from ``tokenwise_logprobs``);
    ``"exact"`` over every labelled token. The same convention as Min-K% / Min-K%++.
    """

    convention: Convention = "reference"

    def group(self):
        return ("grad_norms", self.convention)

    def run(self, adapter, items, batch_size):
        model = adapter.model
        was_training = model.training
        model.train()  # as the reference does
        params = [p for p in model.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        norms = []
        try:
            for i in range(len(items)):
                b = adapter.collate(items[i: i + 1])
                try:
                    loss = scored_mean_nll(adapter, b, self.convention)[0]
                except ValueError as e:
                    raise ValueError(f"GradNorms: item {i}: {str(e).removeprefix('item 0 ')}") from None
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                gn = [g.norm(2).item() for g in grads if g is not None]
                norms.append(float(np.mean(gn)))
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            model.train(was_training)
        return np.asarray(norms)
