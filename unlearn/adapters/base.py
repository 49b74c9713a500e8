"""The adapter contract: what objectives, the trainer, the harness, probes and attacks may ask
of a model, whatever its modality.

An adapter is the only code that knows a model family. Everything else is written against
the abstract classes below, in the style of lm-eval's ``LM``: each method's docstring states
its exact inputs and outputs, tensor shapes included.

* :class:`Adapter` -- the modality-free part: ``modality``, ``model`` (the ``torch.nn.Module``
  that is trained), ``collate``, ``item_nll``, ``parameter_groups``, ``reference``,
  ``fingerprint``, ``save`` and the classmethod ``load``.
* :class:`TextModel` -- causal language models (``modality = "text"``): teacher-forced
  scores (``logits``, ``token_logprobs``), representations (``hidden_states``), greedy
  ``generate`` and the prompt encoding the scores are defined on.
* :class:`ImageModel` -- text-to-image diffusion models (``modality = "image"``): prompt
  tokens and embeddings (``tokenize``, ``encode_prompts``), the noise prediction
  (``noise_pred``) and ``sample``.

Implementations: :class:`~unlearn.adapters.text.TextAdapter` (and the wrapped models built
on it, ``ULDAdapter`` and ``ECOAdapter``), :class:`~unlearn.adapters.image.ImageAdapter`
(and ``SAFREEAdapter``). ``unlearn.models.load_model`` loads any of them from a source.

Shape letters: ``B`` items in a batch, ``T`` sequence length, ``V`` vocabulary, ``H`` hidden
width, ``K`` timesteps per item, ``d`` text-embedding width, ``(3, S, S)`` an image.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

MODALITIES = ("text", "image")
IGNORE = -100  # label of a position that is not scored (prompt, padding)
# A directory holding this file is a wrapped model (ULD, ECO, SAFREE, ...) saved by its
# adapter; ``unlearn.models.load_model`` rebuilds it through the editor that wrote it.
WRAPPER_FILE = "wrapper.json"


class Adapter(abc.ABC):
    """A model behind the unlearning contract (modality-free part).

    Attributes:
        modality: class attribute, ``"text"`` or ``"image"``; says which tasks, objectives,
            editors, suites and attacks fit the model.
        model: the ``torch.nn.Module`` holding every weight of the model; the trainer
            optimises it in place and may replace it (``adapter.model = ...``, e.g. after
            ``accelerate`` unwraps it), parameter selections name its parameters, and
            :meth:`fingerprint` hashes its state.
        source: where the model came from (a zoo name, a directory, a hub id, or
            ``"<in-memory>"``), recorded in provenance.
    """

    modality: ClassVar[str]
    model: torch.nn.Module
    source: str

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        m = cls.__dict__.get("modality")
        if m is not None and m not in MODALITIES:
            raise TypeError(f"{cls.__name__}.modality must be one of {MODALITIES}, got {m!r}")

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (where batches are moved)."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ batches and scores
    @abc.abstractmethod
    def collate(self, items: list[dict], answer_key: str | None = None, answer_index: int | None = None,
                indices: list[int] | None = None, **kwargs) -> dict[str, Any]:
        """Turn dataset items into one batch that :meth:`item_nll` scores.

        Args:
            items: B item dicts of the task (text: ``question`` + ``answer`` fields; image:
                ``image`` + ``caption``). Must not be empty (ValueError).
            answer_key: which target of the item to score (text: ``"answer"``, ``"idk"``,
                ``"paraphrased_answer"``...; image: only ``None`` / ``"answer"``, the image).
            answer_index: when ``item[answer_key]`` is a list, which element.
            indices: the items' positions in their dataset, kept as ``batch["index"]``.
            **kwargs: modality-specific options (text ``question_key``; image
                ``caption_key``, ``seed``).
        Returns:
            a dict of tensors, always with ``"index"``: ``(B,)`` long. Text:
            ``input_ids``/``attention_mask``/``labels`` ``(B, T)`` long. Image:
            ``pixel_values`` ``(B, 3, S, S)``, ``input_ids`` ``(B, T)``, ``noise``
            ``(B, K, 3, S, S)``, ``timesteps`` ``(B, K)`` long.
        """

    @abc.abstractmethod
    def item_nll(self, batch: dict[str, Any], model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-item summed loss of each item's target and the number of terms summed.

        Args:
            batch: a batch built by :meth:`collate`.
            model: score with this module instead of :attr:`model` (same architecture; a
                reference copy, an attacked copy).
        Returns:
            ``(loss_sum (B,) float, count (B,) long)``. Text: the summed negative
            log-likelihood of the answer tokens (EOS included) and the number of answer
            tokens. Image: the denoising MSE summed over the item's K timesteps, and K.
            ``loss_sum / count`` is the per-item mean. Differentiable when called in
            training mode with grad enabled.
        """

    # ------------------------------------------------------------------ parameters, copies, identity
    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass instead of keeping them (less memory,
        about one more forward pass of time); ``train.gradient_checkpointing``. Raises
        ValueError when the model cannot."""
        raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")

    @abc.abstractmethod
    def parameter_groups(self) -> dict[str, list[str]]:
        """Named groups of parameters: group name -> names of :attr:`model`'s parameters
        (as ``model.named_parameters()`` spells them). Used by the ``group`` selection and the
        editors; the groups a model offers are listed in its adapter's docstring."""

    @abc.abstractmethod
    def reference(self) -> "Adapter":
        """A frozen deep copy of this adapter: the model "before unlearning".

        Returns an adapter of the same class (a wrapped model stays wrapped) whose module is
        a copy in eval mode with ``requires_grad`` off everywhere; later training of ``self``
        does not change it. Its :meth:`fingerprint` equals this adapter's at copy time."""

    @abc.abstractmethod
    def fingerprint(self, refresh: bool = False) -> str:
        """16 hex digits of sha256 identifying the exact model: every weight (as float32,
        whatever its dtype or device) and, for a wrapped model, the wrapper's settings.

        Cached: pass ``refresh=True`` after changing the weights in place."""

    def identity(self) -> dict[str, str]:
        """What decides this model's outputs, as strings: the class and :meth:`fingerprint`,
        plus what a subclass adds (text: the tokenizer's fingerprint, the tokenisation mode
        and the prompt template; image: the tokenizer and the noise scheduler). Two models
        with the same identity give the same evaluation results, so it keys the evaluation
        cache (:mod:`unlearn.evaluators.cache`)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "weights": self.fingerprint()}

    # ------------------------------------------------------------------ storage
    @abc.abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the model to the directory ``path`` (created if needed) in a form that
        ``unlearn.models.load_model(path, modality)`` rebuilds with the same fingerprint.
        Plain models write safetensors weights; wrapped ones write ``wrapper.json``."""

    @classmethod
    @abc.abstractmethod
    def load(cls, source: str, **kwargs) -> "Adapter":
        """Load a model of this class from ``source`` (a ``zoo:<family>/<name>`` name or a
        directory written by :meth:`save`; text models also take a hub id).

        ``kwargs`` are the adapter's options (text: ``dtype``, ``prompt_template``,
        ``tokenization``; image: ``timesteps_per_item``). Raises ValueError naming the source
        and the fix when it cannot be loaded. To load any saved model, wrapped ones included,
        call ``unlearn.models.load_model``."""


