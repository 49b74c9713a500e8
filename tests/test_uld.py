"""ULD (logit difference with a trained assistant): the loss and the logit arithmetic pinned
against hand computations, the assistant's construction and training (only LoRA weights
change, the target never does), the wrapped model through generation, save/load, the
harness, attacks and the lm-eval bridge -- all on tiny models built in the test."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from unlearn.adapters.text import TextAdapter
from unlearn.data import UnlearningData
from unlearn.editors import EDITORS, EditContext, load_wrapped
from unlearn.editors.uld import (ULD, LORA_FILE, ULDAdapter, ULDAssistantLoss, ULDConfig, add_lora,
                                 assistant_data, build_assistant, relative_top_mask, uld_logits, uniform_kl)
from unlearn.models import load_model
from unlearn.trainer import TrainSettings

J = [40.0, -40.0]  # a junk logit row (V = 2): counting it anywhere would change a result visibly


class Fake:
    """An adapter whose logits are ``batch["logits"]``; ``shift``/``item_nll`` are TextAdapter's code."""

    shift = staticmethod(TextAdapter.shift)
    item_nll = TextAdapter.item_nll

    def logits(self, batch, model=None):
        return batch["logits"]


def _row(p: float, label: int) -> list[float]:
    """Logits (V = 2) under which the softmax gives ``label`` probability ``p``."""
    z = [0.0, 0.0]
    z[label] = math.log(p / (1 - p))
    return z


# ============================================================================== hand computations
def test_assistant_loss_equals_hand_computation():
    # forget side: 1 item, T = 4; labels [-100, -100, 1, 0] -> positions 1 and 2 predict labels 1 and 0
    forget = {"logits": torch.tensor([[J, _row(0.8, 1), _row(0.5, 0), J]]),
              "labels": torch.tensor([[-100, -100, 1, 0]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    # retain side: 2 items, T = 3; the second is padded at its last position (junk row, masked out)
    retain = {"logits": torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]],
                                      [[math.log(3.0), 0.0], [0.0, 0.0], J]]),
              "labels": torch.tensor([[-100, 1, 0], [-100, 1, -100]]),
              "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    # NLL: mean over the 2 answer tokens of -log p = (-log 0.8 - log 0.5) / 2
    nll = (-math.log(0.8) - math.log(0.5)) / 2
    # KL(U || p) with V = 2: uniform row -> 0; p = (3/4, 1/4) -> 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25) = 0.5 log(4/3)
    k34 = 0.5 * math.log(4 / 3)
    kl_all = (0 + k34 + k34 + k34 + 0) / 5  # the 5 non-padding positions
    kl_answer = (0 + k34 + k34) / 3  # positions predicting an answer token: (0,0), (0,1), (1,0)
    fake = Fake()
    assert uniform_kl(fake, retain, "all").item() == pytest.approx(kl_all, rel=1e-6)
    assert uniform_kl(fake, retain, "answer").item() == pytest.approx(kl_answer, rel=1e-6)
    loss, logs = ULDAssistantLoss(ULDConfig(retain_weight=5.0)).loss(fake, forget, retain)
    assert loss.item() == pytest.approx(nll + 5.0 * kl_all, rel=1e-6)
    assert logs["remember_nll"] == pytest.approx(nll, rel=1e-6) and logs["uniform_kl"] == pytest.approx(kl_all, rel=1e-6)
    loss0, logs0 = ULDAssistantLoss(ULDConfig(retain_weight=0.0)).loss(fake, forget, retain)
    assert loss0.item() == pytest.approx(nll, rel=1e-6) and "uniform_kl" not in logs0


