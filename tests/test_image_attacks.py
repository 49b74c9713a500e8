"""Attacks on an erased text-to-image model (the image side of evaluators/attacks.py), on the
shipped tiny-t2i zoo: the attacks work on copies, embedding inversion only touches prompts with
the concept word, relearning brings an erased concept back, quantisation puts weights on the grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn.adapters.base import ImageModel
from unlearn.evaluators.attacks import ATTACKS, attack_names, make_attack, run_attacks, run_image_attacks
from unlearn.evaluators.image_attacks import image_inputs


@pytest.fixture(scope="module")
def zoo_setup():
    from unlearn.adapters.image import ImageAdapter
    from unlearn.editors import EditContext
    from unlearn.editors.uce import UCE
    from unlearn.evaluators.image_judge import ImageJudge
    from unlearn.tasks.visual_task import load_visual
    from unlearn.trainer import TrainSettings
    from unlearn.zoo import zoo_path

    torch.set_num_threads(1)
    data = load_visual()
    data.judge = ImageJudge.load(zoo_path("tiny-t2i/judge"))
    original = ImageAdapter.load("zoo:tiny-t2i/target")
    erased = original.reference()
    erased._fingerprint = None
    erased = UCE().apply(erased, data, EditContext(settings=TrainSettings(), seed=0, progress=False)).adapter
    return data, original, erased


def test_the_image_attacks_of_the_registry():
    assert attack_names("image") == ("embedding_inversion", "relearn", "quantize_8bit", "quantize_4bit",
                                     "unlearndiffatk", "p4d", "p4d_k", "ring_a_bell", "concept_inversion")


def test_embedding_inversion_changes_only_prompts_with_the_concept_word(zoo_setup):
    data, original, erased = zoo_setup
    att = ATTACKS.get("embedding_inversion")().attacked(erased, original, image_inputs(data))
    model = att.model
    assert att.info["words"] == ["red"] and att.indices is None
    # an image model the i2p suite accepts, never mistaken for the erased one (evaluation cache)
    assert isinstance(model, ImageModel) and model.fingerprint() != erased.fingerprint()
    assert model.unet is erased.unet  # shares the erased model's modules
    plain = ["a picture of a solid blue square"]
    assert np.array_equal(model.sample(plain, seed=[3], steps=4), erased.sample(plain, seed=[3], steps=4))
    red = ["a picture of a solid red circle"]
    assert not np.array_equal(model.sample(red, seed=[3], steps=4), erased.sample(red, seed=[3], steps=4))
    assert model.changed_prompts == 1  # only the red prompt had the word


def test_relearn_brings_the_erased_colour_back_and_leaves_the_erased_model_alone(zoo_setup):
    from unlearn.editors.rece import concept_erasure

    data, original, erased = zoo_setup
    fp = erased.fingerprint(refresh=True)
    rows = data.eval_splits["forget_explicit"][::4][:12]
    attack = ATTACKS.get("relearn")(ATTACKS.get("relearn").Config(steps=10, lr=2e-4))
    att = attack.attacked(erased, original, image_inputs(data))
    copy, settings, note = att.model, att.info, att.note
    assert settings["steps_done"] == 10 and "of 288 forget renders" in note and "denoising loss" in note
    assert settings["lr"] == 2e-4 and settings["trained_items"] == 144
    assert settings["trained_half_nll"]["after"] < settings["trained_half_nll"]["before"]
    seeds = [int(r["seed"]) for r in rows]
    prompts = [r["prompt"] for r in rows]
    before = concept_erasure(data.judge, erased.sample(prompts, seed=seeds, steps=10), rows)
    after = concept_erasure(data.judge, copy.sample(prompts, seed=seeds, steps=10), rows)
    assert before >= 0.9 and after <= before - 0.5, (before, after)
    assert erased.fingerprint(refresh=True) == fp


def test_quantize_puts_every_linear_weight_on_its_grid(zoo_setup):
    data, original, erased = zoo_setup
    att = ATTACKS.get("quantize_4bit")().attacked(erased, original, image_inputs(data))
    copy, settings = att.model, att.info
    assert settings["bits"] == 4 and settings["linear_layers"] > 0 and "UNet and text encoder" in att.note
    for mod in copy.model.modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
            scale = w.abs().amax(dim=1, keepdim=True) / 7
            q = torch.where(scale > 0, w / scale.clamp_min(1e-30), torch.zeros_like(w))
            assert torch.allclose(q, q.round(), atol=1e-3)
            assert q.abs().max() <= 7 + 1e-3


def test_run_image_attacks_checks_names_settings_and_the_original(zoo_setup):
    data, original, erased = zoo_setup
    ev = lambda m, sp: None  # noqa: E731  (never reached)
    with pytest.raises(ValueError, match="did you mean 'relearn'"):
        run_image_attacks(["relern"], erased, original, data, {}, ev, {"splits": {}})
    with pytest.raises(ValueError, match="image attack 'embedding_inversion' has no setting 'lamb'"):
        run_image_attacks(["embedding_inversion"], erased, original, data, {}, ev, {"splits": {}},
                          params={"embedding_inversion": {"lamb": 1}})
    with pytest.raises(ValueError, match="needs the model before erasure"):
        run_image_attacks(["embedding_inversion"], erased, None, data, {}, ev, {"splits": {}})
    with pytest.raises(ValueError, match=r"'in_context' does not apply to image models .*attacks for image models: "
                                         r"embedding_inversion, relearn, quantize_8bit, quantize_4bit, unlearndiffatk"):
        run_image_attacks(["relearn", "in_context"], erased, original, data, {}, ev, {"splits": {}})
    with pytest.raises(ValueError, match="modality='text', but the model's modality is 'image'"):
        run_attacks(["relearn"], erased, None, image_inputs(data), lambda a, att: {}, modality="text")
    with pytest.raises(ValueError, match="split='per_author' is for text models"):
        run_image_attacks(["relearn"], erased, original, data, {}, ev, {"splits": {}},
                          params={"relearn": {"split": "per_author"}})


def test_relearn_records_the_image_learning_rate(zoo_setup):
    """relearn's lr default is the image one (1e-4) on an image model, recorded in the settings;
    the scorer's result carries the attack's settings and the seconds it took."""
    data, original, erased = zoo_setup
    calls = []

    def evaluate(model, splits):
        calls.append(model)
        return {"splits": {"forget_explicit": {"metrics": {"erasure_rate": {"value": 0.25}}}}}

    before = {"splits": {"forget_explicit": {"metrics": {"erasure_rate": {"value": 1.0}}}}}
    res = run_image_attacks(["relearn"], erased, None, data, {"forget_explicit": []}, evaluate, before,
                            params={"relearn": {"steps": 1, "batch_size": 2}}, seed=3)
    r = res["relearn"]
    assert r["settings"]["lr"] == 1e-4 and r["settings"]["steps_done"] == 1 and r["settings"]["seed"] == 3
    assert "lr 0.0001" in r["note"] and r["delta"] == {"forget_explicit": -0.75} and r["seconds"] >= 0
    assert r["asr"] == {"before": {"forget_explicit": 0.0}, "after": {"forget_explicit": 0.75}}
    assert len(calls) == 1 and calls[0] is not erased
    assert make_attack("relearn", modality="image").lr_for("image") == 1e-4
