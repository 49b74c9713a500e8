"""Objectives pinned against hand-computed values.

A ``FakeAdapter`` returns per-item NLLs (and logits) chosen by the test, so every expected
value below is an explicit formula of those numbers. One test per objective at the end runs
the real tiny Llama, and one checks that gradient ascent does what it says.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from unlearn.adapters.text import IGNORE, TextAdapter
from unlearn.objectives import OBJECTIVES, GradAscent, GradDiff, IdkDPO, IdkNLL, NPO, SimNPO
from unlearn.objectives.base import mean_token_nll
from unlearn.objectives.grad_diff import GradDiffConfig
from unlearn.objectives.idk_dpo import IdkDPOConfig
from unlearn.objectives.idk_nll import IdkNLLConfig
from unlearn.objectives.npo import NPOConfig
from unlearn.objectives.simnpo import SimNPOConfig


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


class FakeAdapter:
    """The part of the adapter contract that objectives use, with values set by the test.

    ``item_nll(batch)`` returns ``(batch["nll"], batch["n"])``; ``logits(batch)`` returns
    ``batch[logits_key]``; ``collate(items, answer_key)`` builds such a batch from
    ``item["nll"][answer_key]`` (one token each), which is how a reference is queried in setup.
    """

    shift = staticmethod(TextAdapter.shift)

    def __init__(self, logits_key: str = "logits"):
        self.logits_key = logits_key
        self.calls: Counter = Counter()

    def item_nll(self, batch, model=None):
        self.calls["item_nll"] += 1
        return batch["nll"], batch["n"]

    def logits(self, batch, model=None):
        self.calls["logits"] += 1
        return batch[self.logits_key]

    def collate(self, items, answer_key="answer", **_):
        self.calls["collate"] += 1
        return {"nll": torch.tensor([float(it["nll"][answer_key]) for it in items]),
                "n": torch.ones(len(items), dtype=torch.long)}


def fb(nll, n=None, index=None, **extra):
    """A fake batch: summed NLL per item (a leaf that requires grad), answer-token counts, index."""
    nll = torch.tensor(nll, dtype=torch.float32, requires_grad=True)
    n = torch.tensor(n if n is not None else [1] * len(nll), dtype=torch.long)
    index = torch.tensor(index if index is not None else list(range(len(nll))), dtype=torch.long)
    return {"nll": nll, "n": n, "index": index, **extra}


# -- GradAscent -------------------------------------------------------------------------------
def test_grad_ascent_is_minus_mean_token_nll():
    forget = fb([2.0, 4.0], n=[1, 3])
    loss, logs = GradAscent().loss(FakeAdapter(), forget, None)
    assert loss.item() == pytest.approx(-(2.0 + 4.0) / (1 + 3))
    assert logs == {"forget_nll": pytest.approx(1.5)}
    loss.backward()
    assert forget["nll"].grad.tolist() == pytest.approx([-1 / 4, -1 / 4])
    obj = GradAscent()
    assert not obj.needs_retain() and not obj.needs_reference() and not obj.needs_idk()


# -- GradDiff ---------------------------------------------------------------------------------
def test_grad_diff_nll_retain():
    forget, retain = fb([2.0, 4.0], n=[1, 3]), fb([3.0], n=[2])
    obj = GradDiff(GradDiffConfig(gamma=0.5, alpha=2.0))
    assert obj.needs_retain() and not obj.needs_reference()
    loss, logs = obj.loss(FakeAdapter(), forget, retain)
    assert loss.item() == pytest.approx(-0.5 * (6.0 / 4) + 2.0 * (3.0 / 2))
    assert logs == {"forget_nll": pytest.approx(1.5), "retain_nll": pytest.approx(1.5)}
    # defaults gamma = alpha = 1
    loss, _ = GradDiff().loss(FakeAdapter(), forget, retain)
    assert loss.item() == pytest.approx(-1.5 + 1.5)


def test_grad_diff_without_retain_term():
    obj = GradDiff(GradDiffConfig(alpha=0.0))
    assert not obj.needs_retain() and not obj.needs_reference()
    loss, logs = obj.loss(FakeAdapter(), fb([2.0, 4.0], n=[1, 3]), None)
    assert loss.item() == pytest.approx(-1.5) and set(logs) == {"forget_nll"}


def test_grad_diff_kl_retain_by_hand():
    # One scored position, V = 3. Sequence of 3 tokens, labels [-100, -100, 1]: after the
    # shift, logits row 1 predicts label 1; row 0 (prompt) and row 2 (last) must be ignored.
    junk = [50.0, -50.0, 7.0]
    theta = torch.tensor([[junk, [1.0, 0.0, -1.0], junk]], requires_grad=True)  # (1, 3, 3)
    ref = torch.tensor([[junk, [0.0, 0.0, 0.0], [-9.0, 9.0, 0.0]]])  # uniform at the scored row
    labels = torch.tensor([[IGNORE, IGNORE, 1]])
    retain = {"logits": theta, "ref_logits": ref, "labels": labels}
    forget = fb([2.0, 4.0], n=[1, 3])
    # KL(p_ref || p_theta) = sum_v (1/3) (log(1/3) - log p_theta(v)) = logsumexp(1, 0, -1) - log 3
    lse = math.log(math.e + 1.0 + math.exp(-1.0))
    kl = lse - math.log(3.0)
    obj = GradDiff(GradDiffConfig(gamma=1.0, alpha=3.0, retain_loss="kl"))
    assert obj.needs_reference()
    reference = FakeAdapter(logits_key="ref_logits")
    obj.setup(FakeAdapter(), reference, [])
    loss, logs = obj.loss(FakeAdapter(), forget, retain)
    assert logs["retain_kl"] == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(-1.5 + 3.0 * kl, rel=1e-6)
    assert reference.calls["logits"] == 1
    loss.backward()
    # only the scored row receives a gradient: d KL / d logits = p_theta - p_ref
    p = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), 0)
    assert torch.allclose(theta.grad[0, 1], 3.0 * (p - 1 / 3), atol=1e-6)
    assert (theta.grad[0, 0] == 0).all() and (theta.grad[0, 2] == 0).all()


def test_grad_diff_kl_needs_the_reference():
    obj = GradDiff(GradDiffConfig(retain_loss="kl"))
    with pytest.raises(ValueError, match="reference"):
        obj.loss(FakeAdapter(), fb([1.0]), {"labels": torch.tensor([[IGNORE, 1]])})
    with pytest.raises(ValueError, match="gamma and alpha"):
        GradDiffConfig(alpha=-1.0)


# -- NPO --------------------------------------------------------------------------------------
def test_npo_by_hand_with_reference_computed_once():
    forget_items = [{"nll": {"answer": 1.0}}, {"nll": {"answer": 1.0}}]
    reference = FakeAdapter()
    obj = NPO(NPOConfig(beta=0.1, alpha=0.0))
    assert obj.needs_reference() and not obj.needs_retain()
    obj.setup(FakeAdapter(), reference, forget_items)
    assert reference.calls["item_nll"] == 1  # all reference NLLs in one precomputation
    expected = -(2 / 0.1) * (logsigmoid(0.1 * (2 - 1)) + logsigmoid(0.1 * (4 - 1))) / 2
    for _ in range(3):
        loss, logs = obj.loss(FakeAdapter(), fb([2.0, 4.0]), None)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["npo"] == pytest.approx(expected, rel=1e-6) and logs["forget_nll"] == pytest.approx(3.0)
    assert reference.calls["item_nll"] == 1  # never again during training


def test_npo_uses_the_batch_index_and_the_retain_term():
    # reference NLL differs per item; the batch holds items 1 and 0 in that order
    forget_items = [{"nll": {"answer": 1.0}}, {"nll": {"answer": 0.5}}]
    obj = NPO(NPOConfig(beta=0.2, alpha=2.0))
    obj.setup(FakeAdapter(), FakeAdapter(), forget_items)
    forget = fb([2.0, 4.0], index=[1, 0])
    loss, logs = obj.loss(FakeAdapter(), forget, fb([3.0], n=[4]))
    npo = -(2 / 0.2) * (logsigmoid(0.2 * (2.0 - 0.5)) + logsigmoid(0.2 * (4.0 - 1.0))) / 2
    assert loss.item() == pytest.approx(npo + 2.0 * (3.0 / 4), rel=1e-6)
    assert logs["retain_nll"] == pytest.approx(0.75)
    loss.backward()
    # d/d nll_i = -(2/beta) * beta * sigmoid(-beta * delta_i) / B = -sigmoid(-beta * delta_i)
    expected_grad = [-1 / (1 + math.exp(0.2 * 1.5)), -1 / (1 + math.exp(0.2 * 3.0))]
    assert forget["nll"].grad.tolist() == pytest.approx(expected_grad, rel=1e-5)


def test_npo_at_the_reference_is_4_log_2_over_beta():
    obj = NPO(NPOConfig(beta=0.5, alpha=0.0))
    obj.setup(FakeAdapter(), FakeAdapter(), [{"nll": {"answer": 3.0}}])
    loss, _ = obj.loss(FakeAdapter(), fb([3.0]), None)
    assert loss.item() == pytest.approx((2 / 0.5) * math.log(2))


# -- SimNPO -----------------------------------------------------------------------------------
def test_simnpo_length_normalises():
    # same per-token NLL (2.0) for both items, different lengths: the loss sees only NLL / |y|
    obj = SimNPO(SimNPOConfig(beta=2.5, gamma=0.5, alpha=0.0))
    assert not obj.needs_reference() and not obj.needs_retain()
    obj.setup(FakeAdapter(), None, [])
    loss, logs = obj.loss(FakeAdapter(), fb([2.0, 6.0], n=[1, 3]), None)
    expected = -(2 / 2.5) * (logsigmoid(2.5 * 2.0 / 1 - 0.5) + logsigmoid(2.5 * 6.0 / 3 - 0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["simnpo"] == pytest.approx(expected, rel=1e-6)
    loss_same, _ = obj.loss(FakeAdapter(), fb([2.0, 2.0], n=[1, 1]), None)
    assert loss_same.item() == pytest.approx(expected, rel=1e-6)


def test_simnpo_defaults_and_retain_term():
    obj = SimNPO()
    assert (obj.config.beta, obj.config.gamma, obj.config.alpha) == (4.5, 0.0, 1.0)
    assert obj.needs_retain() and not obj.needs_reference()
    obj.setup(FakeAdapter(), None, [])
    loss, logs = obj.loss(FakeAdapter(), fb([3.0], n=[2]), fb([5.0], n=[5]))
    expected = -(2 / 4.5) * logsigmoid(4.5 * 3.0 / 2) + 1.0 * (5.0 / 5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["retain_nll"] == pytest.approx(1.0)


# -- IdkNLL -----------------------------------------------------------------------------------
def test_idk_nll_by_hand():
    nan = float("nan")
    forget = fb([nan, nan], idk=fb([3.0, 5.0], n=[2, 2]))  # the forget answers must not be scored
    obj = IdkNLL(IdkNLLConfig(alpha=0.5))
    assert obj.needs_idk() and obj.needs_retain() and not obj.needs_reference()
    loss, logs = obj.loss(FakeAdapter(), forget, fb([1.0], n=[4]))
    assert loss.item() == pytest.approx((3.0 + 5.0) / 4 + 0.5 * (1.0 / 4))
    assert logs == {"idk_nll": pytest.approx(2.0), "retain_nll": pytest.approx(0.25)}
    loss, logs = IdkNLL(IdkNLLConfig(alpha=0.0)).loss(FakeAdapter(), forget, None)
    assert loss.item() == pytest.approx(2.0) and set(logs) == {"idk_nll"}


# -- IdkDPO -----------------------------------------------------------------------------------
def test_idk_dpo_by_hand_with_reference_computed_once():
    forget_items = [{"nll": {"answer": 1.0, "idk": 2.0}}, {"nll": {"answer": 1.0, "idk": 2.0}}]
    reference = FakeAdapter()
    obj = IdkDPO(IdkDPOConfig(beta=0.1, alpha=0.0))
    assert obj.needs_idk() and obj.needs_reference() and not obj.needs_retain()
    obj.setup(FakeAdapter(), reference, forget_items)
    assert reference.calls["item_nll"] == 2  # forget answers and idk answers, once each
    forget = fb([2.0, 4.0], idk=fb([3.0, 1.0]))
    loss, logs = obj.loss(FakeAdapter(), forget, None)
    # chosen = -(NLL_idk - ref_idk) = [-1, 1]; rejected = -(NLL_f - ref_f) = [-1, -3]
    expected = -(2 / 0.1) * (logsigmoid(0.1 * (-1 - -1)) + logsigmoid(0.1 * (1 - -3))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs == {"dpo": pytest.approx(expected, rel=1e-6)}
    loss.backward()
    # pushing the forget answer's NLL up and the refusal's down lowers the loss
    assert (forget["nll"].grad < 0).all() and (forget["idk"]["nll"].grad > 0).all()
    obj.loss(FakeAdapter(), forget, None)
    assert reference.calls["item_nll"] == 2


def test_idk_dpo_uses_per_item_reference_and_retain():
    forget_items = [{"nll": {"answer": 1.0, "idk": 2.0}}, {"nll": {"answer": 3.0, "idk": 0.5}}]
    obj = IdkDPO(IdkDPOConfig(beta=0.5, alpha=1.5))
    obj.setup(FakeAdapter(), FakeAdapter(), forget_items)
    forget = fb([4.0], index=[1], idk=fb([1.0], index=[1]))
    loss, logs = obj.loss(FakeAdapter(), forget, fb([2.0], n=[2]))
    chosen, rejected = -(1.0 - 0.5), -(4.0 - 3.0)
    expected = -(2 / 0.5) * logsigmoid(0.5 * (chosen - rejected)) + 1.5 * (2.0 / 2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["retain_nll"] == pytest.approx(1.0)


# -- configs and the registry -----------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: NPOConfig(beta=0.0), lambda: NPOConfig(alpha=-1.0), lambda: SimNPOConfig(beta=-1.0),
    lambda: IdkDPOConfig(beta=0.0), lambda: IdkNLLConfig(alpha=-0.1), lambda: GradDiffConfig(gamma=-1.0),
])
def test_configs_refuse_bad_values(make):
    with pytest.raises(ValueError):
        make()


def test_registry_holds_every_objective_and_rejects_unknown_names():
    assert OBJECTIVES.names() == sorted(["grad_ascent", "grad_diff", "npo", "simnpo", "idk_nll", "idk_dpo",
                                         "flat", "rmu", "undial", "wga", "needle", "uoe", "salun"])
    assert OBJECTIVES.get("npo") is NPO
    with pytest.raises(ValueError, match="did you mean 'grad_ascent'"):
        OBJECTIVES.get("grad_ascnt")
    with pytest.raises(ValueError, match=r"unknown objective 'simnpoo'.*did you mean 'simnpo'"):
        OBJECTIVES.get("simnpoo")
    for name in OBJECTIVES.names():
        cls = OBJECTIVES.get(name)
        assert cls.name == name and "arXiv:" in cls.paper


# -- the real tiny model ----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(["grad_ascent", "grad_diff", "npo", "simnpo", "idk_nll", "idk_dpo"]))
def test_every_objective_runs_on_the_tiny_llama(name, tiny_adapter, qa_items, tiny_qa):
    obj = OBJECTIVES.get(name)()
    reference = tiny_adapter.reference() if obj.needs_reference() else None
    obj.setup(tiny_adapter, reference, qa_items)
    forget = tiny_adapter.collate(qa_items[:3], indices=[0, 1, 2])
    if obj.needs_idk():
        forget["idk"] = tiny_adapter.collate(qa_items[:3], answer_key="idk", indices=[0, 1, 2])
    retain = tiny_adapter.collate(tiny_qa[10:13]) if obj.needs_retain() else None
    tiny_adapter.model.train()
    loss, logs = obj.loss(tiny_adapter, forget, retain)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) and math.isfinite(v) for v in logs.values())
    loss.backward()
    grads = [p.grad for p in tiny_adapter.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if name in ("npo", "idk_dpo"):  # at the reference the log-ratios are 0: loss = (2/beta) log 2
        assert logs.get("npo", logs.get("dpo")) == pytest.approx((2 / 0.1) * math.log(2), rel=1e-4)


def test_grad_ascent_raises_the_forget_nll(tiny_adapter, qa_items):
    batch = tiny_adapter.collate(qa_items[:4])
    with torch.no_grad():
        before = mean_token_nll(tiny_adapter, batch).item()
    opt = torch.optim.Adam(tiny_adapter.model.parameters(), lr=1e-2)
    tiny_adapter.model.train()
    for _ in range(3):
        loss, _ = GradAscent().loss(tiny_adapter, batch, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tiny_adapter.model.eval()
    with torch.no_grad():
        after = mean_token_nll(tiny_adapter, batch).item()
    assert after > before + 0.1, (before, after)
