"""Any toolkit model as an lm-evaluation-harness ``LM`` (registered as ``"unlearn"``).

:class:`UnlearnLM` wraps a :class:`~unlearn.adapters.text.TextAdapter` -- or anything with the
same contract: ``.tokenizer`` and ``.logits(batch)`` returning next-token logits ``(B, T, V)``
for a right-padded batch ``{"input_ids", "attention_mask", "labels", "index"}`` -- and answers
lm-eval's three request types:

* :meth:`UnlearnLM.loglikelihood` -- ``(sum log p(continuation | context), is_greedy)``;
* :meth:`UnlearnLM.loglikelihood_rolling` -- the log-likelihood of a whole string in rolling
  windows (lm-eval's ``get_rolling_token_windows``), conditioned on BOS;
* :meth:`UnlearnLM.generate_until` -- greedy decoding, honouring ``until`` and ``max_gen_toks``.

Every score goes through the adapter's ``logits`` method (generation is a greedy loop over
``logits`` too): the wrapped model itself is never called. An adapter whose ``logits`` is
changed later -- a guarded model, a logit-difference model -- is therefore evaluated as it
answers, unchanged. (The price: generation recomputes the whole prefix at every step, no
KV cache. Fine for the tiny zoo; slow for long generations with large models.)

Tokenisation (``tokenization=``; defaults to the adapter's own):

* ``"split"`` -- the toolkit convention: the context is tokenised as the adapter tokenises a
  prompt (with the tokenizer's special tokens, i.e. BOS), the continuation apart without
  special tokens. lm-eval puts word-boundary spaces in the continuation
  (``context="...Answer:"``, ``continuation=" The capital..."``), which is what the toolkit's
  ``" " + answer`` does.
* ``"reference"`` -- lm-eval's ``HFLM`` convention: ``context + continuation`` is tokenised as a
  whole and the continuation is what follows the context's tokens.

Both move trailing spaces of the context into the continuation, and an empty context is
replaced by the BOS token (EOS when the tokenizer has none), as lm-eval's ``TemplateLM``
does. When the context/continuation boundary is also a pre-tokenizer boundary (byte-level BPE
and ``"...Answer:"`` + ``" ..."``) the two conventions give the same tokens, and ``HFLM`` and
``UnlearnLM`` the same scores.

Command line (the ``lm_eval`` CLI does not discover third-party models, see
:mod:`unlearn.lm_eval_cli`)::

    python -m unlearn.lm_eval_cli --model unlearn \\
        --model_args source=zoo:tiny-llama/target,tokenization=split \\
        --tasks unlearn_world_facts_mc --include_path DIR --device cpu

Python::

    from unlearn.lm_eval_bridge import UnlearnLM
    lm = UnlearnLM(adapter)                       # or UnlearnLM(source="zoo:tiny-llama/target")
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=...)
"""

from __future__ import annotations

import logging
from typing import Any

import torch

# Populate lm-eval's model registry *before* registering ours: ``lm_eval.api.registry.get_model``
# only imports ``lm_eval.models`` (which registers "hf", "vllm", ...) when the registry is
# empty, so registering "unlearn" first would hide every built-in model.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from unlearn.models import load_model

log = logging.getLogger(__name__)

IGNORE = -100
TOKENIZATIONS = ("split", "reference")
_DEFAULT_MAX_LENGTH = 2048


def _batch_size(value: Any, default: int = 16) -> int:
    """lm-eval passes ``batch_size`` as an int, a digit string, or ``"auto"`` / ``"auto:N"``."""
    if value is None:
        return default
    if isinstance(value, str):
        if value.startswith("auto"):
            return default
        value = int(value)
    if int(value) < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return int(value)


