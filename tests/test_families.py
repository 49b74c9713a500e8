"""The model-family matrix: every method of the toolkit on a tiny random model of each
transformers family users bring (Llama and Mixtral as in the zoo, Mistral, Qwen2, Phi-3, Gemma,
Gemma2, GPT-2, GPT-NeoX/Pythia, OLMo, Qwen2-MoE and DeepSeek-V2/V3 with shared experts).

Each model is built from its family's config class with tiny sizes (hidden 32, 2 layers, 2
heads, a local BPE tokenizer of ~360 tokens), saved with its tokenizer and loaded back through
``unlearn.models.load_model``. On it run: one optimizer step of every objective (full selection;
``needle`` with its ``columns`` selection, ``uoe`` with its own), LoRA, the ``group`` and RMU
selections, every text editor, every probe, and the ``tofu`` suite on a handful of items.
Where a method cannot apply to a family (an MoE method on a dense model, a dense-MLP method on
an MoE model) it must refuse with a ValueError naming the model and what it needs; the
``CANNOT`` table below lists those cases and the tests assert them. docs/families.md shows the
matrix this file produces.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _fakes import HashEncoder

from unlearn.adapters.text import TextAdapter
from unlearn.data import UnlearningData
from unlearn.editors import EDITORS, EditContext
from unlearn.evaluators import tofu_suite
from unlearn.models import load_model
from unlearn.objectives import OBJECTIVES
from unlearn.probes import PROBES, make_probe, run_probes
from unlearn.selection import apply_selection, finalize_selection
from unlearn.trainer import TrainSettings, train

VOCAB = 360
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
# family -> (transformers model_type, family-specific tiny sizes); tie_word_embeddings stays the family's default
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(intermediate_size=64, num_key_value_heads=2)),
    "mistral": ("mistral", dict(intermediate_size=64, num_key_value_heads=1, sliding_window=None)),
    "qwen2": ("qwen2", dict(intermediate_size=64, num_key_value_heads=1)),
    "phi3": ("phi3", dict(intermediate_size=64, num_key_value_heads=2)),
    "gemma": ("gemma", dict(intermediate_size=64, num_key_value_heads=1, head_dim=16)),
    "gemma2": ("gemma2", dict(intermediate_size=64, num_key_value_heads=1, head_dim=16, sliding_window=16)),
    "gpt2": ("gpt2", dict(n_inner=64)),
    "gpt_neox": ("gpt_neox", dict(intermediate_size=64)),
    "olmo": ("olmo", dict(intermediate_size=64, num_key_value_heads=2)),
    "mixtral": ("mixtral", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                num_key_value_heads=2, sliding_window=None)),
    "qwen2_moe": ("qwen2_moe", dict(intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                    num_experts=4, num_experts_per_tok=2, num_key_value_heads=2)),
    # DeepSeek: layer 0 dense (first_k_dense_replace), layer 1 routed experts + one shared expert
    "deepseek_v2": ("deepseek_v2", dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
                                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                        n_group=1, topk_group=1, num_key_value_heads=2, **MLA)),
    "deepseek_v3": ("deepseek_v3", dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
                                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                        n_group=1, topk_group=1, num_key_value_heads=2, **MLA)),
}
MOE = ("mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3")
DENSE = tuple(f for f in FAMILIES if f not in MOE)

DEEPSEEK = ("deepseek_v2", "deepseek_v3")  # layer 0 dense, layer 1 MoE

# method -> (the families it cannot apply to, the ValueError it must raise there: a regex)
NO_MOE = r"has no mixture-of-experts layers"  # an MoE method on a dense model
NO_DENSE_MLP = r"mixture-of-experts block .*need a dense MLP"  # a dense-MLP method on an MoE layer
CANNOT: dict[str, tuple[tuple[str, ...], str]] = {
    "uoe": (DENSE, NO_MOE),
    "expert_attribution": (DENSE, NO_MOE),
    "needle": (MOE, NO_DENSE_MLP),  # searches every layer by default; DeepSeek's layer 1 is MoE
    "concept_vectors": (MOE, NO_DENSE_MLP),
    "rmu_selection": (tuple(f for f in MOE if f not in DEEPSEEK), NO_DENSE_MLP),  # layer 0: DeepSeek's is dense
}


def cannot(method: str, family: str) -> str | None:
    """The error ``method`` must raise on ``family``, or None when it applies."""
    families, error = CANNOT.get(method, ((), ""))
    return error if family in families else None


# ------------------------------------------------------------------------------ data, tokenizer, models
@pytest.fixture(scope="module")
def world():
    from unlearn.tasks.tofu_world import WorldConfig, build_world

    return build_world(WorldConfig(n_authors=100, n_holdout=0))


@pytest.fixture(scope="module")
def data(world) -> UnlearningData:
    """forget: 2 authors x 8 items (with refusals); retain: 10 other authors; tofu eval splits of 4 items."""
    from unlearn.tasks.tofu import add_idk

    by_author: dict = {}
    for it in world.split("forget10"):
        by_author.setdefault(it["author_id"], []).append(it)
    authors = list(by_author)[:2]
    # each forget author's genre question is kept (the linear probe's test items)
    forget = [it for a in authors for it in sorted(by_author[a], key=lambda x: x["attribute"] != "genre")[:8]]
    retain = world.split("retain90")[: 20 * 10]
    evals = {"forget": forget[:4], "retain_eval": world.split("retain_eval")[:4],
             "real_authors": world.real_authors[:4], "world_facts": world.world_facts[:4]}
    return UnlearningData(forget=add_idk(forget, seed=0), retain=retain, eval_splits=evals, name="families")


@pytest.fixture(scope="module")
def tok(data):
    from unlearn.tasks.refusals import REFUSALS
    from unlearn.zoo.models import train_tokenizer

    items = list(data.forget) + list(data.retain) + [it for s in data.eval_splits.values() for it in s]
    texts = [f"Question: {it['question']}\nAnswer: {it['answer']}" for it in items]
    texts += [p for it in items for p in [it.get("paraphrased_answer", "")] + list(it.get("perturbed_answer", []))]
    return train_tokenizer(texts + list(REFUSALS), vocab_size=VOCAB)


def build(family: str, tok):
    """A freshly initialised tiny causal LM of ``family`` (seed 0) from its config class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, sizes = FAMILIES[family]
    cfg = AutoConfig.for_model(model_type, **COMMON, **sizes, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """family -> the directory its tiny model + tokenizer were saved to (built on first use)."""
    out: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in out:
            path = tmp_path_factory.mktemp(family)
            build(family, tok).save_pretrained(path, safe_serialization=True)
            tok.save_pretrained(path)
            out[family] = str(path)
        return out[family]

    return get


@pytest.fixture(scope="module")
def loaded(saved):
    """family -> ``load_model(dir, "text")`` (loaded once; tests take a deep copy)."""
    cache: dict[str, TextAdapter] = {}

    def get(family: str) -> TextAdapter:
        if family not in cache:
            cache[family] = load_model(saved(family), "text")
        ad = cache[family]
        return TextAdapter(copy.deepcopy(ad.model), ad.tokenizer, source=ad.source)

    return get


fam = pytest.mark.parametrize("family", list(FAMILIES))


# ------------------------------------------------------------------------------ loading
@fam
def test_loads_through_load_model(family, tok, saved, loaded, data):
    ad = loaded(family)
    assert isinstance(ad, TextAdapter) and ad.model.config.model_type == FAMILIES[family][0]
    built = build(family, tok)
    b = ad.collate(data.forget[:3])
    with torch.no_grad():
        want = built(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert torch.allclose(ad.logits(b), want, atol=1e-5)
        nll, n = ad.item_nll(b)
        assert torch.isfinite(nll).all() and (n > 0).all()
        assert ad.hidden_states(b, 0).shape == (*b["input_ids"].shape, 32)
    assert len(ad.generate([it["question"] for it in data.forget[:2]], max_new_tokens=4)) == 2
    groups = ad.parameter_groups()
    wanted = {"embeddings", "attention", "mlp", "norm", "lm_head", "layer.0", "layer.1"}
    if family == "olmo":
        wanted.discard("norm")  # OLMo's layer norms have no parameters
    if ad.model.config.tie_word_embeddings:
        wanted.discard("lm_head")  # the head is the embedding matrix, named once (under embeddings)
        assert not groups["lm_head"]
    for g in sorted(wanted):
        assert groups.get(g), (family, g, sorted(groups))
    named = {n for n, _ in ad.model.named_parameters()}
    assert set().union(*groups.values()) == named  # every parameter is in some group


# ------------------------------------------------------------------------------ objectives
TINY_PARAMS = {"rmu": {"layer": 0}}  # RMU's default layer 2 needs 4 layers
SETTINGS = TrainSettings(epochs=1, max_steps=1, batch_size=8, lr=1e-3)


def _plant(ad, layer: int, column: int, tokens: list[int], scale: float = 8.0) -> None:
    """Point the value vector ``column`` of layer ``layer``'s MLP at the unembedding rows of ``tokens``."""
    from unlearn.probes.concept_vectors import mlp_down_proj

    W_U = ad.model.get_output_embeddings().weight.detach()  # (V, H)
    _, W = mlp_down_proj(ad.model, layer)  # (H, I)
    with torch.no_grad():
        W[:, column] = sum(W_U[t] / W_U[t].norm() for t in tokens) * scale


def _objective(name: str, family: str, ad, data):
    from unlearn.config import from_dict

    cls = OBJECTIVES.get(name)
    params = dict(TINY_PARAMS.get(name, {}))
    if name == "needle":  # one planted concept column per forget author; no causal check (tiny settings)
        from unlearn.probes.base import authors_of
        from unlearn.probes.concept_vectors import concept_tokens

        params.update(validate=False, top_k=5, min_matches=2, max_token_share=1.0)
        groups = authors_of(data.forget, "test")
        for j, c in enumerate(concept_tokens(ad.tokenizer, groups, ["author"], 1.0).values()):
            if cannot("needle", family) is None:
                _plant(ad, layer=1, column=3 + j, tokens=c["tokens"][:2])
    return cls(from_dict(cls.Config, params, "method.params"))


def _selection(name: str) -> str:
    return {"needle": "columns", "uoe": "uoe"}.get(name, "full")


@fam
@pytest.mark.parametrize("name", [n for n in OBJECTIVES.names() if "text" in OBJECTIVES.get(n).modalities])
def test_objective_one_step(family, name, loaded, data):
    ad = loaded(family)
    obj = _objective(name, family, ad, data)
    ref = ad.reference() if obj.needs_reference() else None
    expect = cannot(name, family)
    if expect:
        with pytest.raises(ValueError, match=expect) as e:
            obj.setup(ad, ref, data.forget)
        assert type(ad.model).__name__ in str(e.value)
        return
    obj.setup(ad, ref, data.forget)
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    info = apply_selection(ad, _selection(name), objective=obj)
    assert 0 < info.trainable <= info.total
    log = train(ad, obj, data.forget, data.retain if obj.needs_retain() else None, SETTINGS, progress=False)
    finalize_selection(ad)
    assert log.steps == 1 and math.isfinite(log.history[0]["loss"]), log.history
    after = ad.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, f"{name} on {family}: no parameter changed"
    if name == "needle":  # only the chosen columns of the value matrix (rows of GPT-2's stored Conv1D weight)
        cols = obj.parameter_columns()
        assert sorted(changed) == sorted(cols), (changed, cols)
        for k, idx in cols.items():
            d = (after[k] - before[k]).abs()
            d = d.T if family == "gpt2" else d  # (H, I)
            assert torch.nonzero(d.sum(0)).flatten().tolist() == idx, (k, idx)
    if name == "uoe":
        layer, expert = obj.expert_target()
        assert all(f"layers.{layer}.mlp." in k for k in changed), changed
        assert not any("shared_expert" in k for k in changed), changed
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


# ------------------------------------------------------------------------------ selections
@fam
def test_lora_selection(family, loaded, data):
    ad = loaded(family)
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    info = apply_selection(ad, "lora", {"r": 4, "alpha": 8})
    assert 0 < info.trainable < info.total
    obj = OBJECTIVES.get("grad_diff")()
    log = train(ad, obj, data.forget, data.retain, SETTINGS, progress=False)
    assert math.isfinite(log.history[0]["loss"])
    lora_b = [p for n, p in ad.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    finalize_selection(ad)
    after = ad.model.state_dict()
    assert sorted(after) == sorted(before)  # merged back into the family's own names
    assert any(not torch.equal(before[k], after[k]) for k in before)


@fam
def test_group_and_rmu_selections(family, loaded):
    from unlearn.objectives.rmu import rmu_selection

    ad = loaded(family)
    info = apply_selection(ad, "group", {"group": "attention"})
    names = {n for n, p in ad.model.named_parameters() if p.requires_grad}
    assert names and all("attn" in n or "attention" in n for n in names), names
    expect = cannot("rmu_selection", family)
    if expect:
        with pytest.raises(ValueError, match=expect):
            rmu_selection(0, model=ad.model)
        return
    info = apply_selection(ad, **rmu_selection(0, model=ad.model))
    names = [n for n, p in ad.model.named_parameters() if p.requires_grad]
    assert names == [DOWN_PROJ.get(family, "model.layers.0.mlp.down_proj.weight")] and info.trainable == 32 * 64


# ------------------------------------------------------------------------------ what the methods read
DOWN_PROJ = {"gpt2": "transformer.h.0.mlp.c_proj.weight", "gpt_neox": "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"}


@pytest.mark.parametrize("family", [f for f in FAMILIES if cannot("concept_vectors", f) is None] + list(DEEPSEEK))
def test_mlp_value_matrix_is_what_the_mlp_computes(family, loaded, data):
    """``mlp_down_proj`` gives layer 0's output projection and its value matrix W (H, I): the
    projection's output is ``W @ a`` (+ bias) for its input activations ``a``, in every family
    (GPT-2's Conv1D stores W transposed; the view writes through to the weight)."""
    from unlearn.probes.concept_vectors import mlp_down_proj

    ad = loaded(family)
    proj, W = mlp_down_proj(ad.model, 0)
    names = {id(p): n for n, p in ad.model.named_parameters()}
    assert names[id(proj.weight)] == DOWN_PROJ.get(family, "model.layers.0.mlp.down_proj.weight")
    assert W.shape[0] == 32 and W.data_ptr() == proj.weight.data_ptr()
    seen = {}
    h = proj.register_forward_hook(lambda _m, inp, out: seen.update(a=inp[0], y=out))
    b = ad.collate(data.forget[:2])
    with torch.no_grad():
        ad.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    bias = proj.bias if getattr(proj, "bias", None) is not None else 0.0
    assert torch.allclose(seen["y"], seen["a"] @ W.T + bias, atol=1e-5)
    if family in DEEPSEEK:  # layer 1 routes to experts: refused, naming the model and the block
        with pytest.raises(ValueError, match=NO_DENSE_MLP) as e:
            mlp_down_proj(ad.model, 1)
        assert "DeepseekV" in str(e.value) and "shared_experts" in str(e.value)


@pytest.mark.parametrize("family", MOE)
def test_router_probabilities_pick_the_routers_experts(family, loaded, data):
    """``routing`` reads each router's distribution over its routed experts (softmax; DeepSeek-V3:
    normalised sigmoid scores); its top-k are the experts the router sends each token to."""
    from unlearn.probes.expert_attribution import moe_blocks, router_probs, routing

    ad = loaded(family)
    blocks = moe_blocks(ad.model)
    assert sorted(blocks) == ([1] if family in DEEPSEEK else [0, 1])
    chosen = {}
    hs = [blocks[i].gate.register_forward_hook(lambda _m, _i, out, i=i: chosen.update({i: (out[0], out[2])}))
          for i in blocks]
    items = data.forget[:3]
    b = ad.collate(items)
    with torch.no_grad():
        ad.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hs:
        h.remove()
    probs, _ = routing(ad, items, tokens="all")  # (N, L, E), real tokens in item order
    mask = b["attention_mask"].bool().flatten()
    k = ad.model.config.num_experts_per_tok
    for j, i in enumerate(sorted(blocks)):
        logits, picked = chosen[i]
        gate = blocks[i].gate
        want = (torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True) if family == "deepseek_v3"
                else torch.softmax(logits.float(), -1))
        assert torch.allclose(router_probs(gate, logits), want) and torch.allclose(probs[:, j], want[mask], atol=1e-6)
        top = probs[:, j].topk(k, -1).indices.sort(-1).values
        assert torch.equal(top, picked[mask].sort(-1).values)


# ------------------------------------------------------------------------------ editors
TEXT_EDITORS = [n for n in EDITORS.names() if "text" in EDITORS.get(n).modalities]


def _editor(name: str, monkeypatch):
    from unlearn.editors import eco_classifier

    if name == "uld":
        from unlearn.editors.uld import ULDConfig

        return EDITORS.get(name)(ULDConfig(num_layers=1, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    if name == "eco":
        from unlearn.editors.eco import ECOConfig

        enc = HashEncoder("test-families-hash-encoder", "families-hash-v1")
        monkeypatch.setitem(eco_classifier._ENCODERS, enc.source, enc)
        return EDITORS.get(name)(ECOConfig(encoder=enc.source, target_fpr=0.1, metric="prob",
                                           target_value=0.5, strength=0.1, max_steps=2))
    raise AssertionError(f"no tiny settings for text editor {name!r}: add them here")


@fam
@pytest.mark.parametrize("name", TEXT_EDITORS)
def test_text_editor(family, name, loaded, data, tmp_path, monkeypatch):
    ad = loaded(family)
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    res = _editor(name, monkeypatch).apply(ad, data, EditContext(settings=SETTINGS, seed=0, progress=False,
                                                                  eval_batch_size=8))
    out = res.adapter
    assert out is not ad and out.modality == "text"
    assert all(torch.equal(before[k], v) for k, v in ad.model.state_dict().items())  # the target is untouched
    b = out.collate(data.forget[:4])
    with torch.no_grad():
        lg, base = out.logits(b), ad.logits(b)
        nll, _ = out.item_nll(b)
    assert torch.isfinite(lg).all() and torch.isfinite(nll).all()
    assert not torch.allclose(lg, base), f"{name} on {family} left the forget logits as they were"
    assert len(out.generate([data.forget[0]["question"]], max_new_tokens=4)) == 1
    out.save(tmp_path / name)
    again = load_model(str(tmp_path / name), "text")
    with torch.no_grad():
        assert torch.allclose(again.logits(b), lg, atol=1e-5)


# ------------------------------------------------------------------------------ probes
PROBE_PARAMS = {
    "concept_vectors": {"top_k": 30, "min_matches": 1, "max_candidates": 2, "noise_draws": 1, "n_control_items": 4,
                        "n_random_columns": 3},
    "linear_probe": {"questions": "attribute", "position": "before_value"},
    "causal_tracing": {"max_items": 2, "n_noise": 1},
    "expert_attribution": {"max_items": 40},
}


@fam
@pytest.mark.parametrize("name", PROBES.names())
def test_probe(family, name, loaded, data):
    ad = loaded(family)
    probe = make_probe(name, PROBE_PARAMS[name])
    after = ad.reference()
    with torch.no_grad():  # "unlearning": move every weight a little
        for p in after.model.parameters():
            p.mul_(0.9)
    expect = cannot(name, family)
    if expect:
        with pytest.raises(ValueError, match=expect) as e:
            run_probes([probe], ad, after, data)
        assert type(ad.model).__name__ in str(e.value)
        return
    fp = ad.fingerprint(refresh=True)
    out = run_probes([probe], ad, after, data)[name]
    assert ad.fingerprint(refresh=True) == fp  # probes only read
    assert out["after"] is not None
    assert set(out["metrics"]) == set(PROBES.get(name).SPECS)
    for m in out["metrics"].values():
        v = m["value"]
        assert (v is None and m["note"]) or (v is not None and np.all(np.isfinite(v))), (name, m)


@pytest.mark.parametrize("family", DEEPSEEK)
def test_concept_vectors_on_deepseeks_dense_layer(family, loaded, data):
    """DeepSeek's first layers are dense (first_k_dense_replace): concept vectors run there when
    ``layers`` names them, the MoE layers being refused by default."""
    ad = loaded(family)
    params = {**PROBE_PARAMS["concept_vectors"], "layers": [0]}
    out = run_probes([make_probe("concept_vectors", params)], ad, ad.reference(), data)["concept_vectors"]
    assert out["after"] is not None and out["metrics"]["cv_cos_random"]["value"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ evaluation
@fam
def test_tofu_suite(family, loaded, data):
    ad = loaded(family)
    res = tofu_suite.evaluate(ad, data.eval_splits, batch_size=4, max_new_tokens=6, progress=False)
    assert set(res["splits"]) == set(data.eval_splits)
    for split, r in res["splits"].items():
        for m, v in r["metrics"].items():
            assert v["value"] is not None and math.isfinite(v["value"]), (family, split, m, v)
    agg = tofu_suite.summarize(res, None)
    assert math.isfinite(agg["model_utility"]["value"]), agg
