"""``python -m unlearn.lm_eval_cli ...``: lm-eval's command line, with the ``unlearn`` model.

lm-evaluation-harness 0.4.x finds models only in its own registry: it imports
``lm_eval.models`` (a fixed name -> "module:Class" table) and nothing else -- no entry
points, no plugin discovery, no ``module:Class`` model names. A model registered by a
third-party package (``@register_model("unlearn")`` in :mod:`unlearn.lm_eval_bridge`) is
therefore unknown to the ``lm_eval`` / ``lm-eval`` executables. This wrapper imports the
bridge (which registers ``"unlearn"``) and then runs lm-eval's own CLI with the same
arguments, so every lm-eval option works unchanged::

    python -m unlearn.lm_eval_cli --model unlearn \\
        --model_args source=zoo:tiny-llama/target,tokenization=split \\
        --tasks unlearn_world_facts_mc --include_path DIR --device cpu --batch_size 16

One extra option, removed before lm-eval parses the rest:

``--no_default_tasks``
    index only ``--include_path`` (``TaskManager(include_defaults=False)``), not lm-eval's
    thousands of built-in task YAMLs (~13 s on a small CPU machine). Use it when every
    task is local.
"""

from __future__ import annotations

import sys


def _local_tasks_only() -> None:
    """Make the CLI's ``TaskManager`` skip lm-eval's built-in task index."""
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager
    if getattr(base, "_unlearn_local_only", False):
        return

    class LocalTaskManager(base):  # type: ignore[misc, valid-type]
        _unlearn_local_only = True

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("include_defaults", False)
            super().__init__(*args, **kwargs)

    lm_eval.tasks.TaskManager = LocalTaskManager  # read at call time by the CLI's config


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI (``lm_eval.__main__.cli_evaluate``) with ``unlearn`` registered."""
    # lazy: the bridge imports lm-eval and torch; load them only when the CLI runs
    import unlearn.lm_eval_bridge  # noqa: F401  -- registers the "unlearn" model

    args = list(sys.argv[1:] if argv is None else argv)
    if "--no_default_tasks" in args:
        args = [a for a in args if a != "--no_default_tasks"]
        _local_tasks_only()
    from lm_eval.__main__ import cli_evaluate

    # lm-eval's parser reads sys.argv itself (and inserts the "run" subcommand when missing)
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
