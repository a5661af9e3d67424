"""What is merged: ``merge_`` and ``unmerge_``'s work (every site checked first, then each folds its update into
its base weight or takes it out), which task a multi-task adapter has merged, and the merge record in the model's
state_dict (:class:`~tying.bank.MergeRecord`): written by a state_dict hook, read back by the load hooks, so that a
checkpoint of merged weights loads merged and the update is never added twice. The engine registers the hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from . import meta, route, sharded
from .bank import _ONLY, FactorBank, MergeRecord, bank_of, banks, named_base_parameters, wrappers
from .errors import NotMergeableError, TyingError


def _record_merge(name, model, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook of an adapted root: the merge record (:class:`~tying.bank.MergeRecord`). Merged sites'
    base weights hold the update; the record says which and whose, so that loading the checkpoint into an adapted
    model marks them merged instead of adding the update twice."""
    bank = banks(model).get(name)
    if bank is None:
        return
    flags = tuple(w.merged for _, w in wrappers(model, bank))
    device = next(iter(bank.parameters())).device  # where the model is: its state_dict's tensors all are there
    state_dict.update(MergeRecord(flags, bank.state.merged_task).tensors(prefix + bank.path, device))


def _read_merge_record(name, model, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of an adapted root: each site whose base weight the checkpoint holds will be
    merged exactly when the checkpoint says so (a plain checkpoint holds unmerged weights)."""
    bank = banks(model).get(name)
    if bank is None:
        return
    record = MergeRecord.read(state_dict, prefix + bank.path, pop=True) or MergeRecord()
    names = [n for n, _ in wrappers(model, bank)]
    flags = record.flags if len(record.flags) == len(names) else [False] * len(names)  # another adapter's
    # record (or none): its weights cannot be told apart; unmerged
    bank.state.pending = {n: f for n, f in zip(names, flags)
                          if any(prefix + n + k in state_dict for k in (".weight", ".base.weight"))}
    bank.state.pending_task = record.task if record.task in (bank.spec.tasks or ()) else None  # unknown: refused


def _accept_plain_checkpoint(name, model, incompatible) -> None:
    """load_state_dict post-hook of an adapted root: a checkpoint without any factor (a plain base checkpoint)
    loads with the factors kept as they are and not reported missing; one with only some factors reports
    the others. (A missing base key stays torch's own error.)"""
    bank = banks(model).get(name)
    if bank is None:
        return
    state, found = bank.state, dict(wrappers(model, bank))
    for site, merged in state.pending.items():  # the load succeeded: the record holds
        found[site].merged = merged
    if state.pending:
        state.merged = any(w.merged for w in found.values())
        state.merged_task = state.pending_task if state.merged else None
        state.merged_unknown = bool(bank.spec.tasks) and state.merged and state.merged_task is None
    state.pending, state.pending_task = {}, None
    ours = {k for k in incompatible.missing_keys if k.startswith(bank.path + ".") or f".{bank.path}." in k}
    if bank.state.unset is not None:  # applied on meta: what the checkpoint did not hold takes its initial value
        local = {k.partition(f"{bank.path}.")[2] for k in ours}
        meta.settle(model, bank, set(bank.state_dict(keep_vars=True)) - local)
    if len(ours) == len(bank.state_dict()):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in ours]


def merged_task_of(model: nn.Module, name: str | None = _ONLY) -> str | None:  # type: ignore[assignment]
    """The task whose update is merged into the base weights (None: no task merged). Sites loaded merged from a
    checkpoint that does not say which task's update they hold are a clear error, never a guess."""
    bank = bank_of(model, name)
    if bank.state.merged_unknown:  # set by a load (_accept_plain_checkpoint), the one way to get there
        raise NotMergeableError(
            "the base weights hold a merged task update, but the checkpoint they were loaded from does not say which "
            f"task's (tasks: {', '.join(map(repr, bank.spec.tasks))}), so it can be neither taken out nor routed "
            "around; load base weights saved unmerged (or saved by this version of tying, which records the task)")
    return bank.state.merged_task


def _merge_task(model: nn.Module, bank: FactorBank, sign: int, task: str | None) -> str | None:
    """The task whose update merge_ (sign 1) folds in or unmerge_ takes out; None for a single-task adapter."""
    tasks = bank.spec.tasks
    if not tasks:
        if task is not None:
            raise TyingError(f"task={task!r}: the adapter has no tasks; merge it without task=")
        return None
    merged = merged_task_of(model, bank.name)
    if sign < 0 and merged is None:
        return None  # nothing merged: nothing to take out
    if sign < 0:
        if task not in (None, merged):
            raise NotMergeableError(f"the update of task {merged!r} is merged, not {task!r}; "
                                    "tying.unmerge_(model) takes it out")
        return merged
    if merged is not None:
        if task in (None, merged):
            return merged  # merged already: nothing to do
        raise NotMergeableError(f"task {merged!r} is merged already; tying.unmerge_(model) first, then "
                                f"merge task {task!r}")
    if task not in tasks:
        what = "which task's update to fold in: pass task=" if task is None else f"unknown task {task!r}; tasks:"
        raise NotMergeableError(f"a multi-task adapter merges one task at a time; say {what} "
                                f"{', '.join(map(repr, tasks))} (tying.merge_(model, task={tasks[0]!r}))")
    return task


def _merge_all(model: nn.Module, bank: FactorBank, sign: int, dequantize: bool = False, task: str | None = None,
               safe: bool = False) -> None:
    """merge_ / unmerge_: every site is checked first, so a refusal changes no weight."""
    if route.is_routed(bank):
        raise NotMergeableError("merge_/unmerge_ inside a tying.adapters block: leave the block first")
    task = _merge_task(model, bank, sign, task)
    facts = bank.spec.adapter.facts
    todo = [(name, w) for name, w in wrappers(model, bank) if w.merged != (sign > 0)]
    if todo:
        meta.check(bank, "merge_" if sign > 0 else "unmerge_")
    if todo and sharded.is_sharded(model, bank):
        raise NotMergeableError("the model is sharded (FSDP2 or tensor parallelism): merging would edit sharded base "
                                "weights with collectives in between, and is not supported there; nothing was merged. "
                                "Keep the adapter unmerged, or merge on a model that is not sharded (save_adapter, "
                                "then load_adapter into it)")
    for name, w in todo:
        if not facts.mergeable:
            raise NotMergeableError(f"module {name!r}: {w.no_merge}")
        try:
            w.check_merge(sign, dequantize)
        except NotMergeableError as e:
            raise NotMergeableError(f"module {name!r}: {e}") from None
    owners: dict[int, list[str]] = {}  # parameter -> every name it has in the model (tied weights: several)
    for pname, q in named_base_parameters(model):
        owners.setdefault(id(q), []).append(pname)
    for name, w in todo:
        weight = getattr(w, "weight", None)
        others = [o for o in owners.get(id(weight), []) if not o.startswith(f"{name}.")]
        if others:
            raise NotMergeableError(
                f"module {name!r} shares its weight with {others[:3]} (tied weights, e.g. input embeddings and "
                "lm_head): merging would change them too. Keep the adapter unmerged, or untie the weights first")
    with route.routed({bank: route.Selection(task=task)}):  # factor() of a multi-task site reads the task
        if safe:
            _check_finite(todo, sign)
        for _, w in todo:
            w.merge(sign)
    bank.state.merged = sign > 0
    bank.state.merged_task = task if sign > 0 else None


def _check_finite(todo, sign: int) -> None:
    """A safe merge: every merged weight would be finite (PEFT's ``safe_merge``), checked on a copy first."""
    for name, w in todo:
        if not all(torch.isfinite(t).all() for t in w.merged_preview(sign)):
            raise NotMergeableError(f"module {name!r}: merging would give NaN or infinite weights (the adapter's "
                                    "factors, the base's bias or the sum hold such values); nothing was merged")
