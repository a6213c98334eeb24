"""Tasks by name. Each module has METRIC, BUDGET, ARCHS, define_search_space and load."""
from __future__ import annotations

from types import ModuleType

from searchspace.tasks import deepfake, digits, imagefolder, paddy
from trainer.errors import BadInput

TASKS: dict[str, ModuleType] = {
    "digits": digits,
    "paddy": paddy,
    "deepfake": deepfake,
    "imagefolder": imagefolder,
}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise BadInput(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
