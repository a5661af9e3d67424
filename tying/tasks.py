"""Multi-task adapters (a spec with ``tasks: [...]``): routing the rows of a batch to their tasks, and one task's
plain adapter taken out of a multi-task one.

A multi-task adapter is applied like any other (:func:`tying.apply_`); its bank holds every factor once: a factor
tied along ``task`` once for all tasks, any other once per task (keys ending in ``#<task>``). A forward needs to
know each row's task:

    with tying.adapters(model, ["a", "c", "b", "a"]):   # one task per row, with gradients
        loss = model(**batch).loss
    with tying.adapters(model, "b"):                     # one task for the whole batch (any kind)

A factor shared by the rows' tasks is one dense product for the batch; a per-task factor is gathered per row, so
a shared factor receives the sum of its tasks' gradients. Row-by-row mixing needs a kind whose wrapper routes rows
(``SiteAdapter.routes_rows``: IA3, and the LoRA family on Linear-like modules); every kind takes one task per
batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .engine import bank_of, merged_task_of, wrappers
from .errors import AdapterFileError, NotMergeableError, ServingError
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


@contextmanager
def route(model: nn.Module, names: str | Sequence[str]) -> Iterator[None]:
    """Route the rows of every batch inside the block to their tasks (see the module docstring). Blocks nest."""
    if not isinstance(names, (str, Sequence)) or not names:
        raise ServingError(f"tying.adapters takes a task name, or a non-empty list with one task per row; got {names!r}")
    bank = bank_of(model)
    tasks = bank.spec.tasks
    if not tasks:
        raise ServingError("the model's adapter has no tasks, so it applies to every row: tying.adapters routes rows "
                           "of a multi-task adapter (a spec with tasks: [...]) or of adapters loaded with "
                           "tying.load_adapters_")
    if merged_task_of(model) is not None:
        raise NotMergeableError(f"the update of task {bank.merged_task!r} is merged into the base weights, so every "
                                "row gets it; call tying.unmerge_(model) before routing rows to tasks")
    count = None if isinstance(names, str) else len(names)  # a list names each row: the batch must match it
    if isinstance(names, str):
        names = [names]
    elif not isinstance(names, Sequence) or not names:
        raise ServingError(f"tying.adapters takes a task name, or a non-empty list with one task per row; got {names!r}")
    for i, n in enumerate(names):
        if n not in tasks:
            raise ServingError(f"row {i} names {n!r}, which is not a task of the adapter; tasks: {', '.join(tasks)}")
    names = list(names)
    task, rows = (names[0], None) if len(set(names)) == 1 else (None, torch.tensor([tasks.index(n) for n in names]))
    if rows is not None:
        odd = [n for n, w in wrappers(model) if not w.routes_rows()]
        if odd:
            raise ServingError(f"module {odd[0]!r} ({len(odd)} in all) cannot mix tasks row by row (a "
                               f"{bank.spec.adapter.kind} adapter on a {dict(wrappers(model))[odd[0]].mtype.name}: "
                               "the kind does not route rows there, see its routes_rows()); give one task per batch")
    before = bank.task, bank.rows, bank.row_count
    bank.task, bank.rows, bank.row_count = task, rows, count

    def check(module, args, kwargs):  # before the forward pass: nothing has run yet
        n = batch_rows(args, kwargs)
        if bank.row_count is not None and n is not None and n != bank.row_count:
            raise ServingError(f"the batch has {n} rows but tying.adapters was given {bank.row_count} task names; "
                               "give one name per row (with num_beams=k or num_return_sequences=k, repeat each name "
                               "k times), or one name for the whole batch")

    hook = model.register_forward_pre_hook(check, with_kwargs=True) if before == (None, None, None) else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        bank.task, bank.rows, bank.row_count = before


def batch_rows(args: tuple, kwargs: dict) -> int | None:
    """The number of rows of a model call's batch (input_ids, inputs_embeds or the first argument), if it shows."""
    for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(t, torch.Tensor) and t.ndim >= 2:
            return t.shape[0]
    return None
