"""Mixture-of-experts pieces: expert attribution (router affinity, routing shift), the UOE
selection (one expert's FFN + that layer's router) and the UOE router anchor loss.

Every model here is a tiny random Mixtral built in the test (no zoo needed)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from unlearn.adapters.text import TextAdapter
from unlearn.data import UnlearningData
from unlearn.objectives.uoe import UOE, UOEConfig, anchor_loss
from unlearn.probes import make_probe
from unlearn.probes.expert_attribution import (affinity, author_usage, moe_blocks, routing, specialisation, top_expert,
                                               topk_sets)
from unlearn.selection import apply_selection, finalize_selection
from unlearn.trainer import TrainSettings, train
from unlearn.zoo.models import TinyMoESpec, build_tiny_moe

MOE_SPEC = dict(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_local_experts=8, num_experts_per_tok=2)


@pytest.fixture
def moe(tiny_tok):
    model = build_tiny_moe(TinyMoESpec(**MOE_SPEC), tiny_tok, seed=0)
    model.eval()
    return TextAdapter(model, tiny_tok, source="<tiny-test-moe>")


@pytest.fixture
def data(tiny_qa):
    items = [dict(it, author_id=i % 2) for i, it in enumerate(tiny_qa)]  # two "authors" for per-author usage
    return UnlearningData(forget=items[:8], retain=items[8:16], eval_splits={})


def _gate_inputs(adapter, batch, layer):
    """The inputs of layer ``layer``'s router, (B*T, H), read with a hook."""
    got = {}

    def keep(_m, inp, _out):  # returns None: the output is left as it is
        got.setdefault("x", inp[0])

    h = moe_blocks(adapter.model)[layer].gate.register_forward_hook(keep)
    with torch.no_grad():
        adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.remove()
    return got["x"]


# -- expert attribution ------------------------------------------------------------------------
def test_router_affinity_equals_a_hand_computation(moe, data):
    items = data.forget
    batch = moe.collate(items)
    B, T = batch["input_ids"].shape
    expect = []
    for layer in sorted(moe_blocks(moe.model)):
        x = _gate_inputs(moe, batch, layer)  # (B*T, H)
        W = moe_blocks(moe.model)[layer].gate.weight.detach()  # (E, H)
        p = torch.softmax(x @ W.T, -1).reshape(B, T, -1)  # (B, T, E)
        m = batch["labels"] != -100  # answer tokens only
        expect.append(p[m].mean(0))
    expect = torch.stack(expect)  # (L, E)
    probs, owner = routing(moe, items, tokens="answer", batch_size=3)  # batches of 3: padding must not matter
    assert probs.shape == (int((batch["labels"] != -100).sum()), 2, 8)
    assert torch.allclose(affinity(probs), expect, atol=1e-5)
    layer, expert, score = top_expert(moe, items, tokens="answer")
    assert (layer, expert) == divmod(int(expect.argmax()), 8)
    assert torch.allclose(score, expect, atol=1e-5)
    assert owner.count(0) + owner.count(1) == probs.shape[0]


def test_a_zero_router_is_uniform_and_a_planted_router_is_found(moe, data):
    for mlp in moe_blocks(moe.model).values():
        torch.nn.init.zeros_(mlp.gate.weight)
    probe = make_probe("expert_attribution", {"max_items": None})
    res = probe.run(moe, data)
    af = torch.as_tensor(res.arrays["affinity_forget"])
    json.dumps(res.to_dict())  # JSON-able for metrics.json
    assert torch.allclose(af, torch.full_like(af, 1 / 8))
    assert res.values["entropy_forget"] == pytest.approx(torch.log(torch.tensor(8.0)).item(), abs=1e-5)
    # plant: in layer 1 expert 5 gets the router input's direction -> the largest logit on every token
    x = _gate_inputs(moe, moe.collate(data.forget), 1)
    with torch.no_grad():
        moe_blocks(moe.model)[1].gate.weight[5] = 10 * x.mean(0) / x.mean(0).norm()
    res = probe.run(moe, data)
    assert res.values["forget_top"] == [1, 5] and (res.values["top_layer"], res.values["top_expert"]) == (1, 5)
    assert res.values["top_forget_affinity"] > 0.5


def test_specialisation_is_zero_for_identical_authors_and_positive_for_disjoint_ones():
    sets = torch.zeros(4, 1, 4, dtype=torch.bool)
    sets[:, 0, :2] = True  # every token routed to experts {0, 1}
    assert specialisation(sets, ["a", "a", "b", "b"]).item() == pytest.approx(0.0)
    sets[2:, 0] = torch.tensor([False, False, True, True])  # author b -> {2, 3}
    assert specialisation(sets, ["a", "a", "b", "b"]).item() == pytest.approx(0.5)  # TV(a, pooled) = TV(b, pooled) = 0.5
    u = author_usage(sets, ["a", "a", "b", "b"])
    assert u["b"][0].tolist() == [0.0, 0.0, 0.5, 0.5]


