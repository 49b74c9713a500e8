"""Comparative benches: a grid of recipes (methods x seeds x a swept key), run as cells, with
resume, matched forgetting and a leaderboard. See ``docs/bench.md``.

A bench file names a base recipe, the methods to compare, the seeds and optionally a sweep of
one recipe key (``train.lr``). Every cell is one resolved recipe; its directory is
``<out>/cells/<key>``, where ``key`` is the first 16 hex digits of the SHA-256 of the resolved
recipe without its ``output`` section. So:

* **resume**: a cell whose directory holds a finished run is not run again;
* **no stale results**: a changed recipe is a new key, so an old result is never reused (the old
  directory stays and is reported as stale);
* **failures are kept**: a cell that fails is written to ``<out>/cells/<key>.failed.json`` (the
  error line and the recipe), shown as failed in the leaderboard and run again next time.

Each cell runs as ``python -m unlearn.cli run <out>/cells/<key>.yaml -q --resume`` in a process
of its own (``OMP_NUM_THREADS=1``), ``jobs`` at a time; its wall time, CPU time and peak RSS are
taken from ``os.wait4`` (the child's own rusage).

**Matched forgetting** (``sweep.target``): for each method every swept value runs with the first
seed; among the values whose ``sweep.target.metric`` (a summary key of the unlearned model) is
within ``sweep.target.tolerance`` of ``sweep.target.value``, the one with the best utility (the
task's utility number) is chosen -- the same forget level, then what was kept; when none is
within the tolerance, the closest value (it is recorded that it is not within); the chosen value
then runs with every seed.

**Bootstrap CI** (:func:`bootstrap_ci`): 95 % percentile bootstrap of the mean over seeds, 2000
resamples from ``numpy.random.default_rng(0)`` (a fresh generator per method and number):
``idx = rng.integers(0, n, size=(2000, n))``, the resampled means ``x[idx].mean(axis=1)``, and
``numpy.percentile(means, [2.5, 97.5])`` (linear interpolation).
"""

from __future__ import annotations

import copy
import hashlib
import html
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from unlearn.config import RecipeError, apply_overrides, suggest
from unlearn.recipe import load_recipe
from unlearn.runs import atomic_write_json, atomic_write_text, is_finished_run

BENCH_KEYS = ("name", "description", "base", "set", "methods", "seeds", "sweep", "out")
METHOD_KEYS = ("name", "params", "set")
SWEEP_KEYS = ("key", "values", "target")
TARGET_KEYS = ("metric", "value", "tolerance")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
N_RESAMPLES = 2000
VERSION_LIBS = ("torch", "transformers", "diffusers")  # the libraries a run card names (with unlearn and python)
CI_LEVEL = 0.95


class BenchError(ValueError):
    """A bench file that cannot be used: one line naming the key."""


