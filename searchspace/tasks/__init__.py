"""Tasks by name: each a ``Task`` (``searchspace.tasks.task``), defined in a module of its own."""
from __future__ import annotations

from core.errors import BadInput
from searchspace.tasks import deepfake, digits, imagefolder, paddy
from searchspace.tasks.task import Task

TASKS: dict[str, Task] = {t.name: t for t in (digits.TASK, paddy.TASK, deepfake.TASK, imagefolder.TASK)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise BadInput(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
