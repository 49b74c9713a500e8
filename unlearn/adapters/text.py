"""TextAdapter: the only place that knows about causal language models.

It wraps any ``transformers`` ``AutoModelForCausalLM`` + tokenizer -- from the tiny zoo
(``zoo:tiny-llama/target``), a local directory, or a hub id -- through the same code, and
exposes the small contract that objectives, metrics and probes are written against
(:class:`~unlearn.adapters.base.TextModel`, the text side of :class:`~unlearn.adapters.base.Adapter`):

* :meth:`collate` -- QA items -> a right-padded batch with the prompt and padding masked;
* :meth:`logits` / :meth:`item_nll` / :meth:`token_logprobs` -- teacher-forced scores;
* :meth:`hidden_states` -- one decoder layer's output (representation-level objectives: RMU);
* :meth:`generate` -- greedy answers (left padding);
* :meth:`parameter_groups`, :meth:`reference`, :meth:`save`, :meth:`fingerprint`.

Tokenisation (recorded in every result as ``tokenization``):

* ``"split"`` (default): the prompt (``"Question: {q}\\nAnswer:"``) is tokenised with the
  tokenizer's special tokens (BOS), the answer is tokenised apart as ``" " + answer`` and EOS
  is appended; exactly the answer tokens and EOS are scored, and the generation prompt ends
  in a token the model saw in training.
* ``"reference"``: the TOFU / open-unlearning reference convention -- prompt
  ``"Question: {q}\\nAnswer: "`` (trailing space), ``full = prompt + answer`` tokenised as a
  whole, EOS appended if missing, and the first ``len(tokenize(prompt))`` positions masked.
  With byte-level BPE the trailing space merges into the first answer token, so this masks
  the first answer token. Use it to reproduce published numbers.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from unlearn.adapters import first_line, tokenizer_fingerprint, weights_fingerprint
from unlearn.adapters.base import IGNORE, WRAPPER_FILE, TextModel
from unlearn.zoo import zoo_path

Tokenization = Literal["split", "reference"]
DEFAULT_PROMPT = "Question: {question}\nAnswer:"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep == "\\" and "\\" in source


def resolve_source(source: str) -> str:
    """Map a model source to something ``from_pretrained`` accepts.

    ``zoo:<family>/<name>`` -> the shipped (or cached) zoo checkpoint directory; an existing
    directory -> itself; a path-like string that does not exist -> ValueError; anything
    else is passed on as a hub id.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"model source must be a non-empty string, got {source!r}")
    if source.startswith("zoo:"):
        return str(zoo_path(source[4:]))
    p = Path(source).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists() and not (p / WRAPPER_FILE).exists():
            raise ValueError(f"model path {source!r} exists but holds no config.json; point it at a saved model directory")
        return str(p)
    if p.exists():
        raise ValueError(f"model path {source!r} is a file; point it at a saved model directory")
    if _looks_like_path(source):
        raise ValueError(f"model path {source!r} does not exist; check the path, or use a zoo name such as 'zoo:tiny-llama/target'")
    return source  # a hub id


