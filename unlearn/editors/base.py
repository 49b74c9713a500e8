"""The editor contract: a method that returns a (possibly wrapped) model instead of training
the target in place.

Objectives (``unlearn.objectives``) are losses the trainer minimises on the target's own
weights. Editors cover everything else DESIGN.md lists: closed-form edits, inference-time
guards (ECO) and models assembled from parts (ULD's logit difference). An editor gets the
target adapter and the data and returns an :class:`EditResult` whose ``adapter`` is what the
harness evaluates. A wrapped adapter subclasses the target's adapter
(:class:`~unlearn.adapters.text.TextAdapter` for ULD and ECO,
:class:`~unlearn.adapters.image.ImageAdapter` for SAFREE) and so keeps the adapter contract of
:mod:`unlearn.adapters.base` (``logits``, ``item_nll``, ``token_logprobs``, ``generate``, ...,
``reference``, ``save``, ``load``, ``fingerprint``): every metric, attack and the lm-eval
bridge run on it unchanged.

Saving a wrapped adapter writes a directory with ``wrapper.json`` (``{"kind": <editor name>,
...}``) next to whatever the editor needs; :func:`unlearn.editors.load_wrapped` (and therefore
``unlearn.models.load_model``) rebuilds it from that directory. ``TextAdapter.load`` and
``ImageAdapter.load`` load plain models only.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unlearn.adapters.base import WRAPPER_FILE  # noqa: F401  (re-exported: editors write it)


@dataclass
class EditorConfig:
    """Base class of every editor's config dataclass (fields carry ``metadata={"help": ...}``)."""


@dataclass
class EditContext:
    """What the run gives an editor besides the model and the data.

    Attributes:
        settings: the recipe's ``train`` section as :class:`~unlearn.trainer.TrainSettings`
            (editors that train a helper model, e.g. ULD's assistant, use it).
        seed: the recipe seed.
        progress: show progress bars.
        eval_batch_size: batch size for any evaluation the editor runs itself (ECO's sigma search).
    """

    settings: Any
    seed: int = 0
    progress: bool = True
    eval_batch_size: int = 32


@dataclass
class EditResult:
    """The output of :meth:`Editor.apply`.

    Attributes:
        adapter: the model the harness evaluates (a wrapper around the target, or the edited target).
        log: a :class:`~unlearn.trainer.TrainLog` when the editor trained something, else ``None``.
        info: JSON-able facts about the edit (recorded in ``metrics.json`` under ``editor``),
            e.g. trainable parameter counts, the chosen threshold, a search trace.
    """

    adapter: Any
    log: Any = None
    info: dict[str, Any] = field(default_factory=dict)


