"""The task registry: ``task.name`` of a recipe -> its :class:`~unlearn.task.Task` class.

Every task is registered here explicitly. A new benchmark adds one line (or registers its
class at run time: ``TASKS.register("my_task", MyTask)``, as ``tests/test_task_contract.py``
does with a toy task).
"""

from __future__ import annotations

from unlearn.registry import Registry
from unlearn.tasks.passages_task import MuseTask, RwkuTask
from unlearn.tasks.tofu_task import TofuFilesTask, TofuTask
from unlearn.tasks.visual import VisualTask

TASKS = Registry("task")
for _cls in (TofuTask, TofuFilesTask, VisualTask, RwkuTask, MuseTask):
    TASKS.register(_cls.name, _cls)


def get_task(name: str):
    """The Task class registered as ``name`` (a ValueError lists the known names otherwise)."""
    return TASKS.get(name)


__all__ = ["TASKS", "get_task"]