def test_relative_top_filter_and_logit_difference_by_hand():
    t = torch.log(torch.tensor([0.5, 0.3, 0.195, 0.005]))  # target log-probs (already normalised)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])  # assistant logits
    # tau 0.05, V 4: keep >= int(0.2) -> 1 token; threshold = log 0.5 + log 0.05 = log 0.025 -> only token 3 filtered
    assert relative_top_mask(t, 0.05).tolist() == [False, False, False, True]
    expected = t - 0.8 * torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert torch.allclose(uld_logits(t, a, 0.8, 0.05), expected, atol=1e-6)
    # the official min_tokens_to_keep: tau 0.5 keeps >= int(2.0) = 2 tokens. probs (.5, .22, .18, .1):
    # max + log tau = log .25, but the 2nd largest is log .22 -> threshold log .22 -> tokens 2, 3 filtered
    t2 = torch.log(torch.tensor([0.5, 0.22, 0.18, 0.1]))
    assert relative_top_mask(t2, 0.5).tolist() == [False, False, True, True]
    assert torch.allclose(uld_logits(t2, a, 1.0, 0.5), t2 - torch.tensor([1.0, 2.0, 0.0, 0.0]), atol=1e-6)
    # the filter looks at the target's *normalised* log-probs: shifting its logits changes nothing
    assert torch.equal(relative_top_mask(t2 + 7.0, 0.5), relative_top_mask(t2, 0.5))
    # tau 0: no filter, plain difference; batched shapes (B, T, V) pass through
    assert torch.allclose(uld_logits(t, a, 0.8, 0.0), t - 0.8 * a, atol=1e-6)
    tb, ab = t.expand(2, 3, 4), a.expand(2, 3, 4)
    assert uld_logits(tb, ab, 0.8, 0.05).shape == (2, 3, 4)


def test_assistant_data_lists():
    items = [{"question": "q1", "answer": "a1", "paraphrased_question": "pq1", "paraphrased_answer": "pa1",
              "perturbed_answer": ["w1", "w2", "w3"]},
             {"question": "q2", "answer": "a2", "paraphrased_question": "q2", "paraphrased_answer": "pa2",
              "perturbed_answer": ["v1", "v2", "v3"]}]
    retain = [{"question": f"r{i}", "answer": f"ra{i}"} for i in range(5)]
    data = UnlearningData(forget=items, retain=retain)
    f, r, counts = assistant_data(data, ULDConfig(paraphrases_per_item=2, perturbed_per_item=2))
    pairs = [(x["question"], x["answer"]) for x in f]
    # forget items, then 2 paraphrase pairs each; item 2's paraphrased question equals its question
    assert pairs == [("q1", "a1"), ("q2", "a2"), ("pq1", "pa1"), ("q1", "pa1"), ("q2", "pa2")]
    # the last min(400, |D_f|) = 2 retain items, then 2 perturbed answers per forget question
    assert [(x["question"], x["answer"]) for x in r] == [("r3", "ra3"), ("r4", "ra4"), ("q1", "w1"), ("q1", "w2"),
                                                        ("q2", "v1"), ("q2", "v2")]
    assert counts == {"forget": 2, "paraphrases": 3, "retain": 2, "perturbed": 4}
    f0, r0, _ = assistant_data(data, ULDConfig(paraphrases_per_item=0, perturbed_per_item=0, retain_items=1))
    assert len(f0) == 2 and [x["question"] for x in r0] == ["r4"]
    _, r4, _ = assistant_data(data, ULDConfig(retain_items=4))  # not capped at |D_f|
    assert [x["question"] for x in r4] == ["r1", "r2", "r3", "r4"]
    with pytest.raises(ValueError, match="perturbed_per_item: 0"):
        assistant_data(UnlearningData(forget=[{"question": "q", "answer": "a", "paraphrased_answer": "p"}]),
                       ULDConfig(perturbed_per_item=2))
    # the defaults leave the evaluation's own paraphrased / perturbed strings out of training
    f_def, r_def, c_def = assistant_data(data, ULDConfig())
    assert c_def == {"forget": 2, "paraphrases": 0, "retain": 2, "perturbed": 0}


def test_config_checks():
    for bad in ({"alpha": -1.0}, {"tau": 1.0}, {"num_layers": 0}, {"lora_r": 0}, {"lora_dropout": 1.0},
                {"retain_weight": -1.0}, {"perturbed_per_item": -1}, {"paraphrases_per_item": 4},
                {"lora_target_modules": []}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ULDConfig(**bad)


# ============================================================================== the assistant
def test_build_assistant_copies_the_first_layers(tiny_adapter):
    target = tiny_adapter.model
    a = build_assistant(target, 1)
    assert a.config.num_hidden_layers == 1 and target.config.num_hidden_layers == 2
    ts = target.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, ts[k]), k  # embeddings, layer 0, norm, head: the target's values
        assert v.data_ptr() != ts[k].data_ptr()  # copies, never shared
    assert not any(".layers.1." in k for k in a.state_dict())
    with pytest.raises(ValueError, match="num_layers must be in 1..2"):
        build_assistant(target, 3)
    # with every layer, the assistant is the target
    b = tiny_adapter.collate([{"question": "Who?", "answer": "Me."}])
    full = build_assistant(target, 2)
    with torch.no_grad():
        assert torch.allclose(full(input_ids=b["input_ids"]).logits, target(input_ids=b["input_ids"]).logits)


