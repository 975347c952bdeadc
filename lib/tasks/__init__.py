"""Tasks the engine trains and evaluates, by name: ``cls`` (classification), ``seg`` (segmentation), ``lm``
(language modelling)."""
from __future__ import annotations

from typing import Any

from deqlab.errors import ConfigError
from deqlab.tasks.base import Meter, Task
from deqlab.tasks.classification import ClassificationTask
from deqlab.tasks.language_model import LanguageModelTask
from deqlab.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {"cls": ClassificationTask, "seg": SegmentationTask, "lm": LanguageModelTask}

__all__ = ["Meter", "Task", "TASKS", "get_task", "register_task"]


def register_task(name: str, task: type[Task]) -> None:
    TASKS[name] = task


def get_task(name: str, cfg: Any, full_test: bool = False) -> Task:
    """The task called ``name``, configured by ``cfg`` (``full_test``: the test tool's full procedure)."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](cfg, full_test=full_test)
