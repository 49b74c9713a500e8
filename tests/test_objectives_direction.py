"""Every registered objective, a short run on the zoo target: forget-set Prob must drop."""

from __future__ import annotations

import pytest

from unlearn.adapters.text import TextAdapter
from unlearn.evaluators import tofu as M
from unlearn.objectives import OBJECTIVES
from unlearn.selection import apply_selection, finalize_selection
from unlearn.tasks.tofu import load_tofu
from unlearn.trainer import TrainSettings, train

LR = {"grad_ascent": 1e-4, "grad_diff": 5e-4}


@pytest.fixture(scope="module")
def data():
    return load_tofu(forget_split="forget10", retain_split="retain90", eval_splits=("forget",))


def _forget_prob(ad, items):
    from unlearn.evaluators.text_passes import TeacherForced

    r = TeacherForced("answer").run(ad, items, batch_size=64)
    return M.prob(r["nll"], r["n"]).value


# uoe needs an MoE: test_moe.py; image-only objectives (salun): test_salun.py
@pytest.mark.parametrize("name", [n for n in OBJECTIVES.names() if n != "uoe" and "text" in OBJECTIVES.get(n).modalities])
def test_short_run_lowers_forget_prob(name, data):
    ad = TextAdapter.load("zoo:tiny-llama/target")
    items = data.forget[:64]
    before = _forget_prob(ad, items)
    obj = OBJECTIVES.get(name)()
    ref = ad.reference() if obj.needs_reference() else None
    obj.setup(ad, ref, items)
    apply_selection(ad, "full")
    train(ad, obj, items, data.retain, TrainSettings(epochs=1, max_steps=4, lr=LR.get(name, 1e-3), batch_size=16),
          progress=False)
    finalize_selection(ad)
    after = _forget_prob(ad, items)
    assert after < before, (name, before, after)
