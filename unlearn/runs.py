"""Run directories, atomic writes and provenance.

A run directory holds ``recipe.yaml`` (resolved), ``provenance.json``, ``metrics.json``,
``report.md`` (+ plots), ``checkpoint/`` (safetensors) and the marker ``.unlearn-run``. It is
assembled in a temporary sibling ``.NAME.partial-*`` and renamed into place only when complete,
so a crash never leaves a half-written run where a finished one is expected.

Output safety (:class:`RunDir`):

* a directory is only ever *replaced* when it holds a finished run of this toolkit (the
  marker, or ``metrics.json`` + ``provenance.json`` of an older version) and
  ``output.overwrite`` is set; an empty directory is used as is; anything else is refused,
  overwrite or not -- the toolkit never deletes files it did not write;
* one run at a time per output directory: an exclusive lock (``.NAME.lock`` beside it, held
  with ``flock`` for the whole run, so a killed run releases it); a second run with the same
  ``output.dir`` fails at start with a line naming the running process;
* the commit re-checks the destination: if something appeared there during the run, the
  finished run is kept under a free sibling name and the error says where;
* leftovers of killed runs (``.NAME.partial-*`` of a process that no longer holds the lock,
  ``.NAME.old-*`` of an interrupted commit) are found at the next start: an interrupted commit
  is rolled back (the old run restored) and partial directories are removed, each reported;
* an unfinished run that holds a complete training checkpoint (``train.checkpoint_every``,
  :mod:`unlearn.checkpoint`) is never removed unasked: ``resume=True`` (``--resume``) adopts
  it, ``overwrite=True`` discards it, anything else is an error naming it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from unlearn._version import __version__

DONE_MARKER = "metrics.json"
RUN_MARKER = ".unlearn-run"  # written last-but-one: this directory is a run of this toolkit
PARTIAL_MARKER = ".unlearn-partial"  # pid and start time of the process writing a partial directory
RESUME_DIR = ".resume"  # training checkpoints inside an unfinished run (unlearn.checkpoint)
CHECKPOINT_COMPLETE = "COMPLETE"  # written last into a checkpoint directory
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "datasets", "diffusers", "lm_eval",
             "scikit-learn", "scipy", "rouge-score", "safetensors", "numpy")


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


_UMASK = _umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes it private)
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


def library_versions(libraries: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """The installed version of each of ``libraries`` (None: not installed)."""
    out = {}
    for lib in libraries:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def provenance(**extra: Any) -> dict[str, Any]:
    return {"unlearn_version": __version__, "git": git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "libraries": library_versions(), **extra}


def latest_checkpoint(run_path: str | Path) -> Path | None:
    """The newest complete training checkpoint of an unfinished run directory, or None."""
    base = Path(run_path) / RESUME_DIR
    if not base.is_dir():
        return None
    done = [d for d in base.iterdir() if d.is_dir() and d.name.startswith("step-") and not d.name.endswith(".tmp")
            and (d / CHECKPOINT_COMPLETE).exists()]
    return max(done, key=lambda d: d.name) if done else None


class OutputError(ValueError):
    """An output directory that cannot be used: the message names it and the fix."""


def is_finished_run(path: Path) -> bool:
    """True if ``path`` holds a finished run of this toolkit (and nothing else can be lost by
    replacing it): the marker and ``metrics.json``, or -- runs written before the marker --
    ``metrics.json`` and a ``provenance.json`` that names an ``unlearn_version``."""
    if not path.is_dir() or not (path / DONE_MARKER).is_file():
        return False
    if (path / RUN_MARKER).is_file():
        return True
    try:
        return "unlearn_version" in json.loads((path / "provenance.json").read_text())
    except (OSError, ValueError):
        return False


class _Lock:
    """An exclusive, non-blocking ``flock`` on ``path`` (released by the kernel if the process dies)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = ""
                try:
                    holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
                except OSError:
                    pass
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{what} is being written by another run ({holder or 'unknown process'}); "
                                      "wait for it to finish or choose another output.dir") from None
                raise
            try:  # the holder before us may have unlinked the file: lock the file that is there now
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


