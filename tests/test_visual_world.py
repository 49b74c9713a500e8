"""The I2P-style visual world: determinism, split contents, captions, the I2P CSV loader."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from unlearn.tasks.visual_world import (
    COLOURS, SHAPES, TEXTURES, VisualWorldConfig, build_visual_world, load_i2p_csv, render,
)


@pytest.fixture(scope="module")
def world():
    return build_visual_world(VisualWorldConfig(renders_per_concept=2, holdout_per_concept=1))


def test_deterministic_from_seed(world):
    cfg = VisualWorldConfig(renders_per_concept=2, holdout_per_concept=1)
    again = build_visual_world(cfg)
    assert again.fingerprint() == world.fingerprint()
    assert all(np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
               for a, b in zip(again.items, world.items))
    other = build_visual_world(VisualWorldConfig(seed=1, renders_per_concept=2, holdout_per_concept=1))
    assert other.fingerprint() != world.fingerprint()
    assert not np.array_equal(other.items[0]["image"], world.items[0]["image"])


def test_render_shape_and_attributes():
    img = render("square", "red", "solid", size=16, seed=3)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert np.array_equal(img, render("square", "red", "solid", size=16, seed=3))
    # the object's pixels are red-dominant; a blue render's are blue-dominant
    bright = img.max(axis=2) > 100
    assert bright.sum() > 20 and (img[bright][:, 0] > img[bright][:, 2]).all()
    blue = render("square", "blue", "solid", size=16, seed=3)
    bb = blue.max(axis=2) > 100
    assert (blue[bb][:, 2] > blue[bb][:, 0]).all()
    # texture changes pixels, not the silhouette's position (same seed)
    assert not np.array_equal(img, render("square", "red", "striped", size=16, seed=3))


def test_splits_contents(world):
    train, forget, retain, hold = (world.split(s) for s in ("train", "forget", "retain", "holdout"))
    assert len(forget) + len(retain) == len(train)
    assert len(train) == len(SHAPES) * len(COLOURS) * len(TEXTURES) * 2 * 3  # 2 renders x 3 phrasings
    assert all(it["colour"] == "red" for it in forget) and all(it["colour"] != "red" for it in retain)
    assert all(it["split"] == "holdout" for it in hold) and len(hold) == len(train) // 2
    held = {it["image_seed"] for it in hold}
    assert held.isdisjoint({it["image_seed"] for it in train})
    fe, fi = world.split("forget_explicit"), world.split("forget_implicit")
    assert len(fe) + len(fi) == len(forget)
    assert all("red" in it["caption"].split() for it in fe)
    with pytest.raises(ValueError, match="unknown visual split"):
        world.split("nope")


def test_indirect_captions_never_name_the_concept(world):
    for it in world.items:
        words = set(it["caption"].replace(",", " ").split())
        named = {it["shape"], it["colour"], it["texture"]} & words
        if it["phrasing"] == "explicit":
            assert {it["shape"], it["colour"]} <= words
        else:
            assert not named, it["caption"]


def test_prompt_table(world):
    rows = world.prompt_table()
    assert [r["case_number"] for r in rows] == list(range(len(rows)))
    target = world.prompt_table(target=True)
    assert target and all(r["categories"] == ["colour:red"] and r["colour"] == "red" for r in target)
    assert all(r["categories"] == [] for r in world.prompt_table(target=False))
    imp = world.prompt_table(kind="implicit", target=True)
    assert imp and all("red" not in r["prompt"].split() for r in imp)
    assert all("red" in r["prompt"].split() for r in world.prompt_table(kind="explicit", target=True))
    assert len({r["seed"] for r in rows}) == len(rows)


def test_config_errors():
    with pytest.raises(ValueError, match="attribute:value"):
        VisualWorldConfig(erase=("red",))
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        VisualWorldConfig(erase=("colour:pink",))
    with pytest.raises(ValueError, match="same attribute"):
        VisualWorldConfig(erase=("colour:red",), guide=("shape:circle",))
    with pytest.raises(ValueError, match="one guide concept per erase"):
        VisualWorldConfig(erase=("colour:red", "shape:cross"), guide=("colour:blue",))


def test_prompt_csv_roundtrip(world, tmp_path):
    p = tmp_path / "p.csv"
    world.write_prompt_csv(p)
    rows = load_i2p_csv(p)
    assert len(rows) == len(world.prompts)
    for a, b in zip(rows, world.prompts):
        assert (a["case_number"], a["prompt"], a["categories"], a["seed"], a["guidance"], a["kind"]) == \
               (b["case_number"], b["prompt"], b["categories"], b["seed"], b["guidance"], b["kind"])
        assert a["extra"]["colour"] == b["colour"]


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


HUB_HEADER = ["prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
              "sd_safety_percentage", "prompt_toxicity", "lexica_url", "sd_seed", "sd_guidance_scale",
              "sd_image_width", "sd_image_height", "sd_model"]


def test_load_hub_format(tmp_path):
    p = tmp_path / "i2p.csv"
    _write(p, HUB_HEADER, [
        ["a scary thing", "shocking,violence", "1", "80.0", "0.0", "70", "10", "0.2", "http://x", "123", "7",
         "512", "512", "2.1"],
        ["", "sexual", "0", "0", "0", "0", "0", "0", "", "1", "7", "512", "512", "2.1"],  # empty prompt: skipped
        ["a calm lake", "hate", "0", "10.0", "0.0", "0", "0", "0.1", "http://y", "9", "7.5", "512", "512", "2.1"],
    ])
    rows = load_i2p_csv(p)
    assert [r["prompt"] for r in rows] == ["a scary thing", "a calm lake"]
    assert rows[0]["categories"] == ["shocking", "violence"] and rows[0]["seed"] == 123
    assert rows[1]["guidance"] == 7.5 and rows[1]["case_number"] == 2 and rows[1]["hard"] == 0
    assert rows[0]["extra"]["nudity_percentage"] == "0.0"
    assert [r["prompt"] for r in load_i2p_csv(p, categories=["violence"])] == ["a scary thing"]
    assert [r["prompt"] for r in load_i2p_csv(p, hard_only=True)] == ["a scary thing"]


@pytest.mark.parametrize("drop,named", [("prompt", "'prompt'"), ("categories", "'categories'"),
                                        ("sd_seed", "'sd_seed'"), ("sd_guidance_scale", "'sd_guidance_scale'")])
def test_loader_names_missing_column(tmp_path, drop, named):
    header = [h for h in HUB_HEADER if h != drop]
    row = ["x" if h in ("prompt", "categories") else "1" for h in header]
    p = tmp_path / "bad.csv"
    _write(p, header, [row])
    with pytest.raises(ValueError, match=f"missing column {named}"):
        load_i2p_csv(p)


def test_loader_bad_values(tmp_path):
    p = tmp_path / "bad.csv"
    _write(p, ["prompt", "categories", "sd_seed", "sd_guidance_scale"], [["x", "hate", "abc", "7"]])
    with pytest.raises(ValueError, match="data row 0"):
        load_i2p_csv(p)
    with pytest.raises(ValueError, match="does not exist"):
        load_i2p_csv(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="'hard' column"):
        load_i2p_csv(p, hard_only=True)
