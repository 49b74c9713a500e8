"""RECE: the adversarial embedding against a hand-computed normal-equation solution and a
stacked least-squares solve; the editor on a tiny model (only attn2 K/V change, the adversarial
embedding is erased, validation keeps the best epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn.editors.base import EditContext
from unlearn.editors.rece import (RECE, RECEConfig, concept_erasure, concept_positions, kv_weights,
                                  rece_adversarial_embedding, rece_attack_embeds)
from unlearn.editors.uce import UCEConfig, concept_token_embeddings, uce_erase
from unlearn.tasks.visual_task import load_visual
from unlearn.tasks.visual_world import VisualWorldConfig



def _random_weights(seed, n=4, d=12):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, d), (5, d), (9, d), (7, d)][:n]
    orig = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    edited = [w + 0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64) for w in orig]
    c = torch.randn(3, d, generator=g, dtype=torch.float64)
    return edited, orig, c


@pytest.mark.parametrize("reg", [0.1, 1e-3, 5.0])
def test_adversarial_embedding_equals_normal_equations_and_lstsq(reg):
    edited, orig, c = _random_weights(0)
    d = c.shape[1]
    got = rece_adversarial_embedding(edited, orig, c, reg)
    assert got.shape == c.shape and got.dtype == c.dtype
    # normal equations, explicit inverse
    a = sum(we.T @ we for we in edited) + reg * torch.eye(d, dtype=torch.float64)
    b = sum(we.T @ wo for we, wo in zip(edited, orig))
    torch.testing.assert_close(got, (torch.linalg.inv(a) @ b @ c.T).T, rtol=1e-9, atol=1e-9)
    # stacked least squares: min Σ_l ‖W'_l x − W_l c‖² + λ‖x‖², one column per row of c
    A = torch.cat(edited + [reg ** 0.5 * torch.eye(d, dtype=torch.float64)])  # (Σd_out + d, d)
    B = torch.cat([wo @ c.T for wo in orig] + [torch.zeros(d, c.shape[0], dtype=torch.float64)])
    torch.testing.assert_close(got, torch.linalg.lstsq(A, B).solution.T, rtol=1e-8, atol=1e-8)


def test_unedited_model_gives_ridge_shrunk_concept():
    _, orig, c = _random_weights(1)
    d = c.shape[1]
    g = sum(w.T @ w for w in orig)
    for reg in (0.5, 1e-9):
        got = rece_adversarial_embedding(orig, orig, c, reg)  # W' == W
        shrunk = (torch.linalg.inv(g + reg * torch.eye(d, dtype=torch.float64)) @ g @ c.T).T
        torch.testing.assert_close(got, shrunk, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got, c, rtol=0, atol=1e-6)  # λ → 0: c itself
    assert (rece_adversarial_embedding(orig, orig, c, 0.5).norm(dim=1) < c.norm(dim=1)).all()


def test_float32_and_input_errors():
    edited, orig, c = _random_weights(2)
    got = rece_adversarial_embedding([w.float() for w in edited], [w.float() for w in orig], c.float(), 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), rece_adversarial_embedding(edited, orig, c, 0.1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="same non-empty list"):
        rece_adversarial_embedding(edited, orig[:-1], c, 0.1)
    with pytest.raises(ValueError, match="must both be"):
        rece_adversarial_embedding(edited, [orig[1]] + orig[1:], c, 0.1)
    with pytest.raises(ValueError, match="reg"):
        rece_adversarial_embedding(edited, orig, c, 0.0)
    with pytest.raises(ValueError, match="shape \\(k, d\\)"):
        rece_adversarial_embedding(edited, orig, c[0], 0.1)
    with pytest.raises(ValueError, match="rece.reg"):
        RECEConfig(reg=0)
    with pytest.raises(ValueError, match="validation_mode"):
        RECEConfig(validation_mode="bogus")


# ---------------------------------------------------------------------------- on a tiny model
@pytest.fixture(scope="module")
def data():
    return load_visual(VisualWorldConfig(size=8, renders_per_concept=1, holdout_per_concept=0), max_prompts=4)


@pytest.fixture
def adapter(data, make_image_adapter):
    return make_image_adapter(data.world)


def _ctx():
    return EditContext(settings=None, seed=0, progress=False, eval_batch_size=8)


def test_rece_erases_the_adversarial_embedding_and_changes_only_kv(adapter, data):
    ref = adapter.reference()
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    te, tok = adapter.text_encoder, adapter.tokenizer
    c = concept_token_embeddings(te, tok, ["red"])  # (1, d)
    cg = concept_token_embeddings(te, tok, ["blue"])
    w = kv_weights(ref.unet)  # original W

    # the same UCE the editor starts from, on a copy: the adversarial embedding of the UCE model
    uce_model = adapter.reference()
    uce_erase(uce_model, ["red"], ["blue"], data.preserve_words(), UCEConfig())
    adv = rece_adversarial_embedding(kv_weights(uce_model.unet), w, c, 0.1)

    def gap(weights, x):  # Σ_l ‖W'_l x − W_l c_guide‖: K/V outputs of x vs the guide's original ones
        return sum(float((x @ we.T - cg @ wo.T).norm()) for we, wo in zip(weights, w))

    res = RECE(RECEConfig(epochs=2, validation=False)).apply(adapter, data, _ctx())
    assert res.adapter is adapter
    kv = set(adapter.parameter_groups()["cross_attention_kv"])
    assert set(res.info["edited"]) == kv
    for n, p in adapter.model.named_parameters():
        assert (not torch.equal(p, before[n])) == (n in kv), n
    # after the RECE epochs c' (found after UCE) maps much closer to the guide's outputs
    assert gap(kv_weights(adapter.unet), adv) < 0.5 * gap(kv_weights(uce_model.unet), adv)
    # and the fresh adversarial embedding of the final model reproduces the concept's outputs worse
    new_adv = rece_adversarial_embedding(kv_weights(adapter.unet), w, c, 0.1)

    def regen(weights, x):  # Σ_l ‖W'_l x − W_l c‖ / Σ_l ‖W_l c‖
        return sum(float((x @ we.T - c @ wo.T).norm()) for we, wo in zip(weights, w)) / sum(
            float((c @ wo.T).norm()) for wo in w)

    assert regen(kv_weights(adapter.unet), new_adv) > regen(kv_weights(uce_model.unet), adv)
    assert res.info["best_epoch"] == 2 and res.info["epoch_erasure"] is None
    assert "validation is off" in res.info["validation"]
    assert len(res.info["adv_gap"]) == 2 and res.info["edit_seconds"] < 5


def test_accumulate_mode_erases_all_keys_from_the_original(adapter, data):
    ref = adapter.reference()
    RECE(RECEConfig(epochs=1, validation=False, accumulate=True, lamb=1e-3)).apply(adapter, data, _ctx())
    c = concept_token_embeddings(adapter.text_encoder, adapter.tokenizer, ["red"])
    cg = concept_token_embeddings(adapter.text_encoder, adapter.tokenizer, ["blue"])
    for we, wo in zip(kv_weights(adapter.unet), kv_weights(ref.unet)):
        target = cg @ wo.T
        assert (c @ we.T - target).norm() < 0.2 * (c @ wo.T - target).norm()  # the concept itself stays erased


class _StubJudge:
    """Reads every image as red except on the ``clean_call``-th predict call (all blue)."""

    def __init__(self, clean_call: int) -> None:
        self.calls, self.clean_call = 0, clean_call

    def predict(self, images):
        colour = "blue" if self.calls == self.clean_call else "red"
        self.calls += 1
        return {"colour": [colour] * len(images), "shape": ["circle"] * len(images), "texture": ["solid"] * len(images)}


def test_validation_keeps_the_best_epoch(adapter, data, make_image_adapter):
    data.judge = _StubJudge(clean_call=1)  # calls: 0 = UCE, 1 = epoch 1, 2 = epoch 2
    try:
        res = RECE(RECEConfig(epochs=2, sample_steps=2)).apply(adapter, data, _ctx())
    finally:
        data.judge = None
    assert res.info["epoch_erasure"] == [0.0, 1.0, 0.0] and res.info["best_epoch"] == 1
    assert res.info["validation_seconds"] >= 0 and "forget_explicit" in res.info["validation"]
    # the kept weights are exactly those after one epoch
    other = make_image_adapter(data.world)
    RECE(RECEConfig(epochs=1, validation=False)).apply(other, data, _ctx())
    for a, b in zip(kv_weights(adapter.unet), kv_weights(other.unet)):
        assert torch.equal(a, b)


def test_no_judge_keeps_last_epoch(adapter, data):
    assert data.judge is None
    res = RECE(RECEConfig(epochs=1)).apply(adapter, data, _ctx())
    assert res.info["best_epoch"] == 1 and "no judge" in res.info["validation"]


def test_attack_embeds_replace_only_concept_positions(adapter, data):
    ref = adapter.reference()
    uce_erase(adapter, ["red"], ["blue"], data.preserve_words(), UCEConfig())
    prompts = ["a striped red circle", "a solid blue square"]
    emb = adapter.encode_prompts(adapter.tokenize(prompts))
    att = rece_attack_embeds(adapter, ref, prompts, "red", reg=0.1)
    pos = concept_positions(adapter.tokenizer, adapter.tokenize(prompts), ["red"])
    assert pos.sum() == 1 and pos[0, 3]  # <bos> a striped red ...
    assert torch.equal(att[~pos], emb[~pos])  # every other position, and the prompt without the word
    expect = rece_adversarial_embedding(kv_weights(adapter.unet), kv_weights(ref.unet), emb[0, 3:4], 0.1)
    torch.testing.assert_close(att[0, 3:4], expect, rtol=1e-5, atol=1e-6)
    imgs = adapter.sample(prompts, seed=0, steps=2, prompt_embeds=att)
    assert imgs.shape == (2, 8, 8, 3) and imgs.dtype == np.uint8


def test_concept_erasure_counts_rows_not_read_as_their_concept():
    class J:
        def predict(self, images):
            return {"colour": ["red", "blue", "red"], "shape": ["circle"] * 3, "texture": ["solid"] * 3}

    rows = [{"categories": ["colour:red"]}, {"categories": ["colour:red"]}, {"categories": ["colour:green"]}]
    assert concept_erasure(J(), np.zeros((3, 8, 8, 3), np.uint8), rows) == pytest.approx(2 / 3)
