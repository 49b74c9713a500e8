"""The generated TOFU-style world: schema, sizes, nested splits, determinism."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unlearn.tasks.tofu_world import ATTRIBUTES, WorldConfig, build_world


@pytest.fixture(scope="module")
def world():
    return build_world()


def test_sizes_and_schema(world):
    assert len(world.authors) == 220 and len(world.qa) == 220 * 20
    assert len(ATTRIBUTES) == 20
    for q in world.qa[:200]:
        for k in ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"):
            assert q[k], k
        assert len(q["perturbed_answer"]) == 5
        assert q["answer"] != q["paraphrased_answer"] and q["question"] != q["paraphrased_question"]
        assert q["value"] in q["answer"] and q["value"] in q["paraphrased_answer"]
        assert q["paraphrased_answer"] not in q["perturbed_answer"]  # perturbed = same template, wrong value
        assert len(set(q["perturbed_answer"])) == 5
    assert len(world.world_facts) == 100 and len(world.real_authors) == 100
    for it in world.world_facts + world.real_authors:
        assert it["answer"] not in it["perturbed_answer"] and len(it["perturbed_answer"]) == 3


def test_splits_are_tofus(world):
    f1, f5, f10 = (set(q["author_id"] for q in world.split(s)) for s in ("forget01", "forget05", "forget10"))
    assert (len(f1), len(f5), len(f10)) == (2, 10, 20)
    assert f1 < f5 < f10 and max(f10) == 199  # nested, the last authors
    for pct in ("01", "05", "10"):
        forget, retain = world.split(f"forget{pct}"), world.split(f"retain{100 - int(pct)}")
        assert len(forget) + len(retain) == 4000
        assert not {q["author_id"] for q in forget} & {q["author_id"] for q in retain}
    hold = {q["author_id"] for q in world.split("holdout")}
    assert hold == set(range(200, 220))
    assert not {q["author_id"] for q in world.split("retain_eval")} & f10
    with pytest.raises(ValueError, match="unknown split 'forget07'"):
        world.split("forget07")


def test_names_are_unique(world):
    names = [a["name"] for a in world.authors]
    assert len(set(names)) == len(names)


def test_deterministic_across_processes_and_hash_seeds(world):
    code = "from unlearn.tasks.tofu_world import build_world; print(build_world().fingerprint())"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(s), "PATH": ""}).stdout.strip() for s in (1, 2)}
    assert outs == {world.fingerprint()}
    assert build_world(WorldConfig(seed=1)).fingerprint() != world.fingerprint()


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="n_authors"):
        WorldConfig(n_authors=10)
    with pytest.raises(ValueError, match="n_perturbed"):
        WorldConfig(n_perturbed=2)