class TextAdapter(TextModel):
    """A causal LM + tokenizer behind the unlearning contract (:class:`~unlearn.adapters.base.TextModel`).

    Args:
        model: a ``transformers`` causal LM (``PreTrainedModel``).
        tokenizer: its tokenizer; needs a pad token (EOS is used when it has none).
        prompt_template: ``str.format`` template with a ``{question}`` field.
        tokenization: ``"split"`` or ``"reference"`` (see the module docstring).
        source: where the model came from (recorded in provenance).
    """

    def __init__(self, model, tokenizer, *, prompt_template: str = DEFAULT_PROMPT,
                 tokenization: Tokenization = "split", source: str = "<in-memory>") -> None:
        if tokenization not in ("split", "reference"):
            raise ValueError(f"tokenization must be 'split' or 'reference', got {tokenization!r}")
        if "{question}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{question}}', got {prompt_template!r}")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before wrapping it")
        if getattr(model.config, "vocab_size", None) is not None and len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model.config.vocab_size}: "
                "the tokenizer does not belong to this model (load both from the same directory)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.tokenization = tokenization
        self.source = source
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def load(cls, source: str, *, dtype: str = "float32", **kwargs) -> "TextAdapter":
        """Load a plain causal LM from ``zoo:<family>/<name>``, a local directory, or a hub id
        (same code). A wrapped model's directory (``wrapper.json``: ULD, ECO, ...) raises
        ValueError: load it with ``unlearn.models.load_model(source, "text")``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        where = resolve_source(source)
        if (Path(where) / WRAPPER_FILE).is_file():
            raise ValueError(f"{source!r} holds a wrapped model ({WRAPPER_FILE}), which TextAdapter.load does not "
                             f"rebuild; load it with unlearn.models.load_model({source!r}, \"text\")")
        if not Path(where).is_dir():
            try:
                tok = AutoTokenizer.from_pretrained(where)
                model = AutoModelForCausalLM.from_pretrained(where, dtype=_DTYPES[dtype])
            except OSError as e:
                raise ValueError(
                    f"could not load model {source!r}: not a local directory, and loading it as a hub id failed "
                    f"(offline machines need a local path). Cause: {first_line(e)}"
                ) from None
        else:
            try:
                tok = AutoTokenizer.from_pretrained(where)
            except Exception as e:  # noqa: BLE001 -- any failure here is a bad or missing tokenizer file
                raise ValueError(f"could not load the tokenizer of model {source!r} from {where}: {first_line(e)}; the "
                                 "directory needs tokenizer.json (or the slow tokenizer's files) and "
                                 "tokenizer_config.json, saved with the model") from None
            try:
                model = AutoModelForCausalLM.from_pretrained(where, dtype=_DTYPES[dtype])
            except Exception as e:  # noqa: BLE001 -- corrupt, empty or mismatched weight/config files
                files = ", ".join(sorted(f.name for f in Path(where).glob("*.safetensors"))) or "no *.safetensors"
                raise ValueError(f"could not load the weights of model {source!r} from {where}: {first_line(e)}; the "
                                 f"weight files ({files}) or config.json are corrupt, incomplete or do not belong "
                                 "together -- save the model again") from None
        model.eval()
        return cls(model, tok, source=source, **kwargs)

    def save(self, path: str | Path) -> None:
        """Write the model (safetensors), its config and the tokenizer to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)

    def reference(self) -> "TextAdapter":
        """A frozen deep copy (eval mode, no gradients): the model "before unlearning"."""
        m = copy.deepcopy(self.model)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        ref = TextAdapter(m, self.tokenizer, prompt_template=self.prompt_template,
                          tokenization=self.tokenization, source=self.source)
        ref._fingerprint = self._fingerprint
        return ref

    def fingerprint(self, refresh: bool = False) -> str:
        """sha256 (16 hex) over parameter names and bytes: identifies the exact weights."""
        if self._fingerprint is None or refresh:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def identity(self) -> dict[str, str]:
        """The weights plus the tokenizer's fingerprint, the tokenisation mode and the prompt."""
        return {**super().identity(), "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "tokenization": self.tokenization, "prompt_template": self.prompt_template}

    # ------------------------------------------------------------------ encoding
    def prompt(self, question: str) -> str:
        return self.prompt_template.format(question=question)

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids and labels (prompt positions = -100) for one question/answer pair."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        if self.tokenization == "split":
            p_ids = tok(self.prompt(question), add_special_tokens=True)["input_ids"]
            a_ids = tok(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [eos]
            return p_ids + a_ids, [IGNORE] * len(p_ids) + a_ids
        prompt = self.prompt(question) + " "
        p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        ids = tok(prompt + answer, add_special_tokens=True)["input_ids"]
        if ids[-1] != eos:
            ids = ids + [eos]
        n = min(len(p_ids), len(ids) - 1)
        return ids, [IGNORE] * n + ids[n:]

    def generation_prompt_ids(self, question: str) -> list[int]:
        text = self.prompt(question) + (" " if self.tokenization == "reference" else "")
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def collate(self, items: list[dict], answer_key: str = "answer", answer_index: int | None = None,
                question_key: str = "question", indices: list[int] | None = None) -> dict[str, Any]:
        """Build a right-padded batch.

        Args:
            items: dicts with ``question_key`` and ``answer_key``.
            answer_key: which answer to score (``"answer"``, ``"paraphrased_answer"``,
                ``"perturbed_answer"``, ``"idk"``...).
            answer_index: when ``item[answer_key]`` is a list (perturbed answers), which one.
            indices: positions of the items in their dataset (kept as ``batch["index"]``).
        Returns:
            ``{"input_ids": (B, T) long, "attention_mask": (B, T) long, "labels": (B, T) long
            with -100 on prompt and padding, "index": (B,) long}``.
        """
        if not items:
            raise ValueError("cannot collate an empty list of items")
        seqs = []
        for it in items:
            for key in (question_key, answer_key):
                if key not in it:
                    raise ValueError(f"item has no {key!r} field (fields: {sorted(it)})")
            ans = it[answer_key]
            if answer_index is not None:
                ans = ans[answer_index]
            if not isinstance(ans, str):
                raise ValueError(f"item[{answer_key!r}] must be a string (or pass answer_index for a list), got {type(ans).__name__}")
            seqs.append(self.encode(it[question_key], ans))
        T = max(len(ids) for ids, _ in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (ids, lab) in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attn[i, : len(ids)] = 1
        idx = torch.tensor(indices if indices is not None else list(range(len(items))), dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attn, "labels": labels, "index": idx}

    @property
    def supports_shared_prefix(self) -> bool:
        """True when scores may be computed by calling ``self.model`` with a KV-cached prompt
        (the evaluation harness's shared-prefix pass). A subclass that changes :meth:`logits`
        (a guarded or logit-difference model) gets False, so every score goes through it."""
        return type(self).logits is TextAdapter.logits

    # ------------------------------------------------------------------ scores
    def logits(self, batch: dict[str, Any], model=None) -> torch.Tensor:
        """Next-token logits, shape (B, T, V) -- position t predicts token t+1."""
        m = model if model is not None else self.model
        dev = next(m.parameters()).device
        out = m(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
        return out.logits

    def item_nll(self, batch: dict[str, Any], model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-item summed NLL of the answer tokens and their count: ``(nll (B,), n (B,))``.

        Differentiable when called in training mode with grad enabled.
        """
        logits = self.logits(batch, model)  # (B, T, V)
        lg, lb, mask = self.shift(logits, batch["labels"])
        tok_nll = F.cross_entropy(lg.float().transpose(1, 2), lb.clamp_min(0), reduction="none")  # (B, T-1)
        tok_nll = tok_nll * mask
        return tok_nll.sum(-1), mask.sum(-1)

    def hidden_states(self, batch: dict[str, Any], layer: int, model=None) -> torch.Tensor:
        """Output of decoder layer ``layer`` (0-based, ``model.model.layers[layer]``): (B, T, H).

        Read from ``output_hidden_states`` (entry ``layer + 1``; entry 0 is the embeddings).
        The last layer is refused: transformers applies the final norm to that entry, so it
        is not the layer's output. Differentiable when called with grad enabled.
        """
        m = model if model is not None else self.model
        n_layers = m.config.num_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers - 1:
            raise ValueError(f"layer must be an int in 0..{n_layers - 2} for this {n_layers}-layer model "
                             f"(the last layer's hidden state is taken after the final norm), got {layer!r}")
        dev = next(m.parameters()).device
        out = m(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                output_hidden_states=True)
        return out.hidden_states[layer + 1]

    def token_logprobs(self, batch: dict[str, Any], model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of each label token: ``(logp (B, T-1), mask (B, T-1) bool)``; 0 where masked."""
        logits = self.logits(batch, model)
        lg, lb, mask = self.shift(logits, batch["labels"])
        logp = torch.log_softmax(lg.float(), -1).gather(-1, lb.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return logp * mask, mask

    # ------------------------------------------------------------------ generation
    def generate(self, questions: list[str], *, max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
        """Greedy answers to questions (left padding), decoded without special tokens, stripped."""
        return self.generate_from_ids([self.generation_prompt_ids(q) for q in questions],
                                      max_new_tokens=max_new_tokens, batch_size=batch_size)

    @torch.no_grad()
    def generate_from_ids(self, prompts: list[list[int]], *, max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
        """Greedy continuations of token-id prompts (left padding), decoded without special tokens, stripped."""
        tok = self.tokenizer
        out: list[str] = []
        was_training = self.model.training
        self.model.eval()
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s: s + batch_size]
            T = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, c in enumerate(chunk):
                ids[i, T - len(c):] = torch.tensor(c)
                attn[i, T - len(c):] = 1
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out += [t.strip() for t in tok.batch_decode(gen[:, T:], skip_special_tokens=True)]
        if was_training:
            self.model.train()
        return out

    # ------------------------------------------------------------------ parameters
    # parameter-name patterns of each group, over the families' names: Llama-style (embed_tokens,
    # self_attn, mlp, *norm), GPT-2 (wte/wpe, attn., mlp, ln_*), GPT-NeoX (embed_in, attention., mlp,
    # *layernorm), DeepSeek (self_attn incl. kv_a_layernorm, mlp with experts and shared_experts)
    _GROUPS = {
        "embeddings": r"embed_tokens|embed_in\.|wte|wpe|embed_positions",
        "attention": r"self_attn|attn\.|\.attention\.",
        "mlp": r"\.mlp\.",
        "norm": r"norm|ln_",
        "lm_head": r"lm_head|embed_out",
    }

    def enable_gradient_checkpointing(self) -> None:
        """``transformers``' gradient checkpointing (non-reentrant, so frozen inputs and LoRA work)."""
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ValueError(f"model {self.source!r} ({type(self.model).__name__}) does not support gradient "
                             "checkpointing; set train.gradient_checkpointing: false")
        if hasattr(self.model, "activation_checkpointing_enable"):  # the name in newer transformers
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False

    def parameter_groups(self) -> dict[str, list[str]]:
        """Named parameter groups -> parameter names. Groups: embeddings, attention, mlp,
        norm, lm_head, and ``layer.<i>`` for each decoder layer. A group may be empty: OLMo's
        norms have no parameters; with tied embeddings (GPT-2, Gemma) the LM head is the
        embedding matrix, named once, under embeddings."""
        groups: dict[str, list[str]] = {k: [] for k in self._GROUPS}
        for name, _ in self.model.named_parameters():
            for g, pat in self._GROUPS.items():
                if re.search(pat, name):
                    groups[g].append(name)
            m = re.search(r"layers\.(\d+)\.|\.h\.(\d+)\.", name)
            if m:
                groups.setdefault(f"layer.{m.group(1) or m.group(2)}", []).append(name)
        return groups