class RunDir:
    """A run directory being written: files go to a temporary sibling until :meth:`commit`.

    Construction checks the destination, takes the output directory's lock and cleans up
    after killed runs (see the module docstring); :meth:`commit` moves the finished run into
    place; :meth:`abort` removes the temporary directory. Either one releases the lock.

    With ``resume=True`` an unfinished run that holds a complete training checkpoint
    (``unlearn.checkpoint``) is adopted: :attr:`path` is its directory and
    :attr:`resume_from` the newest checkpoint. Without it, such a run is an error (so that its
    checkpoint is never deleted unasked) unless ``overwrite`` discards it.

    Raises:
        OutputError: the destination is a file, holds something that is not a finished run,
            holds a finished run and ``overwrite`` is false, another run is writing it, or it
            has a resumable unfinished run and neither ``resume`` nor ``overwrite`` is set.
        OSError: the parent cannot be created or written (permissions, full disk).
    """

    def __init__(self, final: str | Path, overwrite: bool = False, resume: bool = False) -> None:
        self.final = Path(final)
        self.overwrite = overwrite
        self.resume = resume
        self.resume_from: Path | None = None  # the checkpoint to continue from (resume=True)
        self._adopted: Path | None = None
        self.recovered: list[str] = []
        if self.final.exists() and not self.final.is_dir():
            raise OutputError(f"output.dir {str(self.final)!r} is a file, not a directory; choose another output.dir")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(self.final.with_name(f".{self.final.name}.lock"), f"output.dir {str(self.final)!r}")
        try:
            self._recover()
            self._check_destination()
            if self._adopted is not None:  # continue the killed run in its own directory
                self.path = self._adopted
            else:
                if resume:
                    self._report("no unfinished run with a complete checkpoint to resume; starting from the beginning")
                self.path = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.partial-"))
                os.chmod(self.path, 0o777 & ~_UMASK)  # as mkdir would make it (mkdtemp makes it private)
            (self.path / PARTIAL_MARKER).write_text(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        except BaseException:
            self._lock.release()
            raise

    def _check_destination(self) -> None:
        f = self.final
        if not f.exists():
            return
        if not f.is_dir():
            raise OutputError(f"output.dir {str(f)!r} is a file, not a directory; choose another output.dir")
        if is_finished_run(f):
            if not self.overwrite:
                raise OutputError(f"output.dir {str(f)!r} already holds a finished run; set output.overwrite=true to "
                                  "replace it, or choose another output.dir")
            return
        entries = sorted(p.name for p in f.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise OutputError(f"output.dir {str(f)!r} is not empty and is not a finished unlearn run ({shown}); "
                              "unlearn only replaces its own finished runs, even with output.overwrite=true: choose "
                              "another output.dir or empty it yourself")

    def _recover(self) -> None:
        """Under the lock, clean up after killed runs of this output directory.

        A commit is: write the marker, move the old run to ``.NAME.old-PID``, move the new one
        into place, delete the old one. Killed in between, the newest finished run wins: a
        finished ``.partial-*`` with nothing in place is moved into place (kept under a free
        name if something is); an ``.old-*`` is restored if nothing is in place, removed if a
        finished run is. Unfinished ``.partial-*`` directories are removed. Each step is reported.
        """
        parent, name = self.final.parent, self.final.name
        for part in sorted(parent.glob(f".{name}.partial-*")):
            if is_finished_run(part) and (part / RUN_MARKER).exists():
                if not self.final.exists():
                    os.replace(part, self.final)
                    self._report(f"completed an interrupted commit: the finished run in {part.name} is now "
                                 f"{str(self.final)!r}")
                else:
                    keep = self._free_name()
                    os.replace(part, keep)
                    self._report(f"a finished run was left in {part.name} by an interrupted commit; kept it as "
                                 f"{str(keep)!r}")
                continue
            if not (part / PARTIAL_MARKER).exists() and any(part.iterdir()):
                self._report(f"found {part.name}, which looks like an unfinished run but carries no marker; left it")
                continue
            info = ""
            try:
                info = (part / PARTIAL_MARKER).read_text().strip()
            except OSError:
                pass
            ckpt = latest_checkpoint(part)
            if ckpt is not None and not self.overwrite:
                if not self.resume:
                    raise OutputError(f"output.dir {str(self.final)!r} has an unfinished run that can be resumed "
                                      f"({part.name}, checkpoint {ckpt.name}, {info or 'killed'}): continue it with "
                                      "--resume (output.resume=true), or discard it with output.overwrite=true")
                if self._adopted is None or ckpt.name > (latest_checkpoint(self._adopted) or ckpt).name:
                    if self._adopted is not None:
                        shutil.rmtree(self._adopted, ignore_errors=True)
                    self._adopted, self.resume_from = part, ckpt
                    self._report(f"resuming the run killed in {part.name} ({info or 'killed'}) from {ckpt.name}")
                    continue
            shutil.rmtree(part, ignore_errors=True)
            self._report(f"removed {part.name}, the unfinished directory of a run that was killed"
                         + (f" ({info})" if info else ""))
        for old in sorted(parent.glob(f".{name}.old-*")):
            if not self.final.exists() and is_finished_run(old):
                os.replace(old, self.final)
                self._report(f"restored the finished run {str(self.final)!r} from {old.name} (a run was killed while "
                             "replacing it)")
            elif self.final.exists() and is_finished_run(self.final):
                shutil.rmtree(old, ignore_errors=True)
                self._report(f"removed {old.name}, the replaced run of an interrupted commit")
            else:
                self._report(f"found {old.name} from an interrupted commit; left it")

    def _report(self, msg: str) -> None:
        """Record a clean-up step (the runner prints them and keeps them in the provenance)."""
        self.recovered.append(msg)

    def commit(self) -> Path:
        """Move the finished run into place (replacing an old finished run only if ``overwrite``
        was set), after re-checking the destination. Releases the lock.

        Raises:
            OutputError: the destination changed during the run so that it may not be replaced;
                the finished run is kept under a free sibling name, which the message gives.
        """
        try:
            atomic_write_text(self.path / RUN_MARKER, json.dumps({"unlearn_version": __version__}) + "\n")
            (self.path / PARTIAL_MARKER).unlink(missing_ok=True)
            try:
                self._check_destination()
            except OutputError as e:
                keep = self._free_name()
                os.replace(self.path, keep)
                self.path = keep
                raise OutputError(f"{e} -- it changed while the run was going; the finished run was kept as "
                                  f"{str(keep)!r}") from None
            if self.final.exists() and any(self.final.iterdir()):
                trash = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
                os.replace(self.final, trash)
                os.replace(self.path, self.final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                if self.final.exists():
                    self.final.rmdir()
                os.replace(self.path, self.final)
            self.path = self.final
            return self.final
        finally:
            self._lock.release()

    def _free_name(self) -> Path:
        i = 1
        while self.final.with_name(f"{self.final.name}-{i}").exists():
            i += 1
        return self.final.with_name(f"{self.final.name}-{i}")

    def abort(self, keep_resumable: bool = False) -> Path | None:
        """Remove the temporary directory (a finished run moved aside by commit stays) and release
        the lock. With ``keep_resumable`` an unfinished run holding a complete training
        checkpoint is kept for ``--resume``; returns that checkpoint, or None."""
        try:
            if self.path != self.final and (self.path / PARTIAL_MARKER).exists():
                ckpt = latest_checkpoint(self.path) if keep_resumable else None
                if ckpt is not None:
                    return ckpt
                shutil.rmtree(self.path, ignore_errors=True)
            return None
        finally:
            self._lock.release()