def test_routing_overlap_is_one_for_identical_models_and_drops_after_a_router_change(moe, data):
    probe = make_probe("expert_attribution")
    before = probe.run(moe, data)
    same = probe.compare(before, probe.run(copy.deepcopy(moe), data, reference=before))
    assert same["moe_routing_overlap_forget"].value == 1.0 and same["moe_routing_overlap_retain"].value == 1.0
    assert same["moe_top_affinity_after"].value == pytest.approx(same["moe_top_affinity_before"].value)
    other = copy.deepcopy(moe)
    with torch.no_grad():
        moe_blocks(other.model)[0].gate.weight.add_(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)))
    moved = probe.compare(before, probe.run(other, data, reference=before))
    assert moved["moe_routing_overlap_forget"].value < 0.9
    assert moved["moe_routing_overlap_forget"].per_item[0] < 1.0  # the changed layer
    assert set(moved) == set(probe.SPECS)


def test_topk_sets_and_probe_refuse_a_dense_model(tiny_adapter, data):
    p = torch.tensor([[[0.1, 0.5, 0.4]]])
    assert topk_sets(p, 2).tolist() == [[[False, True, True]]]
    with pytest.raises(ValueError, match="unlearn zoo build tiny-moe"):
        make_probe("expert_attribution").run(tiny_adapter, data)


# -- the uoe selection -------------------------------------------------------------------------
def test_uoe_selection_is_one_expert_and_one_router_under_five_percent(tiny_tok):
    model = build_tiny_moe(TinyMoESpec(), tiny_tok, seed=0)  # zoo size: 8 experts, hidden 160
    ad = TextAdapter(model, tiny_tok, source="<moe>")
    info = apply_selection(ad, "uoe", {"layer": 2, "expert": 3})
    H, I, E = 160, 112, 8
    assert info.trainable == 2 * I * H + H * I + E * H
    assert info.fraction < 0.05
    names = sorted(n for n, p in ad.model.named_parameters() if p.requires_grad)
    assert names == ["model.layers.2.mlp.experts.parametrizations.down_proj.0.delta",
                     "model.layers.2.mlp.experts.parametrizations.gate_up_proj.0.delta",
                     "model.layers.2.mlp.gate.weight"]


def test_uoe_training_changes_only_the_chosen_expert_and_its_router(moe, data):
    obj = UOE(UOEConfig(base="grad_ascent", anchor_alpha=1.0))
    obj.setup(moe, None, data.forget)  # picks (layer, expert) by forget affinity
    layer, expert = obj.expert_target()
    assert (layer, expert) == top_expert(moe, data.forget)[:2]
    before = {k: v.clone() for k, v in moe.model.state_dict().items()}
    info = apply_selection(moe, "uoe", {}, objective=obj)
    assert info.params == {"layer": layer, "expert": expert, "source": "objective uoe"}
    train(moe, obj, data.forget, None, TrainSettings(epochs=1, max_steps=2, lr=1e-2, batch_size=8, weight_decay=0.1),
          progress=False)
    finalize_selection(moe)
    after = moe.model.state_dict()
    assert sorted(after) == sorted(before)  # parametrizations merged away on finalize
    pre = f"model.layers.{layer}.mlp."
    for k, v in after.items():
        if k in (pre + "experts.gate_up_proj", pre + "experts.down_proj"):
            others = [e for e in range(8) if e != expert]
            assert not torch.equal(v[expert], before[k][expert]), k
            assert torch.equal(v[others], before[k][others]), k
        elif k == pre + "gate.weight":
            assert not torch.equal(v, before[k])
        else:
            assert torch.equal(v, before[k]), k


def test_uoe_selection_rejects_bad_targets(moe, tiny_adapter):
    with pytest.raises(ValueError, match="expert 8 is out of range"):
        apply_selection(copy.deepcopy(moe), "uoe", {"layer": 0, "expert": 8})
    with pytest.raises(ValueError, match="not an MoE layer"):
        apply_selection(copy.deepcopy(moe), "uoe", {"layer": 5, "expert": 0})
    with pytest.raises(ValueError, match="both layer and expert"):
        apply_selection(copy.deepcopy(moe), "uoe", {"layer": 0})
    with pytest.raises(ValueError, match="needs params.layer"):
        apply_selection(copy.deepcopy(moe), "uoe", {})
    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        apply_selection(tiny_adapter, "uoe", {"layer": 0, "expert": 0})


