"""Output directories: only finished runs are replaced, one run at a time, nothing lost after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from unlearn.runs import PARTIAL_MARKER, RUN_MARKER, OutputError, RunDir, is_finished_run


def _finish(rd: RunDir, value: str = "new") -> None:
    (rd.path / "provenance.json").write_text(json.dumps({"unlearn_version": "test"}))
    (rd.path / "metrics.json").write_text(json.dumps({"v": value}))


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_overwrite_never_deletes_what_is_not_a_finished_run(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("data")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"is not empty and is not a finished unlearn run \(thesis.tex\)"):
            RunDir(out, overwrite=overwrite)
    assert (out / "thesis.tex").read_text() == "data" and _leftovers(tmp_path) == []


def test_a_finished_run_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "run"
    rd = RunDir(out)
    _finish(rd, "old")
    assert rd.commit() == out and is_finished_run(out) and (out / RUN_MARKER).exists()
    assert not (out / PARTIAL_MARKER).exists()
    with pytest.raises(OutputError, match="already holds a finished run; set output.overwrite=true"):
        RunDir(out)
    rd = RunDir(out, overwrite=True)
    _finish(rd, "new")
    rd.commit()
    assert json.loads((out / "metrics.json").read_text()) == {"v": "new"} and _leftovers(tmp_path) == []


def test_empty_directory_is_used_and_a_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    rd = RunDir(tmp_path / "empty")
    _finish(rd)
    rd.commit()
    assert is_finished_run(tmp_path / "empty")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        RunDir(tmp_path / "afile")


def test_second_run_on_the_same_output_fails_at_start_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = RunDir(out)
    with pytest.raises(OutputError, match=rf"being written by another run \(pid {os.getpid()} on .*, started "):
        RunDir(out, overwrite=True)
    _finish(first)
    first.commit()
    assert _leftovers(tmp_path) == []  # the lock file goes with the run
    RunDir(out, overwrite=True).abort()  # released: the next run may start
    assert _leftovers(tmp_path) == []


def test_commit_rechecks_and_keeps_the_run_if_the_destination_changed(tmp_path):
    out = tmp_path / "run"
    rd = RunDir(out, overwrite=True)
    _finish(rd)
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # written by someone else while the run was going
    with pytest.raises(OutputError, match=r"changed while the run was going; the finished run was kept as .*run-1"):
        rd.commit()
    assert (out / "notes.txt").read_text() == "mine" and is_finished_run(tmp_path / "run-1")
    assert _leftovers(tmp_path) == []


def test_abort_removes_the_partial_directory_and_the_lock(tmp_path):
    rd = RunDir(tmp_path / "run")
    (rd.path / "big.safetensors").write_bytes(b"0" * 100)
    rd.abort()
    assert list(tmp_path.iterdir()) == []


def test_after_kill_9_the_next_run_cleans_up_and_reports(tmp_path):
    out = tmp_path / "run"
    code = ("import os, signal, sys; from unlearn.runs import RunDir; rd = RunDir(sys.argv[1]); "
            "(rd.path / 'step.safetensors').write_bytes(b'0' * 10); os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9
    partial = [n for n in _leftovers(tmp_path) if ".partial-" in n]
    assert len(partial) == 1 and not out.exists()
    rd = RunDir(out)  # the killed process no longer holds the lock
    assert len(rd.recovered) == 1 and rd.recovered[0].startswith(f"removed {partial[0]}, the unfinished directory")
    assert "pid" in rd.recovered[0]
    _finish(rd)
    rd.commit()
    assert _leftovers(tmp_path) == [] and is_finished_run(out)


def test_a_commit_killed_half_way_is_completed_or_rolled_back(tmp_path):
    out = tmp_path / "run"
    rd = RunDir(out)
    _finish(rd, "old")
    rd.commit()
    # killed after moving the old run aside, before moving the new one in: the old one is restored
    os.replace(out, tmp_path / ".run.old-4242")
    rd = RunDir(out, overwrite=True)
    assert any("restored the finished run" in m for m in rd.recovered)
    assert json.loads((out / "metrics.json").read_text()) == {"v": "old"}
    rd.abort()
    # killed with the new run finished (marker written) and nothing in place: the commit is completed
    rd = RunDir(tmp_path / "other")
    _finish(rd, "new")
    (rd.path / RUN_MARKER).write_text("{}")
    (rd.path / PARTIAL_MARKER).unlink()
    rd._lock.release()  # as if the process had died here
    again = RunDir(tmp_path / "other", overwrite=True)
    assert any("completed an interrupted commit" in m for m in again.recovered)
    assert json.loads((tmp_path / "other" / "metrics.json").read_text()) == {"v": "new"}
    again.abort()
    assert _leftovers(tmp_path) == []
