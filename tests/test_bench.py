"""``unlearn bench``: the bootstrap CI, resume, failed and stale cells, matched forgetting, dry-run
and bench-file checks.

One bench runs real cells (``python -m unlearn.cli run``, a 1-step run on 2 items per split, no
retain model): one that trains and one whose learning rate (1e30) makes it fail. The other
benches replace the cell's command by a small script that writes a finished run directory whose
numbers follow from the recipe (``_FAKE``), so that resume, staleness and the choice of matched
forgetting are checked without training.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unlearn import bench
from unlearn.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {"train.max_steps": 1, "eval.max_items": 2, "task.retain_model": None, "eval.n_samples": 0}

# a stand-in for `unlearn run`: a finished run directory whose forget_prob is 1 - 100 * lr (+ the seed / 1000)
_FAKE = """
import json, os, sys, yaml
r = yaml.safe_load(open(sys.argv[1]))
d = r["output"]["dir"]
os.makedirs(d, exist_ok=True)
fp = 1.0 - 100 * r["train"]["lr"] + r["seed"] / 1000
s = {"unlearned": {"forget_prob": fp, "model_utility": 0.5 + r["train"]["lr"] * 10 + r["seed"] / 100,
                   "forget_quality": None},
     "target": {"forget_prob": 0.99, "model_utility": 0.6}, "max_items": r["eval"]["max_items"], "wall_seconds": 0.1}
m = {"summary": s, "provenance": {"unlearn_version": "0", "python": "3", "libraries": {"torch": "9.9"}}}
# eval.attacks: prob before = forget_prob / 2, after = before + 0.1 * (position + 1) + seed / 100
b = fp / 2
m["attacks"] = {"unlearned": {n: {"before": {"prob": b, "rouge": 0.5}, "after": {"prob": b + 0.1 * (i + 1) + r["seed"] / 100,
                "rouge": 0.5}, "delta": {"prob": 0.1 * (i + 1) + r["seed"] / 100, "rouge": 0.0}, "items": 2}
                for i, n in enumerate(r["eval"].get("attacks") or [])}}
