"""Multi-task adapters (a spec with ``tasks: [...]``) in files: one task's plain adapter taken out of a multi-task one.

A multi-task adapter is applied like any other (:func:`tying.apply_`); its bank holds every factor once: a factor
tied along ``task`` once for all tasks, any other once per task (keys ending in ``#<task>``). Routing each row of a
batch to its task is :func:`tying.adapters` (:mod:`tying.route`).
"""

from __future__ import annotations

import torch

from .errors import AdapterFileError
from .planner import Plan
from .spec import TyingSpec


def check_task(spec: TyingSpec, task: str, where: str) -> None:
    """``task`` is one of the spec's tasks; a clear error naming them otherwise."""
    if not spec.tasks:
        raise AdapterFileError(f"{where} holds a single-task adapter; leave out task=")
    if task not in spec.tasks:
        raise AdapterFileError(f"{where} has no task {task!r}; its tasks: {', '.join(spec.tasks)}")


def file_keys(spec: TyingSpec, p: Plan, task: str, keys) -> dict[str, str]:
    """Each key of ``task``'s plain adapter (``keys``, planned as ``p`` from ``spec.single_task()``) -> its key in the
    multi-task adapter ``spec``'s file; the train_modules' keys (shared by every task) are the same in both."""
    factors = {f"{g.factor}.{g.key}": f"{g.factor}.{g.key}{spec.task_suffix(g.factor, task)}" for g in p.groups}
    return {k: factors.get(k, k) for k in keys}


def multi_want(spec: TyingSpec, p: Plan, want: dict) -> dict:
    """What the multi-task adapter ``spec``'s file must hold, from ``want`` (key -> shape, dtype) of its plain
    adapter's plan ``p``: every task's keys."""
    return {multi: want[single] for t in spec.tasks for single, multi in file_keys(spec, p, t, want).items()}


def task_tensors(spec: TyingSpec, p: Plan, tensors: dict[str, torch.Tensor], task: str, keys) -> dict[str, torch.Tensor]:
    """The tensors of ``task``'s plain adapter (its ``keys``, planned as ``p``) out of the multi-task adapter's
    checked ``tensors``; a factor shared by every task is the very same tensor in each."""
    return {single: tensors[multi] for single, multi in file_keys(spec, p, task, keys).items()}
