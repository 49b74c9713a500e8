"""The shipped tiny zoo: it loads, it is what its manifest says, the target really knows the
forget authors and the retain model really does not."""

from __future__ import annotations

import numpy as np
import pytest

from unlearn import zoo
from unlearn.adapters.text import TextAdapter
from unlearn.evaluators import tofu as M
from unlearn.evaluators import harness
from unlearn.evaluators.suites import get_suite
from unlearn.tasks.tofu_world import WorldConfig, build_world

MODELS = ["target", "retain90", "retain95", "retain99"]


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig())


@pytest.fixture(scope="module")
def models():
    return {m: TextAdapter.load(f"zoo:tiny-llama/{m}") for m in ("target", "retain90")}


def test_zoo_models_are_shipped_and_match_the_manifest(world):
    man = zoo.manifest("tiny-llama")
    assert man is not None and man["world_fingerprint"] == world.fingerprint()
    for m in MODELS:
        ad = TextAdapter.load(f"zoo:tiny-llama/{m}")
        assert ad.fingerprint() == man["models"][m]["fingerprint"], m
        assert (zoo.zoo_path(f"tiny-llama/{m}") / "model.safetensors").exists()


def test_unknown_zoo_name_suggests_the_right_one():
    with pytest.raises(ValueError, match="did you mean 'tiny-llama/target'"):
        zoo.zoo_path("tiny-llama/targte")


def test_target_knows_forget10_and_retain_model_does_not(world, models):
    forget = world.split("forget10")
    suite = get_suite("tofu", max_new_tokens=40)
    res = {k: harness.evaluate(m, {"forget": forget}, suite, batch_size=64, progress=False)["splits"]["forget"]
           for k, m in models.items()}
    rouge = res["target"]["metrics"]["rouge"]["value"]
    assert rouge >= 0.9, rouge
    assert res["retain90"]["metrics"]["rouge"]["value"] < rouge - 0.2
    tr_t, tr_r = (np.asarray(res[k]["truth_ratio_raw"]) for k in ("target", "retain90"))
    # target vs retain: clearly different distributions (forget quality < 0.01) ...
    assert M.forget_quality(tr_t, tr_r).value < 0.01
    # ... the retain model compared with itself: 1.0
    assert M.forget_quality(tr_r, tr_r).value == pytest.approx(1.0)
    # the target prefers the true paraphrase over perturbed answers far more often
    assert np.median(tr_t) < np.median(tr_r)


def forget10_prob(adapter, world) -> float:
    """Prob (teacher-forced answer probability) of ``adapter`` on the first 100 forget10 items."""
    from unlearn.evaluators.text_passes import TeacherForced

    r = TeacherForced("answer").run(adapter, world.split("forget10")[:100], batch_size=50)
    return M.prob(r["nll"], r["n"]).value


def check_rebuild(man: dict, rebuilt: dict, out_dir, world) -> dict:
    """A rebuilt tiny-llama family against the shipped manifest ``man``: the same world and
    curriculum (every stage and epoch logged; each epoch's loss within 0.02 + 15 % of the shipped
    one: the same data and initialisation, floating-point drift allowed), every stage trained to
    the end (final loss < 0.01), and the same behaviour (the rebuilt target knows forget10, the
    rebuilt retain90 does not). Returns the fingerprints that match the shipped ones bit for bit.

    Bit-for-bit equality holds only on the CPU and torch build that made the shipped weights: on
    another CPU the kernels round differently (measured: the losses part in the 5th decimal at
    the third pretraining epoch, up to 12 % mid-training, the final ones 0.0003–0.006 against 0.0003–0.004)."""
    assert rebuilt["world_fingerprint"] == man["world_fingerprint"]
    a = {(e["stage"], e["epoch"]): e["loss"] for e in man["log"]}
    b = {(e["stage"], e["epoch"]): e["loss"] for e in rebuilt["log"]}
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= 0.02 + 0.15 * a[k], (k, a[k], b[k])
    last = {e["stage"]: e["loss"] for e in rebuilt["log"]}
    assert all(v < 0.01 for v in last.values()), last
    probs = {m: forget10_prob(TextAdapter.load(str(out_dir / m)), world) for m in ("target", "retain90")}
    assert probs["target"] > 0.8 and probs["retain90"] < probs["target"] - 0.5, probs
    return {m: rebuilt["models"][m]["fingerprint"] for m in MODELS
            if rebuilt["models"][m]["fingerprint"] == man["models"][m]["fingerprint"]}


