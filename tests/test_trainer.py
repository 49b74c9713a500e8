"""The training loop: divergence guard, gradient accumulation, step limits, input checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from unlearn.objectives import GradAscent, GradDiff
from unlearn.objectives.base import Objective, mean_token_nll
from unlearn.trainer import TrainingDiverged, TrainSettings, train


class CountingAscent(Objective):
    """Gradient ascent that counts its calls (one call = one micro-batch)."""

    name = "counting_ascent"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss(self, adapter, forget, retain):
        self.calls += 1
        nll = mean_token_nll(adapter, forget)
        return -nll, {"forget_nll": nll.item()}


class NaNFromCall(CountingAscent):
    """The loss becomes NaN from the ``bad``-th call on."""

    name = "nan_from_call"

    def __init__(self, bad: int):
        super().__init__()
        self.bad = bad

    def loss(self, adapter, forget, retain):
        loss, logs = super().loss(adapter, forget, retain)
        return (loss * float("nan") if self.calls >= self.bad else loss), logs


class _InfGrad(torch.autograd.Function):
    """Forward: 0 (the loss stays finite). Backward: an infinite gradient for its input."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return w.new_zeros(())

    @staticmethod
    def backward(ctx, grad_out):
        (w,) = ctx.saved_tensors
        return torch.full_like(w, float("inf")) * grad_out


class InfGradFromCall(CountingAscent):
    """Adds a term whose gradient on ``lm_head.weight`` is +inf from the ``bad``-th call on."""

    name = "inf_grad_from_call"

    def __init__(self, bad: int):
        super().__init__()
        self.bad = bad

    def loss(self, adapter, forget, retain):
        loss, logs = super().loss(adapter, forget, retain)
        if self.calls >= self.bad:
            loss = loss + _InfGrad.apply(adapter.model.lm_head.weight)
        return loss, logs


@pytest.fixture
def optimizer_steps():
    """Counts the real ``optimizer.step()`` calls (the one accelerate wraps)."""
    count = {"n": 0}
    handle = register_optimizer_step_post_hook(lambda *_: count.__setitem__("n", count["n"] + 1))
    yield count
    handle.remove()


def settings(**kw) -> TrainSettings:
    return TrainSettings(**{"epochs": 1, "batch_size": 2, "lr": 1e-3, **kw})


def test_nan_loss_stops_and_names_the_step(tiny_adapter, qa_items):
    obj = NaNFromCall(bad=3)
    seen = []
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 3, epoch 0 of nan_from_call"):
        train(tiny_adapter, obj, qa_items, None, settings(), progress=False, callback=lambda s, e: seen.append(s))
    assert obj.calls == 3 and seen == [1, 2]  # steps are numbered from 1, as in the history


def test_inf_gradient_stops_and_names_the_parameter_and_step(tiny_adapter, qa_items):
    obj = InfGradFromCall(bad=2)
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient in lm_head\.weight \(and 0 more\) at step 2, epoch 0"):
        train(tiny_adapter, obj, qa_items, None, settings(), progress=False)
    assert obj.calls == 2


def test_inf_gradient_is_caught_before_the_weights_move(tiny_adapter, qa_items):
    before = tiny_adapter.model.lm_head.weight.detach().clone()
    with pytest.raises(TrainingDiverged, match="at step 1"):
        train(tiny_adapter, InfGradFromCall(bad=1), qa_items, None, settings(), progress=False)
    assert torch.equal(tiny_adapter.model.lm_head.weight, before)
    assert torch.isfinite(tiny_adapter.model.lm_head.weight).all()


@pytest.mark.parametrize("grad_accum, steps", [(1, 4), (2, 2)])
def test_grad_accum_divides_the_optimizer_steps(tiny_adapter, qa_items, optimizer_steps, grad_accum, steps):
    obj = CountingAscent()
    log = train(tiny_adapter, obj, qa_items, None, settings(grad_accum=grad_accum), progress=False)
    assert obj.calls == 4  # 8 items / batch 2 micro-batches in both cases
    assert optimizer_steps["n"] == steps and log.steps == steps
    assert [h["step"] for h in log.history] == list(range(1, steps + 1))


def test_max_steps_is_respected(tiny_adapter, qa_items, optimizer_steps):
    obj = CountingAscent()
    log = train(tiny_adapter, obj, qa_items, None, settings(epochs=10, max_steps=3), progress=False)
    assert log.steps == 3 and optimizer_steps["n"] == 3 and obj.calls == 3
    obj = CountingAscent()
    log = train(tiny_adapter, obj, qa_items, None, settings(epochs=10, max_steps=3, grad_accum=2), progress=False)
    assert log.steps == 3 and obj.calls == 6


