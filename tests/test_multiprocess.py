"""Two processes (``accelerate launch`` / ``torchrun``, gloo, CPU) run the same recipe as one process with the
same global batch: one run directory, evaluation shared between the processes, the same
metrics within float tolerance (each process averages its half of a batch; DDP averages the
two gradients, which equals the global mean when both halves hold as many answer tokens)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import unlearn
from unlearn.accelerate_configs import config_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = ["train.max_steps=3", "train.batch_size=8", "eval.max_items=6", "task.retain_model=null",
        "eval.n_samples=0"]


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNLEARN_CACHE": str(tmp_path / "cache2"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out2 = tmp_path / "two"
    # accelerate's launcher with the shipped CPU configuration (torchrun underneath, use_cpu: the
    # processes train on the CPU and talk over gloo, GPU or not)
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path("cpu_ddp")),
            "--dynamo_backend", "no", "-m", "unlearn", "run", os.path.join(ROOT, "recipes", "quickstart.yaml"), "-q"]
    for s in [*SETS, f"output.dir={out2}"]:
        argv += ["--set", s]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("run written to") == 1  # the main process reports, once
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cache2", "two"]  # one run, no leftovers
    two = json.loads((out2 / "metrics.json").read_text())

    one = unlearn.run(os.path.join(ROOT, "recipes", "quickstart.yaml"),
                      overrides=[*SETS, f"output.dir={tmp_path / 'one'}"], progress=False).metrics
    for model in ("target", "unlearned"):
        assert two["models"][model]["processes"] == 2  # each pass ran on half of the items per process
        for key, v1 in one["summary"][model].items():
            v2 = two["summary"][model][key]
            assert (v1 is None and v2 is None) or v2 == pytest.approx(v1, rel=2e-3, abs=2e-4), (model, key)
    for key, v1 in one["summary"]["target"].items():  # same weights, same items: up to batch padding
        assert v1 is None or two["summary"]["target"][key] == pytest.approx(v1, rel=1e-5), key
    h1, h2 = one["train"]["history"], two["train"]["history"]
    assert [h["step"] for h in h2] == [h["step"] for h in h1] == [1, 2, 3]
    assert h2[0]["loss"] == pytest.approx(h1[0]["loss"], rel=1e-4)  # the global batch's mean loss
    # the per-item evaluation outputs are in item order, whichever process computed them
    f1 = one["models"]["target"]["splits"]["forget"]["metrics"]["prob"]["per_item"]
    f2 = two["models"]["target"]["splits"]["forget"]["metrics"]["prob"]["per_item"]
    assert f2 == pytest.approx(f1, rel=1e-5)


def test_sharded_outputs_merge_in_item_order():
    from unlearn.distributed import _decode, _encode, _merge

    import numpy as np

    index = [[0, 2, 4], [1, 3]]
    parts = [{"a": np.array([0.0, 2.0, 4.0]), "t": ["x0", "x2", "x4"], "k": 7},
             {"a": np.array([1.0, 3.0]), "t": ["x1", "x3"], "k": 7}]
    parts = [_decode(_encode(p)) for p in parts]  # the transport: JSON + base64 arrays, no pickle
    m = _merge(parts, index, 5)
    assert m["a"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and m["t"] == ["x0", "x1", "x2", "x3", "x4"] and m["k"] == 7
    img = [np.arange(3 * 2 * 2).reshape(3, 2, 2).astype(np.uint8), np.arange(2 * 2 * 2).reshape(2, 2, 2).astype(np.uint8)]
    merged = _merge([_decode(_encode(x)) for x in img], index, 5)
    assert merged.shape == (5, 2, 2) and (merged[1] == img[1][0]).all() and (merged[4] == img[0][2]).all()


KILLER = """
import os, signal, sys
import unlearn.trainer as tr
real = tr.save_checkpoint
def save(root, state, *a, **k):
    path = real(root, state, *a, **k)
    if state.step == 2:  # the main process dies right after its checkpoint of step 2
        os.kill(os.getpid(), signal.SIGKILL)
    return path
tr.save_checkpoint = save
from unlearn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_resume_after_a_kill_to_the_same_result(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNLEARN_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    (tmp_path / "killer.py").write_text(KILLER)
    sets = ["train.max_steps=4", "train.batch_size=8", "eval.max_items=4", "task.retain_model=null",
            "eval.n_samples=0", "train.checkpoint_every=2"]

    def torchrun(entry: list[str], out, *extra):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry,
                "run", os.path.join(ROOT, "recipes", "quickstart.yaml"), "-q", *extra]
        for s in [*sets, f"output.dir={out}"]:
            argv += ["--set", s]
        return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))

    full = torchrun(["-m", "unlearn.cli"], tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = torchrun([str(tmp_path / "killer.py")], tmp_path / "run")
    assert killed.returncode != 0 and not (tmp_path / "run").exists()
    resumed = torchrun(["-m", "unlearn.cli"], tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the run killed in" in resumed.stderr and "from step-00000002" in resumed.stderr
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert b["provenance"]["resumed_from"] == "step-00000002" and b["models"]["unlearned"]["processes"] == 2
    assert b["train"]["history"] == a["train"]["history"]
    assert b["summary"]["unlearned"] == a["summary"]["unlearned"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or p.name.endswith(".lock")]
