"""Run directories, atomic writes and provenance.

A run directory holds ``recipe.yaml`` (resolved), ``provenance.json``, ``metrics.json``,
``report.md`` (+ plots) and ``checkpoint/`` (safetensors). It is assembled in a temporary
sibling directory and renamed into place only when complete, so a crash never leaves a
half-written run behind, and a finished run is never overwritten unless asked.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from unlearn._version import __version__

DONE_MARKER = "metrics.json"
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "datasets", "diffusers", "lm_eval",
             "scikit-learn", "scipy", "rouge-score", "safetensors", "numpy")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def git_commit(cwd: str | Path | None = None) -> dict[str, Any]:
    """The git commit of the code (and whether the work tree was dirty), if in a checkout."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return {"commit": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def library_versions() -> dict[str, str | None]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def provenance(**extra: Any) -> dict[str, Any]:
    return {"unlearn_version": __version__, "git": git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "libraries": library_versions(), **extra}


class RunDir:
    """A run directory being written: files go to a temporary sibling until :meth:`commit`."""

    def __init__(self, final: str | Path, overwrite: bool = False) -> None:
        self.final = Path(final)
        if self.final.exists():
            if (self.final / DONE_MARKER).exists() and not overwrite:
                raise FileExistsError(
                    f"run directory {str(self.final)!r} already holds a finished run; "
                    "set output.overwrite=true or choose another output.dir"
                )
            if any(self.final.iterdir()) and not (self.final / DONE_MARKER).exists() and not overwrite:
                raise FileExistsError(f"run directory {str(self.final)!r} exists and is not empty; "
                                      "set output.overwrite=true or choose another output.dir")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.partial-"))

    def commit(self) -> Path:
        """Move the finished run into place (replacing an old one only if overwrite was set)."""
        if self.final.exists():
            trash = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, trash)
            os.replace(self.path, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.final)
        self.path = self.final
        return self.final

    def abort(self) -> None:
        if self.path != self.final:
            shutil.rmtree(self.path, ignore_errors=True)
