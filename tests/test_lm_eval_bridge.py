"""lm-eval both ways: toolkit models as an lm-eval ``LM`` (UnlearnLM), and local lm-eval tasks
built from the synthetic world (write_tasks / run_lm_eval). Offline, tiny models only."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from lm_eval.api.instance import Instance

from unlearn.lm_eval_bridge import UnlearnLM
from unlearn.lm_eval_tasks import GROUP, TASKS, run_lm_eval, write_tasks


def _ll(ctx: str, cont: str, i: int = 0) -> Instance:
    return Instance("loglikelihood", {}, (ctx, cont), i)


def _gen(ctx: str, i: int = 0, **gen_kwargs) -> Instance:
    return Instance("generate_until", {}, (ctx, gen_kwargs), i)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    from unlearn.tasks.tofu_world import WorldConfig, build_world

    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), build_world(WorldConfig(n_authors=100, n_holdout=0)))


@pytest.fixture
def trained_adapter(tiny_adapter, tiny_qa):
    """``tiny_adapter`` fitted on ``tiny_qa[0]`` until it answers it greedily."""
    batch = tiny_adapter.collate([tiny_qa[0]])
    opt = torch.optim.Adam(tiny_adapter.model.parameters(), lr=1e-2)
    tiny_adapter.model.train()
    for _ in range(200):
        nll, n = tiny_adapter.item_nll(batch)
        loss = (nll / n).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    tiny_adapter.model.eval()
    return tiny_adapter


# ---------------------------------------------------------------------------- loglikelihood
def test_loglikelihood_equals_adapter_token_logprobs(tiny_adapter, tiny_qa):
    items = tiny_qa[:3]
    batch = tiny_adapter.collate(items)
    with torch.no_grad():
        logp, mask = tiny_adapter.token_logprobs(batch)
    lm = UnlearnLM(tiny_adapter, batch_size=2)  # 2 batches, padded, sorted by length
    eos = tiny_adapter.tokenizer.eos_token
    reqs = [_ll(tiny_adapter.prompt(it["question"]), " " + it["answer"], i) for i, it in enumerate(items)]
    reqs += [_ll(tiny_adapter.prompt(it["question"]), " " + it["answer"] + eos, 3 + i) for i, it in enumerate(items)]
    res = lm.loglikelihood(reqs)
    for i in range(len(items)):
        pos = mask[i].nonzero().flatten()
        without_eos = float(logp[i, pos[:-1]].sum())  # collate appends EOS: the last label
        with_eos = float(logp[i, pos].sum())
        assert res[i][0] == pytest.approx(without_eos, abs=1e-4)
        assert res[3 + i][0] == pytest.approx(with_eos, abs=1e-4)
        assert res[i][1] is False  # an untrained model does not greedily produce the answer


def test_is_greedy_on_a_memorised_answer(trained_adapter, tiny_qa):
    item = tiny_qa[0]
    lm = UnlearnLM(trained_adapter)
    prompt = trained_adapter.prompt(item["question"])
    (lp_true, greedy_true), (lp_wrong, greedy_wrong), (_, greedy_prefix) = lm.loglikelihood([
        _ll(prompt, " " + item["answer"], 0),
        _ll(prompt, " " + item["perturbed_answer"][0], 1),
        _ll(prompt, " " + item["answer"].split()[0], 2),  # a greedy prefix is greedy too
    ])
    assert greedy_true and greedy_prefix and not greedy_wrong
    assert lp_true > lp_wrong
    # generation agrees: greedy text == the memorised answer; == TextAdapter.generate
    (out,) = lm.generate_until([_gen(prompt, until=["\n"], max_gen_toks=40)])
    assert out == " " + item["answer"]
    assert trained_adapter.generate([item["question"]], max_new_tokens=40) == [item["answer"]]


def test_empty_context_and_reference_tokenization(tiny_adapter, tiny_qa):
    tok = tiny_adapter.tokenizer
    split, ref = UnlearnLM(tiny_adapter), UnlearnLM(tiny_adapter, tokenization="reference")
    prompt, answer = tiny_adapter.prompt(tiny_qa[0]["question"]), " " + tiny_qa[0]["answer"]
    # "...Answer:" + " The ..." splits at a pre-tokenizer boundary: both conventions agree
    assert split.encode_pair(prompt, answer) == ref.encode_pair(prompt, answer)
    # trailing context spaces move into the continuation (lm-eval's rule)
    assert split.encode_pair(prompt + " ", answer.lstrip()) == split.encode_pair(prompt, answer)
    ctx, cont = split.encode_pair("", "Question:")
    assert ctx == [tok.bos_token_id] and cont == tok("Question:", add_special_tokens=False)["input_ids"]
    assert split.loglikelihood([_ll(prompt, "")]) == [(0.0, True)]
    with pytest.raises(ValueError, match="tokenization"):
        UnlearnLM(tiny_adapter, tokenization="joint")
    with pytest.raises(ValueError, match="exactly one"):
        UnlearnLM()


# ---------------------------------------------------------------------------- generation
def test_generate_until_stops_at_until_and_budget(trained_adapter, tiny_qa):
    item = tiny_qa[0]
    lm = UnlearnLM(trained_adapter)
    prompt = trained_adapter.prompt(item["question"])
    full = " " + item["answer"]  # what it generates greedily (see the test above)
    outs = lm.generate_until([
        _gen(prompt, 0, until=[" born"], max_gen_toks=40),
        _gen(prompt, 1, until=["was", "Glys", "zzz"], max_gen_toks=40),  # earliest stop wins
        _gen(prompt, 2, until=" born", max_gen_toks=40),  # a bare string is one stop sequence
        _gen(prompt, 3, until=[], max_gen_toks=3),
    ])
    assert outs[0] == full[: full.index(" born")]
    assert outs[1] == full[: min(full.index("was"), full.index("Glys"))]
    assert outs[2] == outs[0]
    n3 = len(trained_adapter.tokenizer(outs[3], add_special_tokens=False)["input_ids"])
    assert 0 < n3 <= 3 and full.startswith(outs[3])


def test_generate_until_matches_adapter_generate_in_a_padded_batch(tiny_adapter, tiny_qa):
    qs = [tiny_qa[i]["question"] for i in (0, 5, 11)]
    lm = UnlearnLM(tiny_adapter, batch_size=4)
    outs = lm.generate_until([_gen(tiny_adapter.prompt(q), i, until=[], max_gen_toks=8) for i, q in enumerate(qs)])
    ref = [tiny_adapter.generate([q], max_new_tokens=8)[0] for q in qs]
    assert [o.strip() for o in outs] == ref


# ---------------------------------------------------------------------------- wrapped adapters
class _Biased:
    """A wrapped adapter that changes logits (stand-in for a guarded / logit-difference model).

    Its ``.model`` is not callable: UnlearnLM must score only through ``logits``."""

    def __init__(self, inner, token_id: int, bias: float = 50.0):
        self.inner, self.token_id, self.bias = inner, token_id, bias
        self.tokenizer = inner.tokenizer
        self.model = SimpleNamespace(config=inner.model.config)
        self.scored = 0

    def logits(self, batch):
        self.scored += int((batch["labels"] != -100).sum())
        out = self.inner.logits(batch).clone()
        out[..., self.token_id] += self.bias
        return out


def test_wrapped_adapter_logits_are_what_gets_evaluated(tiny_adapter, tiny_qa):
    tok = tiny_adapter.tokenizer
    t = tok(" a", add_special_tokens=False)["input_ids"]
    assert len(t) == 1
    biased = _Biased(tiny_adapter, t[0])
    lm, plain = UnlearnLM(biased), UnlearnLM(tiny_adapter)
    prompt = tiny_adapter.prompt(tiny_qa[0]["question"])
    (out,) = lm.generate_until([_gen(prompt, until=["\n"], max_gen_toks=4)])
    assert out == " a" * 4
    (lp_b, greedy_b), = lm.loglikelihood([_ll(prompt, " a a")])
    (lp_p, greedy_p), = plain.loglikelihood([_ll(prompt, " a a")])
    assert greedy_b and not greedy_p and lp_b > lp_p


def test_loglikelihood_rolling_windows_score_every_token_once(tiny_adapter, tiny_qa):
    text = tiny_qa[0]["question"] + " " + tiny_qa[0]["answer"]
    tok = tiny_adapter.tokenizer
    n_tok = len(tok(text, add_special_tokens=False)["input_ids"])
    one = UnlearnLM(tiny_adapter)  # max_length 128 > n_tok: one window == BOS + text
    (whole,) = one.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    (direct, _), = one.loglikelihood([_ll("", text)])
    assert whole == pytest.approx(direct, abs=1e-4)
    counter = _Biased(tiny_adapter, 0, bias=0.0)
    short = UnlearnLM(counter, max_length=8)  # several windows
    (windowed,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert counter.scored == n_tok and windowed < 0


# ---------------------------------------------------------------------------- registry / args
def test_registered_and_created_from_arg_string(tiny_adapter, tiny_qa, tmp_path):
    from lm_eval.api.registry import get_model

    assert get_model("unlearn") is UnlearnLM
    assert get_model("hf").__name__ == "HFLM"  # the built-in models are still there
    tiny_adapter.save(tmp_path / "m")
    lm = UnlearnLM.create_from_arg_string(f"source={tmp_path / 'm'},tokenization=split",
                                          {"batch_size": "4", "device": "cuda:0", "max_batch_size": None})
    assert lm.batch_size == 4 and lm.tokenization == "split" and lm.max_length == 128
    req = _ll(tiny_adapter.prompt(tiny_qa[0]["question"]), " " + tiny_qa[0]["answer"])
    assert lm.loglikelihood([req])[0][0] == pytest.approx(UnlearnLM(tiny_adapter).loglikelihood([req])[0][0], abs=1e-5)


# ---------------------------------------------------------------------------- local tasks
def test_write_tasks_layout(tasks_dir):
    for name in TASKS:
        cfg = yaml.safe_load((tasks_dir / f"{name}.yaml").read_text().replace("!function", "#"))
        assert cfg["task"] == name and cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
        data = cfg["dataset_kwargs"]["data_files"]["test"]
        assert os.path.isabs(data) and os.path.exists(data)
        assert cfg["doc_to_text"] == "Question: {{question}}\nAnswer:"
        assert cfg["metadata"]["version"] == 1.0
        assert all(m["higher_is_better"] for m in cfg["metric_list"])
    mc = yaml.safe_load((tasks_dir / "unlearn_world_facts_mc.yaml").read_text())
    assert mc["output_type"] == "multiple_choice" and {m["metric"] for m in mc["metric_list"]} == {"acc", "acc_norm"}
    rows = [json.loads(x) for x in (tasks_dir / "unlearn_world_facts_mc.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and all(len(r["choices"]) == 4 for r in rows)
    assert all(r["choices"][r["gold"]] == " " + r["answer"] for r in rows)
    assert len({r["gold"] for r in rows}) > 1  # options are shuffled
    gen = (tasks_dir / "unlearn_retain_qa.yaml").read_text()
    assert "process_results: !function unlearn.lm_eval_tasks.process_retain_qa" in gen
    assert yaml.safe_load(gen.replace("!function", "#"))["generation_kwargs"]["until"] == ["\n"]
    assert yaml.safe_load((tasks_dir / f"{GROUP}.yaml").read_text())["task"] == list(TASKS)


def test_simple_evaluate_unlearnlm_matches_hflm(tiny_adapter, tasks_dir):
    from lm_eval.models.huggingface import HFLM

    ours = run_lm_eval(UnlearnLM(tiny_adapter, batch_size=8), ["unlearn_world_facts_mc"], limit=8,
                       tasks_dir=tasks_dir, full=True, log_samples=True)
    hf = HFLM(pretrained=tiny_adapter.model, tokenizer=tiny_adapter.tokenizer, device="cpu", batch_size=8)
    theirs = run_lm_eval(hf, ["unlearn_world_facts_mc"], limit=8, tasks_dir=tasks_dir, full=True, log_samples=True)
    a, b = ours["results"]["unlearn_world_facts_mc"], theirs["results"]["unlearn_world_facts_mc"]
    assert 0.0 <= a["acc,none"] <= 1.0 and ours["n-samples"]["unlearn_world_facts_mc"]["effective"] == 8
    # same tokens (the boundary is a pre-tokenizer boundary) -> same scores, same accuracy
    assert a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"]
    for x, y in zip(ours["samples"]["unlearn_world_facts_mc"], theirs["samples"]["unlearn_world_facts_mc"]):
        assert [r[0] for r in x["filtered_resps"]] == pytest.approx([r[0] for r in y["filtered_resps"]], abs=1e-3)


def test_run_lm_eval_group_with_generation(trained_adapter, tasks_dir):
    res = run_lm_eval(trained_adapter, [GROUP], limit=4, tasks_dir=tasks_dir)
    assert set(res) == {*TASKS, GROUP}
    for t in ("unlearn_world_facts_mc", "unlearn_real_authors_mc"):
        assert 0.0 <= res[t]["acc"] <= 1.0 and 0.0 <= res[t]["acc_norm"] <= 1.0 and res[t]["n"] == 4
    qa = res["unlearn_retain_qa"]
    # retain_eval starts with author 0's QA; the first item is the one the model memorised
    assert qa["exact_match"] >= 0.25 and 0.25 <= qa["rougeL_recall"] <= 1.0
    assert 0.0 <= res[GROUP]["acc"] <= 1.0
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_lm_eval(trained_adapter, ["hellaswag"], limit=1, tasks_dir=tasks_dir)


# ---------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_runs_unlearn_model_offline(tiny_adapter, tasks_dir, tmp_path):
    tiny_adapter.save(tmp_path / "model")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "unlearn.lm_eval_cli", "--model", "unlearn",
           "--model_args", f"source={tmp_path / 'model'},tokenization=split",
           "--tasks", "unlearn_world_facts_mc", "--include_path", str(tasks_dir), "--limit", "4",
           "--device", "cpu", "--batch_size", "4", "--no_default_tasks", "--output_path", str(tmp_path / "out")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "unlearn_world_facts_mc" in p.stdout
    (found,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    res = json.loads(open(found).read())["results"]["unlearn_world_facts_mc"]
    assert 0.0 <= res["acc,none"] <= 1.0
