"""End to end: recipe -> run directory, through the Python API and the CLI, on a tiny model
saved to disk (so it exercises loading by local path, not the zoo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import unlearn
from unlearn.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from unlearn.adapters.text import TextAdapter
    from unlearn.tasks.tofu_world import build_world, corpus
    from unlearn.zoo.models import TinyLlamaSpec, build_tiny_llama, train_tokenizer

    w = build_world()
    tok = train_tokenizer(corpus(w)[:4000], 400)
    m = build_tiny_llama(TinyLlamaSpec(vocab_size=400, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2), tok, seed=0)
    d = tmp_path_factory.mktemp("models") / "tiny"
    TextAdapter(m, tok).save(d)
    return d


def _recipe(model_dir: Path, out: Path, **over) -> dict:
    r = {
        "name": "smoke",
        "seed": 0,
        "model": {"source": str(model_dir)},
        "task": {"name": "tofu", "forget_split": "forget01", "retain_split": "retain99", "retain_model": str(model_dir)},
        "method": {"name": "grad_diff", "params": {"gamma": 1.0, "alpha": 1.0}},
        "train": {"epochs": 1, "max_steps": 2, "lr": 1.0e-3, "batch_size": 4},
        "eval": {"batch_size": 8, "max_new_tokens": 8, "max_items": 4, "n_samples": 2},
        "output": {"dir": str(out)},
    }
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def test_run_writes_a_complete_run_directory(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    res = unlearn.run(_recipe(tiny_model_dir, out), progress=False)
    assert res.run_dir == out
    for f in ("recipe.yaml", "provenance.json", "metrics.json", "report.md", "truth_ratio_hist.png",
              "checkpoint/model.safetensors"):
        assert (out / f).exists(), f
    assert not list(out.glob("checkpoint/*.bin"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"target", "unlearned", "retain"}
    # the retain model compared with itself has forget quality 1
    assert metrics["summary"]["retain"]["forget_quality"] == pytest.approx(1.0)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["model"]["fingerprint_before"] != prov["model"]["fingerprint_after"]
    assert prov["seed"] == 0 and prov["libraries"]["torch"] and "commit" in prov["git"]
    assert prov["data"]["forget"] and prov["tokenization"] == "split"
    assert prov["parameters_changed"] > 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["method"]["name"] == "grad_diff"
    assert metrics["recipe"]["seed"] == 0 and metrics["provenance"]["model"] == prov["model"]
    assert "Sample generations" in (out / "report.md").read_text()
    # per-item values are kept next to the aggregates
    forget = metrics["models"]["unlearned"]["splits"]["forget"]
    assert len(forget["metrics"]["prob"]["per_item"]) == 4 and len(forget["truth_ratio_raw"]) == 4


def test_finished_run_is_not_overwritten_and_nothing_partial_is_left(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    unlearn.run(_recipe(tiny_model_dir, out), progress=False)
    before = (out / "metrics.json").read_text()
    with pytest.raises(ValueError, match="already holds a finished run"):
        unlearn.run(_recipe(tiny_model_dir, out), progress=False)
    assert (out / "metrics.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    # a failing run leaves no directory behind
    bad = _recipe(tiny_model_dir, tmp_path / "bad", train={"lr": 1.0e30, "max_steps": 3})
    from unlearn.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="non-finite"):
        unlearn.run(bad, progress=False)
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_without_retain_model_forget_quality_is_not_computable(tiny_model_dir, tmp_path):
    res = unlearn.run(_recipe(tiny_model_dir, tmp_path / "r", task={"retain_model": None}), progress=False)
    assert res.summary["unlearned"]["forget_quality"] is None
    fq = res.metrics["models"]["unlearned"]["summary"]["forget_quality"]
    assert fq["value"] is None and "not computable" in fq["note"]
    assert "not computable" in (res.run_dir / "report.md").read_text()


def test_cli_and_api_give_the_same_metrics(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_model_dir, tmp_path / "cli")))
    assert main(["run", str(path), "-q"]) == 0
    assert "forget quality" in capsys.readouterr().out
    api = unlearn.run(str(path), overrides=[f"output.dir={tmp_path / 'api'}"], progress=False)
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    for model in ("target", "unlearned", "retain"):
        for k in ("forget_quality", "model_utility", "forget_prob"):
            assert cli["summary"][model][k] == pytest.approx(api.summary[model][k])


@pytest.mark.parametrize("override, needle", [
    ("train.lr_rate=1", "train.lr_rate"),
    ("train.epochs=five", "train.epochs"),
    ("method.name=npoo", "npo"),
    ("task.eval_splits=[forget,nope]", "nope"),
    ("task.forget_split=forget11", "forget_split"),
])
def test_cli_bad_recipe_gives_one_line_error(tiny_model_dir, tmp_path, capsys, override, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_model_dir, tmp_path / "x")))
    assert main(["run", str(path), "-q", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_missing_model_path(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path / "no" / "model", tmp_path / "x")))
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(tmp_path / "no" / "model") in err


def test_cli_missing_recipe_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_empty_forget_set_is_an_error():
    from unlearn.data import UnlearningData

    with pytest.raises(ValueError, match="forget set is empty"):
        UnlearningData(forget=[])