json.dump(m, open(os.path.join(d, "metrics.json"), "w"))
open(os.path.join(d, ".unlearn-run"), "w").write("{}")
"""


def _bench(tmp_path, methods, **extra) -> dict:
    return {"name": "t", "base": str(ROOT / "recipes" / "quickstart.yaml"), "set": dict(TINY), "methods": methods,
            "seeds": [0], "out": str(tmp_path / "bench"), **extra}


@pytest.fixture
def spawns(monkeypatch):
    """Count the cell processes (``calls``); ``fake(path)`` replaces `unlearn run` by ``_FAKE``."""
    calls: list[list[str]] = []
    real = bench._spawn
    state = {"script": None}

    def spawn(argv, env, log):
        calls.append(argv)
        if state["script"] is not None:
            argv = [sys.executable, state["script"], argv[argv.index("run") + 1]]
        return real(argv, env, log)

    def fake(tmp_path):
        p = tmp_path / "fake_run.py"
        p.write_text(_FAKE)
        state["script"] = str(p)

    monkeypatch.setattr(bench, "_spawn", spawn)
    spawn.calls, spawn.fake = calls, fake
    return spawn


def test_bootstrap_ci_matches_the_documented_algorithm_by_hand():
    x = [0.25, 0.5, 0.75, 1.0, 0.125]
    mean, lo, hi = bench.bootstrap_ci(x)
    assert mean == 0.525  # exact: sum / n
    # by hand: 2000 resamples of n indices from default_rng(0), the mean of each, percentiles 2.5 / 97.5
    rng = np.random.default_rng(0)
    means = []
    for _ in range(2000):
        idx = rng.integers(0, len(x), size=len(x))
        means.append(sum(x[i] for i in idx) / len(x))
    means.sort()

    def percentile(q):  # linear interpolation between the closest ranks (numpy's default)
        pos = (len(means) - 1) * q / 100
        i = int(pos)
        return means[i] + (means[min(i + 1, len(means) - 1)] - means[i]) * (pos - i)

    assert lo == pytest.approx(percentile(2.5), abs=1e-12)
    assert hi == pytest.approx(percentile(97.5), abs=1e-12)
    assert lo < mean < hi
    assert bench.bootstrap_ci([0.3]) == (0.3, 0.3, 0.3)


def test_real_cells_failed_cell_recorded_and_resume_starts_nothing(tmp_path, spawns, monkeypatch):
    spec = _bench(tmp_path, {"ga": {"name": "grad_ascent"},
                             "bad": {"name": "grad_ascent", "set": ["train.lr=1.0e30"]}})
    # a bench killed with -9 leaves a partial cell directory: the cell's next run removes it
    planned = bench.run(spec, dry_run=True)
    ga_key = planned.cells[0].key
    partial = Path(spec["out"]) / "cells" / f".{ga_key}.partial-killed"
    partial.mkdir(parents=True)
    (partial / ".unlearn-partial").write_text("pid 1, started earlier\n")
    res = bench.run(spec, jobs=2)
    assert len(spawns.calls) == 2
    assert not partial.exists() and "removed" in (partial.parent / f"{ga_key}.log").read_text()
    assert all(a[1:5] == ["-m", "unlearn.cli", "run", a[4]] and "-q" in a for a in spawns.calls)
    out = Path(spec["out"])
    df = bench.load(out)
    assert len(df) == 2
    ga, bad = df.set_index("method").loc["ga"], df.set_index("method").loc["bad"]
    assert ga["status"] == "done" and 0 <= ga["unlearned.forget_prob"] <= 1 and "target.model_utility" in df
    assert ga["wall_s"] > 0 and ga["cpu_s"] > 0 and ga["peak_rss_mib"] > 50 and ga["effective_batch"] == 32
    assert bad["status"] == "failed" and isinstance(bad["error"], str) and bad["error"]
    failed = json.loads((out / "cells" / f"{bad['key']}.failed.json").read_text())
    assert failed["error"] == bad["error"] and failed["recipe"]["train"]["lr"] == 1e30
    md = (out / "leaderboard.md").read_text()
    assert "## Failed cells" in md and bad["error"] in md and bad["key"] in md
    assert "## Run cards" in md and ga["key"] in md and "torch" in md
    assert (out / "pareto.png").stat().st_size > 1000
    assert "pareto.png" in (out / "index.html").read_text()

    # resume: the finished cell is not run again (a bench without the failing method starts nothing)
    spawns.calls.clear()
    again = bench.run(_bench(tmp_path, {"ga": {"name": "grad_ascent"}}))
    assert spawns.calls == [] and again.ran == 0
    assert [c.status for c in again.cells] == ["done"]
    # the failed cell is retried by the next run of the full bench (here by a stand-in that fails at once)
    retried = []

    def failing(argv, env, log):
        retried.append(argv)
        return subprocess.Popen([sys.executable, "-c", "print('error: stand-in failure'); raise SystemExit(2)"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)

    monkeypatch.setattr(bench, "_spawn", failing)
    res = bench.run(spec)
    assert len(retried) == 1 and retried[0][4] == str(out / "cells" / f"{bad['key']}.yaml")
    assert [c.status for c in res.cells] == ["done", "failed"] and res.ran == 1
    assert res.cells[1].error == "stand-in failure"


def test_stale_cell_is_rerun_and_not_reused(tmp_path, spawns):
    spawns.fake(tmp_path)
    spec = _bench(tmp_path, {"ga": {"name": "grad_ascent"}})
    first = bench.run(spec)
    old_key = first.cells[0].key
    assert len(spawns.calls) == 1 and first.cells[0].summary["max_items"] == 2
    spec["set"]["eval.max_items"] = 3  # the recipe changed: a new key
    second = bench.run(spec)
    assert len(spawns.calls) == 2
    (cell,) = second.cells
    assert cell.key != old_key and cell.status == "done" and cell.summary["max_items"] == 3
    assert second.stale == [old_key] and (Path(spec["out"]) / "cells" / old_key).is_dir()
    df = bench.load(spec["out"])
    assert list(df["key"]) == [cell.key]
    assert f"cells/{old_key}" in (Path(spec["out"]) / "leaderboard.md").read_text()


def test_matched_forgetting_picks_the_closest_value(tmp_path, spawns):
    spawns.fake(tmp_path)
    spec = _bench(tmp_path, {"a": {"name": "grad_ascent"}, "b": {"name": "npo"}}, seeds=[0, 1, 2],
                  sweep={"key": "train.lr", "values": {"a": [1.0e-3, 3.0e-3, 6.0e-3], "b": [1.0e-3]},
                         "target": {"metric": "forget_prob", "value": 0.65, "tolerance": 0.1}})
    res = bench.run(spec)
    # a: forget_prob 0.9, 0.7, 0.4 -> 3e-3 (0.05 away, within); b: only 1e-3 (0.25 away, not within)
    assert res.choices["a"]["value"] == 3.0e-3 and res.choices["a"]["within"]
    assert res.choices["a"]["reached"] == pytest.approx(0.7)
    assert res.choices["b"]["value"] == 1.0e-3 and not res.choices["b"]["within"]
    assert len(spawns.calls) == 4 + 2 * 2  # the sweep on seed 0, then the chosen value on seeds 1 and 2
    df = bench.load(spec["out"])
    chosen = df[df["chosen"]]
    assert sorted(zip(chosen["method"], chosen["seed"])) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert set(chosen[chosen["method"] == "a"]["sweep_value"]) == {3.0e-3}
    md = (Path(spec["out"]) / "leaderboard.md").read_text()
    board = md.split("## Leaderboard")[1].split("##")[0]
    assert board.index("| 1 | a |") < board.index("| 2 | b |")
    assert "## Matched forgetting" in md
    # ties go to the earlier value
    cells = [bench.Cell("m", 0, v, True, {}, str(v), 1, "sweep", "done", summary={"unlearned": {"x": fp}})
             for v, fp in ((1, 0.25), (2, 0.75), (3, 0.5))]
    assert bench.choose(cells, {"metric": "x", "value": 0.5, "tolerance": 0.0})["value"] == 3
    assert bench.choose(cells[:2], {"metric": "x", "value": 0.5, "tolerance": 0.0})["value"] == 1


def test_dry_run_lists_cells_and_runs_nothing(tmp_path, spawns, capsys):
    spec = _bench(tmp_path, {"ga": {"name": "grad_ascent"}, "npo": {"name": "npo"}}, seeds=[0, 1])
    path = tmp_path / "b.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    assert main(["bench", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["method", "seed", "sweep", "key", "status"]
    assert [ln.split()[:2] + ln.split()[-1:] for ln in out[1:]] == [
        ["ga", "0", "todo"], ["ga", "1", "todo"], ["npo", "0", "todo"], ["npo", "1", "todo"]]
    assert spawns.calls == [] and not Path(spec["out"]).exists()


@pytest.mark.parametrize("change, names", [
    ({"method": {}}, "key 'method' is not a bench key"),
    ({"methods": {"ga": {"params": {}}}}, "key 'methods.ga.name' is missing"),
    ({"methods": {"ga": {"name": "grad_ascent", "lr": 1}}}, "key 'methods.ga.lr' is not a bench key"),
    ({"seeds": "0"}, "key 'seeds' must be a non-empty list"),
    ({"methods": {"ga": {"name": "grad_ascnet"}}}, "'method.name' is 'grad_ascnet'"),
    ({"set": {"train.lrr": 1}}, "'train.lrr'"),
    ({"sweep": {"key": "train.lr", "values": [1.0e-3]}}, "key 'sweep.target' is missing"),
])
def test_bad_bench_file_is_one_clear_error(tmp_path, spawns, capsys, change, names):
    spec = {**_bench(tmp_path, {"ga": {"name": "grad_ascent"}}), **change}
    with pytest.raises(bench.BenchError, match=None) as e:
        bench.run(spec)
    assert names in str(e.value) and "\n" not in str(e.value)
    path = tmp_path / "b.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    assert main(["bench", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bench file") and names in err[0]
    assert spawns.calls == []


def test_an_unswept_method_is_judged_against_the_target_by_its_own_result(tmp_path, spawns):
    spawns.fake(tmp_path)
    # c is not swept (an editor has no learning rate): at the base lr 1e-3 the stand-in reaches
    # forget_prob 0.9, on the target; a's only value 3e-3 reaches 0.7, outside the tolerance
    spec = _bench(tmp_path, {"a": {"name": "grad_ascent"}, "c": {"name": "npo"}}, seeds=[0],
                  sweep={"key": "train.lr", "values": {"a": [3.0e-3]},
                         "target": {"metric": "forget_prob", "value": 0.9, "tolerance": 0.05}})
    bench.run(spec)
    board = (Path(spec["out"]) / "leaderboard.md").read_text().split("## Leaderboard")[1].split("##")[0]
    row_c = next(line for line in board.splitlines() if "| c |" in line)
    row_a = next(line for line in board.splitlines() if "| a |" in line)
    assert row_c.startswith("| 1 | c |") and row_c.rstrip().endswith("| yes |")
    assert row_a.startswith("| 2 | a |") and row_a.rstrip().endswith("| no |")


def test_within_the_tolerance_the_best_utility_wins_not_the_closest():
    from unlearn.bench import Cell, choose

    def cell(value, forget, utility):
        c = Cell.__new__(Cell)
        c.value, c.status, c.summary = value, "done", {"unlearned": {"erasure_explicit": forget,
                                                                     "retain_in_domain": utility}}
        return c

    target = {"metric": "erasure_explicit", "value": 1.0, "tolerance": 0.2}
    # the image bench's ESD-x sweep: 1e-3 -> 0.833 / 1.000, 3e-3 -> 1.000 / 0.583
    ch = choose([cell(1e-3, 0.8333, 1.0), cell(3e-3, 1.0, 0.5833)], target, "retain_in_domain")
    assert ch["value"] == 1e-3 and ch["within"] and ch["reached"] == pytest.approx(0.8333)
    # none within: the closest
    ch = choose([cell(1e-3, 0.1, 1.0), cell(3e-3, 0.5, 0.2)], target, "retain_in_domain")
    assert ch["value"] == 3e-3 and not ch["within"]


def test_outside_the_tolerance_the_closest_ranks_first_not_the_most_forgotten(tmp_path, spawns):
    spawns.fake(tmp_path)
    # the stand-in: lr 1e-3 -> forget_prob 0.9, 6e-3 -> 0.4; target 0.95 +- 0.01: nobody within;
    # a (0.9) is 0.05 away, b (0.4) forgot more but is 0.55 away
    spec = _bench(tmp_path, {"a": {"name": "grad_ascent"}, "b": {"name": "npo"}}, seeds=[0],
                  sweep={"key": "train.lr", "values": {"a": [1.0e-3], "b": [6.0e-3]},
                         "target": {"metric": "forget_prob", "value": 0.95, "tolerance": 0.01}})
    bench.run(spec)
    board = (Path(spec["out"]) / "leaderboard.md").read_text().split("## Leaderboard")[1].split("##")[0]
    assert board.index("| 1 | a |") < board.index("| 2 | b |")


def _captured_figures(monkeypatch) -> dict:
    """``bench._save`` records each figure (by file name) before writing it."""
    figs = {}
    real = bench._save

    def save(fig, path):
        figs[Path(path).name] = fig
        real(fig, path)

    monkeypatch.setattr(bench, "_save", save)
    return figs


def _bar_groups(ax) -> list:
    from matplotlib.container import BarContainer

    return [c for c in ax.containers if isinstance(c, BarContainer)]


def _bar_ci(ax) -> list[tuple[float, float, float]]:
    """``(height, error low end, error high end)`` of the bars of the first bar group of ``ax``."""
    container = _bar_groups(ax)[0]
    segs = container.errorbar.lines[2][0].get_segments()
    return [(p.get_height(), s[0][1], s[1][1]) for p, s in zip(container.patches, segs)]


def test_metric_bars_and_attack_deltas_with_bootstrap_cis(tmp_path, spawns, monkeypatch):
    spawns.fake(tmp_path)
    figs = _captured_figures(monkeypatch)
    spec = _bench(tmp_path, {"a": {"name": "grad_ascent"}, "b": {"name": "npo", "set": {"train.lr": 2.0e-3}}},
                  seeds=[0, 1, 2])
    spec["set"]["eval.attacks"] = ["paraphrase", "relearn"]
    res = bench.run(spec)
    out = Path(spec["out"])
    lr_a = res.cells[0].recipe["train"]["lr"]
    # headline metrics: the stand-in gives model_utility 0.5 + 10 lr + seed / 100 and no forget quality
    md = (out / "leaderboard.md").read_text()
    sec = md.split("## Headline metrics")[1].split("\n## ")[0]
    assert "model utility (↑)" in sec and "forget Prob (↓)" in sec and "forget quality" not in sec
    mu_b = bench.bootstrap_ci([0.5 + 2.0e-2 + s / 100 for s in (0, 1, 2)])
    row_b = next(ln for ln in sec.splitlines() if ln.startswith("| b |"))
    assert f"{mu_b[0]:.4g} [{mu_b[1]:.4g}, {mu_b[2]:.4g}]" in row_b and "| 3 |" in row_b
    # metrics.png: a panel per headline metric, a bar per method at its mean, the CI as error bars
    panels = [ax for ax in figs["metrics.png"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["model utility (↑)", "forget Prob (↓)"]
    mu_a = bench.bootstrap_ci([0.5 + lr_a * 10 + s / 100 for s in (0, 1, 2)])
    for got, want in zip(_bar_ci(panels[0]), (mu_a, mu_b)):
        assert got == pytest.approx(want)
    assert (out / "metrics.png").stat().st_size > 1000
    # attack deltas: relearn (second attack) moves prob by 0.2 + seed / 100
    sec = md.split("## Attack deltas")[1].split("\n## ")[0]
    d = bench.bootstrap_ci([0.2 + s / 100 for s in (0, 1, 2)])
    row = next(ln for ln in sec.splitlines() if ln.startswith("| b | relearn | prob |"))
    assert f"| {d[0]:.4g} | [{d[1]:.4g}, {d[2]:.4g}] |" in row
    df = bench.load(out)
    assert df[df["method"] == "b"]["attack.relearn.prob.delta"].tolist() == pytest.approx([0.2, 0.21, 0.22])
    # attacks.png: a panel per attack, before and after of prob (TOFU's forget number is forget_prob)
    panels = [ax for ax in figs["attacks.png"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["paraphrase: prob", "relearn: prob"]
    before, after = _bar_groups(panels[1])
    fp_b = [1.0 - 100 * 2.0e-3 + s / 1000 for s in (0, 1, 2)]
    assert before.patches[1].get_height() == pytest.approx(np.mean(fp_b) / 2)
    assert after.patches[1].get_height() == pytest.approx(np.mean(fp_b) / 2 + 0.21)
    page = (out / "index.html").read_text()
    assert all(f"src='{p}'" in page for p in ("pareto.png", "metrics.png", "attacks.png")) and "Attack deltas" in page
    assert "![forget metric before and after each attack](attacks.png)" in md

    # the same bench without attacks: no attack section, and the old attacks.png is removed
    spec["set"]["eval.attacks"] = []
    bench.run(spec)
    assert "Attack deltas" not in (out / "leaderboard.md").read_text() and not (out / "attacks.png").exists()


def test_attack_forget_metric_follows_the_tasks_forget_key():
    assert bench.attack_forget_metric("forget_prob", ["rouge", "prob", "truth_ratio"]) == "prob"
    assert bench.attack_forget_metric("erasure_explicit", ["retain", "forget_implicit", "forget_explicit"]) == \
        "forget_explicit"
    assert bench.attack_forget_metric("other", ["x", "y"]) == "x"


def test_run_card_has_recipe_hash_seed_versions_and_usage(tmp_path, spawns):
    spawns.fake(tmp_path)
    spec = _bench(tmp_path, {"ga": {"name": "grad_ascent", "set": {"train.grad_accum": 2}}}, seeds=[3])
    res = bench.run(spec)
    (cell,) = res.cells
    assert cell.key == bench.content_key(cell.recipe)
    row = bench.load(spec["out"]).iloc[0]
    assert row["key"] == cell.key and row["seed"] == 3
    assert row["unlearn_version"] == 0 and row["torch"] == 9.9  # the stand-in's provenance (read back by pandas)
    assert row["wall_s"] > 0 and row["cpu_s"] >= 0 and row["peak_rss_mib"] > 0 and row["processes"] == 1
    assert row["effective_batch"] == 2 * cell.recipe["train"]["batch_size"]
    cards = (Path(spec["out"]) / "leaderboard.md").read_text().split("## Run cards")[1]
    head, _, line = cards.strip().splitlines()[2:5]
    assert head.split(" | ")[3] == "recipe hash"
    cols = [x.strip() for x in line.strip("| ").split(" | ")]
    assert cols[:5] == ["ga", "3", "—", cell.key, "done"] and cols[5] == "unlearn 0, python 3, torch 9.9"
    assert cols[-2:] == ["1", str(2 * cell.recipe["train"]["batch_size"])]


def test_sigkill_of_a_running_bench_then_resume_redoes_no_finished_cell(tmp_path, spawns):
    """`unlearn bench` on two real 1-step cells, SIGKILL of its process group (the bench and its
    cell process) once a cell has finished; the next run starts only the unfinished cells."""
    import os
    import signal
    import time

    import yaml

    spec = _bench(tmp_path, {"ga": {"name": "grad_ascent"}}, seeds=[0, 1])
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(spec))
    keys = [c.key for c in bench.run(spec, dry_run=True).cells]
    cells = Path(spec["out"]) / "cells"
    finished = lambda: [k for k in keys if bench.is_finished_run(cells / k)]  # noqa: E731
    partial = lambda: [p.name for p in cells.iterdir() if ".partial-" in p.name] if cells.is_dir() else []  # noqa: E731
    with open(tmp_path / "bench.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "unlearn.cli", "bench", str(path), "--jobs", "1"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        # killed once a cell has finished and the next one is writing its run (its partial directory)
        while not (finished() and partial()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = finished()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "bench.log").read_text()[-2000:]
    assert 1 <= len(done) < len(keys) and partial()
    before = {k: [(p.name, p.stat().st_mtime_ns) for p in sorted((cells / k).iterdir())] for k in done}

    res = bench.run(spec)
    started = [Path(a[4]).stem for a in spawns.calls]
    assert started == [k for k in keys if k not in done] and res.ran == len(started)
    assert [c.status for c in res.cells] == ["done"] * len(keys)
    assert {k: [(p.name, p.stat().st_mtime_ns) for p in sorted((cells / k).iterdir())] for k in done} == before
    assert partial() == []  # the killed cell's partial directory was removed by its rerun
    assert len(bench.load(spec["out"])) == len(keys)