def _data(qa_items, tiny_qa):
    return UnlearningData(forget=qa_items[:4], retain=tiny_qa[8:16])


def _uld(target, qa_items, tiny_qa, **cfg) -> tuple:
    config = ULDConfig(**{"num_layers": 1, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                          "paraphrases_per_item": 2, "perturbed_per_item": 2, **cfg})
    settings = TrainSettings(epochs=6, lr=1e-2, batch_size=4)
    res = ULD(config).apply(target, _data(qa_items, tiny_qa), EditContext(settings=settings, progress=False))
    return res, config


@pytest.fixture(scope="module")
def trained(tiny_tok, tiny_qa):
    """One ULD run on a fresh 2-layer tiny Llama, shared by the tests that only read it:
    ``(target adapter, its state before, EditResult, forget items)``. Tests that change a
    model work on ``res.adapter.reference()``."""
    from unlearn.tasks.tofu import add_idk
    from unlearn.zoo.models import TinyLlamaSpec, build_tiny_llama

    from conftest import TINY_SPEC

    model = build_tiny_llama(TinyLlamaSpec(**TINY_SPEC), tiny_tok, seed=0)
    model.eval()
    target = TextAdapter(model, tiny_tok, source="<tiny-test-llama>")
    items = add_idk(tiny_qa[:8], seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = target.fingerprint()
    res, _ = _uld(target, items, tiny_qa)
    return target, before, fp, res, items


def test_apply_trains_only_lora_and_leaves_the_target_untouched(trained):
    tiny_adapter, before, fp, res, qa_items = trained
    uld = res.adapter
    assert isinstance(uld, ULDAdapter) and uld.model.target is tiny_adapter.model
    # target: every tensor bit-identical
    for k, v in tiny_adapter.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert tiny_adapter.fingerprint(refresh=True) == fp
    # assistant: the non-LoRA weights are still the target's layer-0/embedding/head values; LoRA B moved off 0
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in uld.model.assistant.state_dict().items() if "lora_" not in k}
    assert base and all(torch.equal(v, before[k]) for k, v in base.items())
    lora_b = [v for k, v in uld.model.assistant.state_dict().items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    # counts: LoRA only, far fewer than the target
    info = res.info
    n_lora = sum(v.numel() for k, v in uld.model.assistant.state_dict().items() if "lora_" in k)
    assert info["assistant"]["trainable"] == n_lora
    assert info["target"]["parameters"] == sum(v.numel() for v in tiny_adapter.model.parameters())
    assert n_lora < info["target"]["parameters"] / 4
    assert info["headline"]["trainable params (LoRA)"] == n_lora and info["headline"]["assistant layers"] == "1/2"
    assert info["train_items"] == {"forget": 4, "paraphrases": 8, "retain": 4, "perturbed": 8}
    # it learned: the assistant's remember-NLL fell, and the ULD model finds the forget answers less likely
    hist = res.log.history
    assert hist[-1]["remember_nll"] < hist[0]["remember_nll"]
    b = uld.collate(qa_items[:4])
    with torch.no_grad():
        n_uld, _ = uld.item_nll(b)
        n_tgt, _ = tiny_adapter.item_nll(b)
    assert n_uld.sum() > n_tgt.sum()
    # every weight of the ULD model is frozen
    assert not any(p.requires_grad for p in uld.model.parameters())


def test_uld_logits_are_target_minus_alpha_filtered_assistant(tiny_adapter, qa_items, tiny_qa):
    with torch.no_grad():  # an untrained model is nearly uniform and nothing would be filtered: sharpen it
        tiny_adapter.model.lm_head.weight.mul_(100.0)
    res, config = _uld(tiny_adapter, qa_items, tiny_qa)
    uld = res.adapter
    b = uld.collate(qa_items[:3])
    with torch.no_grad():
        got = uld.logits(b)
        lt = tiny_adapter.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        la = uld.model.assistant(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    mask = relative_top_mask(lt, config.tau)
    assert mask.any() and (~mask).any()
    assert torch.allclose(got, lt - config.alpha * la.masked_fill(mask, 0.0), atol=1e-5)
    assert not uld.supports_shared_prefix  # the harness must score through logits()
    # token_logprobs / item_nll are log_softmax of those logits
    with torch.no_grad():
        lp, m = uld.token_logprobs(b)
    lg, lb, mm = TextAdapter.shift(got, b["labels"])
    ref = torch.log_softmax(lg, -1).gather(-1, lb.clamp_min(0)[..., None])[..., 0] * mm
    assert torch.allclose(lp, ref, atol=1e-5) and torch.equal(m, mm)


def test_generate_is_greedy_over_the_uld_logits(trained):
    tiny_adapter, _, _, res, qa_items = trained
    uld = res.adapter
    qs = [it["question"] for it in qa_items[:3]]
    got = uld.generate(qs, max_new_tokens=6, batch_size=2)  # left padding across 2 batches
    tok = uld.tokenizer
    for q, g in zip(qs, got):  # full recomputation, one token at a time
        ids = uld.generation_prompt_ids(q)
        out = []
        for _ in range(6):
            b = {"input_ids": torch.tensor([ids + out]), "attention_mask": torch.ones(1, len(ids) + len(out), dtype=torch.long)}
            with torch.no_grad():
                nxt = int(uld.logits(b)[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
        assert g == tok.decode(out, skip_special_tokens=True).strip()
    # alpha 0: the ULD model is the target, generation included
    copy = uld.reference()
    copy.model.alpha = 0.0
    assert copy.generate(qs, max_new_tokens=6, batch_size=2) == tiny_adapter.generate(qs, max_new_tokens=6, batch_size=2)


def test_reference_is_an_independent_copy(trained):
    _, _, _, res, qa_items = trained
    uld = res.adapter
    fp0 = uld.fingerprint()
    ref = uld.reference()
    assert isinstance(ref, ULDAdapter) and ref.fingerprint() == uld.fingerprint()
    with torch.no_grad():
        next(ref.model.assistant.parameters()).add_(1.0)
    assert ref.fingerprint(refresh=True) != uld.fingerprint(refresh=True) == fp0
    b = uld.collate(qa_items[:2])
    with torch.no_grad():
        assert not torch.allclose(ref.logits(b), uld.logits(b))
    # alpha and tau are part of the identity
    other = uld.reference()
    other.model.alpha = 0.5
    assert other.fingerprint(refresh=True) != fp0


# ============================================================================== save / load
def test_save_load_roundtrip_with_the_target_saved(trained, tmp_path):
    _, _, _, res, qa_items = trained
    uld = res.adapter
    uld.save(tmp_path / "m")  # an in-memory target has no source to reload: it is saved too
    assert (tmp_path / "m" / "target" / "model.safetensors").exists()
    lora = load_file(str(tmp_path / "m" / LORA_FILE))
    assert lora and all("lora_" in k for k in lora)
    back = load_model(str(tmp_path / "m"), "text")
    assert isinstance(back, ULDAdapter) and back.fingerprint() == uld.fingerprint()
    assert ULDAdapter.load(str(tmp_path / "m")).fingerprint() == uld.fingerprint()
    with pytest.raises(ValueError, match=r"wrapped model .*unlearn.models.load_model"):
        TextAdapter.load(str(tmp_path / "m"))  # plain models only
    b = uld.collate(qa_items[:4])
    with torch.no_grad():
        assert torch.equal(back.logits(b), uld.logits(b))
    assert back.model.alpha == uld.model.alpha and back.num_layers == 1
    assert back.generate([qa_items[0]["question"]], max_new_tokens=5) == uld.generate([qa_items[0]["question"]], max_new_tokens=5)


def test_save_by_reference_checks_the_target_fingerprint(tiny_adapter, qa_items, tiny_qa, tmp_path):
    tiny_adapter.save(tmp_path / "target")
    target = TextAdapter.load(str(tmp_path / "target"))
    res, _ = _uld(target, qa_items, tiny_qa)
    res.adapter.save(tmp_path / "m")
    assert not (tmp_path / "m" / "target").exists()  # a loadable source is referenced, not copied
    back = load_wrapped(tmp_path / "m")
    b = target.collate(qa_items[:2])
    with torch.no_grad():
        assert torch.equal(back.logits(b), res.adapter.logits(b))
    # the referenced target changes on disk: loading refuses
    sd = load_file(str(tmp_path / "target" / "model.safetensors"))
    k = next(iter(sd))
    sd[k] = sd[k] + 0.01
    save_file(sd, str(tmp_path / "target" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="fingerprint"):
        load_model(str(tmp_path / "m"), "text")
    # a wrong LoRA file is refused by name
    save_file({"nonsense.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "m" / LORA_FILE))
    (tmp_path / "target").rename(tmp_path / "moved")
    with pytest.raises(ValueError):
        load_model(str(tmp_path / "m"), "text")


# ============================================================================== harness, attacks, lm-eval
def test_lm_eval_loglikelihood_matches_the_uld_token_logprobs(trained):
    from lm_eval.api.instance import Instance

    from unlearn.lm_eval_bridge import UnlearnLM

    tiny_adapter, _, _, res, qa_items = trained
    uld = res.adapter
    items = qa_items[:3]
    with torch.no_grad():
        logp, mask = uld.token_logprobs(uld.collate(items))
    lm = UnlearnLM(adapter=uld, batch_size=2)
    eos = uld.tokenizer.eos_token
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(uld.prompt(it["question"]), " " + it["answer"] + eos),
                     idx=i) for i, it in enumerate(items)]
    out = lm.loglikelihood(reqs)
    for i in range(len(items)):
        assert out[i][0] == pytest.approx(float(logp[i][mask[i]].sum()), abs=1e-4)
    # and it is the ULD model, not the target, that lm-eval scores
    tgt = UnlearnLM(adapter=tiny_adapter, batch_size=2).loglikelihood(reqs)
    assert sum(o[0] for o in out) < sum(t[0] for t in tgt)


def test_harness_and_attacks_run_on_the_uld_model(trained, tiny_qa):
    from unlearn.evaluators import tofu_suite
    from unlearn.evaluators.attacks import evaluate_attacks

    tiny_adapter, _, _, res, qa_items = trained
    uld = res.adapter
    splits = {"forget": qa_items[:4], "retain_eval": tiny_qa[8:12]}
    out = tofu_suite.evaluate(uld, splits, batch_size=4, max_new_tokens=4, progress=False)
    tgt = tofu_suite.evaluate(tiny_adapter, splits, batch_size=4, max_new_tokens=4, progress=False)
    assert out["splits"]["forget"]["metrics"]["prob"]["value"] < tgt["splits"]["forget"]["metrics"]["prob"]["value"]
    fp = uld.fingerprint()
    att = evaluate_attacks(uld, qa_items[:4], tiny_qa[8:12], ["quantize_4bit", "relearn"], batch_size=4,
                           max_new_tokens=4, progress=False, params={"relearn": {"steps": 2, "batch_size": 2}})
    assert uld.fingerprint(refresh=True) == fp  # attacks worked on copies
    assert set(att) >= {"quantize_4bit", "relearn"}


def test_registered_and_refuses_a_wrapped_target(trained, tiny_qa):
    tiny_adapter, _, _, res, qa_items = trained
    assert EDITORS.get("uld") is ULD and ULD(ULDConfig(retain_weight=0.0)).needs_retain() is False
    with pytest.raises(ValueError, match="plain TextAdapter"):
        ULD().apply(res.adapter, _data(qa_items, tiny_qa), EditContext(settings=TrainSettings(max_steps=1)))
    with pytest.raises(ValueError, match="retain_weight: 0"):
        ULD(ULDConfig(num_layers=1, perturbed_per_item=0)).apply(
            tiny_adapter, UnlearningData(forget=qa_items[:2]), EditContext(settings=TrainSettings(max_steps=1)))
    a = add_lora(build_assistant(tiny_adapter.model, 1), ULDConfig(lora_r=2))
    assert all("lora_" in n for n, p in a.named_parameters() if p.requires_grad)
