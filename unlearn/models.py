"""One entry point that turns a model source into an adapter, for both modalities.

``load_model(source, modality, **kwargs)`` accepts

* a zoo name, ``zoo:<family>/<name>`` (``zoo:tiny-llama/target``, ``zoo:tiny-t2i/target``);
* a local directory written by an adapter's ``save`` (a run's ``checkpoint/``);
* (image) a diffusers pipeline directory (``model_index.json``: Stable Diffusion 1.x / 2.x, SDXL),
  loaded as a latent :class:`~unlearn.adapters.image.ImageAdapter`;
* a saved *wrapped* model: a directory with ``wrapper.json`` (ULD, ECO, SAFREE), rebuilt by the
  loader of the editor that wrote it (:func:`unlearn.editors.load_wrapped`);
* (text only) a hub id, passed to ``transformers``' ``from_pretrained``.

and returns an :class:`~unlearn.adapters.base.Adapter` of that modality
(:class:`~unlearn.adapters.text.TextAdapter` / :class:`~unlearn.adapters.image.ImageAdapter`
or a wrapper built on one). ``TextAdapter.load`` and ``ImageAdapter.load`` load plain models
only; this module is the one place that also knows the editors' saved forms.
"""

from __future__ import annotations

import json
from pathlib import Path

from unlearn.adapters import nonfinite_parameter
from unlearn.adapters.base import MODALITIES, WRAPPER_FILE, Adapter
from unlearn.adapters.image import ImageAdapter
from unlearn.adapters.text import TextAdapter
from unlearn.editors import EDITORS, load_wrapped
from unlearn.zoo import zoo_path

# files that mark a saved plain model of each modality (image: a saved ImageAdapter, or a diffusers
# pipeline directory such as a Stable Diffusion snapshot)
_MARKERS = {"text": ("config.json",), "image": ("image_adapter.json", "model_index.json")}


def _local_dir(source: str) -> Path | None:
    """The directory ``source`` names (a zoo name resolved), or None (a hub id or a missing path:
    the adapter's own ``load`` reports those)."""
    if source.startswith("zoo:"):
        return Path(zoo_path(source[4:]))
    p = Path(source).expanduser()
    return p if p.is_dir() else None


def _saved_modality(where: Path) -> str | None:
    """The modality of the model saved in ``where``, from its marker files (None: unknown)."""
    if (where / WRAPPER_FILE).is_file():
        try:
            kind = json.loads((where / WRAPPER_FILE).read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            return None  # load_wrapped names the problem
        return EDITORS.get(kind).modalities[0] if kind in EDITORS else None
    found = [m for m, markers in _MARKERS.items() if any((where / f).is_file() for f in markers)]
    return found[0] if len(found) == 1 else None


def source_modality(source: str) -> str | None:
    """The modality of the model at ``source`` -- a zoo name or a local directory, plain or
    wrapped -- read from its marker files without loading it; None when it cannot be told (a hub
    id, a path that is not a directory, a directory without the markers).

    Raises:
        ValueError: an unknown zoo model, or one not built on this machine.
    """
    where = _local_dir(source)
    return _saved_modality(where) if where is not None else None


def _a(modality: str) -> str:
    return ("an " if modality[0] in "aeiou" else "a ") + modality


def load_model(source: str, modality: str, **kwargs) -> Adapter:
    """Load the model at ``source`` as an adapter of ``modality``.

    Args:
        source: ``zoo:<family>/<name>``, a local directory (a plain model or a wrapped one with
            ``wrapper.json``), or -- for text -- a hub id.
        modality: ``"text"`` or ``"image"``; a source holding a model of the other modality
            raises ValueError.
        **kwargs: the adapter's options. Text: ``dtype`` (``"float32"``, ``"bfloat16"``,
            ``"float16"``), ``prompt_template``, ``tokenization``. Image: ``timesteps_per_item``, ``dtype``.
            A wrapped model's loader takes the same options as its base adapter (ULD:
            ``dtype``, ``prompt_template``, ``tokenization``).
    Returns:
        the adapter: a :class:`~unlearn.adapters.base.TextModel` for ``"text"``, an
        :class:`~unlearn.adapters.base.ImageModel` for ``"image"``.
    Raises:
        ValueError naming the source and the fix: an unknown or missing zoo model, a path that
        does not exist or holds no saved model, a model of the other modality, a hub id that
        cannot be loaded (offline machines need a local path), corrupt, empty or missing weight
        or tokenizer files (named), weights holding NaN/Inf (the tensor named).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(repr(m) for m in MODALITIES)}, got {modality!r}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"model source must be a non-empty string, got {source!r}")
    where = _local_dir(source)
    if where is not None:
        found = _saved_modality(where)
        if found is not None and found != modality:
            raise ValueError(f"model {source!r} is {_a(found)} model, but {_a(modality)} model was asked for; "
                             f"load it with modality={found!r} (or point at {_a(modality)} model)")
        if (where / WRAPPER_FILE).is_file():
            adapter = load_wrapped(where, **kwargs)
            if adapter.modality != modality:
                raise ValueError(f"model {source!r} is a wrapped {adapter.modality} model, but {_a(modality)} model "
                                 f"was asked for; load it with modality={adapter.modality!r}")
            return check_finite(adapter, source)
    adapter = TextAdapter.load(source, **kwargs) if modality == "text" else ImageAdapter.load(source, **kwargs)
    return check_finite(adapter, source)


def check_finite(adapter: Adapter, source: str) -> Adapter:
    """``adapter``, if every weight is finite; else ValueError naming the first NaN/Inf tensor."""
    bad = nonfinite_parameter(adapter.model)
    if bad is not None:
        raise ValueError(f"model {source!r} has non-finite weights (NaN/Inf in {bad}); the checkpoint is corrupt or "
                         "was saved from a diverged run -- use another checkpoint")
    return adapter


__all__ = ["load_model", "source_modality"]
