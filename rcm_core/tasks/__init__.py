"""The registry of built-in tasks: what a distillation job of each kind needs, in one module per task.

A task is a `Task` subclass in rcm_core/tasks/<name>.py, registered with `@register` (rcm_core.tasks.base):
its datasets, its preset (the defaults a job spec starts from), its built-in teacher (trained once per config
and cached by a content key, or shipped with the package), how to load a teacher file, its data source, its
evaluation (periodic and final report, one code path for the CLI and the Ray worker) and the network config
an export records. Adding a task or a teacher family = one new module + its import below.
"""

from rcm_core.tasks import diffusers, shapes, toy2d  # noqa: F401  (importing a task module registers it)
from rcm_core.tasks.base import (
    TASKS,
    Task,
    content_key,
    eval_seed,
    final_report,
    get_task,
    periodic_metrics,
    register,
    student_info,
    student_metrics,
    task_for_dataset,
)

__all__ = [
    "TASKS",
    "Task",
    "content_key",
    "eval_seed",
    "final_report",
    "get_task",
    "periodic_metrics",
    "register",
    "student_info",
    "student_metrics",
    "task_for_dataset",
]
