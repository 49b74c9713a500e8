"""The visual world's judge: held-out accuracy, safetensors round trip, Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn.evaluators.image_judge import (
    ImageJudge, JudgeConfig, frechet_distance, judge_accuracy, train_judge, unique_renders,
)
from unlearn.tasks.visual_world import build_visual_world


@pytest.fixture(scope="module")
def world():
    return build_visual_world()


@pytest.fixture(scope="module")
def judge(world):
    j, log = train_judge(world.split("train"), JudgeConfig())
    assert log[-1] < log[0] / 10  # training converged
    return j


def test_heldout_accuracy(judge, world):
    hold = world.split("holdout")
    assert {it["image_seed"] for it in hold}.isdisjoint({it["image_seed"] for it in world.split("train")})
    acc = judge_accuracy(judge, hold)
    assert acc["all"] >= 0.95, acc
    assert min(acc["shape"], acc["colour"], acc["texture"]) >= 0.95


def test_untrained_judge_is_near_chance(world):
    torch.manual_seed(0)
    acc = judge_accuracy(ImageJudge(16), world.split("holdout"))
    assert acc["all"] < 0.5  # the accuracy test above measures training, not the architecture


def test_training_is_deterministic(world):
    items = world.split("train")[:60]
    a, la = train_judge(items, JudgeConfig(epochs=2))
    b, lb = train_judge(items, JudgeConfig(epochs=2))
    assert la == lb
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_save_load_roundtrip(judge, world, tmp_path):
    judge.save(tmp_path / "j")
    back = ImageJudge.load(tmp_path / "j")
    imgs = [it["image"] for it in unique_renders(world.split("holdout"))[:20]]
    assert back.predict(imgs) == judge.predict(imgs)
    assert np.array_equal(back.features(imgs), judge.features(imgs))
    assert judge.features(imgs).shape == (20, 64)
    with pytest.raises(ValueError, match="holds no judge"):
        ImageJudge.load(tmp_path)


def test_frechet_distance_hand_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)  # ‖Δμ‖², same covariance
    # 1-D Gaussians: (μa − μb)² + (σa − σb)²
    x = rng.normal(size=(2000, 1))
    y = 3.0 * x + 1.0
    sa, sb = x.std(ddof=1), y.std(ddof=1)
    assert frechet_distance(x, y) == pytest.approx((x.mean() - y.mean()) ** 2 + (sa - sb) ** 2, rel=1e-4)
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(a, a[:, :2])
