"""Every module of the installed package imports on its own, and the package's imports form no cycle.

* :func:`test_every_module_imports_in_a_fresh_process`: each module is imported first thing in
  a process of its own in which no ``unlearn`` module was ever imported, so a module that only
  imports when another one was loaded before it (an import cycle entered from the wrong side, a
  missing import hidden by a sibling) fails here by name. One interpreter per module costs the
  third-party imports (torch alone ~2 s) every time: ~85 modules took minutes on two cores. So
  one fresh interpreter imports the third-party modules the package imports at module level,
  then forks one child per module; a child starts with no ``unlearn`` module loaded and imports
  its module as ``python -c "import <module>"`` would.
* :func:`test_import_graph_has_no_cycle`: the graph of every ``unlearn.*`` import in the source,
  the ones inside functions included (a cycle through a function-level import still ties the
  modules together: each can only be understood, tested and changed with the other), has no
  cycle. ``from unlearn.x import name`` is an edge to ``unlearn.x.name`` when that is a module,
  else to ``unlearn.x``; the implicit edge from a module to its parent package is not counted.

Modules are found from pyproject's ``[tool.setuptools]`` (``package-dir`` maps ``unlearn.tasks``
to ``tasks/`` and ``unlearn.evaluators`` to ``evaluators/``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# used when tomllib (Python >= 3.11) is missing; test_layout_matches_pyproject keeps it honest
_LAYOUT = ({"unlearn": "unlearn", "unlearn.tasks": "tasks", "unlearn.evaluators": "evaluators"},
           ["unlearn", "unlearn.accelerate_configs", "unlearn.adapters", "unlearn.editors", "unlearn.objectives", "unlearn.probes", "unlearn.zoo",
            "unlearn.tasks", "unlearn.evaluators"])


def _pyproject_layout() -> tuple[dict[str, str], list[str]] | None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return None
    st = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return dict(st["package-dir"]), list(st["packages"])


def _package_dir(pkg: str, package_dir: dict[str, str]) -> Path:
    """The directory of package ``pkg``: the longest ``package-dir`` prefix, then one folder per part."""
    parts = pkg.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in package_dir:
            return ROOT / package_dir[".".join(parts[:i])] / Path(*parts[i:])
    return ROOT / Path(*parts)


def package_modules() -> dict[str, Path]:
    """Every module setuptools installs: dotted name -> source file."""
    package_dir, packages = _pyproject_layout() or _LAYOUT
    mods: dict[str, Path] = {}
    for pkg in packages:
        d = _package_dir(pkg, package_dir)
        for f in sorted(d.glob("*.py")):
            if f.stem == "__main__":  # entry points (`python -m ...`): running them on import is their job
                continue
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


MODULES = package_modules()


def test_layout_matches_pyproject():
    """The fallback layout is pyproject's, and every package directory in the tree is installed."""
    layout = _pyproject_layout()
    if layout is not None:
        assert (layout[0], sorted(layout[1])) == (_LAYOUT[0], sorted(_LAYOUT[1])), \
            "pyproject's packages changed: update _LAYOUT in tests/test_imports.py"
    package_dir, packages = layout or _LAYOUT
    listed = {_package_dir(p, package_dir).resolve() for p in packages}
    for top in {ROOT / d for d in package_dir.values()}:
        for init in top.rglob("__init__.py"):
            assert init.parent.resolve() in listed, (
                f"{init.parent.relative_to(ROOT)} is a package directory but not in pyproject's "
                "[tool.setuptools] packages: an installed (non-editable) unlearn would lack it")
    assert len(MODULES) > 50 and "unlearn.tasks" in MODULES and "unlearn.evaluators.harness" in MODULES


# ---------------------------------------------------------------------------- (a) each module imports alone
def _module_level_imports(tree: ast.Module) -> set[str]:
    """Names of the non-``unlearn`` modules imported when the module runs (not inside functions)."""
    out: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in out if m != "__future__" and m.split(".")[0] != "unlearn"}


