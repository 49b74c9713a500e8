"""Small local lm-eval tasks built from the synthetic world -- a utility metric with no hub.

:func:`write_tasks` writes JSONL data and lm-evaluation-harness task YAMLs into a folder:

* ``unlearn_world_facts_mc`` -- multiple choice over ``world.world_facts`` (fictional
  countries' capitals, currencies, rivers, continents): the true answer sentence and its 3
  perturbed sentences; metrics ``acc`` and ``acc_norm``.
* ``unlearn_real_authors_mc`` -- the same over ``world.real_authors`` ("Who wrote ...?").
* ``unlearn_retain_qa`` -- greedy generation on ``world.split("retain_eval")`` (QA about
  authors that no forget split contains), stopping at a newline; metrics ``exact_match``
  (stripped string equality) and ``rougeL_recall`` (``rouge_score``, stemmer on, as the
  toolkit's ROUGE), computed offline by :func:`process_retain_qa`.
* group ``unlearn_utility`` -- the three tasks.

Prompts use the toolkit format ``"Question: {question}\\nAnswer:"``; multiple-choice options are
``" " + answer sentence`` (the space belongs to the continuation, ``target_delimiter: ""``),
which is exactly what ``TextAdapter`` scores in ``"split"`` tokenisation. Options are shuffled
with a fixed per-item seed, so that a model that scores all options alike is not always right.

:func:`run_lm_eval` runs them (or any task in the folder) through ``lm_eval.simple_evaluate``
with a ``TaskManager`` that indexes only that folder (the default index of built-in tasks
costs ~13 s), on a toolkit adapter, an ``lm_eval`` ``LM``, or a model source string.
"""

from __future__ import annotations

import json
import random
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from unlearn.tasks.tofu_world import WorldConfig, build_world

TASKS = ("unlearn_world_facts_mc", "unlearn_real_authors_mc", "unlearn_retain_qa")
GROUP = "unlearn_utility"
DEFAULT_PROMPT = "Question: {question}\nAnswer:"
RETAIN_QA_MAX_GEN_TOKS = 48