def test_epochs_and_log(tiny_adapter, qa_items):
    log = train(tiny_adapter, GradAscent(), qa_items, None, settings(epochs=2, batch_size=3), seed=7, progress=False)
    assert log.steps == 2 * 3 and log.seed == 7  # ceil(8 / 3) = 3 batches per epoch
    assert [h["epoch"] for h in log.history] == [0, 0, 0, 1, 1, 1]
    assert all("forget_nll" in h and "lr" in h for h in log.history)
    assert not tiny_adapter.model.training
    assert log.to_dict()["steps"] == 6


def test_empty_forget_set_is_an_error(tiny_adapter):
    with pytest.raises(ValueError, match="forget set is empty"):
        train(tiny_adapter, GradAscent(), [], None, settings(), progress=False)


def test_retain_needed_but_missing_is_an_error(tiny_adapter, qa_items):
    with pytest.raises(ValueError, match="objective 'grad_diff' needs a retain set"):
        train(tiny_adapter, GradDiff(), qa_items, None, settings(), progress=False)
    with pytest.raises(ValueError, match="needs a retain set"):
        train(tiny_adapter, GradDiff(), qa_items, [], settings(), progress=False)


def test_bad_optimizer_and_frozen_model_are_errors(tiny_adapter, qa_items):
    with pytest.raises(ValueError, match="train.optimizer"):
        train(tiny_adapter, GradAscent(), qa_items, None, settings(optimizer="adam"), progress=False)
    for p in tiny_adapter.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(tiny_adapter, GradAscent(), qa_items, None, settings(), progress=False)


def test_retain_batches_are_drawn_when_needed(tiny_adapter, qa_items, tiny_qa):
    log = train(tiny_adapter, GradDiff(), qa_items, tiny_qa[10:], settings(max_steps=2), progress=False)
    assert log.steps == 2 and all("retain_nll" in h for h in log.history)


def test_short_last_window_steps_at_epoch_end(tiny_adapter, qa_items, optimizer_steps):
    # 8 items / batch 2 = 4 micro-batches per epoch; grad_accum 3 -> windows of 3 and 1: 2 steps per epoch
    obj = CountingAscent()
    log = train(tiny_adapter, obj, qa_items, None, settings(epochs=2, grad_accum=3), progress=False)
    assert obj.calls == 8 and log.steps == 4 and optimizer_steps["n"] == 4
    assert [h["epoch"] for h in log.history] == [0, 0, 1, 1]
    # far more accumulation than micro-batches: one (short) window, one step -- never 0 steps
    obj = CountingAscent()
    log = train(tiny_adapter, obj, qa_items, None, settings(batch_size=64, grad_accum=8), progress=False)
    assert obj.calls == 1 and log.steps == 1


def test_window_gradient_is_the_mean_over_its_micro_batches(tiny_adapter, qa_items):
    # SGD without clipping: the update of one step over a window of 3 micro-batches equals
    # lr * mean of the three micro-batch gradients, computed here by hand
    ref = copy.deepcopy(tiny_adapter.model)
    w0 = tiny_adapter.model.lm_head.weight.detach().clone()
    grads = []
    for idx in ([0, 1], [2, 3], [4, 5]):
        ref.zero_grad()
        b = tiny_adapter.collate([qa_items[i] for i in idx])
        (-mean_token_nll(tiny_adapter, b, model=ref)).backward()
        grads.append(ref.lm_head.weight.grad.detach().clone())
    import unlearn.trainer as tr

    orig = tr._batches
    tr._batches = lambda n, bs, rng: [[0, 1], [2, 3], [4, 5], [6, 7]]
    try:
        train(tiny_adapter, CountingAscent(), qa_items, None,
              settings(grad_accum=3, optimizer="sgd", lr=0.1, max_grad_norm=None, max_steps=1), progress=False)
    finally:
        tr._batches = orig
    expected = w0 - 0.1 * torch.stack(grads).mean(0)
    assert torch.allclose(tiny_adapter.model.lm_head.weight.detach(), expected, atol=1e-6)
    assert not torch.allclose(expected, w0 - 0.1 * grads[0], atol=1e-6)  # not just one micro-batch's step


@pytest.mark.parametrize("kw", [{"epochs": 0}, {"max_steps": 0}])
def test_zero_optimizer_steps_is_an_error_before_training(tiny_adapter, qa_items, kw):
    obj = CountingAscent()
    with pytest.raises(ValueError, match="0 optimizer steps"):
        train(tiny_adapter, obj, qa_items, None, settings(**kw), progress=False)
    assert obj.calls == 0