_FORK_IMPORTS = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    modules, preload = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for name in preload:  # third-party only: what every child would import anyway
        try:
            importlib.import_module(name)
        except Exception:
            pass  # the child that needs it reports the failure
    leaked = sorted(m for m in sys.modules if m == "unlearn" or m.startswith("unlearn."))
    if leaked:
        raise SystemExit(f"preloading third-party modules imported {leaked}")
    failures = {}
    for name in modules:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no unlearn module loaded yet
            os.close(r)
            code = 0
            try:
                importlib.import_module(name)
            except BaseException:
                with os.fdopen(w, "wb") as f:
                    f.write(traceback.format_exc().encode())
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failures[name] = out or f"child exited with status {status}"
    print(json.dumps(failures))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child per module")
def test_every_module_imports_in_a_fresh_process():
    preload: set[str] = set()
    for f in MODULES.values():
        preload |= _module_level_imports(ast.parse(f.read_text(), str(f)))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, json.dumps(sorted(MODULES)), json.dumps(sorted(preload))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "modules that do not import in a fresh process:\n\n" + "\n".join(
        f"== {name}\n{tb}" for name, tb in failures.items())


# ---------------------------------------------------------------------------- (b) no import cycle
def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line of the first import}}`` over every ``unlearn`` import
    anywhere in the module (function bodies included)."""

    def resolve(name: str) -> str | None:  # the module itself, else the nearest enclosing module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package the module is in
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t == "unlearn" or t.startswith("unlearn."):
                    r = resolve(t)
                    if r is not None and r != mod:
                        edges.setdefault(r, node.lineno)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    for root in sorted(graph):  # Tarjan, iterative
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    out = []
    for comp in comps:  # a shortest way back to the component's first module
        start, members = comp[0], set(comp)
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while path[-1] != start or len(path) == 1:
            path.append(prev[path[-1]])
        out.append(path[::-1])
    return out


def test_cycles_are_reported_as_paths():
    """The checker itself, on a made-up package: ``from pkg import mod`` is an edge to the module,
    ``from pkg.mod import name`` to ``pkg.mod``, relative and function-level imports count."""
    g = {"unlearn.a": {"unlearn.b": 1}, "unlearn.b": {"unlearn.c": 3}, "unlearn.c": {"unlearn.a": 9},
         "unlearn.d": {"unlearn.a": 1}}
    assert cycles(g) == [["unlearn.a", "unlearn.b", "unlearn.c", "unlearn.a"]]
    assert cycles({"unlearn.a": {"unlearn.b": 1}, "unlearn.b": {}}) == []


def test_import_graph_of_a_made_up_package(tmp_path):
    (tmp_path / "unlearn" / "sub").mkdir(parents=True)
    src = {
        "unlearn/__init__.py": "from unlearn import x\n",
        "unlearn/x.py": "def f():\n    from unlearn.sub import y\n",
        "unlearn/sub/__init__.py": "",
        "unlearn/sub/y.py": "from .z import thing\nimport unlearn.sub\n",
        "unlearn/sub/z.py": "from unlearn.x import f\nfrom unlearn import nothing_here\n",
    }
    for rel, text in src.items():
        (tmp_path / rel).write_text(text)
    mods = {"unlearn": tmp_path / "unlearn/__init__.py", "unlearn.x": tmp_path / "unlearn/x.py",
            "unlearn.sub": tmp_path / "unlearn/sub/__init__.py", "unlearn.sub.y": tmp_path / "unlearn/sub/y.py",
            "unlearn.sub.z": tmp_path / "unlearn/sub/z.py"}
    g = import_graph(mods)
    assert g == {"unlearn": {"unlearn.x": 1}, "unlearn.x": {"unlearn.sub.y": 2}, "unlearn.sub": {},
                 "unlearn.sub.y": {"unlearn.sub.z": 1, "unlearn.sub": 2},
                 "unlearn.sub.z": {"unlearn.x": 1, "unlearn": 2}}
    assert cycles(g) == [["unlearn", "unlearn.x", "unlearn.sub.y", "unlearn.sub.z", "unlearn"]]


def test_import_graph_has_no_cycle():
    graph = import_graph(MODULES)
    found = cycles(graph)
    lines = []
    for cyc in found:
        lines.append(" -> ".join(cyc))
        lines += [f"    {a} imports {b} ({MODULES[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cyc, cyc[1:])]
    assert not found, "import cycles among unlearn modules:\n" + "\n".join(lines)
