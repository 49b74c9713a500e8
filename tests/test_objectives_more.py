"""FLAT, RMU, UNDIAL and WGA pinned against hand-computed values, then run on a tiny Llama.

The fake adapters return logits / hidden states set by the test, so every expected value is
an explicit formula of those numbers (the arithmetic is in the comments). ``J`` rows are
positions that must not be scored (prompt, padding, the last position); they hold extreme
values so that counting one of them would change the result visibly.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from unlearn.adapters.text import IGNORE, TextAdapter
from unlearn.objectives import FLAT, OBJECTIVES, RMU, UNDIAL, WGA, rmu_selection
from unlearn.objectives.base import mean_token_nll
from unlearn.objectives.flat import DIVERGENCES, REVERSED, FLATConfig
from unlearn.objectives.rmu import RMUConfig, rmu_param_pattern
from unlearn.objectives.undial import UNDIALConfig
from unlearn.objectives.wga import WGAConfig
from unlearn.selection import apply_selection, changed_parameters

J = [40.0, -40.0]  # a junk logit row (V = 2): p(label 0) ~ 1, p(label 1) ~ 0


def row(p: float, label: int) -> list[float]:
    """Logits (V = 2) under which the softmax gives ``label`` probability ``p``."""
    z = [0.0, 0.0]
    z[label] = math.log(p / (1 - p))
    return z


class Fake:
    """What the four objectives ask of an adapter, with values taken from the batch.

    ``logits`` -> ``batch[prefix + "logits"]``, ``hidden_states`` -> ``batch[prefix + "hidden"]``,
    ``item_nll`` -> ``(batch["nll"], batch["n"])``; ``shift`` and ``token_logprobs`` are the
    real TextAdapter code running on those logits. ``prefix="ref_"`` makes a reference.
    """

    shift = staticmethod(TextAdapter.shift)
    token_logprobs = TextAdapter.token_logprobs

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.layers: list[int] = []

    def logits(self, batch, model=None):
        return batch[self.prefix + "logits"]

    def hidden_states(self, batch, layer, model=None):
        self.layers.append(layer)
        return batch[self.prefix + "hidden"]

    def item_nll(self, batch, model=None):
        return batch["nll"], batch["n"]


def leaf(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, requires_grad=True)


# -- FLAT -------------------------------------------------------------------------------------
def flat_batches():
    # forget: item A scores 2 tokens (p = 3/4 for label 0, p = 1/2 for label 1); item B scores
    # 1 token (p = 1/4 for label 1) and is padded. Batch mean P_f = (3/4 + 1/2 + 1/4) / 3 = 1/2
    # (the mean of the item means would be (5/8 + 1/4) / 2 = 7/16).
    forget = {"logits": leaf([[row(0.75, 0), row(0.5, 1), J], [row(0.25, 1), J, J]]),
              "labels": torch.tensor([[IGNORE, 0, 1], [IGNORE, 1, IGNORE]])}
    # template (idk): one token each, p = 0.9 and p = 0.5 -> P_e = 0.7
    forget["idk"] = {"logits": leaf([[J, row(0.9, 1), J], [J, row(0.5, 0), J]]),
                     "labels": torch.tensor([[IGNORE, IGNORE, 1], [IGNORE, IGNORE, 0]])}
    return forget


def sp(x):  # softplus
    return math.log1p(math.exp(x))


# L = -g(P_e) + f*(g(P_f)) with P_e = 0.7, P_f = 0.5, the official code's pairs
FLAT_BY_HAND = {
    "total_variation": -math.tanh(0.7) / 2 + math.tanh(0.5) / 2,
    "kl": -0.7 + math.exp(0.5 - 1),
    "js": -(math.log(2) - sp(-0.7)) + sp(0.5) - math.log(2),
    "pearson": -0.7 + (0.5 + 0.5 ** 2 / 4),
    "jeffrey": -0.7 + (0.5 + 0.5 ** 2 / 4 + 0.5 ** 3 / 16),
    "reverse_kl": math.exp(0.7) + (-1 - 0.5),
    "squared_hellinger": -(1 - math.exp(0.7)) + (1 - math.exp(0.5)) / math.exp(0.5),
    "neyman": -(1 - math.exp(0.7)) + (2 - 2 * math.sqrt(1 - 0.5)),
}


@pytest.mark.parametrize("div", sorted(FLAT_BY_HAND))
def test_flat_by_hand(div):
    assert set(FLAT_BY_HAND) == set(DIVERGENCES)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        obj = FLAT(FLATConfig(divergence=div))
    assert bool(w) == (div in REVERSED)
    assert obj.needs_idk() and not obj.needs_retain() and not obj.needs_reference()
    forget = flat_batches()
    loss, logs = obj.loss(Fake(), forget, None)
    assert loss.item() == pytest.approx(FLAT_BY_HAND[div], rel=1e-5)
    assert logs["p_forget"] == pytest.approx(0.5, rel=1e-5) and logs["p_template"] == pytest.approx(0.7, rel=1e-5)
    loss.backward()
    gf, ge = forget["logits"].grad, forget["idk"]["logits"].grad
    # junk rows get no gradient
    assert (gf[0, 2] == 0).all() and (gf[1, 1:] == 0).all() and (ge[:, 0] == 0).all() and (ge[:, 2] == 0).all()
    up_f = gf[0, 0, 0] < 0  # a descent step raises the forget token's logit (bad)
    down_e = ge[0, 1, 1] > 0  # a descent step lowers the template token's logit (bad)
    if div in ("reverse_kl", "squared_hellinger"):
        assert up_f and down_e  # the official pairs train backwards on P in [0, 1]
    elif div == "neyman":
        assert not up_f and down_e
    else:
        assert not up_f and not down_e


def test_flat_default_is_total_variation_and_rejects_unknown():
    assert FLAT().config.divergence == "total_variation"
    with pytest.raises(ValueError, match="divergence"):
        FLATConfig(divergence="hellinger")


# -- RMU --------------------------------------------------------------------------------------
def test_rmu_control_vector_is_seeded_uniform_and_fixed():
    obj = RMU(RMUConfig(steering_coeff=6.5, seed=3))
    t = obj.control_vector(16)
    assert t.shape == (16,) and (t >= 0).all() and t.norm().item() == pytest.approx(6.5, rel=1e-6)
    assert obj.control_vector(16) is t  # one vector for the whole run
    assert torch.equal(RMU(RMUConfig(steering_coeff=6.5, seed=3)).control_vector(16), t)
    assert not torch.equal(RMU(RMUConfig(steering_coeff=6.5, seed=4)).control_vector(16), t)


def test_rmu_by_hand_all_positions():
    # H = 2, c = 4. Forget: h = 0 at the 3 attended positions, so each position's MSE is
    # |c u|^2 / H = 16 / 2 = 8 whatever u is (|u| = 1); the padded position (100s) is ignored.
    forget = {"hidden": leaf([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [100.0, 100.0]]]),
              "attention_mask": torch.tensor([[1, 1], [1, 0]]), "labels": torch.tensor([[IGNORE, 5], [IGNORE, IGNORE]])}
    # Retain: position MSEs ((1-1)^2 + (2-0)^2)/2 = 2 and ((3-3)^2 + (5-1)^2)/2 = 8 -> mean 5;
    # the padded third position (h - h_ref = 50) is ignored.
    retain = {"hidden": leaf([[[1.0, 2.0], [3.0, 5.0], [50.0, 0.0]]]),
              "ref_hidden": torch.tensor([[[1.0, 0.0], [3.0, 1.0], [0.0, 0.0]]]),
              "attention_mask": torch.tensor([[1, 1, 0]]), "labels": torch.tensor([[IGNORE, 1, IGNORE]])}
    obj = RMU(RMUConfig(layer=1, steering_coeff=4.0, alpha=3.0))
    assert obj.needs_retain() and obj.needs_reference() and not obj.needs_idk()
    ad, ref = Fake(), Fake("ref_")
    obj.setup(ad, ref, [])
    loss, logs = obj.loss(ad, forget, retain)
    assert logs == {"rmu_forget": pytest.approx(8.0), "rmu_retain": pytest.approx(5.0)}
    assert loss.item() == pytest.approx(8.0 + 3.0 * 5.0)
    assert ad.layers == [1, 1] and ref.layers == [1]  # the configured layer, reference on retain only
    loss.backward()
    # d/dh of mean_pos mean_H (h - t)^2 = 2 (h - t) / (H * 3) at each attended forget position
    t = obj.control_vector(2)
    assert torch.allclose(forget["hidden"].grad[0, 0], -2 * t / 6)
    assert (forget["hidden"].grad[1, 1] == 0).all()
    assert torch.allclose(retain["hidden"].grad[0, 1], 3.0 * 2 * torch.tensor([0.0, 4.0]) / (2 * 2))


def test_rmu_answer_positions_and_no_retain_term():
    # positions: answer -> only labels != -100 count: the position with h = (4, 4) alone.
    # MSE there = ((4 - t0)^2 + (4 - t1)^2) / 2.
    forget = {"hidden": leaf([[[9.0, -9.0], [4.0, 4.0]]]), "attention_mask": torch.tensor([[1, 1]]),
              "labels": torch.tensor([[IGNORE, 7]])}
    obj = RMU(RMUConfig(layer=0, steering_coeff=2.0, alpha=0.0, positions="answer"))
    assert not obj.needs_retain() and not obj.needs_reference()
    obj.setup(Fake(), None, [])
    loss, logs = obj.loss(Fake(), forget, None)
    t0, t1 = obj.control_vector(2).tolist()
    assert loss.item() == pytest.approx(((4 - t0) ** 2 + (4 - t1) ** 2) / 2, rel=1e-6)
    assert set(logs) == {"rmu_forget"}


def test_rmu_param_pattern_and_selection():
    assert rmu_param_pattern(2) == r"model\.layers\.(0|1|2)\.mlp\.down_proj\.weight$"
    assert rmu_selection(7) == {"name": "regex", "params": {"pattern": r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight$"}}
    names = [f"model.layers.{i}.mlp.{m}.weight" for i in range(13) for m in ("down_proj", "up_proj")]
    hit = [n for n in names if re.search(rmu_param_pattern(1), n)]
    assert hit == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]  # not 10, 11
    with pytest.raises(ValueError):
        rmu_param_pattern(-1)
    for bad in (dict(layer=-1), dict(steering_coeff=0.0), dict(alpha=-1.0)):
        with pytest.raises(ValueError):
            RMUConfig(**bad)


# -- UNDIAL -----------------------------------------------------------------------------------
def undial_ce(z, r, y, beta):
    """CE(softmax(z), softmax(r - beta * onehot(y))), by hand."""
    r = [v - (beta if i == y else 0.0) for i, v in enumerate(r)]
    zq = sum(math.exp(v) for v in r)
    q = [math.exp(v) / zq for v in r]
    lse = math.log(sum(math.exp(v) for v in z))
    return -sum(qi * (zi - lse) for qi, zi in zip(q, z)), q


def test_undial_by_hand():
    # V = 3; item A scores row 1 (label 0), item B scores row 0 (label 2). Junk rows differ
    # between student and reference, so scoring one would change the loss.
    junk = [30.0, -30.0, 5.0]
    za, ra = [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]
    zb, rb = [0.5, 2.0, 0.0], [1.0, -1.0, 0.5]
    forget = {"logits": leaf([[junk, za, junk], [zb, junk, junk]]),
              "ref_logits": torch.tensor([[[-9.0, 0, 9], ra, [0, 0, 0]], [rb, [0, 9, 0], [9, 0, 0]]]),
              "labels": torch.tensor([[IGNORE, IGNORE, 0], [IGNORE, 2, IGNORE]])}
    beta = 2.0
    ce_a, q_a = undial_ce(za, ra, 0, beta)  # q_a = (e^-2, 1, 1) / (e^-2 + 2)
    ce_b, _ = undial_ce(zb, rb, 2, beta)
    obj = UNDIAL(UNDIALConfig(beta=beta, alpha=0.0))
    assert obj.needs_reference() and not obj.needs_retain() and not obj.needs_idk()
    obj.setup(Fake(), Fake("ref_"), [])
    loss, logs = obj.loss(Fake(), forget, None)
    assert loss.item() == pytest.approx((ce_a + ce_b) / 2, rel=1e-6)
    nll_a = -(za[0] - math.log(sum(math.exp(v) for v in za)))
    nll_b = -(zb[2] - math.log(sum(math.exp(v) for v in zb)))
    assert logs == {"undial": pytest.approx((ce_a + ce_b) / 2, rel=1e-6), "forget_nll": pytest.approx((nll_a + nll_b) / 2, rel=1e-6)}
    loss.backward()
    # d CE / d z = (p - q) / N at a scored row, 0 elsewhere
    p_a = torch.softmax(torch.tensor(za), 0)
    assert torch.allclose(forget["logits"].grad[0, 1], (p_a - torch.tensor(q_a)) / 2, atol=1e-6)
    g = forget["logits"].grad
    assert (g[0, 0] == 0).all() and (g[0, 2] == 0).all() and (g[1, 1:] == 0).all()


def test_undial_gamma_and_retain_term():
    forget = {"logits": leaf([[[0.0, 0.0], J]]), "ref_logits": torch.tensor([[[0.0, 0.0], J]]),
              "labels": torch.tensor([[IGNORE, 1]])}
    # q = softmax(0, -1) = (e, 1)/(e + 1); p = (1/2, 1/2): CE = log 2
    obj = UNDIAL(UNDIALConfig(beta=1.0, gamma=0.5, alpha=2.0))
    assert obj.needs_retain()
    obj.setup(Fake(), Fake("ref_"), [])
    retain = {"nll": torch.tensor([3.0, 1.0]), "n": torch.tensor([2, 2])}
    loss, logs = obj.loss(Fake(), forget, retain)
    assert loss.item() == pytest.approx(0.5 * math.log(2) + 2.0 * (4.0 / 4), rel=1e-6)
    assert logs["retain_nll"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        UNDIALConfig(beta=-1.0)


# -- WGA --------------------------------------------------------------------------------------
def test_wga_by_hand():
    # answer tokens p = 3/4, 1/2 (item A) and 1/4 (item B); N = 3 tokens in the batch.
    # beta = 1: w = p, forget term = -(1/3) sum p * (-log p) = (1/3) sum p log p
    forget = {"logits": leaf([[row(0.75, 0), row(0.5, 1), J], [row(0.25, 1), J, J]]),
              "labels": torch.tensor([[IGNORE, 0, 1], [IGNORE, 1, IGNORE]])}
    ps = [0.75, 0.5, 0.25]
    f = sum(p * math.log(p) for p in ps) / 3
    nll = -sum(math.log(p) for p in ps) / 3
    obj = WGA(WGAConfig(beta=1.0, gamma=2.0, alpha=0.5))
    assert obj.needs_retain() and not obj.needs_reference() and not obj.needs_idk()
    obj.setup(Fake(), None, [])
    retain = {"nll": torch.tensor([6.0]), "n": torch.tensor([3])}
    loss, logs = obj.loss(Fake(), forget, retain)
    assert loss.item() == pytest.approx(2.0 * f + 0.5 * 2.0, rel=1e-6)
    assert logs == {"wga": pytest.approx(f, rel=1e-6), "forget_nll": pytest.approx(nll, rel=1e-6),
                    "retain_nll": pytest.approx(2.0)}
    loss.backward()
    # the weight carries no gradient: d/dz_y [gamma * w * log p / N] = gamma * w * (1 - p) / N
    # row A0: 2 * 0.75 * 0.25 / 3 = 0.125 on the label-0 logit (0.75 * 0.25 * (log .75 + 1) if w were not detached)
    assert forget["logits"].grad[0, 0, 0].item() == pytest.approx(2 * 0.75 * 0.25 / 3, rel=1e-5)


def test_wga_beta_zero_is_gradient_ascent():
    forget = {"logits": leaf([[row(0.75, 0), row(0.5, 1), J]]), "labels": torch.tensor([[IGNORE, 0, 1]])}
    loss, _ = WGA(WGAConfig(beta=0.0, alpha=0.0)).loss(Fake(), forget, None)
    assert loss.item() == pytest.approx((math.log(0.75) + math.log(0.5)) / 2, rel=1e-6)
    assert WGA(WGAConfig(retain_loss="kl")).needs_reference()
    with pytest.raises(ValueError):
        WGAConfig(beta=-0.5)


# -- registry ---------------------------------------------------------------------------------
def test_registry_has_the_four():
    for name, cls in (("flat", FLAT), ("rmu", RMU), ("undial", UNDIAL), ("wga", WGA)):
        assert OBJECTIVES.get(name) is cls and cls.name == name and "arXiv:" in cls.paper


# -- the real tiny model ----------------------------------------------------------------------
def _steps(adapter, obj, forget, retain, n=4, lr=1e-2):
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    adapter.model.train()
    for _ in range(n):
        loss, logs = obj.loss(adapter, forget, retain)
        assert torch.isfinite(loss) and all(math.isfinite(v) for v in logs.values()), logs
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        opt.step()
    adapter.model.eval()


def _memorise(adapter, batches, n=15, lr=1e-2):
    """Fine-tune the freshly initialised model on the batches first: unlearning starts from a
    model that knows its forget answers (at random init p ~ 1/V, and WGA's weights p^beta ~ 0)."""
    opt = torch.optim.Adam(adapter.model.parameters(), lr=lr)
    adapter.model.train()
    for _ in range(n):
        loss = sum(mean_token_nll(adapter, b) for b in batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter.model.eval()


@pytest.mark.parametrize("name", ["flat", "undial", "wga"])
def test_steps_raise_the_forget_nll(name, tiny_adapter, qa_items, tiny_qa):
    forget = tiny_adapter.collate(qa_items[:4], indices=[0, 1, 2, 3])
    forget["idk"] = tiny_adapter.collate(qa_items[:4], answer_key="idk", indices=[0, 1, 2, 3])
    retain = tiny_adapter.collate(tiny_qa[10:14])
    _memorise(tiny_adapter, [forget, retain])
    obj = OBJECTIVES.get(name)()  # defaults
    reference = tiny_adapter.reference() if obj.needs_reference() else None
    obj.setup(tiny_adapter, reference, qa_items)
    retain = retain if obj.needs_retain() else None
    with torch.no_grad():
        before = mean_token_nll(tiny_adapter, forget).item()
    _steps(tiny_adapter, obj, forget, retain)
    with torch.no_grad():
        after = mean_token_nll(tiny_adapter, forget).item()
    assert after > before + 0.05, (name, before, after)


@pytest.fixture
def tiny4(tiny_tok):
    """The test Llama with 4 layers, so that RMU's defaults (layer 2, down_proj of 0-2) apply."""
    from unlearn.zoo.models import TinyLlamaSpec, build_tiny_llama

    spec = TinyLlamaSpec(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)
    model = build_tiny_llama(spec, tiny_tok, seed=0)
    model.eval()
    return TextAdapter(model, tiny_tok, source="<tiny-test-llama-4>")


def test_rmu_moves_forget_activations_and_trains_only_its_down_projs(tiny4, qa_items, tiny_qa):
    obj = RMU(RMUConfig(steering_coeff=10.0))  # default layer 2 and alpha; c sized to this model's small activations
    obj.setup(tiny4, tiny4.reference(), qa_items)
    info = apply_selection(tiny4, **rmu_selection(obj.config.layer))
    wanted = {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)}
    assert info.trainable == sum(p.numel() for n, p in tiny4.model.named_parameters() if n in wanted)
    forget = tiny4.collate(qa_items[:4])
    retain = tiny4.collate(tiny_qa[10:14])
    mask = forget["attention_mask"].bool()

    def forget_mse():
        with torch.no_grad():
            h = tiny4.hidden_states(forget, 2)  # (B, T, H)
            return ((h - obj.control_vector(h.shape[-1])) ** 2).mean(-1)[mask].mean().item()

    before_mse = forget_mse()
    before = {k: v.detach().clone() for k, v in tiny4.model.state_dict().items()}
    _steps(tiny4, obj, forget, retain, n=10, lr=3e-2)
    assert forget_mse() < 0.95 * before_mse, (before_mse, forget_mse())
    assert set(changed_parameters(before, tiny4.model)) == wanted


def test_hidden_states_is_the_decoder_layer_output(tiny4, qa_items):
    batch = tiny4.collate(qa_items[:2])
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, layer in enumerate(tiny4.model.model.layers)]
    with torch.no_grad():
        hs = [tiny4.hidden_states(batch, k) for k in range(3)]
    for h in hooks:
        h.remove()
    for k in range(3):
        assert hs[k].shape == (*batch["input_ids"].shape, 32) and torch.allclose(hs[k], seen[k])
    for bad in (3, -1, 1.0):  # the last layer's entry is post-norm: refused
        with pytest.raises(ValueError, match="layer"):
            tiny4.hidden_states(batch, bad)
