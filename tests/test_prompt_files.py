"""task.visual.prompts: evaluation prompts from a CSV (I2P's columns or prompt[, seed, guidance])
with free attribute:value concepts, and the shipped recipes/sd14-*.yaml (published Stable
Diffusion 1.4 settings) load, validate and name model.source when the pipeline is absent."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from unlearn.config import RecipeError
from unlearn.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("sd14-*.yaml"))


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture()
def i2p_csv(tmp_path):
    """I2P-layout rows: three 'sexual' rows (world prompts depicting red) and one 'violence' row."""
    return _write_csv(tmp_path / "i2p.csv", ["prompt", "categories", "hard", "sd_seed", "sd_guidance_scale"], [
        ["a solid red circle", "sexual", 0, 11, 3.0], ["a striped red square", "sexual, shocking", 1, 12, 3.0],
        ["a dotted red triangle", "hate, sexual", 0, 13, 3.0], ["a solid red cross", "violence", 0, 14, 3.0]])


def _recipe(tmp_path, prompts, **visual):
    return {"name": "pf", "model": {"source": "zoo:tiny-t2i/target"},
            "task": {"name": "visual", "eval_splits": ["forget_explicit"],
                     "visual": {"prompts": str(prompts), "erase": ["colour:red"], "guide": ["colour:blue"], **visual}},
            "method": {"name": "uce"}, "eval": {"judge": "zoo:tiny-t2i/judge", "sample_steps": 10},
            "output": {"dir": str(tmp_path / "run")}}


def test_prompt_file_rows_replace_the_world_and_uce_erases(tmp_path, i2p_csv):
    import unlearn

    retain = _write_csv(tmp_path / "retain.csv", ["prompt", "evaluation_seed", "colour"],
                        [["a solid green square", 5, "green"], ["a dotted yellow circle", 6, "yellow"]])
    r = _recipe(tmp_path, i2p_csv, prompt_categories=["sexual"], retain_prompts=str(retain),
                preserve=["green", "yellow", "blue"])
    r["task"]["eval_splits"] = ["forget_explicit", "retain"]
    res = unlearn.run(r, progress=False)
    m = json.loads((res.run_dir / "metrics.json").read_text())
    target = m["models"]["target"]
    s_t, s_u = m["summary"]["target"], m["summary"]["unlearned"]
    # the three 'sexual' rows only; the zoo target draws them red, UCE red -> blue erases it
    assert len(target["splits"]["forget_explicit"]["metrics"]["erasure_rate"]["per_item"]) == 3
    assert s_t["erasure_explicit"] <= 1 / 3 and s_u["erasure_explicit"] >= 2 / 3
    assert s_u["retain_in_domain"] is not None and s_u["fid_like"] is None    # no renders of file prompts
    assert s_u["retain_cross_domain"] is None                                  # the retain CSV labels colour only
    assert target["protocol"]["prompts"] == {"file": str(i2p_csv), "retain_file": str(retain), "categories": ["sexual"]}
    assert m["editor"]["preserve_prompts"] == ["green", "yellow", "blue"]


def test_read_prompt_file_columns_defaults_and_errors(tmp_path, i2p_csv):
    from unlearn.tasks.visual_task import read_prompt_file

    rows = read_prompt_file(str(i2p_csv), "task.visual.prompts", ["nudity:nude"], ["sexual"])
    assert [r["prompt"] for r in rows] == ["a solid red circle", "a striped red square", "a dotted red triangle"]
    assert [(r["seed"], r["guidance"], r["hard"]) for r in rows] == [(11, 3.0, 0), (12, 3.0, 1), (13, 3.0, 0)]
    assert all(r["categories"] == ["nudity:nude"] for r in rows)
    # UCE's imagenette.csv layout: one file, forget = the erased class's rows, retain = the others
    nette = _write_csv(tmp_path / "nette.csv", ["case_number", "prompt", "class", "evaluation_seed"], [
        [0, "an image of a church", "church", 7], [1, "an image of a tench", "tench", 8], [2, "", "church", 9],
        [3, "an image of a parachute", "parachute", 10]])
    f = read_prompt_file(str(nette), "task.visual.prompts", ["class:church"])
    assert [(r["prompt"], r["seed"], r["categories"]) for r in f] == [("an image of a church", 7, ["class:church"])]
    r2 = read_prompt_file(str(nette), "task.visual.retain_prompts", ["class:church"], label_attributes=["class"])
    assert r2 == [{"case_number": "1", "prompt": "an image of a tench", "seed": 8, "guidance": 7.5, "categories": [],
                   "kind": "explicit", "hard": None, "class": "tench"},
                  {"case_number": "3", "prompt": "an image of a parachute", "seed": 10, "guidance": 7.5,
                   "categories": [], "kind": "explicit", "hard": None, "class": "parachute"}]
    plain = _write_csv(tmp_path / "plain.csv", ["prompt", "object"], [["a church", "church"]])
    with pytest.raises(ValueError, match="task.visual.retain_prompts.*no column 'style'"):
        read_prompt_file(str(plain), "task.visual.retain_prompts", ["style:x"], label_attributes=["style"])
    with pytest.raises(ValueError, match="task.visual.prompts.*does not exist"):
        read_prompt_file(str(tmp_path / "nope.csv"), "task.visual.prompts", ["nudity:nude"])
    with pytest.raises(ValueError, match="no row with a prompt whose categories"):
        read_prompt_file(str(i2p_csv), "task.visual.prompts", ["nudity:nude"], ["harassment"])


@pytest.mark.parametrize("patch, needle", [
    ({"method": {"name": "grad_ascent"}}, "trains on rendered images"),
    ({"method": {"name": "rece"}}, "method.params.validation"),
    ({"method": {"name": "esd", "params": {"prompts": "captions"}}}, "method.params.prompts"),
    ({"task": {"eval_splits": ["forget_implicit"]}}, "task.eval_splits[0]"),
    ({"task": {"eval_splits": ["forget_explicit", "retain"]}}, "retain_prompts"),
    ({"visual": {"erase": ["nudity"]}}, "task.visual.erase[0]"),
    ({"visual": {"guide": ["style:nude"]}}, "task.visual.guide[0]"),
])
def test_prompt_file_recipe_errors_name_the_key(tmp_path, i2p_csv, patch, needle):
    r = _recipe(tmp_path, i2p_csv)
    r["task"]["visual"].update({"erase": ["nudity:nude"], "guide": ["nudity:"]})
    r["task"]["visual"].update(patch.get("visual", {}))
    r["task"].update(patch.get("task", {}))
    if "method" in patch:
        r["method"] = patch["method"]
    with pytest.raises(RecipeError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(r)


def test_free_concepts_need_a_prompt_file(tmp_path, i2p_csv):
    r = _recipe(tmp_path, i2p_csv)
    r["task"]["visual"].update({"erase": ["nudity:nude"], "guide": ["nudity:"], "preserve": ["person"]})
    assert load_recipe(r).task.visual.erase == ["nudity:nude"]
    del r["task"]["visual"]["prompts"]
    with pytest.raises(RecipeError, match="task.visual.prompts"):
        load_recipe(r)
    del r["task"]["visual"]["preserve"]
    with pytest.raises(RecipeError, match="task.visual.erase"):
        load_recipe(r)


# ------------------------------------------------------------------------------ recipes/sd14-*.yaml
def test_sd14_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"sd14-nudity-esd", "sd14-nudity-uce", "sd14-nudity-rece", "sd14-nudity-safree", "sd14-object-esd",
            "sd14-object-uce", "sd14-style-esd", "sd14-style-uce"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_sd14_recipe_validates_and_names_model_source(path, tmp_path):
    import unlearn

    r = load_recipe(path)
    assert r.task.name == "visual" and r.task.visual.prompts and r.model.source.startswith("/path/to/")
    assert r.eval.judge.split(":")[0] in ("nudenet", "clip", "q16")
    out = f"output.dir={tmp_path / 'run'}"
    # as shipped: the placeholder prompt file is named first (data loads before the model)
    with pytest.raises(ValueError, match="task.visual.prompts") as e:
        unlearn.run(str(path), overrides=[out], progress=False)
    assert "\n" not in str(e.value)
    # with a prompt file that exists: the placeholder pipeline directory is named
    (attr, value), = [c.split(":", 1) for c in r.task.visual.erase]
    rows = _write_csv(tmp_path / "p.csv", ["prompt", "categories", attr],
                      [["p1", "sexual", value], ["p2", "sexual", "other"]])
    sets = [out, f"task.visual.prompts={rows}"] + ([f"task.visual.retain_prompts={rows}"]
                                                   if r.task.visual.retain_prompts else [])
    with pytest.raises(ValueError, match="model.source") as e:
        unlearn.run(str(path), overrides=sets, progress=False)
    assert "\n" not in str(e.value) and "/path/to/stable-diffusion-v1-4" in str(e.value)


def test_label_warnings_name_values_the_judge_cannot_predict():
    from types import SimpleNamespace

    from unlearn.tasks.visual import _label_warnings

    judge = SimpleNamespace(attributes={"class": ["church", "tench"]})
    data = SimpleNamespace(erase=["class:Church"], eval_splits={"retain": [
        {"case_number": "4", "class": "tench"}, {"case_number": "5", "class": "garbage truck"}]})
    w = _label_warnings(judge, data)
    assert len(w) == 2 and "'Church'" in w[0] and "retain prompt 5" in w[1] and "'garbage truck'" in w[1]
    assert _label_warnings(SimpleNamespace(), data) == []          # judges without labels: nothing to check


@pytest.mark.parametrize("name, params", [
    ("sd14-object-uce", {}),
    ("sd14-nudity-esd", {"iterations": 2, "ddim_steps": 2}),
    ("sd14-nudity-safree", {}),
])
def test_sd14_recipe_runs_on_a_tiny_sd1_pipeline(name, params, tmp_path):
    """The shipped recipe, end to end on a tiny random SD-1.x-shaped pipeline directory, a prompt
    file and a tiny random CLIP zero-shot judge: the published edit runs through the latent
    path, the judge reads the decoded images, the erased model is saved as a pipeline."""
    import unlearn
    from test_latent_pipelines import build_sd
    from test_real_judges import make_tiny_clip

    from unlearn.tasks.visual_world import build_visual_world
    from unlearn.zoo.build_t2i import world_tokenizer

    pipe = build_sd(tmp_path / "sd1", world_tokenizer(build_visual_world(), 24))
    clip = make_tiny_clip(tmp_path / "clip")
    r = load_recipe(RECIPES[[p.stem for p in RECIPES].index(name)])
    (attr, value), = [c.split(":", 1) for c in r.task.visual.erase]
    rows = _write_csv(tmp_path / "p.csv", ["prompt", "categories", "evaluation_seed", attr], [
        ["a solid red circle", "sexual", 1, value], ["a striped red square", "sexual", 2, value],
        ["a dotted green cross", "sexual", 3, "tench"], ["a solid blue circle", "sexual", 4, "truck"]])
    sets = [f"model.source={pipe}", f"task.visual.prompts={rows}", f"output.dir={tmp_path / 'run'}",
            f"eval.judge=clip:{clip}?{attr}={value},tench,truck", "eval.sample_steps=2", "eval.batch_size=4"]
    sets += [f"task.visual.retain_prompts={rows}"] if r.task.visual.retain_prompts else []
    sets += [f"method.params.{k}={v}" for k, v in params.items()]
    res = unlearn.run(str(RECIPES[[p.stem for p in RECIPES].index(name)]), overrides=sets, progress=False)
    m = res.metrics
    assert m["summary"]["unlearned"]["erasure_explicit"] is not None
    # the file's attribute column picks the forget rows (the two with the erase value)
    assert len(m["models"]["unlearned"]["splits"]["forget_explicit"]["metrics"]["erasure_rate"]["per_item"]) == 2
    if r.task.visual.retain_prompts:
        assert m["summary"]["unlearned"]["retain_in_domain"] is not None
    changed = m["changed_parameters"]
    if r.method.name == "uce":
        assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    elif r.method.name == "esd":                     # esd-u: everything but cross-attention and time embedding
        assert changed and not any(".attn2." in n for n in changed)
    else:                                            # SAFREE wraps the model; weights unchanged
        assert not changed
    assert (res.run_dir / "checkpoint").is_dir()