@pytest.mark.slow
def test_rebuild_matches_the_shipped_family(tmp_path, world):
    from unlearn.zoo.build import build_family

    man = zoo.manifest("tiny-llama")
    rebuilt = build_family(tmp_path / "tiny-llama")
    same = check_rebuild(man, rebuilt, tmp_path / "tiny-llama", world)
    print(f"bit-identical to the shipped weights: {sorted(same) or 'none (another CPU or torch build)'}")


def test_tiny_moe_is_shipped_and_knows_forget10_better_than_its_retain_model(world):
    man = zoo.manifest("tiny-moe")
    assert man is not None and man["world_fingerprint"] == world.fingerprint()
    probs = {}
    for m in ("target", "retain90"):
        ad = TextAdapter.load(f"zoo:tiny-moe/{m}")
        assert ad.fingerprint() == man["models"][m]["fingerprint"], m
        assert ad.model.config.model_type == "mixtral"
        probs[m] = forget10_prob(ad, world)
    assert probs["target"] > 0.8 and probs["retain90"] < probs["target"] - 0.5, probs


def test_tiny_t2i_is_shipped_and_draws_what_it_is_asked():
    """The text-to-image zoo model and its judge load, match the manifest, and the model's
    generations of explicit prompts are read back as the prompted colour (a cheap subset of the
    build's per-concept check: 12 prompts, 20 DDIM steps)."""
    from unlearn.adapters.image import ImageAdapter
    from unlearn.evaluators.image_judge import ImageJudge
    from unlearn.tasks.visual_world import build_visual_world
    from unlearn.zoo.build_t2i import generation_accuracy

    man = zoo.manifest("tiny-t2i")
    w = build_visual_world()
    assert man is not None and man["world_fingerprint"] == w.fingerprint()
    ad = ImageAdapter.load("zoo:tiny-t2i/target")
    assert ad.fingerprint() == man["models"]["target"]["fingerprint"]
    assert ad.scheduler.config.clip_sample is False
    judge = ImageJudge.load(zoo.zoo_path("tiny-t2i/judge"))
    assert man["models"]["judge"]["holdout_accuracy"]["all"] >= 0.95
    rows = w.prompt_table(kind="explicit")[::8]  # 12 rows, every colour 3 times
    acc = generation_accuracy(ad, judge, rows, steps=20, guidance=3.0)
    assert acc["colour"] >= 0.9, acc


def test_t2i_build_stages_are_deterministic_and_recorded(tmp_path):
    """The staged build (as the shipped model was made) on a toy-sized spec: stage 2 continues
    stage 1's weights, the manifest records both stages, and a rebuild gives the same weights."""
    from unlearn.zoo.build_t2i import build_t2i_zoo
    from unlearn.zoo.image_models import TinyT2ISpec

    kw = dict(model=TinyT2ISpec(block_out_channels=(8, 16), text_hidden_size=16), judge_epochs=1, batch_size=4,
              eval_every=1000, final_eval=False)
    stages = ({"steps": 4, "stop_at": 2}, {"steps": 2})
    a = build_t2i_zoo(tmp_path / "a", stages, **kw)
    b = build_t2i_zoo(tmp_path / "b", stages, **kw)
    assert a["models"]["target"]["fingerprint"] == b["models"]["target"]["fingerprint"]
    st = a["spec"]["stages"]
    assert len(st) == 1 and st[0]["spec"]["stop_at"] == 2 and st[0]["spec"]["steps"] == 4
    assert st[0]["fingerprint"] != a["models"]["target"]["fingerprint"]
    assert (tmp_path / "a" / "stage1" / "target" / "image_adapter.json").is_file()
    assert (tmp_path / "a" / "judge" / "judge.json").is_file()
