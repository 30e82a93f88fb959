"""The benchmark tasks of ``steer eval``: one module per benchmark (data discovery, samples, scoring hook)."""

from steer.evals.tasks.base import Sample, Task
from steer.evals.tasks.chair import ChairTask, chair_task
from steer.evals.tasks.pope import PopeTask, pope_task

__all__ = ["ChairTask", "PopeTask", "Sample", "Task", "chair_task", "pope_task"]
