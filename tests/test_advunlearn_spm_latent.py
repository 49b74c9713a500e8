"""AdvUnlearn and SPM on the latent path: their recipes run end to end on a tiny random SD-1.x
pipeline directory (the builders of tests/test_latent_pipelines.py), AdvUnlearn changes only the
text encoder's layers, SPM only adds its adapter and its checkpoint reloads as an SPM model."""

from __future__ import annotations

import json

import pytest
import torch

from test_latent_pipelines import _recipe, _state, build_sd  # noqa: F401  (shared tiny-pipeline builders)
from unlearn.models import load_model


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from unlearn.tasks.visual_world import build_visual_world
    from unlearn.zoo.build_t2i import world_tokenizer

    torch.set_num_threads(1)
    world = build_visual_world()
    return build_sd(tmp_path_factory.mktemp("pipes") / "sd1", world_tokenizer(world, 24), "1"), world


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, sd1):
    from unlearn.evaluators.image_judge import JudgeConfig, train_judge

    d = tmp_path_factory.mktemp("judge")
    judge, _ = train_judge(sd1[1].split("train"), JudgeConfig(epochs=1))
    judge.save(d)
    return d


def test_advunlearn_on_an_sd1_pipeline(sd1, judge_dir, tmp_path):
    import unlearn

    src = sd1[0]
    before = _state(load_model(str(src), "image"))
    r = _recipe(src, judge_dir, tmp_path / "run", "advunlearn")
    r["method"]["params"].update({"warmup": 1, "attack_steps": 2, "ddim_steps": 3})
    res = unlearn.run(r, progress=False)
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    assert metrics["summary"]["unlearned"]["erasure_explicit"] is not None
    assert metrics["editor"]["attacks"] == 1 and metrics["editor"]["attack_steps_done"] == 2
    after = _state(load_model(str(res.run_dir / "checkpoint"), "image"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("text_encoder.") and ".embeddings." not in n for n in changed)


def test_spm_on_an_sd1_pipeline(sd1, judge_dir, tmp_path):
    import unlearn
    from unlearn.editors.spm import SPMAdapter

    src = sd1[0]
    before = _state(load_model(str(src), "image"))
    r = _recipe(src, judge_dir, tmp_path / "run", "spm")
    r["method"]["params"].update({"ddim_steps": 3})
    res = unlearn.run(r, progress=False)
    ck = res.run_dir / "checkpoint"
    m = load_model(str(ck), "image")
    assert isinstance(m, SPMAdapter) and m.base.is_latent and (ck / "spm.safetensors").is_file()
    base = {n: p for n, p in m.base.model.named_parameters()}
    assert all(torch.equal(before[n], base[n]) for n in before)  # the pipeline's weights are unchanged
    assert any(p.abs().sum() > 0 for p in m.network.up.values())
    assert m.sample(["a red circle"], steps=2).shape == (1, 16, 16, 3) and m.last_strength == [1.0]
