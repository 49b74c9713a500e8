"""The tiny-reader zoo: reading items about fresh authors, the reading stage's data, and the
shipped models (they read a context; the in_context attack bites on an unlearned copy)."""

from __future__ import annotations

import random

import pytest

from unlearn.evaluators.attacks import context_prompt
from unlearn.tasks.tofu_world import build_world, practice_author
from unlearn.zoo.build_reader import ReaderBuildSpec, reading_item, stage_items


@pytest.fixture(scope="module")
def world():
    return build_world()


def test_practice_authors_are_fresh_and_use_the_world_templates(world):
    rng = random.Random(0)
    known = {a["name"] for a in world.authors} | {r["name"] for r in world.real_authors_info}
    templates = {q["attribute"]: q["question"].replace(q["author"], "{n}") for q in world.qa[:20]}
    for _ in range(50):
        items = practice_author(world, rng)
        assert len(items) == 20 and len({it["author"] for it in items}) == 1
        name = items[0]["author"]
        assert name not in known
        for it in items:
            assert it["question"] == templates[it["attribute"]].format(n=name)
            assert it["value"] in it["answer"] and name in it["answer"]


def test_reading_item_asks_about_a_fact_in_its_context(world):
    rng = random.Random(1)
    sizes = set()
    for _ in range(200):
        it = reading_item(world, rng, (1, 4))
        sizes.add(len(it["context"]))
        assert it["answer"] in it["context"]
        assert it["question"] == context_prompt(it["context"], it["plain_question"])  # the attack's own format
        assert it["value"] in it["answer"]
    assert sizes == {1, 2, 3, 4}
    # deterministic from the rng's seed
    a = [reading_item(world, random.Random(5))["question"] for _ in range(2)]
    assert a[0] == a[1]
    with pytest.raises(ValueError, match="context_facts"):
        reading_item(world, rng, (3, 2))


def test_stage_items_mix_reading_and_replay_and_never_replay_forget10_into_retain90(world):
    spec = ReaderBuildSpec(steps=10, batch_size=8, read_frac=0.25)
    items = stage_items(world, spec, "retain90")
    assert len(items) == 80
    reading = [it for it in items if it["question"].startswith("Context: ")]
    assert len(reading) == 20
    forget_q = {q["question"] for q in world.split("forget10")}
    assert not forget_q & {it["question"] for it in items}
    # the same reading items for every model (only the replay differs)
    target_items = stage_items(world, spec, "full")
    assert [it["question"] for it in target_items[:20]] == [it["question"] for it in reading]


# ---- the shipped tiny-reader models ---------------------------------------------------------------

@pytest.fixture(scope="module")
def readers():
    from unlearn.adapters.text import TextAdapter

    return {m: TextAdapter.load(f"zoo:tiny-reader/{m}") for m in ("target", "retain90")}


def _forget_in_context(world, n=40, own=True):
    from unlearn.evaluators.attacks import InContext, InContextConfig

    forget = world.split("forget10")[:n]  # two whole authors
    _, before, after, _ = InContext(InContextConfig(include_own_fact=own), seed=0).rewrite(forget)
    return before, after


def test_tiny_reader_is_shipped_and_matches_its_manifest(world, readers):
    from unlearn import zoo

    man = zoo.manifest("tiny-reader")
    assert man is not None and man["world_fingerprint"] == world.fingerprint()
    for m, ad in readers.items():
        assert ad.fingerprint() == man["models"][m]["fingerprint"], m
        assert man["models"][m]["continued_from"] == f"tiny-llama/{m}"


def test_tiny_reader_reads_fresh_facts_and_keeps_its_knowledge(world, readers):
    """Both models answer from a context about authors no build saw; the target still knows
    forget10 bare, the retain model does not -- but reads it back when it is in the context."""
    from unlearn.zoo.build_reader import value_accuracy

    rng = random.Random("test-reading")  # not the build's nor the manifest's seed
    fresh = [reading_item(world, rng) for _ in range(40)]
    before, after = _forget_in_context(world)
    vals = [it["value"] for it in before]
    acc = {}
    for m, ad in readers.items():
        acc[m] = {"fresh": value_accuracy(ad, [x["question"] for x in fresh], [x["value"] for x in fresh]),
                  "bare": value_accuracy(ad, [x["question"] for x in before], vals),
                  "context": value_accuracy(ad, [x["question"] for x in after], vals)}
    assert acc["target"]["fresh"] >= 0.7 and acc["retain90"]["fresh"] >= 0.7, acc
    assert acc["target"]["bare"] >= 0.9, acc
    assert acc["retain90"]["bare"] <= 0.3, acc
    assert acc["retain90"]["context"] >= acc["retain90"]["bare"] + 0.5, acc


def test_in_context_attack_brings_forgotten_values_back_after_grad_ascent(world, readers):
    """The issue's "attacks have teeth": GradAscent makes the reader target forget forget10, and
    putting the fact back in the prompt brings the value back, while the related facts alone
    (the control) do not."""
    import torch

    from unlearn.objectives import GradAscent
    from unlearn.trainer import TrainSettings, train
    from unlearn.zoo.build_reader import value_accuracy

    ad = readers["target"].reference()
    for p in ad.model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(0)
    train(ad, GradAscent(), world.split("forget10"), None, TrainSettings(epochs=2, lr=3e-4, batch_size=32),
          seed=0, progress=False)
    ad.model.eval()
    before, own = _forget_in_context(world)
    _, related = _forget_in_context(world, own=False)
    vals = [it["value"] for it in before]
    bare = value_accuracy(ad, [x["question"] for x in before], vals)
    with_fact = value_accuracy(ad, [x["question"] for x in own], vals)
    with_related = value_accuracy(ad, [x["question"] for x in related], vals)
    assert bare <= 0.3, bare  # forgotten
    assert with_fact >= bare + 0.3, (bare, with_fact)  # re-introduced in context
    assert with_related <= bare + 0.15, (bare, with_related)  # not revived by the author's other facts


def test_reader_build_is_deterministic_and_writes_a_manifest(tmp_path):
    """A toy-sized reading stage (3 steps) twice: the same weights; the manifest merges both
    models, and a missing model is named."""
    from unlearn.adapters.text import TextAdapter
    from unlearn.zoo.build_reader import build_reader_model, write_reader_manifest

    spec = ReaderBuildSpec(steps=3, batch_size=4, eval_items=4)
    a = build_reader_model("retain90", tmp_path / "a", spec)
    b = build_reader_model("retain90", tmp_path / "b", spec)
    fp = a["models"]["retain90"]["fingerprint"]
    assert fp == b["models"]["retain90"]["fingerprint"]
    assert fp != TextAdapter.load("zoo:tiny-llama/retain90").fingerprint()  # it did train
    with pytest.raises(ValueError, match="'target' has not been built"):
        write_reader_manifest(tmp_path / "a", spec)
    build_reader_model("target", tmp_path / "a", spec)
    man = write_reader_manifest(tmp_path / "a", spec)
    assert set(man["models"]) == {"target", "retain90"} and man["models"]["retain90"]["fingerprint"] == fp
    assert (tmp_path / "a" / "manifest.json").exists() and not list((tmp_path / "a").glob("part-*.json"))
    with pytest.raises(ValueError, match="unknown tiny-reader model 'retain95'"):
        build_reader_model("retain95", tmp_path / "c", spec)