def _mc_rows(items: list[dict], name: str) -> list[dict]:
    rows = []
    for i, it in enumerate(items):
        options = [it["answer"], *it["perturbed_answer"]]
        order = list(range(len(options)))
        random.Random(f"{name}-{i}").shuffle(order)
        rows.append({
            "id": i,
            "question": it["question"],
            "choices": [" " + options[j].strip() for j in order],
            "gold": order.index(0),
            "answer": it["answer"].strip(),
            "value": it.get("value"),
        })
    return rows


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings written double-quoted (``"...\\n..."``), not folded."""


def _str_rep(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)


_Dumper.add_representer(str, _str_rep)


def _dump(cfg: dict) -> str:
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _base_config(task: str, data_file: Path, doc_to_text: str) -> dict[str, Any]:
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "doc_to_text": doc_to_text,
    }


def write_tasks(out_dir: str | Path, world=None, *, prompt_template: str = DEFAULT_PROMPT) -> Path:
    """Write the JSONL data and task YAMLs of the ``unlearn_*`` tasks into ``out_dir``.

    Args:
        out_dir: folder to write (created); pass it as ``include_path`` to lm-eval.
        world: a ``World`` from ``unlearn.tasks.tofu_world.build_world``; default: the
            default world (``WorldConfig()``, the one the tiny zoo is trained on).
        prompt_template: ``str.format`` template with a ``{question}`` field (the
            toolkit's default ``"Question: {question}\\nAnswer:"``).
    Returns:
        ``out_dir`` as an absolute ``Path``.
    """
    if "{question}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{question}}', got {prompt_template!r}")
    if world is None:
        world = build_world(WorldConfig())
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    doc_to_text = prompt_template.format(question="{{question}}")  # jinja, as lm-eval expects
    mc_metrics = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                  {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]

    for task, items, what in (("unlearn_world_facts_mc", world.world_facts, "world facts"),
                              ("unlearn_real_authors_mc", world.real_authors, "real authors")):
        data = out / f"{task}.jsonl"
        _write_jsonl(data, _mc_rows(list(items), task))
        cfg = _base_config(task, data, doc_to_text)
        cfg.update({
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",  # a field: " " + sentence per option
            "doc_to_target": "gold",  # a field: index of the true option
            "target_delimiter": "",  # the leading space is part of each option
            "metric_list": mc_metrics,
            "metadata": {"version": 1.0, "description": f"unlearn synthetic world: {what} (multiple choice)"},
        })
        (out / f"{task}.yaml").write_text(_dump(cfg))

    task = "unlearn_retain_qa"
    data = out / f"{task}.jsonl"
    rows = [{"id": i, "question": q["question"], "answer": q["answer"].strip(),
             "author": q.get("author"), "attribute": q.get("attribute")}
            for i, q in enumerate(world.split("retain_eval"))]
    _write_jsonl(data, rows)
    cfg = _base_config(task, data, doc_to_text)
    cfg.update({
        "output_type": "generate_until",
        "doc_to_target": "{{answer}}",
        "target_delimiter": " ",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": RETAIN_QA_MAX_GEN_TOKS, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "rougeL_recall", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "description": "unlearn synthetic world: retain-author QA (greedy generation)"},
    })
    text = _dump(cfg)
    # a custom tag yaml.safe_dump cannot write: resolved by lm-eval by importing this module
    text += "process_results: !function unlearn.lm_eval_tasks.process_retain_qa\n"
    (out / f"{task}.yaml").write_text(text)

    # the group's one number: multiple-choice accuracy over both MC tasks, weighted by size
    # (lm-eval warns that unlearn_retain_qa has no ``acc``; that is expected)
    group = {"group": GROUP, "task": list(TASKS),
             "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
             "metadata": {"version": 1.0}}
    (out / f"{GROUP}.yaml").write_text(_dump(group))
    return out


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # lazy: pulls in nltk

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def process_retain_qa(doc: dict, results: list[str]) -> dict[str, float]:
    """Per-document metrics of ``unlearn_retain_qa``: exact match of the stripped greedy
    answer, and ROUGE-L recall of it against the reference answer (as the toolkit's ROUGE)."""
    pred = (results[0] if results else "").strip()
    ref = doc["answer"].strip()
    return {"exact_match": float(pred == ref),
            "rougeL_recall": float(_rouge_scorer().score(ref, pred)["rougeL"].recall)}


def _simplify(results: dict[str, dict], n_samples: dict[str, dict]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in results.items():
        row: dict[str, Any] = {}
        for key, v in metrics.items():
            if key in ("alias", "name", "sample_len"):
                continue
            name, _, filt = key.partition(",")
            row[name if filt in ("", "none") else f"{name},{filt}"] = v
        if task in n_samples:
            row["n"] = n_samples[task].get("effective")
        out[task] = row
    return out


def run_lm_eval(adapter_or_lm, tasks=TASKS, limit: int | float | None = None, batch_size: int = 16, *,
                world=None, tasks_dir: str | Path | None = None, num_fewshot: int | None = None,
                full: bool = False, **evaluate_kwargs) -> dict:
    """Run local ``unlearn_*`` lm-eval tasks on a model; no hub, no built-in task index.

    Args:
        adapter_or_lm: a ``TextAdapter`` (or anything ``UnlearnLM`` wraps), an
            ``lm_eval.api.model.LM`` (e.g. ``HFLM``), or a model source string
            (``"zoo:tiny-llama/target"``, a saved directory).
        tasks: task or group names (``TASKS``, ``"unlearn_utility"``), or other tasks
            defined in ``tasks_dir``.
        limit: documents per task (an int, or a fraction < 1), as lm-eval's ``limit``.
        batch_size: requests per forward pass when the model is wrapped here.
        world: the world to build the tasks from (default: the default world); ignored
            when ``tasks_dir`` is given.
        tasks_dir: an existing folder of task YAMLs (from :func:`write_tasks`); default:
            write the tasks to a temporary folder for this call.
        num_fewshot: as lm-eval's (default: the tasks' own, zero-shot).
        full: return lm-eval's whole output instead of the short form.
        **evaluate_kwargs: passed on to ``lm_eval.simple_evaluate``.
    Returns:
        ``{task: {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "n": docs}, ...}`` (metric
        names without lm-eval's ``",none"`` filter suffix; the generation task reports
        ``exact_match`` and ``rougeL_recall``; a group, its aggregate if any), or with
        ``full=True`` the ``simple_evaluate`` dict (``results``, ``configs``, ``n-samples``...).
    """
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    # lazy: the bridge imports lm-eval and torch; writing the task YAMLs needs neither
    from unlearn.lm_eval_bridge import UnlearnLM

    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if isinstance(adapter_or_lm, LM):
        lm = adapter_or_lm
    elif isinstance(adapter_or_lm, str):
        lm = UnlearnLM(source=adapter_or_lm, batch_size=batch_size)
    else:
        lm = UnlearnLM(adapter_or_lm, batch_size=batch_size)

    tmp = None
    if tasks_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="unlearn_lm_eval_")
        tasks_dir = write_tasks(tmp.name, world)
    try:
        tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        missing = [t for t in tasks if t not in tm.all_tasks]
        if missing:
            raise ValueError(f"unknown lm-eval task(s) {missing} in {tasks_dir}; available: {sorted(tm.all_tasks)}")
        evaluate_kwargs.setdefault("log_samples", False)
        evaluate_kwargs.setdefault("verbosity", "WARNING")
        out = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                              task_manager=tm, **evaluate_kwargs)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if full:
        return out
    return _simplify(out["results"], out.get("n-samples", {}))


__all__ = ["TASKS", "GROUP", "write_tasks", "run_lm_eval", "process_retain_qa"]


if __name__ == "__main__":  # python -m unlearn.lm_eval_tasks DIR  -> writes the tasks into DIR
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m unlearn.lm_eval_tasks OUT_DIR")
    print(write_tasks(sys.argv[1]))