# ----------------------------------------------------------------------------- statistics
def bootstrap_ci(values, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its percentile-bootstrap CI.

    ``rng = numpy.random.default_rng(seed)``; ``idx = rng.integers(0, n, size=(n_resamples, n))``;
    the means of ``values[idx]`` per row; ``numpy.percentile`` at ``(1 - level) / 2`` and
    ``(1 + level) / 2``. One value: the CI is that value. No value: NaNs.
    """
    x = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return mean, float(lo), float(hi)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when both coordinates are to be maximised."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i):
            front.append(i)
    return front


# ----------------------------------------------------------------------------- the bench file
@dataclass
class Method:
    label: str
    name: str
    params: dict
    overrides: dict  # dotted key -> value
    sweep_values: list | None  # None: not swept


@dataclass
class Bench:
    name: str
    description: str
    base: dict
    overrides: dict
    methods: list[Method]
    seeds: list[int]
    sweep_key: str | None
    target: dict | None  # {metric, value, tolerance}
    out: Path
    source: str  # where the bench came from (for messages)


@dataclass
class Cell:
    label: str
    seed: int
    value: Any  # the swept value (None: no sweep)
    swept: bool
    recipe: dict  # resolved, with output.dir
    key: str
    effective_batch: int
    phase: str  # "sweep" (first seed, every value) or "seeds"
    status: str = "todo"  # done / todo / failed
    error: str | None = None
    summary: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    attacks: dict = field(default_factory=dict)  # metrics.json attacks of the unlearned model: name -> result


def _err(where: str, key: str, msg: str) -> BenchError:
    return BenchError(f"{where}: key '{key}' {msg}")


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_keys(where: str, prefix: str, data: dict, allowed: tuple[str, ...]) -> None:
    for k in data:
        if k not in allowed:
            name = f"{prefix}.{k}" if prefix else str(k)
            raise _err(where, name, f"is not a bench key; allowed{' in ' + prefix if prefix else ''}: "
                       f"{', '.join(allowed)}{suggest(k, allowed)}")


def _required_mapping(where: str, name: str, data: Any, keys: tuple[str, ...], shape: str) -> dict:
    """``data`` as a mapping holding exactly ``keys`` (all required), or the error naming ``name``."""
    if not isinstance(data, dict):
        raise _err(where, name, f"must be a mapping {{{shape}}}, got {_type(data)}")
    _check_keys(where, name, data, keys)
    for k in keys:
        if k not in data:
            raise _err(where, f"{name}.{k}", "is missing")
    return data


def _overrides(where: str, key: str, value: Any) -> dict:
    """``set``: a list of ``dotted.key=value`` strings (as ``--set``) or a mapping dotted key -> value."""
    if value is None:
        return {}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str) or not k:
                raise _err(where, key, f"has a key {k!r}; keys are dotted recipe keys such as train.lr")
        return dict(value)
    if isinstance(value, list):
        out = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise _err(where, key, f"has {item!r}; each item looks like train.lr=1e-4")
            try:
                parsed = apply_overrides({}, [item])
            except RecipeError as e:
                raise _err(where, key, f"has a bad item: {e}") from None
            k = item.split("=", 1)[0].strip()
            node = parsed
            for part in k.split("."):
                node = node[part]
            out[k] = node
        return out
    raise _err(where, key, f"must be a list of key=value strings or a mapping, got {_type(value)}")


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise RecipeError(f"recipe key '{'.'.join(parts[:i + 1])}' is {_type(child)}, not a mapping (setting {key})")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(values) -> list[float]:
    """The numbers among ``values`` (None, text and booleans left out)."""
    return [float(v) for v in values if _number(v)]


def parse(src: str | Path | dict, out: str | Path | None = None) -> Bench:
    """Read and check a bench file (or mapping); raises :class:`BenchError` naming the key."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        where = f"bench file '{src}'"
        if not path.is_file():
            raise BenchError(f"{where} does not exist" if not path.exists() else f"{where} is not a file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise BenchError(f"{where} is not valid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
        here = path.parent
    else:
        data, where, here = copy.deepcopy(src), "bench", Path.cwd()
    if not isinstance(data, dict):
        raise BenchError(f"{where} must be a mapping (name, base, methods, seeds, ...), but it is {_type(data)}")
    _check_keys(where, "", data, BENCH_KEYS)
    for k in ("name", "base", "methods", "seeds"):
        if k not in data:
            raise _err(where, k, "is missing")
    name = data["name"]
    if not isinstance(name, str) or not _LABEL.match(name):
        raise _err(where, "name", f"is {name!r}; use letters, digits, '.', '_' or '-'")
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise _err(where, "description", f"must be text, got {_type(desc)}")
    base = data["base"]
    if isinstance(base, str):
        bpath = Path(base) if Path(base).is_absolute() else here / base
        if not bpath.is_file():
            raise _err(where, "base", f"is {base!r}, but {str(bpath)!r} is not a recipe file")
        try:
            base = yaml.safe_load(bpath.read_text())
        except yaml.YAMLError:
            raise _err(where, "base", f"is {base!r}, which is not valid YAML") from None
        if not isinstance(base, dict):
            raise _err(where, "base", f"names {str(bpath)!r}, which is not a mapping of recipe sections")
    elif not isinstance(base, dict):
        raise _err(where, "base", f"must be a recipe path (relative to the bench file) or a mapping, got {_type(base)}")
    common = _overrides(where, "set", data.get("set"))
    methods_raw = data["methods"]
    if not isinstance(methods_raw, dict) or not methods_raw:
        raise _err(where, "methods", f"must be a non-empty mapping label -> {{name, params, set}}, got {_type(methods_raw)}")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                           for s in seeds):
        raise _err(where, "seeds", f"must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _err(where, "seeds", f"lists a seed twice: {seeds!r}")
    sweep = data.get("sweep")
    sweep_key, target, values = None, None, None
    if sweep is not None:
        _required_mapping(where, "sweep", sweep, SWEEP_KEYS, "key, values, target")
        sweep_key = sweep["key"]
        if not isinstance(sweep_key, str) or not re.match(r"^[a-z_]+(\.[A-Za-z0-9_]+)+$", sweep_key):
            raise _err(where, "sweep.key", f"must be a dotted recipe key such as train.lr, got {sweep_key!r}")
        values = sweep["values"]
        if isinstance(values, list):
            if not values:
                raise _err(where, "sweep.values", "is empty")
            values = {label: values for label in methods_raw}
        elif isinstance(values, dict):
            for label, vals in values.items():
                if label not in methods_raw:
                    raise _err(where, f"sweep.values.{label}", f"names no method; methods: {', '.join(map(str, methods_raw))}")
                if not isinstance(vals, list) or not vals:
                    raise _err(where, f"sweep.values.{label}", f"must be a non-empty list, got {vals!r}")
        else:
            raise _err(where, "sweep.values", f"must be a list (every method) or a mapping method label -> list, got {_type(values)}")
        for label, vals in values.items():
            if len({json.dumps(v, sort_keys=True, default=str) for v in vals}) != len(vals):
                raise _err(where, f"sweep.values.{label}" if isinstance(sweep["values"], dict) else "sweep.values",
                           f"lists a value twice: {vals!r}")
        target = _required_mapping(where, "sweep.target", sweep["target"], TARGET_KEYS, "metric, value, tolerance")
        if not isinstance(target["metric"], str) or not target["metric"]:
            raise _err(where, "sweep.target.metric", f"must be a summary key such as forget_prob, got {target['metric']!r}")
        if not _number(target["value"]):
            raise _err(where, "sweep.target.value", f"must be a number, got {target['value']!r}")
        if not _number(target["tolerance"]) or target["tolerance"] < 0:
            raise _err(where, "sweep.target.tolerance", f"must be a number >= 0, got {target['tolerance']!r}")
        target = {"metric": target["metric"], "value": float(target["value"]), "tolerance": float(target["tolerance"])}
    methods = []
    for label, spec in methods_raw.items():
        key = f"methods.{label}"
        if not isinstance(label, str) or not _LABEL.match(label):
            raise _err(where, key, "is not a usable label; use letters, digits, '.', '_' or '-'")
        if not isinstance(spec, dict):
            raise _err(where, key, f"must be a mapping {{name, params, set}}, got {_type(spec)}")
        _check_keys(where, key, spec, METHOD_KEYS)
        if "name" not in spec:
            raise _err(where, f"{key}.name", "is missing; give the method's name (method.name of a recipe, e.g. npo)")
        if not isinstance(spec["name"], str):
            raise _err(where, f"{key}.name", f"must be a method name, got {_type(spec['name'])}")
        params = spec.get("params") or {}
        if not isinstance(params, dict):
            raise _err(where, f"{key}.params", f"must be a mapping (method.params), got {_type(params)}")
        methods.append(Method(label, spec["name"], params, _overrides(where, f"{key}.set", spec.get("set")),
                              (values or {}).get(label)))
    out_dir = out if out is not None else data.get("out")
    if out_dir is not None and not (isinstance(out_dir, (str, Path)) and str(out_dir).strip()):
        raise _err(where, "out", f"must be a directory, got {out_dir!r}")
    out_path = Path(out_dir) if out_dir is not None else Path("runs") / "bench" / name
    return Bench(name, desc, base, common, methods, list(seeds), sweep_key, target, out_path, where)


def content_key(recipe: dict) -> str:
    """SHA-256 (first 16 hex digits) of a resolved recipe without its ``output`` section."""
    d = {k: v for k, v in recipe.items() if k != "output"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cell(bench: Bench, m: Method, seed: int, value: Any, swept: bool, phase: str, cells_dir: Path) -> Cell:
    data = copy.deepcopy(bench.base)
    data["name"] = f"{bench.name}-{m.label}"
    try:
        for k, v in bench.overrides.items():
            _set_dotted(data, k, v)
        _set_dotted(data, "method.name", m.name)
        data["method"]["params"] = copy.deepcopy(m.params)
        for k, v in m.overrides.items():
            _set_dotted(data, k, v)
        data["seed"] = seed
        if swept:
            _set_dotted(data, bench.sweep_key, value)
        data.pop("output", None)
        recipe = load_recipe(data).to_dict()
    except RecipeError as e:
        raise BenchError(f"{bench.source}: method {m.label!r} (methods.{m.label}), seed {seed}"
                         + (f", {bench.sweep_key}={value!r}" if swept else "") + f": {e}") from None
    key = content_key(recipe)
    recipe["output"] = {"dir": str((cells_dir / key).absolute()), "overwrite": False, "resume": False}
    tr = recipe["train"]
    return Cell(m.label, seed, value if swept else None, swept, recipe, key,
                int(tr["batch_size"]) * int(tr["grad_accum"]), phase)


# ----------------------------------------------------------------------------- running cells
def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln[len("error:"):].strip()
    return lines[-1] if lines else "no output"


def _spawn(argv: list[str], env: dict, log) -> subprocess.Popen:
    """Start one cell's process (tests count the calls)."""
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)


def _execute(cell: Cell, cells_dir: Path) -> None:
    """Run one cell in a process of its own; fill its status, error, usage and results."""
    spec = cells_dir / f"{cell.key}.yaml"
    atomic_write_text(spec, yaml.safe_dump(cell.recipe, sort_keys=False))
    failed = cells_dir / f"{cell.key}.failed.json"
    log_path = cells_dir / f"{cell.key}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "unlearn.cli", "run", str(spec), "-q", "--resume"]
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            proc = _spawn(argv, env, log)
        except OSError as e:
            rc, ru = None, None
            err = f"could not start the cell: {e}"
        else:
            _, status, ru = os.wait4(proc.pid, 0)
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
            err = None
    wall = time.time() - t0
    cell.usage = {"wall_s": round(wall, 2), "processes": 1, "effective_batch": cell.effective_batch}
    if ru is not None:
        cell.usage.update(cpu_s=round(ru.ru_utime + ru.ru_stime, 2), peak_rss_mib=round(ru.ru_maxrss / 1024, 1))
    run_dir = cells_dir / cell.key
    if err is None and rc == 0 and is_finished_run(run_dir):
        atomic_write_json(cells_dir / f"{cell.key}.usage.json", cell.usage)
        failed.unlink(missing_ok=True)
        _read_done(cell, run_dir, cells_dir)
        return
    if err is None:
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            text = ""
        err = _error_line(text) if rc != 0 else "the run exited 0 but left no finished run"
        if rc not in (0, 1, 2):
            err = f"exit code {rc}: {err}"
    cell.status, cell.error = "failed", err
    atomic_write_json(failed, {"error": err, "exit_code": rc, "usage": cell.usage, "label": cell.label,
                               "seed": cell.seed, "value": cell.value, "log": str(log_path), "recipe": cell.recipe})


def _read_done(cell: Cell, run_dir: Path, cells_dir: Path) -> None:
    m = json.loads((run_dir / "metrics.json").read_text())
    cell.status, cell.error = "done", None
    cell.summary = m.get("summary", {})
    cell.provenance = m.get("provenance", {})
    cell.attacks = (m.get("attacks") or {}).get("unlearned") or {}
    if not cell.usage:
        try:
            cell.usage = json.loads((cells_dir / f"{cell.key}.usage.json").read_text())
        except (OSError, ValueError):
            cell.usage = {"wall_s": cell.summary.get("wall_seconds"), "processes": 1,
                          "effective_batch": cell.effective_batch}


def _refresh(cell: Cell, cells_dir: Path) -> None:
    """The cell's status from disk: done (a finished run), failed (a failure record) or todo."""
    run_dir = cells_dir / cell.key
    if is_finished_run(run_dir):
        _read_done(cell, run_dir, cells_dir)
        return
    f = cells_dir / f"{cell.key}.failed.json"
    if f.is_file():
        try:
            rec = json.loads(f.read_text())
            cell.status, cell.error, cell.usage = "failed", rec.get("error"), rec.get("usage") or {}
            return
        except (OSError, ValueError):
            pass
    cell.status = "todo"


# ----------------------------------------------------------------------------- the bench
@dataclass
class BenchResult:
    out: Path
    cells: list[Cell]
    choices: dict  # label -> {value, reached, distance, within, error}
    stale: list[str]
    ran: int
    dry_run: bool
    sweep_key: str | None = None

    @property
    def failed(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "failed"]


def _metric(cell: Cell, metric: str) -> float | None:
    v = cell.summary.get("unlearned", {}).get(metric)
    return float(v) if _number(v) and not math.isnan(v) else None


def choose(cells: list[Cell], target: dict, utility_key: str | None = None) -> dict:
    """Matched forgetting for one method, over its sweep cells (first seed): among the values whose
    metric is within ``target["tolerance"]`` of ``target["value"]``, the one with the highest
    ``utility_key`` (ties: the closer to the target, then the earlier value) -- the methods are
    tuned to the same forget level, then compared on what they kept; when none is within the
    tolerance, the closest value (ties: the earlier). ``{value, reached, distance, within, error}``."""
    found = []
    for i, c in enumerate(cells):
        v = _metric(c, target["metric"])
        if v is None:
            continue
        u = _metric(c, utility_key) if utility_key else None
        found.append((i, c.value, v, abs(v - target["value"]), u))
    if not found:
        todo = any(c.status == "todo" for c in cells)
        why = ("the sweep has not run" if todo else
               f"no sweep cell finished with a value of {target['metric']!r}")
        return {"value": None, "reached": None, "distance": None, "within": False, "error": why}
    within = [f for f in found if f[3] <= target["tolerance"] + 1e-12]
    if within:
        best = min(within, key=lambda f: (-(f[4] if f[4] is not None else -math.inf), f[3], f[0]))
    else:
        best = min(found, key=lambda f: (f[3], f[0]))
    return {"value": best[1], "reached": best[2], "distance": best[3], "within": bool(within), "error": None}


def run(src: str | Path | dict, jobs: int = 1, dry_run: bool = False, out: str | Path | None = None,
        progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run (or with ``dry_run`` list) a bench; writes the leaderboard into the bench's out directory.

    Args:
        src: a bench YAML path or mapping (``base`` paths relative to the file, or the working
            directory for a mapping).
        jobs: cells run at the same time (processes).
        dry_run: list the cells and their status (done / todo / failed) and run nothing.
        out: the bench's directory (default: the file's ``out``, else ``runs/bench/<name>``).
        progress: called with one line per finished cell (default: nothing).

    Raises:
        BenchError: a bad bench file (one line naming the key), including any cell recipe that
            does not load (checked for every cell before anything runs).
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise BenchError(f"jobs must be an integer >= 1, got {jobs!r}")
    bench = parse(src, out)
    cells_dir = bench.out / "cells"
    say = progress or (lambda line: None)
    plan: dict[str, list[Cell]] = {}  # label -> cells of phase one
    for m in bench.methods:
        if m.sweep_values is not None and bench.target is not None:
            plan[m.label] = [_cell(bench, m, bench.seeds[0], v, True, "sweep", cells_dir) for v in m.sweep_values]
        else:
            plan[m.label] = [_cell(bench, m, s, None, False, "seeds", cells_dir) for s in bench.seeds]
    # every cell recipe loads before anything runs: also the other seeds of every swept value
    if bench.target is not None:
        for m in bench.methods:
            if m.sweep_values is not None:
                for v in m.sweep_values:
                    for s in bench.seeds[1:]:
                        _cell(bench, m, s, v, True, "seeds", cells_dir)
    all_cells: dict[str, Cell] = {}
    for cells in plan.values():
        for c in cells:
            all_cells.setdefault(c.key, c)
            _refresh(all_cells[c.key], cells_dir)
    ran = 0
    lock = threading.Lock()

    def execute(todo: list[Cell]) -> None:
        nonlocal ran
        if dry_run or not todo:
            return
        cells_dir.mkdir(parents=True, exist_ok=True)
        total = len(todo)
        done_n = [0]

        def one(c: Cell) -> None:
            nonlocal ran
            _execute(c, cells_dir)
            with lock:
                ran += 1
                done_n[0] += 1
                what = f"{c.label} seed {c.seed}" + (f" {bench.sweep_key}={c.value}" if c.swept else "")
                u = c.usage
                say(f"cell {done_n[0]}/{total} {what} [{c.key}]: {c.status} in {u.get('wall_s')} s"
                    + (f" ({c.error})" if c.error else ""))

        if jobs == 1:
            for c in todo:
                one(c)
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(one, todo))

    execute([c for c in all_cells.values() if c.status != "done"])
    choices: dict[str, dict] = {}
    if bench.target is not None:
        phase2: list[Cell] = []
        for m in bench.methods:
            if m.sweep_values is None:
                continue
            ch = choices[m.label] = choose(plan[m.label], bench.target, _task_numbers(bench)[2])
            if ch["value"] is None:
                continue
            for s in bench.seeds[1:]:
                c = _cell(bench, m, s, ch["value"], True, "seeds", cells_dir)
                c = all_cells.setdefault(c.key, c)
                _refresh(c, cells_dir)
                phase2.append(c)
        execute([c for c in phase2 if c.status != "done"])
    current = set(all_cells)
    stale = sorted(p.name for p in cells_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and p.name not in current) if cells_dir.is_dir() else []
    res = BenchResult(bench.out, list(all_cells.values()), choices, stale, ran, dry_run, bench.sweep_key)
    if not dry_run:
        write_leaderboard(bench, res)
    return res


# ----------------------------------------------------------------------------- leaderboard
def _task_numbers(bench: Bench) -> tuple[type, tuple[str, bool], str | None, dict]:
    rec = load_recipe(_first_recipe(bench))
    task = rec.task.task_class
    labels = dict(task.headline)
    return task, task.forget_key, task.utility_key(), labels


def _first_recipe(bench: Bench) -> dict:
    data = copy.deepcopy(bench.base)
    for k, v in bench.overrides.items():
        _set_dotted(data, k, v)
    m = bench.methods[0]
    _set_dotted(data, "method.name", m.name)
    data["method"]["params"] = copy.deepcopy(m.params)
    data["name"] = bench.name
    data.pop("output", None)
    return data


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def rows(res: BenchResult) -> list[dict]:
    """One row per cell: what ``results.csv`` holds."""
    out = []
    chosen = {label: ch["value"] for label, ch in res.choices.items() if ch["value"] is not None}
    for c in res.cells:
        row: dict[str, Any] = {"method": c.label, "seed": c.seed, "sweep_value": c.value if c.swept else None,
                               "key": c.key, "status": c.status, "error": c.error, "phase": c.phase,
                               "chosen": (c.label not in res.choices) or (c.label in chosen and c.value == chosen[c.label])}
        for model in ("unlearned", "target"):
            for k, v in sorted(c.summary.get(model, {}).items()):
                if _number(v):
                    row[f"{model}.{k}"] = v
        row.update(_attack_columns(c.attacks))
        u = c.usage or {}
        row.update(wall_s=u.get("wall_s"), cpu_s=u.get("cpu_s"), peak_rss_mib=u.get("peak_rss_mib"),
                   processes=u.get("processes", 1), effective_batch=c.effective_batch)
        row.update(_version_columns(c.provenance))
        out.append(row)
    return out


def _version_columns(p: dict | None) -> dict:
    """The run card's versions (from the run's provenance) as CSV columns; empty for a cell without one."""
    p = p or {}
    libs = p.get("libraries") or {}
    return {"unlearn_version": p.get("unlearn_version"), "python": p.get("python"),
            **{lib: libs.get(lib) for lib in VERSION_LIBS}, "git_commit": (p.get("git") or {}).get("commit")}


def _attack_columns(attacks: dict) -> dict:
    """``attack.<name>.<metric>.{before,after,delta}`` for every numeric metric of every attack result."""
    out = {}
    for name, r in attacks.items():
        for part in ("before", "after", "delta"):
            for k, v in ((r or {}).get(part) or {}).items():
                if _number(v):
                    out[f"attack.{name}.{k}.{part}"] = v
    return out


def _csv(rs: list[dict]) -> str:
    import csv
    import io

    cols: list[str] = []
    for r in rs:
        for k in r:
            if k not in cols:
                cols.append(k)
    # the model columns after the identifying ones, usage last
    head = ["method", "seed", "sweep_value", "key", "status", "error", "phase", "chosen"]
    tail = ["wall_s", "cpu_s", "peak_rss_mib", "processes", "effective_batch", "unlearn_version", "python",
            *VERSION_LIBS, "git_commit"]
    mid = sorted(c for c in cols if c not in head and c not in tail)
    cols = head + mid + tail
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rs:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


def _md_table(head: list[str], body: list[list[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return _fmt(x).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"] + [
        "| " + " | ".join(cell(x) for x in r) + " |" for r in body]


def _html_table(head: list[str], body: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(x))}</td>" for x in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def tables(bench: Bench, res: BenchResult) -> list[tuple[str, str, list[str], list[list[Any]]]]:
    """``(title, text, header, rows)`` of the leaderboard's sections."""
    task, (fkey, f_higher), ukey, labels = _task_numbers(bench)
    flabel, ulabel = labels.get(fkey, fkey), labels.get(ukey, ukey) if ukey else None
    chosen_rows = [r for r in rows(res) if r["chosen"]]
    by_method: dict[str, list[dict]] = {m.label: [] for m in bench.methods}
    for r in chosen_rows:
        by_method[r["method"]].append(r)
    board = []
    for m in bench.methods:
        done = [r for r in by_method[m.label] if r["status"] == "done"]
        f = bootstrap_ci([r.get(f"unlearned.{fkey}") for r in done])
        u = bootstrap_ci([r.get(f"unlearned.{ukey}") for r in done]) if ukey else (math.nan,) * 3
        ch = res.choices.get(m.label)
        within = ch["within"] if ch is not None else None
        distance = math.nan  # of the method's mean result (chosen setting, all seeds) from the target
        if bench.target and done:
            reached = [r.get(f"unlearned.{bench.target['metric']}") for r in done]
            reached = [v for v in reached if v is not None and not (isinstance(v, float) and math.isnan(v))]
            if reached:
                distance = abs(float(np.mean(reached)) - bench.target["value"])
                if ch is None:  # not swept (an editor without a knob): judge its result itself
                    within = distance <= bench.target["tolerance"] + 1e-12
        board.append({"label": m.label, "name": m.name, "n": len(done), "of": len(by_method[m.label]), "f": f, "u": u,
                      "within": within, "value": ch["value"] if ch else None, "distance": distance})

    def sort_key(b):
        """Within the tolerance by utility; then, with a target, the others by how close they came
        to it (a collapsed model "forgets most" but is no better matched); without a target by
        forgetting; methods without results last."""
        fsigned = b["f"][0] if f_higher else -b["f"][0]
        if not b["n"]:
            return (2, 0.0)
        if b["within"]:
            return (0, -(b["u"][0] if not math.isnan(b["u"][0]) else -math.inf))
        if bench.target:
            return (1, b["distance"] if not math.isnan(b["distance"]) else math.inf)
        return (1, -(fsigned if not math.isnan(fsigned) else -math.inf))

    board.sort(key=sort_key)
    ci = f"{int(CI_LEVEL * 100)} % CI"
    head = ["rank", "method", "method.name"] + ([bench.sweep_key] if bench.sweep_key else []) + [
        "seeds done", f"{flabel} mean", ci] + ([f"{ulabel} mean", ci] if ukey else []) + (
        ["within tolerance"] if bench.target else [])
    body = []
    rank = 0
    for b in board:
        rank += b["n"] > 0
        r = [rank if b["n"] else None, b["label"], b["name"]] + ([b["value"]] if bench.sweep_key else []) + [
            f"{b['n']}/{b['of']}", b["f"][0], _ci(b["f"])] + ([b["u"][0], _ci(b["u"])] if ukey else []) + (
            [b["within"]] if bench.target else [])
        body.append(r)
    if bench.target:
        rank_text = (f"Ranked by {ulabel or 'utility'} among the methods whose matched forgetting (an unswept "
                     f"method: its own result) is within the tolerance, then the others by the distance of their "
                     f"mean {bench.target['metric']} from the target. ")
    else:
        rank_text = f"Ranked by {flabel} (most forgotten first). "
    out = [("Leaderboard", rank_text + f"Mean over the seeds of the chosen setting and a {ci} (percentile bootstrap "
            f"of the mean, {N_RESAMPLES} resamples, numpy Generator seeded 0).", head, body)]
    if bench.target:
        t = bench.target
        mt = [[m.label, res.choices.get(m.label, {}).get("value"), res.choices.get(m.label, {}).get("reached"),
               res.choices.get(m.label, {}).get("distance"), res.choices.get(m.label, {}).get("within"),
               res.choices.get(m.label, {}).get("error")] for m in bench.methods if m.label in res.choices]
        out.append(("Matched forgetting",
                    f"Target: unlearned `{t['metric']}` = {t['value']:g} ± {t['tolerance']:g}, over `{bench.sweep_key}` "
                    f"with seed {bench.seeds[0]}.",
                    ["method", f"chosen {bench.sweep_key}", f"{t['metric']} reached", "distance", "within tolerance",
                     "note"], mt))
    out += _metric_and_attack_tables(bench, res)
    failed = [c for c in res.cells if c.status == "failed"]
    out.append(("Failed cells", "None." if not failed else "Each is run again by the next `unlearn bench`.",
                ["method", "seed", "sweep value", "key", "error"],
                [[c.label, c.seed, c.value, c.key, c.error] for c in failed]))
    todo = [c for c in res.cells if c.status == "todo"]
    if todo:
        out.append(("Cells not run", "", ["method", "seed", "sweep value", "key"],
                    [[c.label, c.seed, c.value, c.key] for c in todo]))
    if res.stale:
        out.append(("Stale cells", "Directories under `cells/` of recipes this bench no longer has; not used.",
                    ["directory"], [[f"cells/{s}"] for s in res.stale]))
    cards = []
    for c in res.cells:
        if c.status == "todo":
            continue
        p = c.provenance or {}
        libs = p.get("libraries") or {}
        versions = ", ".join(f"{k} {libs[k]}" for k in VERSION_LIBS if libs.get(k))
        ver = (f"unlearn {p.get('unlearn_version')}, python {p.get('python')}" + (f", {versions}" if versions else "")
               + (f", git {str((p.get('git') or {}).get('commit'))[:10]}" if (p.get("git") or {}).get("commit") else "")
               ) if p else None
        u = c.usage or {}
        cards.append([c.label, c.seed, c.value, c.key, c.status, ver, u.get("wall_s"), u.get("cpu_s"),
                      u.get("peak_rss_mib"), u.get("processes", 1), c.effective_batch])
    out.append(("Run cards", "One per cell: the recipe hash (the cell key: SHA-256 of the resolved recipe without "
                "its output section, first 16 hex digits); versions from the run's provenance; usage of the cell's "
                "process (os.wait4); effective batch = batch size x gradient accumulation x processes.",
                ["method", "seed", "sweep value", "recipe hash", "status", "versions", "wall s", "CPU s",
                                "peak RSS MiB", "processes", "effective batch"], cards))
    return out


def _ci(t: tuple[float, float, float]) -> str:
    return "—" if math.isnan(t[1]) else f"[{t[1]:.4g}, {t[2]:.4g}]"


def _mean_ci(t: tuple[float, float, float]) -> str:
    return "—" if math.isnan(t[0]) else f"{t[0]:.4g} {_ci(t)}"


def _chosen_done(bench: Bench, res: BenchResult) -> dict[str, list[Cell]]:
    """Per method label, its finished cells at the chosen setting (unswept: every seed)."""
    chosen = {label: ch["value"] for label, ch in res.choices.items()}
    out: dict[str, list[Cell]] = {m.label: [] for m in bench.methods}
    for c in res.cells:
        at_choice = c.label not in chosen or (chosen[c.label] is not None and c.value == chosen[c.label])
        if c.status == "done" and at_choice:
            out[c.label].append(c)
    return out


def metric_stats(bench: Bench, res: BenchResult) -> tuple[list[tuple[str, str]], dict[str, dict[str, tuple]]]:
    """The task's headline metrics that some finished cell at a chosen setting has (``(key, label)``),
    and per method ``{key: (mean, low, high)}`` (:func:`bootstrap_ci` over the seeds of its chosen setting)."""
    task = _task_numbers(bench)[0]
    per = _chosen_done(bench, res)
    keys = [(k, label) for k, label in task.headline
            if any(_metric(c, k) is not None for cells in per.values() for c in cells)]
    stats = {label: {k: bootstrap_ci([_metric(c, k) for c in cells]) for k, _ in keys} for label, cells in per.items()}
    return keys, stats


def attack_stats(bench: Bench, res: BenchResult) -> list[dict]:
    """For every method (finished cells at its chosen setting whose runs ran ``eval.attacks``), attack
    and numeric metric of the attack results: ``{method, attack, metric, n, before, after, delta}``,
    each of before/after/delta ``(mean, low, high)`` over the seeds; delta = after - before."""
    out = []
    for label, cells in _chosen_done(bench, res).items():
        names = list(dict.fromkeys(n for c in cells for n in c.attacks))
        for name in names:
            results = [c.attacks[name] or {} for c in cells if name in c.attacks]
            metrics = list(dict.fromkeys(k for r in results for k, v in (r.get("before") or {}).items() if _number(v)))
            for k in metrics:
                parts = {part: bootstrap_ci(_numbers((r.get(part) or {}).get(k) for r in results))
                         for part in ("before", "after", "delta")}
                out.append({"method": label, "attack": name, "metric": k, "n": len(results), **parts})
    return out


def attack_forget_metric(forget_key: str, metrics: list[str]) -> str | None:
    """The attack-result key that stands for the task's forget number, shown in ``attacks.png``: the
    key itself, or one that ``forget_key`` ends with (forget_prob -> ``prob``), or one that ends with
    the forget key's last word (erasure_explicit -> ``forget_explicit``); else the first key."""
    tail = forget_key.rsplit("_", 1)[-1]
    for k in metrics:
        if k == forget_key or forget_key.endswith("_" + k) or k.endswith("_" + tail):
            return k
    return metrics[0] if metrics else None


def _metric_and_attack_tables(bench: Bench, res: BenchResult) -> list[tuple[str, str, list[str], list[list[Any]]]]:
    """The leaderboard's "Headline metrics" and (when some run ran attacks) "Attack deltas" sections."""
    keys, stats = metric_stats(bench, res)
    per = _chosen_done(bench, res)
    ci = f"{int(CI_LEVEL * 100)} % CI"
    out = [("Headline metrics", f"Every headline metric of the task per method at its chosen setting: mean [{ci}] "
            "over its seeds (`metrics.png`: the same as bars with the CI as error bars).",
            ["method", "seeds done"] + [label for _, label in keys],
            [[m.label, len(per[m.label])] + [_mean_ci(stats[m.label][k]) for k, _ in keys] for m in bench.methods])]
    rows_ = attack_stats(bench, res)
    if rows_:
        fkey, f_higher = _task_numbers(bench)[1]
        back = "negative" if f_higher else "positive"
        out.append(("Attack deltas", f"The unlearned model's forget metrics before and after each attack of "
                    f"`eval.attacks` (mean [{ci}] over the seeds of the chosen setting); delta = after - before. "
                    f"The task's forget number ({fkey}) is {'higher' if f_higher else 'lower'} when more is "
                    f"forgotten, so a {back} delta of its metric means the attack brought back what was forgotten "
                    "(`attacks.png`: before and after per attack).",
                    ["method", "attack", "metric", "seeds", "before", "after", "delta", f"delta {ci}"],
                    [[r["method"], r["attack"], r["metric"], r["n"], r["before"][0], r["after"][0], r["delta"][0],
                      _ci(r["delta"])] for r in rows_]))
    return out


def _pareto_png(bench: Bench, res: BenchResult, path: Path) -> bool:
    task, (fkey, f_higher), ukey, labels = _task_numbers(bench)
    pts = [(c, _metric(c, fkey), _metric(c, ukey) if ukey else None) for c in res.cells if c.status == "done"]
    pts = [(c, f, u) for c, f, u in pts if f is not None and u is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    if pts:
        front = set(pareto_front([(f if f_higher else -f, u) for _, f, u in pts]))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, m in enumerate(bench.methods):
            mine = [(f, u) for c, f, u in pts if c.label == m.label]
            if mine:
                ax.scatter([p[0] for p in mine], [p[1] for p in mine], color=colors[i % len(colors)], label=m.label,
                           alpha=0.8, s=30)
        fp = sorted((pts[i][1], pts[i][2]) for i in front)
        ax.plot([p[0] for p in fp], [p[1] for p in fp], "k--", lw=1, label="Pareto front")
        ax.scatter([p[0] for p in fp], [p[1] for p in fp], facecolors="none", edgecolors="k", s=110, lw=1.2)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished cell", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(labels.get(fkey, fkey))
    ax.set_ylabel(labels.get(ukey, ukey) if ukey else "utility")
    ax.set_title(f"{bench.name}: every finished cell")
    _save(fig, path)
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically and close it."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    os.replace(tmp, path)


def _panels(plt, n: int, width: float = 3.6, height: float = 3.2):
    """A figure of ``n`` panels, at most three a row; the unused ones hidden."""
    cols = min(3, max(n, 1))
    nrows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(width * cols, height * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:max(n, 1)]


def _bars(ax, labels: list[str], stats: list[tuple[float, float, float]], offset: float = 0.0, width: float = 0.8,
          **kw) -> None:
    """One bar per label at its mean, the CI as error bars (labels without a mean: no bar)."""
    xs = [i + offset for i, t in enumerate(stats) if not math.isnan(t[0])]
    kept = [t for t in stats if not math.isnan(t[0])]
    if kept:
        err = [[max(t[0] - t[1], 0.0) for t in kept], [max(t[2] - t[0], 0.0) for t in kept]]
        ax.bar(xs, [t[0] for t in kept], width, yerr=err, capsize=3, **kw)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)


def _metrics_png(bench: Bench, res: BenchResult, path: Path) -> None:
    """``metrics.png``: a panel per headline metric, a bar per method (chosen setting, mean over its
    seeds) with the bootstrap CI as error bars."""
    keys, stats = metric_stats(bench, res)
    plt = _pyplot()
    fig, axes = _panels(plt, len(keys))
    labels = [m.label for m in bench.methods]
    for ax, (k, label) in zip(axes, keys):
        _bars(ax, labels, [stats[m][k] for m in labels], color="tab:blue")
        ax.set_title(label, fontsize=9)
    if not keys:
        axes[0].text(0.5, 0.5, "no finished cell", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(f"{bench.name}: chosen setting per method, mean and {int(CI_LEVEL * 100)} % CI over seeds", fontsize=10)
    _save(fig, path)


def _attacks_png(bench: Bench, rows_: list[dict], path: Path) -> None:
    """``attacks.png``: a panel per attack, per method the forget metric before and after it."""
    fkey = _task_numbers(bench)[1][0]
    attacks = list(dict.fromkeys(r["attack"] for r in rows_))
    plt = _pyplot()
    fig, axes = _panels(plt, len(attacks))
    for ax, name in zip(axes, attacks):
        mine = [r for r in rows_ if r["attack"] == name]
        metric = attack_forget_metric(fkey, list(dict.fromkeys(r["metric"] for r in mine)))
        mine = [r for r in mine if r["metric"] == metric]
        labels = [r["method"] for r in mine]
        _bars(ax, labels, [r["before"] for r in mine], -0.2, 0.4, color="tab:gray", label="before")
        _bars(ax, labels, [r["after"] for r in mine], 0.2, 0.4, color="tab:red", label="after")
        ax.set_title(f"{name}: {metric}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{bench.name}: forget metric before and after each attack (unlearned model)", fontsize=10)
    _save(fig, path)


def write_leaderboard(bench: Bench, res: BenchResult) -> None:
    """``results.csv``, ``leaderboard.md``, ``index.html`` and the plots (``pareto.png``,
    ``metrics.png``, and ``attacks.png`` when some run ran attacks) in the bench's directory (each
    written atomically; an ``attacks.png`` left from an earlier run without attacks is removed)."""
    out = bench.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.csv", _csv(rows(res)))
    secs = tables(bench, res)
    plots = [("pareto.png", "Forget vs utility", "forget vs utility, Pareto front"),
             ("metrics.png", "Headline metrics", "per-metric bars with bootstrap CIs")]
    _pareto_png(bench, res, out / "pareto.png")
    _metrics_png(bench, res, out / "metrics.png")
    attack_rows = attack_stats(bench, res)
    if attack_rows:
        _attacks_png(bench, attack_rows, out / "attacks.png")
        plots.append(("attacks.png", "Attacks", "forget metric before and after each attack"))
    else:
        (out / "attacks.png").unlink(missing_ok=True)
    n_done = sum(c.status == "done" for c in res.cells)
    intro = (f"{len(res.cells)} cells: {n_done} done, {len(res.failed)} failed, "
             f"{sum(c.status == 'todo' for c in res.cells)} not run; methods "
             f"{', '.join(m.label for m in bench.methods)}; seeds {', '.join(map(str, bench.seeds))}"
             + (f"; sweep over `{bench.sweep_key}`" if bench.sweep_key else "") + ".")
    md = [f"# Bench `{bench.name}`", ""] + ([bench.description, ""] if bench.description else []) + [intro, ""]
    for title, text, head, body in secs:
        md += [f"## {title}", ""] + ([text, ""] if text else []) + (_md_table(head, body) + [""] if body else [])
    md += [f"![{alt}]({name})\n" for name, _, alt in plots]
    atomic_write_text(out / "leaderboard.md", "\n".join(md))
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>bench {html.escape(bench.name)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
            "margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}th{background:#eee}"
            "img{max-width:100%}</style>",
            f"</head><body><h1>Bench {html.escape(bench.name)}</h1>",
            f"<p>{html.escape(bench.description)}</p>" if bench.description else "", f"<p>{html.escape(intro)}</p>"]
    for title, text, head, body in secs:
        page.append(f"<h2>{html.escape(title)}</h2>" + (f"<p>{html.escape(text)}</p>" if text else "")
                    + (_html_table(head, body) if body else ""))
    page += [f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(alt)}'>" for name, title, alt in plots]
    page.append("</body></html>")
    atomic_write_text(out / "index.html", "\n".join(page) + "\n")


def dry_run_lines(res: BenchResult) -> list[str]:
    """The cells of a bench and their status, as ``unlearn bench --dry-run`` prints them."""
    sweep_key = res.sweep_key
    head = ["method", "seed", sweep_key or "sweep", "key", "status"]
    body = [[c.label, str(c.seed), _fmt(c.value) if c.swept else "-", c.key, c.status] for c in res.cells]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in body]
    pending = [label for label, ch in res.choices.items() if ch["value"] is None]
    if pending:
        lines.append(f"then: the chosen {sweep_key} of {', '.join(pending)} over the other seeds (after the sweep)")
    return lines


def load(directory: str | Path):
    """``results.csv`` of a bench directory as a pandas DataFrame (one row per cell)."""
    import pandas as pd  # lazy: only this reader needs pandas

    return pd.read_csv(Path(directory) / "results.csv")


__all__ = ["run", "load", "parse", "bootstrap_ci", "pareto_front", "choose", "content_key", "BenchError",
           "BenchResult", "Cell"]