class TextModel(Adapter):
    """A causal language model behind the contract (``modality = "text"``).

    Attributes:
        tokenizer: the model's ``transformers`` tokenizer (with EOS and pad tokens).
        prompt_template: ``str.format`` template with a ``{question}`` field.
        tokenization: ``"split"`` or ``"reference"``: how a question/answer pair becomes
            tokens (see :mod:`unlearn.adapters.text`).

    Batches (``collate``): right-padded ``input_ids`` ``(B, T)``, ``attention_mask`` ``(B, T)``
    and ``labels`` ``(B, T)`` equal to ``input_ids`` on the scored answer tokens and ``-100``
    on the prompt and the padding.
    """

    modality = "text"
    tokenizer: Any
    prompt_template: str
    tokenization: str

    @staticmethod
    def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Align logits with the tokens they predict.

        ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)`` -> ``(logits (B, T-1, V), labels (B, T-1),
        mask (B, T-1) bool)`` where ``mask`` is True on scored (non ``-100``) label positions."""
        lg = logits[:, :-1, :]
        lb = labels[:, 1:].to(logits.device)
        return lg, lb, lb != IGNORE

    @property
    def supports_shared_prefix(self) -> bool:
        """True when the harness may score by calling :attr:`model` on a KV-cached prompt
        instead of :meth:`logits` (only for a model whose logits are the module's own)."""
        return False

    # ------------------------------------------------------------------ prompt encoding
    @abc.abstractmethod
    def prompt(self, question: str) -> str:
        """The prompt string of ``question`` (``prompt_template`` filled in)."""

    @abc.abstractmethod
    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of one question/answer pair and its labels: ``(ids, labels)``, two lists
        of the same length; labels are ``-100`` on the prompt, the ids on the answer and EOS."""

    @abc.abstractmethod
    def generation_prompt_ids(self, question: str) -> list[int]:
        """The token ids :meth:`generate` continues for ``question`` (special tokens included)."""

    # ------------------------------------------------------------------ scores
    @abc.abstractmethod
    def logits(self, batch: dict[str, Any], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` of a :meth:`collate` batch; position ``t`` predicts
        token ``t + 1``. ``model``: score with this module instead of :attr:`model`."""

    @abc.abstractmethod
    def token_logprobs(self, batch: dict[str, Any], model: torch.nn.Module | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each label token: ``(logp (B, T-1) float, mask (B, T-1) bool)``,
        aligned as :meth:`shift` aligns them; ``logp`` is 0 where ``mask`` is False."""

    @abc.abstractmethod
    def hidden_states(self, batch: dict[str, Any], layer: int, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Output of decoder layer ``layer`` (0-based) on a :meth:`collate` batch: ``(B, T, H)``.

        ValueError for a layer outside ``0 .. n_layers - 2`` (the last layer's hidden state is
        taken after the final norm). Differentiable when called with grad enabled."""

    # ------------------------------------------------------------------ generation
    @abc.abstractmethod
    def generate(self, questions: list[str], *, max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
        """Greedy answers to ``questions``: one string per question (new tokens only, decoded
        without special tokens and stripped), at most ``max_new_tokens`` tokens, stopping at EOS.
        A question's answer does not depend on the batch it is in (left padding)."""


class ImageModel(Adapter):
    """A text-to-image diffusion model behind the contract (``modality = "image"``).

    Attributes:
        tokenizer: the text encoder's tokenizer (EOS and pad tokens; prompts are padded to
            ``model_max_length``).
        scheduler: the diffusers noise schedule used in training (sampling uses DDIM on its config).
        timesteps_per_item: K, the timesteps :meth:`collate` draws per item.

    :meth:`item_nll` is the per-item denoising loss (``item_loss`` names the same thing), so
    objectives written against the text adapter's ``(nll, n)`` run unchanged.
    """

    modality = "image"
    tokenizer: Any
    scheduler: Any
    timesteps_per_item: int

    @property
    @abc.abstractmethod
    def unet(self) -> torch.nn.Module:
        """The denoising network (a part of :attr:`model`)."""

    @property
    @abc.abstractmethod
    def text_encoder(self) -> torch.nn.Module:
        """The prompt encoder (a part of :attr:`model`)."""

    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """S: images are ``(3, S, S)``."""

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of what :meth:`noise_pred` denoises: ``(3, S, S)`` pixels here; a latent
        model's latents (e.g. ``(4, S/8, S/8)`` for Stable Diffusion)."""
        return (3, self.image_size, self.image_size)

    @abc.abstractmethod
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> token ids ``(B, T)`` long, padded/truncated to the tokenizer's length."""

    @abc.abstractmethod
    def encode_prompts(self, input_ids: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Token ids ``(B, T)`` -> text-encoder token embeddings ``(B, T, d)``: the condition of
        :meth:`noise_pred`. ``model``: use this module instead of :attr:`model`."""

    @abc.abstractmethod
    def noise_pred(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   model: torch.nn.Module | None = None) -> torch.Tensor:
        """The predicted noise ε_θ(x_t, c, t) (a v-prediction model: the velocity): ``x_t``
        ``(B, *noise_shape)``, ``t`` ``(B,)`` long, ``cond`` ``(B, T, d)`` -> ``(B, *noise_shape)``."""

    @abc.abstractmethod
    def sample(self, prompts: list[str], seed: int | list[int] = 0, steps: int = 20, guidance: float = 3.0,
               prompt_embeds: torch.Tensor | None = None, model: torch.nn.Module | None = None) -> np.ndarray:
        """Generate one image per prompt (DDIM, classifier-free guidance).

        Args:
            prompts: B prompts.
            seed: one int (prompt ``i`` uses ``seed + i``) or B seeds; an image depends on its
                prompt and seed only, not on its batch.
            steps: denoising steps (>= 1).
            guidance: classifier-free guidance scale (1 = conditional only).
            prompt_embeds: ``(B, T, d)`` conditions used instead of the encoded prompts.
            model: sample with this module instead of :attr:`model`.
        Returns:
            uint8 images ``(B, S, S, 3)``.
        """


__all__ = ["Adapter", "TextModel", "ImageModel", "MODALITIES", "WRAPPER_FILE", "IGNORE"]
