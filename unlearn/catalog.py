"""What this installation offers, read from the registries: ``unlearn list [what] [--json]``.

Every section is built from the registry that recipes are checked against, at the time of the
call, so a method, attack, probe or task registered by a plugin or a test shows up like a
built-in one:

| section | registry |
| --- | --- |
| ``methods`` | ``OBJECTIVES`` (``unlearn/objectives``) and ``EDITORS`` (``unlearn/editors``) |
| ``selections`` | ``SELECTIONS`` (``unlearn/selection.py``) |
| ``suites`` | ``SUITES`` (``evaluators/suites.py``) and the suites tasks build themselves (``Task.suite_versions``) |
| ``attacks`` | ``ATTACKS`` and ``ATTACK_SETS`` (``evaluators/attacks.py``) |
| ``probes`` | ``PROBES`` (``unlearn/probes``) |
| ``tasks`` | ``TASKS`` (``tasks/registry.py``) |
| ``zoo`` | ``unlearn.zoo.FAMILIES`` (what ``unlearn zoo list`` shows) |
"""

from __future__ import annotations

from typing import Any

from unlearn import zoo
from unlearn.editors import EDITORS
from unlearn.evaluators.attacks import ATTACK_SETS, ATTACKS, attack_names
from unlearn.evaluators.suites import SUITES
from unlearn.objectives import OBJECTIVES
from unlearn.probes import PROBES
from unlearn.recipe import method_modalities
from unlearn.registry import did_you_mean
from unlearn.selection import SELECTIONS
from unlearn.tasks.registry import TASKS

SECTIONS = ("methods", "selections", "suites", "attacks", "probes", "tasks", "zoo")


def _doc(obj: Any) -> str:
    """The first paragraph of ``obj``'s own docstring on one line ("" if it has none)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    para = (doc or "").strip().split("\n\n")[0]
    return " ".join(ln.strip() for ln in para.splitlines()).replace("``", "")


def methods() -> list[dict[str, Any]]:
    """Objectives, then editors, each by name: kind, modalities, paper."""
    out = []
    for kind, reg in (("objective", OBJECTIVES), ("editor", EDITORS)):
        for name in reg.names():
            cls = reg.get(name)
            out.append({"name": name, "kind": kind, "modalities": list(method_modalities(cls)),
                        "paper": getattr(cls, "paper", "") or None})
    return out


def selections() -> list[dict[str, Any]]:
    return [{"name": name} for name in SELECTIONS]


def _tasks_with_suite(suite: str) -> list[str]:
    return [n for n in TASKS.names() if suite in TASKS.get(n).suites]


def suites() -> list[dict[str, Any]]:
    """The registered suites (as recipes name them in ``eval.suite``) with their version, then
    those a task builds itself."""
    out = []
    for key in SUITES.names():
        s = SUITES.get(key)()
        out.append({"name": s.name, "version": s.version, "description": s.description,
                    "tasks": _tasks_with_suite(s.name)})
    known = {e["name"] for e in out}
    for tname in TASKS.names():
        cls = TASKS.get(tname)
        for sname in cls.suites:
            if sname not in known:
                known.add(sname)
                out.append({"name": sname, "version": cls.suite_versions.get(sname),
                            "description": f"built by task {tname!r}", "tasks": _tasks_with_suite(sname)})
    return out


def attacks() -> list[dict[str, Any]]:
    """Every attack (registration order) and every attack set, with the modalities it applies to."""
    out = []
    for name in attack_names():
        cls = ATTACKS.get(name)
        out.append({"name": name, "kind": "attack", "modalities": list(cls.modalities),
                    "paper": getattr(cls, "paper", "") or None})
    for name, members in ATTACK_SETS.items():
        out.append({"name": name, "kind": "set", "modalities": list(members),
                    "members": {m: list(v) for m, v in members.items()}})
    return out


def probes() -> list[dict[str, Any]]:
    with_probes = [n for n in TASKS.names() if TASKS.get(n).has_probes]
    return [{"name": name, "version": getattr(PROBES.get(name), "version", None),
             "paper": getattr(PROBES.get(name), "paper", "") or None, "tasks": with_probes}
            for name in PROBES.names()]


def tasks() -> list[dict[str, Any]]:
    return [{"name": name, "modality": TASKS.get(name).modality, "suites": list(TASKS.get(name).suites),
             "description": _doc(TASKS.get(name))} for name in TASKS.names()]


def zoo_models() -> list[dict[str, Any]]:
    return [{**e, "description": zoo.FAMILIES[e["family"]]["description"]} for e in zoo.entries()]


_BUILDERS = {"methods": methods, "selections": selections, "suites": suites, "attacks": attacks, "probes": probes,
             "tasks": tasks, "zoo": zoo_models}


def check_section(what: str | None) -> None:
    if what is not None and what not in SECTIONS:
        raise ValueError(f"unknown section {what!r} for unlearn list; sections: {', '.join(SECTIONS)}"
                         + did_you_mean(what, SECTIONS))


def catalog(what: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """``{section: [entry, ...]}`` for one section (``what``) or all of them."""
    check_section(what)
    return {s: _BUILDERS[s]() for s in SECTIONS if what in (None, s)}


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows]


def _mods(entry: dict[str, Any]) -> str:
    return ",".join(entry["modalities"])


def section_lines(section: str, entries: list[dict[str, Any]]) -> list[str]:
    """The text ``unlearn list`` prints for one section."""
    if section == "zoo":
        return ["zoo:", *("  " + ln for ln in zoo.listing_lines())]
    if not entries:
        return [f"{section}: (none)"]
    if section == "methods":
        rows = [[e["name"], e["kind"], _mods(e), e["paper"] or ""] for e in entries]
    elif section == "selections":
        return [f"{section}:", "  " + ", ".join(e["name"] for e in entries)]
    elif section == "suites":
        rows = [[e["name"], f"v{e['version']}" if e["version"] is not None else "v?",
                 f"tasks: {', '.join(e['tasks']) or '-'}", e["description"]] for e in entries]
    elif section == "attacks":
        rows = [[e["name"], _mods(e), e["paper"] or ""] for e in entries if e["kind"] == "attack"]
        rows += [[e["name"], _mods(e), "set: " + "; ".join(f"{m}: {', '.join(v)}" for m, v in e["members"].items())]
                 for e in entries if e["kind"] == "set"]
    elif section == "probes":
        rows = [[e["name"], f"v{e['version']}", e["paper"] or ""] for e in entries]
    else:  # tasks
        rows = [[e["name"], e["modality"], f"suites: {', '.join(e['suites'])}", e["description"]] for e in entries]
    return [f"{section}:", *_table(rows)]


def catalog_lines(cat: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The text of :func:`catalog`'s sections, a blank line between them."""
    lines: list[str] = []
    for section, entries in cat.items():
        if lines:
            lines.append("")
        lines += section_lines(section, entries)
    return lines


__all__ = ["SECTIONS", "catalog", "catalog_lines", "check_section", "section_lines"]