class Editor:
    """Base class. Subclasses set the class attributes and implement :meth:`apply`.

    Class attributes:
        name: registry name used in recipes (``method.name``).
        Config: the config dataclass; recipe ``method.params`` are validated against it.
        paper: citation shown in docs and reports.
        modalities: the model kinds it edits, ``("text",)`` or ``("image",)`` (a wrapper returns
            an adapter of the same modality); the same attribute as objectives'.
        full_parameters: ``None``, or why the method needs the whole, unsharded parameters on every
            process (under FSDP / DeepSpeed ZeRO-3 the run then refuses it, naming this reason;
            :func:`unlearn.distributed.check_sharding`).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = EditorConfig
    full_parameters: ClassVar[str | None] = None
    paper: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = ("text",)

    def __init__(self, config: EditorConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def needs_retain(self) -> bool:
        """True if this configuration uses the retain set (then the recipe must name one)."""
        return False

    def apply(self, adapter, data, ctx: EditContext) -> EditResult:
        """Edit or wrap ``adapter`` (the target; it may be modified only if the editor says so
        in its docstring) using ``data`` (:class:`~unlearn.data.UnlearningData`)."""
        raise NotImplementedError


def optimizer_step(loss, opt, params, max_grad_norm: float | None, where: str) -> None:
    """One step of an editor's own training loop: backward, gradient clipping (``max_grad_norm``),
    ``opt.step()``. Stops with ``FloatingPointError`` naming ``where`` (the method, iteration and
    the fix) on a non-finite loss or a non-finite gradient norm, before the weights change."""
    import math

    import torch

    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: non-finite loss ({loss.item()})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else math.inf)
    if not torch.isfinite(norm):
        raise FloatingPointError(f"{where}: non-finite gradient norm ({float(norm)})")
    opt.step()


BASE_DIR = "base"


def save_wrapper_base(path, base, meta: dict) -> None:
    """Save a wrapper that keeps its base model unchanged: ``base`` to ``path/base/`` and ``wrapper.json``
    (``meta`` -- which must hold ``"kind"`` -- plus ``"base"`` and the base's ``"base_fingerprint"``, written
    atomically and last, so a directory without it is recognisably incomplete)."""
    from pathlib import Path

    from unlearn.runs import atomic_write_json

    if "kind" not in meta:
        raise ValueError("save_wrapper_base: meta needs a 'kind' (the editor's name)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    base.save(path / BASE_DIR)
    atomic_write_json(path / WRAPPER_FILE, {**meta, "base": BASE_DIR, "base_fingerprint": base.fingerprint(refresh=True)})


def load_wrapper_base(path, kind: str, **kwargs) -> tuple[dict, Any, Any]:
    """Read a directory written by :func:`save_wrapper_base` for editor ``kind`` -> ``(meta, base, path)``.

    ``kwargs`` go to :meth:`ImageAdapter.load` of the base. One ValueError names the problem: an unreadable
    ``wrapper.json``, a wrapper of another kind, or a base whose weights no longer match the fingerprint
    saved with it."""
    import json
    from pathlib import Path

    from unlearn.adapters.image import ImageAdapter

    path = Path(path).expanduser()
    try:
        meta = json.loads((path / WRAPPER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / WRAPPER_FILE} is not a readable {kind} wrapper description: {e}") from None
    if meta.get("kind") != kind:
        raise ValueError(f"{path / WRAPPER_FILE} describes a {meta.get('kind')!r} wrapper, not {kind!r}")
    base = ImageAdapter.load(str(path / meta.get("base", BASE_DIR)), **kwargs)
    if meta.get("base_fingerprint") and base.fingerprint() != meta["base_fingerprint"]:
        raise ValueError(f"{path}: the stored base model has weights {base.fingerprint()}, but the {kind} wrapper was "
                         f"saved with {meta['base_fingerprint']}; the directory is corrupt")
    return meta, base, path


def image_loop_start(adapter, settings, iterations: int, name: str, seed: int):
    """The start every image editor that trains in its own loop shares -> ``(n_iter, rng, gen)``.

    Checks that ``adapter`` is a text-to-image model (it has ``noise_pred``), takes the iteration count
    (``train.max_steps`` when set, else the method's ``iterations``; at least 1, or one ValueError names
    it), seeds torch with ``seed``, and returns a Python RNG keyed by the method's name and the seed (the
    prompt, timestep and batch draws) and a torch generator (the start noise)."""
    import random

    import torch

    from unlearn.adapters.base import ImageModel

    if not isinstance(adapter, ImageModel):
        raise ValueError(f"{name} edits text-to-image diffusion models: the adapter has no noise_pred "
                         "(use an ImageAdapter)")
    n_iter = settings.max_steps if settings.max_steps is not None else iterations
    if n_iter < 1:
        raise ValueError(f"train.max_steps={n_iter}: {name} needs at least one iteration")
    torch.manual_seed(seed)
    return n_iter, random.Random(f"{name.replace('_', '-')}-{seed}"), torch.Generator().manual_seed(seed)


@contextmanager
def restoring_train_state(adapter):
    """Remember the ``requires_grad`` flag of every parameter of ``adapter.model`` and the train/eval mode of
    each of its modules; on exit, also on an error, restore both, drop the gradients and the cached
    fingerprint (the weights may have changed). The editors that train in their own loop run inside it."""
    flags = {n: p.requires_grad for n, p in adapter.model.named_parameters()}
    modes = {k: m.training for k, m in adapter.model.items()}
    try:
        yield
    finally:
        for n, p in adapter.model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        for k, m in adapter.model.items():
            m.train(modes[k])
        adapter._fingerprint = None
