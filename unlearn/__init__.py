"""unlearn: make trained models forget, and measure how well they forgot and what else broke."""

from unlearn._version import __version__


def run(recipe, overrides=(), **kwargs):
    """Run a recipe (a path, a dict or a :class:`~unlearn.recipe.Recipe`); returns a RunResult.

    Same as ``unlearn run RECIPE --set key=value ...`` on the command line.
    """
    # lazy: keeps `import unlearn` free of torch/transformers (the runner imports them)
    from unlearn.runner import run as _run

    return _run(recipe, overrides=overrides, **kwargs)


def evaluate(source, task=None, *, recipe=None, overrides=(), output=None, progress=True):
    """Evaluate a model (a zoo name, a directory such as a run's ``checkpoint/``, or a hub id) on
    a task's suite without unlearning it; returns an EvalResult.

    Same as ``unlearn eval SOURCE [--task T] [--recipe FILE] [--set key=value ...] [--out DIR]``;
    see :func:`unlearn.evaluation.evaluate`.
    """
    # lazy: keeps `import unlearn` free of torch/transformers (the evaluation module imports them)
    from unlearn.evaluation import evaluate as _evaluate

    return _evaluate(source, task, recipe=recipe, overrides=overrides, output=output, progress=progress)


def load_recipe(src, overrides=()):
    """Load and validate a recipe; see :func:`unlearn.recipe.load_recipe`."""
    # lazy: keeps `import unlearn` free of torch/transformers (the recipe module imports them)
    from unlearn.recipe import load_recipe as _load

    return _load(src, overrides)
