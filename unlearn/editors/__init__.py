"""Editors: methods that return a (possibly wrapped) model rather than training the target
in place. One file each, registered here explicitly; see :mod:`unlearn.editors.base`."""

from __future__ import annotations

import json
from pathlib import Path

from unlearn.editors.base import WRAPPER_FILE, EditContext, Editor, EditorConfig, EditResult
from unlearn.registry import Registry

EDITORS = Registry("editor")
# kind (wrapper.json "kind") -> callable(path, **adapter_kwargs) rebuilding the wrapped adapter
WRAPPER_LOADERS: dict[str, object] = {}


def register_editor(cls, loader=None):
    EDITORS.register(cls.name, cls)
    if loader is not None:
        WRAPPER_LOADERS[cls.name] = loader
    return cls


def is_wrapped_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory written by a wrapped adapter's ``save``."""
    return (Path(path) / WRAPPER_FILE).is_file()


def load_wrapped(path: str | Path, **kwargs):
    """Rebuild a wrapped adapter saved at ``path`` (a directory holding ``wrapper.json``)."""
    path = Path(path)
    try:
        meta = json.loads((path / WRAPPER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / WRAPPER_FILE} is not a readable wrapper description: {e}") from None
    kind = meta.get("kind")
    if kind not in WRAPPER_LOADERS:
        raise ValueError(f"{path / WRAPPER_FILE} names wrapper kind {kind!r}; known kinds: "
                         f"{', '.join(sorted(WRAPPER_LOADERS)) or '(none)'}")
    return WRAPPER_LOADERS[kind](path, **kwargs)


__all__ = ["EDITORS", "WRAPPER_LOADERS", "WRAPPER_FILE", "EditContext", "Editor", "EditorConfig", "EditResult",
           "register_editor", "is_wrapped_dir", "load_wrapped"]

from unlearn.editors.uld import ULD, load_uld  # noqa: E402

register_editor(ULD, load_uld)

from unlearn.editors.eco import ECO, load_eco  # noqa: E402

register_editor(ECO, load_eco)

from unlearn.editors.uce import UCE  # noqa: E402

register_editor(UCE)

from unlearn.editors.esd import ESD  # noqa: E402

register_editor(ESD)

from unlearn.editors.rece import RECE  # noqa: E402

register_editor(RECE)

from unlearn.editors.safree import SAFREE, load_safree  # noqa: E402

register_editor(SAFREE, load_safree)

from unlearn.editors.concept_ablation import ConceptAblation  # noqa: E402

register_editor(ConceptAblation)

from unlearn.editors.advunlearn import AdvUnlearn  # noqa: E402

register_editor(AdvUnlearn)

from unlearn.editors.mace import MACE  # noqa: E402

register_editor(MACE)

from unlearn.editors.spm import SPM, load_spm  # noqa: E402

register_editor(SPM, load_spm)

from unlearn.editors.nemo import NeMo  # noqa: E402

register_editor(NeMo)

from unlearn.editors.all_but_one import AllButOne  # noqa: E402

register_editor(AllButOne)
