"""scripts/image_robustness.py --table: the mean±std table over stored seeds equals the hand computation."""

from __future__ import annotations

from _scripts import load_script

from unlearn.report import mean_std


def _script():
    return load_script("image_robustness")


def _run(recipe, seed, e, asr, wall):
    return {"recipe": recipe, "seed": seed, "erasure_explicit": e, "erasure_implicit": 1.0, "retain_in_domain": 1.0,
            "retain_cross_domain": None, "fid_like": 300.0 + seed, "edit_seconds": 2.0, "wall_seconds": wall,
            "attacks": {"p4d": {"asr": {"forget_explicit": asr, "forget_implicit": 0.0}}}}


def test_the_seed_table_gives_mean_and_std_per_recipe():
    table = _script().seed_table({"a-s0": _run("a", 0, 0.5, 0.25, 10.0), "a-s1": _run("a", 1, 1.0, 0.75, 20.0),
                                  "b-s0": _run("b", 0, 0.9, 0.1, 7.0)})
    head, rule, a, b = table.splitlines()
    assert "`p4d`" in head and rule.count("---") == 8
    # mean of (0.5, 1.0) = 0.75, sample std = 0.3536; ASR mean 0.5, std 0.3536; run s 15 ± 7
    assert a == ("| a | 0 1 | 0.75±0.35 / 1.00±0.00 | 1.00±0.00 / n/a | 300±1 | 0.50±0.35 / 0.00±0.00 | 2.0±0.0 | "
                 "15±7 |")
    assert b == "| b | 0 | 0.90 / 1.00 | 1.00 / n/a | 300 | 0.10 / 0.00 | 2.0 | 7 |"


def test_mean_std_formats_the_non_missing_values():
    assert mean_std([1.0, None, 3.0], ".1f") == "2.0 ± 1.4"  # sample std of (1, 3) = √2
    assert mean_std([0.5], ".2f", sep="±") == "0.50" and mean_std([None]) == "n/a" and mean_std([]) == "n/a"
