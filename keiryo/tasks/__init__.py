"""Tasks: what "good" means for a model, as a registry.

A task defines the metrics on labels, the fidelity of a candidate's outputs to the fp32
model's, and the losses every training pass uses (fine-tuning, distillation, QAT).
Registered by name (``classification``, ``multilabel``, ``regression``, ``embedding``,
``sequence-classification``, ``token-classification``, ``outputs``); a user's own is
``--task module:Class`` (a :class:`Task` subclass). ``auto`` picks one from the data's
targets and the model's output.
"""

from __future__ import annotations

from typing import Any

from keiryo._registry import Registry
from keiryo.errors import ConfigError
from keiryo.tasks.base import Task

__all__ = ["TASKS", "Task", "get_task", "infer_task", "register_task", "task_names"]

TASKS: Registry[type[Task]] = Registry("task")


def register_task(name: str) -> Any:
    def deco(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS.add(name, cls)
        return cls

    return deco


def _load_builtin() -> None:
    from keiryo.tasks import classification, embedding, multilabel, outputs, regression  # noqa: F401


def task_names() -> list[str]:
    _load_builtin()
    return TASKS.names()


def get_task(ref: str | Task, **options: Any) -> Task:
    """A task by registered name or ``module:Class``, built with ``options``."""
    if isinstance(ref, Task):
        return ref
    _load_builtin()
    if ":" in ref:
        from keiryo._imports import resolve_callable

        cls = resolve_callable(ref, "task")
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(f"task {ref!r}: expected a subclass of keiryo.tasks.Task, got {cls!r}")
        if not getattr(cls, "name", ""):
            cls.name = ref
    else:
        cls = TASKS.get(ref)
    task = cls(**options)
    task.ref, task.options = ref, dict(options)
    return task


def infer_task(data: Any) -> str:
    """classification for integer labels, regression for numeric targets, outputs when there are none."""
    target = getattr(data, "target", None)
    if target is None:
        return "outputs"
    tokens = any(t.dtype in ("int64", "int32") and len(t.shape) == 2 for t in data.inputs)
    if target.is_integer and target.shape == ():
        return "sequence-classification" if tokens else "classification"
    if target.is_integer and len(target.shape) == 1 and tokens:
        return "token-classification" if target.shape == tuple(data.inputs[0].shape[1:]) else "multilabel"
    return "regression"