@register_model("unlearn")
class UnlearnLM(LM):
    """lm-eval ``LM`` over a toolkit adapter.

    Args:
        adapter: a ``TextAdapter`` or any object with ``.tokenizer`` and ``.logits(batch)``
            (see the module docstring). Give either this or ``source``.
        source: load ``unlearn.models.load_model(source, "text")`` -- ``zoo:<family>/<name>``,
            a local directory (a saved wrapped model too: ULD, ECO), or a hub id
            (``--model_args source=...`` on the command line).
        tokenization: ``"split"`` or ``"reference"``; default: the adapter's
            ``tokenization`` attribute, else ``"split"``.
        dtype: weights dtype when loading from ``source``.
        batch_size: requests per ``logits`` call (``"auto"`` -> 16).
        device: only used when loading from ``source`` (``cuda*`` falls back to CPU when
            no GPU is present); a given adapter is used where it is.
        max_length: the longest token sequence fed to ``logits``; default: the model's
            ``max_position_embeddings``, else 2048. Longer inputs are left-truncated.
        max_gen_toks: default generation budget when a request does not set one.
        max_batch_size: accepted for CLI compatibility, unused.
    """

    def __init__(self, adapter=None, *, source: str | None = None, tokenization: str | None = None,
                 dtype: str = "float32", batch_size: int | str | None = 16, device: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, max_batch_size: int | None = None,
                 **kwargs) -> None:
        super().__init__()
        if kwargs:
            log.warning("UnlearnLM: ignoring unknown model_args %s", sorted(kwargs))
        if tokenization is not None and tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization must be one of {TOKENIZATIONS}, got {tokenization!r}")
        if (adapter is None) == (source is None):
            raise ValueError("UnlearnLM needs exactly one of `adapter` (an object) or `source` "
                             "(e.g. source=zoo:tiny-llama/target or a saved model directory)")
        if adapter is None:
            adapter = load_model(source, "text", dtype=dtype, tokenization=tokenization or "split")
            if device:
                if str(device).startswith("cuda") and not torch.cuda.is_available():
                    log.info("UnlearnLM: device %r requested but no GPU is present; using CPU", device)
                else:
                    adapter.model.to(device)
        for attr in ("tokenizer", "logits"):
            if not hasattr(adapter, attr):
                raise TypeError(f"UnlearnLM wraps objects with .tokenizer and .logits(batch); "
                                f"{type(adapter).__name__} has no .{attr}")
        self.adapter = adapter
        self.tokenizer = adapter.tokenizer
        self.tokenization = tokenization or getattr(adapter, "tokenization", "split")
        if self.tokenization not in TOKENIZATIONS:
            self.tokenization = "split"
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length) if max_length else self._infer_max_length()
        self.max_gen_toks = int(max_gen_toks)
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        self._warned_sampling = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "UnlearnLM":
        """``"source=zoo:tiny-llama/target,tokenization=split"`` -> ``UnlearnLM`` (lm-eval CLI path)."""
        return super().create_from_arg_string(arg_string, additional_config)

    # ------------------------------------------------------------------ helpers
    def _infer_max_length(self) -> int:
        explicit = getattr(self.adapter, "max_length", None)
        if isinstance(explicit, int) and explicit > 0:
            return explicit
        cfg = getattr(getattr(self.adapter, "model", None), "config", None)
        for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        v = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(v, int) and 0 < v < 1_000_000:
            return v
        return _DEFAULT_MAX_LENGTH

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditioning token for an empty context (BOS, else EOS), as lm-eval's ``HFLM``."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "unlearn")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return chat_template if isinstance(chat_template, str) else getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _encode_context(self, context: str) -> list[int]:
        """A non-empty context, tokenised as the adapter tokenises a prompt (BOS added)."""
        bos = self.tokenizer.bos_token
        add = not (bos and context.startswith(bos))  # lm-eval may already prepend the BOS text
        return self.tokenizer(context, add_special_tokens=add)["input_ids"]

    def _encode_continuation(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) under this LM's ``tokenization``."""
        if context == "":
            cont = self._encode_continuation(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if context == "":  # the context was only whitespace
            return [self.prefix_token_id], self._encode_continuation(continuation)
        ctx = self._encode_context(context)
        if self.tokenization == "reference":
            whole = self._encode_context(context + continuation)
            cont = whole[len(ctx):]
            if cont:
                return ctx, cont
            # the continuation merged into the context's last token: fall back to split
        return ctx, self._encode_continuation(continuation)

    def _batch(self, seqs: list[list[int]], label_from: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded batch in the ``TextAdapter.collate`` layout; labels = tokens from
        ``label_from[i]`` on (the scored positions), -100 elsewhere."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
        for i, (s, k) in enumerate(zip(seqs, label_from)):
            t = torch.tensor(s, dtype=torch.long)
            ids[i, : len(s)] = t
            attn[i, : len(s)] = 1
            labels[i, k: len(s)] = t[k:]
        return {"input_ids": ids, "attention_mask": attn, "labels": labels,
                "index": torch.arange(len(seqs), dtype=torch.long)}

    @torch.no_grad()
    def _score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(sum log p(cont | ctx), is_greedy)`` per (context ids, continuation ids) pair."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        seqs = []
        for ctx, cont in pairs:
            if len(cont) >= self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
            full = (list(ctx) + list(cont))[-self.max_length:]
            seqs.append((full, len(cont)))
        # longest first: similar lengths share a batch, and a too-large batch fails early
        order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i][0]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s: s + self.batch_size]
            todo = [i for i in idx if seqs[i][1] > 0]
            for i in idx:
                if seqs[i][1] == 0:
                    out[i] = (0.0, True)
            if not todo:
                continue
            batch = self._batch([seqs[i][0] for i in todo], [len(seqs[i][0]) - seqs[i][1] for i in todo])
            logits = self.adapter.logits(batch)
            for row, i in enumerate(todo):
                full, n = seqs[i]
                L = len(full)
                lg = torch.log_softmax(logits[row, L - n - 1: L - 1].float(), dim=-1)  # predicts full[L-n:]
                tgt = torch.tensor(full[L - n:], dtype=torch.long, device=lg.device)
                logp = lg.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                greedy = bool((lg.argmax(-1) == tgt).all())
                out[i] = (float(logp.sum()), greedy)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation given its context.

        ``requests``: ``Instance`` objects whose ``args`` are ``(context, continuation)``; an
        empty context is replaced by BOS; word-boundary spaces belong in the continuation.
        Returns ``(logprob, is_greedy)`` per request: the summed log-probability of the
        continuation tokens, and whether greedy decoding from the context would produce
        exactly these tokens.
        """
        pairs = [self.encode_pair(*req.args) for req in requests]
        res = self._score_tokens(pairs)
        for req, r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full log-likelihood of each string (``args == (string,)``), conditioned on BOS.

        The string is tokenised without special tokens and cut into lm-eval's rolling
        windows (``get_rolling_token_windows``, context length 1, disjoint), so that every
        token is predicted exactly once with as much context as fits in ``max_length``.
        Returns one float per request.
        """
        pairs, owner = [], []
        for k, req in enumerate(requests):
            (string,) = req.args
            tokens = self._encode_continuation(string)
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=1))  # -1: we feed ctx + pred whole
            for w in windows:
                pairs.append(w)
                owner.append(k)
        scores = self._score_tokens(pairs) if pairs else []
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores):
            totals[k] += lp
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context (``args == (context, gen_kwargs)``).

        ``gen_kwargs``: ``until`` (a string or list of strings; the text is cut before the
        first occurrence of any of them), ``max_gen_toks`` (token budget, default
        ``self.max_gen_toks``). Generation also stops at EOS. Sampling options are ignored
        (greedy only). Returns the generated text (special tokens skipped, not stripped).
        """
        rows = []
        for req in requests:
            context, gen_kwargs = req.args
            gk = dict(gen_kwargs or {})
            until = gk.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            until = [u for u in until if u]
            max_toks = int(gk.pop("max_gen_toks", self.max_gen_toks))
            if (gk.get("do_sample") or (gk.get("temperature") or 0) > 0) and not self._warned_sampling:
                log.warning("UnlearnLM.generate_until decodes greedily; ignoring sampling options %s", gk)
                self._warned_sampling = True
            ctx = self._encode_context(context) if context else [self.prefix_token_id]
            room = max(1, self.max_length - max_toks)
            if len(ctx) + max_toks > self.max_length:
                ctx = ctx[-room:]
            rows.append({"ids": ctx, "gen": [], "until": until, "max": max_toks, "done": max_toks <= 0})

        eos = self.tokenizer.eos_token_id
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["ids"]))
        for s in range(0, len(order), self.batch_size):
            chunk = [rows[i] for i in order[s: s + self.batch_size]]
            while True:
                active = [r for r in chunk if not r["done"]]
                if not active:
                    break
                seqs = [r["ids"] + r["gen"] for r in active]
                logits = self.adapter.logits(self._batch(seqs, [len(q) for q in seqs]))
                for row, r in enumerate(active):
                    nxt = int(logits[row, len(seqs[row]) - 1].argmax())
                    if nxt == eos:
                        r["done"] = True
                        continue
                    r["gen"].append(nxt)
                    if len(r["gen"]) >= r["max"]:
                        r["done"] = True
                    elif r["until"]:
                        text = self.tokenizer.decode(r["gen"], skip_special_tokens=True)
                        if any(u in text for u in r["until"]):
                            r["done"] = True

        out = []
        for req, r in zip(requests, rows):
            text = self.tokenizer.decode(r["gen"], skip_special_tokens=True)
            for u in r["until"]:
                text = text.split(u)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


__all__ = ["UnlearnLM", "TOKENIZATIONS"]