# -- the router anchor -------------------------------------------------------------------------
def test_anchor_loss_equals_its_formula_and_adds_to_the_base_loss(moe, data):
    batch = moe.collate(data.forget[:4])
    B, T = batch["input_ids"].shape
    with torch.no_grad():  # the model's own router logits, not the hook
        out = moe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    g = torch.softmax(out.router_logits[1].float(), -1).reshape(B, T, -1)[batch["attention_mask"].bool()]  # (N, E)
    target = torch.zeros(8)
    target[3] = 1.0
    want = ((g - target) ** 2).sum(-1).mean()
    assert anchor_loss(moe.model, batch, 1, 3).item() == pytest.approx(want.item(), rel=1e-5)
    obj = UOE(UOEConfig(base="grad_ascent", anchor_alpha=2.5, layer=1, expert=3))
    obj.setup(moe, None, data.forget)
    base = UOE(UOEConfig(base="grad_ascent", anchor_alpha=0.0, layer=1, expert=3))
    with torch.no_grad():
        total, logs = obj.loss(moe, batch, None)
        plain, _ = base.loss(moe, batch, None)
    assert total.item() == pytest.approx(plain.item() + 2.5 * want.item(), rel=1e-5)
    assert logs["anchor"] == pytest.approx(want.item(), rel=1e-5)


def test_uoe_config_checks_its_base_objective():
    with pytest.raises(ValueError, match="method.params.base 'npoo' is not a known objective"):
        UOEConfig(base="npoo")
    with pytest.raises(ValueError, match="cannot be 'uoe'"):
        UOEConfig(base="uoe")
    with pytest.raises(ValueError, match="both, or neither"):
        UOEConfig(layer=1)
    assert UOE(UOEConfig(base="grad_diff", base_params={"alpha": 0.0})).needs_retain() is False
    assert UOE(UOEConfig(base="grad_diff")).needs_retain() is True


# -- recipes and the zoo build -----------------------------------------------------------------
def test_recipe_checks_the_uoe_selection():
    from unlearn.config import RecipeError
    from unlearn.recipe import load_recipe

    with pytest.raises(RecipeError, match="method.selection.params.layer' and '.expert' are required"):
        load_recipe({"name": "x", "method": {"name": "grad_ascent", "selection": {"name": "uoe"}}})
    with pytest.raises(RecipeError, match="both layer and expert"):
        load_recipe({"name": "x", "method": {"name": "grad_ascent", "selection": {"name": "uoe", "params": {"layer": 1}}}})
    r = load_recipe({"name": "x", "method": {"name": "grad_ascent",
                                             "selection": {"name": "uoe", "params": {"layer": 1, "expert": 2}}}})
    assert r.method.selection.params == {"layer": 1, "expert": 2}
    r = load_recipe({"name": "x", "method": {"name": "uoe", "params": {"base": "npo", "anchor_alpha": 0.5},
                                             "selection": {"name": "uoe"}}})
    assert r.method.params["base"] == "npo"


def test_the_moe_recipe_names_the_build_command_when_the_zoo_is_missing(tmp_path, monkeypatch):
    import unlearn

    monkeypatch.setenv("UNLEARN_ZOO_DIR", str(tmp_path / "nothing"))
    monkeypatch.setattr("unlearn.zoo.cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr("unlearn.zoo.ASSETS", tmp_path / "no-assets")  # as if the zoo were not shipped
    with pytest.raises(ValueError, match="unlearn zoo build tiny-moe"):
        unlearn.run("recipes/tofu-moe-uoe.yaml", overrides=[f"output.dir={tmp_path / 'run'}"], progress=False)


@pytest.mark.slow
def test_tiny_moe_family_builds_and_the_uoe_recipe_runs_on_it(tmp_path, monkeypatch):
    """A 1-epoch, 2-layer tiny-moe family on a 100-author world (~25 s), then the UOE recipe on it."""
    import unlearn
    from unlearn.tasks.tofu_world import WorldConfig
    from unlearn.zoo.build import MoEZooBuildSpec, StageSpec, build_part, write_manifest

    spec = MoEZooBuildSpec(world=WorldConfig(n_authors=100, n_holdout=0),
                           model=TinyMoESpec(hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, num_local_experts=4),
                           batch_size=64, pretrain=StageSpec(1, 3e-3, 0.0), finetune=StageSpec(1, 3e-3, 0.0))
    out = tmp_path / "zoo" / "tiny-moe"
    for part in ("base", "target", "retain"):
        build_part(part, out, spec)
    man = write_manifest(out, spec)
    assert man["family"] == "tiny-moe" and sorted(man["models"]) == ["retain90", "target"]
    ad = TextAdapter.load(str(out / "target"))
    assert type(ad.model).__name__ == "MixtralForCausalLM" and len(moe_blocks(ad.model)) == 2
    monkeypatch.setenv("UNLEARN_ZOO_DIR", str(tmp_path / "zoo"))
    res = unlearn.run("recipes/tofu-moe-uoe.yaml", overrides=[f"output.dir={tmp_path / 'run'}", "eval.max_items=20",
                                                               "train.max_steps=3"], progress=False)
    s = res.summary
    assert s["unlearned"]["forget_prob"] < s["target"]["forget_prob"]
    m = json.loads((res.run_dir / "metrics.json").read_text())
    assert m["provenance"]["selection"]["name"] == "uoe" and m["provenance"]["selection"]["fraction"] < 0.05
    ov = m["probes"]["expert_attribution"]["metrics"]["moe_routing_overlap_forget"]["value"]
    assert 0.0 < ov <= 1.0
