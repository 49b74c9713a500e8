"""Layer-wise linear probes: is a forgotten attribute still linearly decodable?

For each decoder layer ``l`` a multinomial logistic regression (scikit-learn, features
standardised) maps a hidden state to the value of one attribute of the author the question is
about (e.g. the genre). It is trained on the **retain** authors' questions and tested on the
**forget** authors' questions, so it can only succeed on a forget author if the model's hidden
states carry that author's attribute:

* features: the output of layer ``l`` (:func:`~unlearn.probes.base.layer_outputs`) at one
  position of the item's text:

  - ``before_value`` (default): the last token before the attribute's value in the
    teacher-forced answer (``"... Answer: Zy Thioth writes"`` for ``" mystery"``), i.e. where
    the model has to produce the value;
  - ``subject_mean``: the mean over the author-name tokens of the prompt (where a large LM
    gathers what it knows about the subject, Geva et al., 2023);
  - ``last_prompt``: the last token of the generation prompt.

* items (``questions``): ``attribute`` (default) uses the question that asks the attribute,
  one item per author; ``all`` uses every question about an author, labelled with that
  author's attribute value (only with ``subject_mean`` / ``last_prompt``);
* label: ``item["value"]`` of the author's item whose ``attribute`` is the chosen one.

On the tiny zoo target (fingerprint f1a66ab59d05793b, forget10, genre) ``before_value`` decodes the forget
authors' genre at 60-80 % per layer against a 5 % majority baseline, while the name-token
features reach only 15-30 %: the tiny model looks the attribute up at the answer position,
not at the subject. Read the last layer with care: there the probe mostly reads the model's
own next-token prediction; the earlier layers show what is stored but not said.

Baselines reported with every accuracy: ``majority`` (always predict the most frequent training
label, scored on the test items) and ``chance`` (1 / number of training classes); a
shuffled-label probe (the same features, training labels permuted) shows what the probe reaches
without a real signal. After unlearning the probe is refitted on the unlearned model's states
(``acc``) and the probe fitted before unlearning is applied to them too (``acc_transfer``).

How to read it: **shallow forgetting** = answers changed (forget Prob/ROUGE down) while the
refitted probe's accuracy on forget authors stays where it was. A model that never learned the
forget authors (the zoo's retain model) scores near the majority baseline: that, not zero, is
what complete forgetting looks like.

Reference: Alain & Bengio, 2016, "Understanding intermediate layers using linear classifier
probes" (arXiv:1610.01644); Geva et al., 2023, "Dissecting Recall of Factual Associations in
Auto-Regressive Language Models" (arXiv:2304.14767); probing of unlearned models: e.g. Lynch et
al., 2024, "Eight Methods to Evaluate Robust Unlearning in LLMs" (arXiv:2402.16835).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from unlearn.evaluators.base import MetricResult, MetricSpec
from unlearn.probes.base import (Probe, ProbeConfig, ProbeResult, _model_of, authors_of, decoder_layers,
                                 encode_with_spans, layer_outputs, locate_value, pad_right, span_positions)


@dataclass
class LinearProbeConfig(ProbeConfig):
    attribute: str = field(default="genre", metadata={"help": "the author attribute decoded (item['attribute'] / ['value'])"})
    questions: Literal["all", "attribute"] = field(default="attribute", metadata={
        "help": "all: every question about an author, labelled with the attribute; attribute: only the questions asking it"})
    position: Literal["subject_mean", "last_prompt", "before_value"] = field(default="before_value", metadata={
        "help": "features: mean over the author-name tokens of the prompt, the last prompt token, or the last token "
                "before the value in the answer (needs questions: attribute)"})
    layers: list[int] | None = field(default=None, metadata={"help": "decoder layers probed (0-based); null: all"})
    C: float = field(default=1.0, metadata={"help": "inverse L2 regularisation strength of the logistic regression"})
    max_iter: int = field(default=2000, metadata={"help": "solver iterations"})
    max_train_items: int | None = field(default=2000, metadata={"help": "retain items used for training (random subset); null: all"})
    batch_size: int = field(default=64, metadata={"help": "prompts per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed of the training subset and the label shuffle"})

    def __post_init__(self) -> None:
        if not self.attribute.strip():
            raise ValueError("attribute is empty; name an author attribute such as genre or country")
        if self.position == "before_value" and self.questions != "attribute":
            raise ValueError("position 'before_value' reads the answer up to the attribute's value, so it needs "
                             "questions: attribute")
        if self.C <= 0 or self.max_iter < 1 or self.batch_size < 1:
            raise ValueError("need C > 0, max_iter >= 1 and batch_size >= 1")
        if self.max_train_items is not None and self.max_train_items < 2:
            raise ValueError(f"max_train_items must be >= 2 or null, got {self.max_train_items}")
        if self.layers is not None and (not self.layers or any(isinstance(x, bool) or x < 0 for x in self.layers)):
            raise ValueError(f"layers must be null or a non-empty list of layer indices >= 0, got {self.layers}")


# ------------------------------------------------------------------------------ core
def fit_probe(X_train: np.ndarray, y_train: list, C: float = 1.0, max_iter: int = 2000) -> dict[str, Any]:
    """Standardise and fit a multinomial logistic regression.

    Args:
        X_train: (N, H) features; y_train: N labels (strings).
    Returns:
        The probe as plain arrays (no pickling): ``{"classes": [str] (K,), "mean": (H,), "scale": (H,),
        "coef": (K', H), "intercept": (K',)}`` (``K' = 1`` for two classes, as scikit-learn stores it).
    """
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(X_train, dtype=np.float64)
    mean, scale = X.mean(0), X.std(0)
    scale[scale < 1e-12] = 1.0
    classes = sorted(set(y_train))
    if len(classes) < 2:
        return {"classes": classes, "mean": mean, "scale": scale, "coef": np.zeros((1, X.shape[1])), "intercept": np.zeros(1)}
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit((X - mean) / scale, y_train)
    return {"classes": [str(c) for c in clf.classes_], "mean": mean, "scale": scale, "coef": clf.coef_,
            "intercept": clf.intercept_}


def predict_probe(probe: dict[str, Any], X: np.ndarray) -> list[str]:
    """Labels predicted by a probe from :func:`fit_probe` for features (N, H)."""
    Z = (np.asarray(X, dtype=np.float64) - probe["mean"]) / probe["scale"]
    classes = list(probe["classes"])
    if len(classes) < 2:
        return [classes[0] if classes else None] * len(Z)
    s = Z @ np.asarray(probe["coef"]).T + np.asarray(probe["intercept"])  # (N, K') scores
    if s.shape[1] == 1:  # binary: positive score -> classes[1]
        return [classes[1] if v > 0 else classes[0] for v in s[:, 0]]
    return [classes[i] for i in s.argmax(1)]


def accuracy(pred: list, y: list) -> float:
    return float(np.mean([p == t for p, t in zip(pred, y)])) if y else float("nan")


def baselines(y_train: list, y_test: list) -> dict[str, float]:
    """``majority``: accuracy on ``y_test`` of always predicting the most frequent training
    label (ties: the smallest label); ``chance``: 1 / number of training classes."""
    counts = Counter(y_train)
    top = min(counts, key=lambda c: (-counts[c], str(c)))
    return {"majority": float(np.mean([t == top for t in y_test])), "chance": 1.0 / len(counts),
            "majority_label": top}


# ------------------------------------------------------------------------------ the probe
class LinearProbe(Probe):
    """Per-layer logistic-regression probes trained on retain authors, tested on forget authors."""

    name = "linear_probe"
    Config = LinearProbeConfig
    paper = ("Alain & Bengio, 2016, Understanding intermediate layers using linear classifier probes "
             "(arXiv:1610.01644)")
    version = "1"
    SPECS: dict[str, MetricSpec] = {}

    def items(self, data) -> tuple[list[dict], list[str], list[dict], list[str]]:
        """(train items, train labels, test items, test labels) from the retain / forget sets."""
        cfg = self.config
        if not data.retain:
            raise ValueError("linear_probe trains on the retain authors: the task needs a retain set (task.retain_split)")

        def labelled(items, what):
            out, labels = [], []
            for aid, its in authors_of(items, f"linear_probe: {what}").items():
                vals = [it["value"] for it in its if it.get("attribute") == cfg.attribute]
                if not vals:
                    continue
                use = its if cfg.questions == "all" else [it for it in its if it.get("attribute") == cfg.attribute]
                out += use
                labels += [str(vals[0])] * len(use)
            if not out:
                attrs = sorted({it.get("attribute") for it in items if it.get("attribute")})
                raise ValueError(f"linear_probe: no {what} item has attribute {cfg.attribute!r}; attributes: {attrs}")
            return out, labels

        tr, y_tr = labelled(data.retain, "retain")
        te, y_te = labelled(data.forget, "forget")
        if cfg.max_train_items is not None and len(tr) > cfg.max_train_items:
            idx = sorted(random.Random(f"probe-train-{cfg.seed}").sample(range(len(tr)), cfg.max_train_items))
            tr, y_tr = [tr[i] for i in idx], [y_tr[i] for i in idx]
        return tr, y_tr, te, y_te

    @torch.no_grad()
    def features(self, adapter, items: list[dict], layers: list[int]) -> dict[int, np.ndarray]:
        """``{layer: (N, H)}`` features of the items' generation prompts (see the module doc)."""
        cfg = self.config
        feats: dict[int, list[np.ndarray]] = {L: [] for L in layers}
        pad = adapter.tokenizer.pad_token_id
        for s in range(0, len(items), cfg.batch_size):
            chunk = items[s: s + cfg.batch_size]
            seqs, pos = [], []
            for it in chunk:
                if cfg.position == "before_value":
                    found = locate_value(adapter, it)
                    if found is None:
                        raise ValueError(f"linear_probe: the value {it.get('value')!r} is not a token span of the answer "
                                         f"{it['answer']!r}; use position subject_mean or last_prompt")
                    ids, p = found[0][: found[3][0]], [found[3][0] - 1]
                    seqs.append(ids)
                    pos.append(p)
                    continue
                ids, spans, text = encode_with_spans(adapter, it["question"])
                if cfg.position == "last_prompt":
                    p = [len(ids) - 1]
                else:
                    at = text.find(it["author"])
                    p = span_positions(spans, at, at + len(it["author"])) if at >= 0 else []
                    if not p:
                        raise ValueError(f"linear_probe: author name {it['author']!r} not found in the prompt of "
                                         f"{it['question']!r}; use position: last_prompt")
                seqs.append(ids)
                pos.append(p)
            ids, mask = pad_right(seqs, pad)
            outs = layer_outputs(adapter, ids, mask, layers)
            for L in layers:
                h = outs[L].float().cpu()  # (B, T, H)
                feats[L].append(torch.stack([h[i, p].mean(0) for i, p in enumerate(pos)]).numpy())
        return {L: np.concatenate(v) for L, v in feats.items()}

    def run(self, adapter, data, *, reference: ProbeResult | None = None) -> ProbeResult:
        """Fit and test one probe per layer.

        Result: values ``n_train``, ``n_test``, ``n_test_authors``, ``n_classes``, ``majority``,
        ``chance``, ``best_layer``, ``best_acc``; arrays ``layers``, ``acc`` (test accuracy per
        layer), ``train_acc``, ``shuffled_acc``, and with a reference ``acc_transfer`` (the
        reference's probes applied to these states); tensors: each layer's probe
        (``coef.<l>``, ``intercept.<l>``, ``mean.<l>``, ``scale.<l>``) and its classes in values."""
        cfg = self.config
        model = _model_of(adapter)
        n = len(decoder_layers(model))
        layers = sorted(set(cfg.layers)) if cfg.layers is not None else list(range(n))
        if any(L >= n for L in layers):
            raise ValueError(f"linear_probe layers {layers} out of range: the model has {n} decoder layers (0..{n - 1})")
        tr, y_tr, te, y_te = self.items(data)
        f_tr, f_te = self.features(adapter, tr, layers), self.features(adapter, te, layers)
        base = baselines(y_tr, y_te)
        y_shuf = list(y_tr)
        random.Random(f"probe-shuffle-{cfg.seed}").shuffle(y_shuf)
        arrays: dict[str, Any] = {"layers": layers, "acc": [], "train_acc": [], "shuffled_acc": []}
        tensors: dict[str, torch.Tensor] = {}
        classes: dict[str, list[str]] = {}
        if reference is not None:
            arrays["acc_transfer"] = []
        for L in layers:
            pr = fit_probe(f_tr[L], y_tr, cfg.C, cfg.max_iter)
            arrays["acc"].append(accuracy(predict_probe(pr, f_te[L]), y_te))
            arrays["train_acc"].append(accuracy(predict_probe(pr, f_tr[L]), y_tr))
            arrays["shuffled_acc"].append(accuracy(predict_probe(fit_probe(f_tr[L], y_shuf, cfg.C, cfg.max_iter), f_te[L]), y_te))
            for k in ("coef", "intercept", "mean", "scale"):
                tensors[f"{k}.{L}"] = torch.as_tensor(np.asarray(pr[k]), dtype=torch.float64)
            classes[str(L)] = pr["classes"]
            if reference is not None:
                ref = {k: reference.tensors[f"{k}.{L}"].numpy() for k in ("coef", "intercept", "mean", "scale")}
                ref["classes"] = reference.values["classes"][str(L)]
                arrays["acc_transfer"].append(accuracy(predict_probe(ref, f_te[L]), y_te))
        best = int(np.argmax(arrays["acc"]))
        values = {"attribute": cfg.attribute, "n_train": len(tr), "n_test": len(te),
                  "n_train_authors": len({it["author_id"] for it in tr}), "n_test_authors": len({it["author_id"] for it in te}),
                  "n_classes": len(set(y_tr)), "majority": base["majority"], "majority_label": base["majority_label"],
                  "chance": base["chance"], "best_layer": layers[best], "best_acc": arrays["acc"][best], "classes": classes}
        return self._result(values, arrays, tensors)

    def compare(self, before: ProbeResult, after: ProbeResult) -> dict[str, MetricResult]:
        b, a = before.arrays["acc"], after.arrays["acc"]
        maj = before.values["majority"]
        note = f"majority baseline {maj:.3f}, chance {before.values['chance']:.3f}"
        out = {
            "lp_best_acc_before": self.metric("lp_best_acc_before", max(b), b, note=note),
            "lp_best_acc_after": self.metric("lp_best_acc_after", max(a), a, note=note),
            "lp_acc_drop": self.metric("lp_acc_drop", max(b) - max(a), [x - y for x, y in zip(b, a)]),
            "lp_majority_baseline": self.metric("lp_majority_baseline", maj),
        }
        tr = after.arrays.get("acc_transfer")
        out["lp_transfer_acc_after"] = self.metric("lp_transfer_acc_after", max(tr) if tr else None, tr,
                                                   note=note if tr else "not computable: no reference probe")
        return out


def _spec(name, hib, desc):
    return MetricSpec(name, hib, LinearProbe.version, description=desc, paper="Alain & Bengio, 2016 (arXiv:1610.01644)")


LinearProbe.SPECS = {
    "lp_best_acc_before": _spec("lp_best_acc_before", None, "best-layer test accuracy on forget authors, model before "
                                                             "unlearning (per_item: per layer)"),
    "lp_best_acc_after": _spec("lp_best_acc_after", False, "best-layer test accuracy on forget authors, probe refitted on "
                                                           "the unlearned model; goal: the majority baseline"),
    "lp_acc_drop": _spec("lp_acc_drop", True, "best accuracy before minus after (per_item: per layer)"),
    "lp_majority_baseline": _spec("lp_majority_baseline", None, "accuracy of predicting the most frequent training label"),
    "lp_transfer_acc_after": _spec("lp_transfer_acc_after", False, "best-layer accuracy of the probes fitted before "
                                                                   "unlearning, applied to the unlearned model's states"),
}
