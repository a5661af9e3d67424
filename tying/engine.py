"""The only mutation: ``apply_`` swaps wrappers in and attaches the bank; ``merge_``, ``unmerge_`` and
``unapply_`` undo or fold it. All checks happen in :func:`tying.planner.plan` first."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Union

import torch
from torch import nn

from . import kinds, modtypes
from .adapter import SiteAdapter, link_shared_down
from .bank import FactorBank
from .errors import AlreadyAppliedError, NotAppliedError, NotMergeableError, SpecError, TyingError
from .planner import BANK_ATTR, SERVING_ATTR, Counts, Plan, plan
from .spec import TyingSpec, load_spec

SpecLike = Union[TyingSpec, dict, str]


def _as_plan(model: nn.Module, spec: SpecLike | Plan) -> Plan:
    if not isinstance(spec, Plan):
        return plan(model, load_spec(spec))
    fresh = plan(model, spec.spec)  # a plan is data: check it still describes this model
    if fresh != spec:
        raise TyingError("the plan was made for a different model (or the model changed since); plan again")
    return fresh


def apply_(model: nn.Module, spec: SpecLike | Plan, *, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Counts:
    """Adapt ``model`` in place from a spec (or a plan made for this model); return the counts.

    Factors live on the device of their first member and in the dtype its module type gives factors (the
    weight's; float32 on quantized bases) unless ``device``/``dtype`` are given. With ``spec.freeze_base`` (the
    default) every base parameter is frozen, except those of ``spec.train_modules``; ``unapply_`` restores the
    original ``requires_grad`` flags and the train_modules' values.
    """
    if getattr(model, SERVING_ATTR, None) is not None:
        raise AlreadyAppliedError("the model serves adapters (tying.load_adapters_): their rows would get this "
                                  "adapter's update too. Unload them first (tying.unload_adapter_), or apply to "
                                  "another copy of the base")
    p = _as_plan(model, spec)
    modules = dict(model.named_modules())
    types = {s.name: modtypes.module_type(s.kind) for s in p.sites}
    first = {}
    for site in p.sites:
        module = modules[site.name]
        place = (torch.device(device) if device else next(module.parameters()).device,
                 dtype or types[site.name].factor_dtype(module))
        if not (isinstance(place[1], torch.dtype) and place[1].is_floating_point):
            given = f"apply_(dtype={dtype})" if dtype else f"module type {site.kind!r} (its dtype fact)"
            raise SpecError(f"{given} gives the factors of {site.name!r} the dtype {place[1]}; factors are trained, so "
                            "their dtype is a floating-point one: float32, bfloat16 or float16")
        for keys in (site.keys, *site.task_keys.values()):
            for factor, key in keys.items():
                first.setdefault((factor, key), place)
    bank = FactorBank(p, first)  # allocation may fail; the model is still untouched
    bank.modules_before = {n: {k: v.detach().clone() for k, v in model.get_submodule(n).state_dict().items()}
                           for n in p.train_modules}  # unapply_ puts their values back
    a = p.spec.adapter
    wrapper = kinds.get(a.kind).wrapper
    wrappers = {s.name: wrapper(modules[s.name], bank, s.keys, a.scale, a.dropout, types[s.name]) for s in p.sites}
    for s in p.sites if p.spec.tasks else ():
        wrappers[s.name].set_task_keys(s.task_keys)
    # From here on nothing can fail: mutate.
    bank.requires_grad_before = {n: q.requires_grad for n, q in model.named_parameters()}
    if p.spec.freeze_base:
        for q in model.parameters():
            q.requires_grad_(False)
    for name in p.train_modules:
        model.get_submodule(name).requires_grad_(True)
    setattr(model, BANK_ATTR, bank)
    for name, w in wrappers.items():
        model.set_submodule(name, w)
        w.attach()
    bank.hooks = [model.register_state_dict_post_hook(_record_merge),
                  model.register_load_state_dict_pre_hook(_read_merge_record),
                  model.register_load_state_dict_post_hook(_accept_plain_checkpoint),
                  *link_shared_down(model, wrappers)]  # q, k, v with one A and one input: A x once per forward
    return p.counts


MERGED_KEY = f"{BANK_ATTR}.merged"  # in the state_dict of a model with merged sites: which ones (plan order)
MERGED_TASK_KEY = f"{BANK_ATTR}.merged_task"  # and, for a multi-task adapter, whose update: its name, UTF-8


def _record_merge(model, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook of an adapted root: while sites are merged, their base weights hold the update; record
    which, so that loading the checkpoint into an adapted model marks them merged instead of adding it twice."""
    sites = [w for _, w in wrappers(model)]
    if any(w.merged for w in sites):
        state_dict[prefix + MERGED_KEY] = torch.tensor([w.merged for w in sites], dtype=torch.uint8)
        bank = bank_of(model)
        if bank.merged_task is not None:
            state_dict[prefix + MERGED_TASK_KEY] = torch.tensor(list(bank.merged_task.encode()), dtype=torch.uint8)


def _read_merge_record(model, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of an adapted root: each site whose base weight the checkpoint holds will be
    merged exactly when the checkpoint says so (a plain checkpoint holds unmerged weights)."""
    record = state_dict.pop(prefix + MERGED_KEY, None)
    task = state_dict.pop(prefix + MERGED_TASK_KEY, None)
    bank = bank_of(model)
    names = [n for n, _ in wrappers(model)]
    flags = [False] * len(names) if record is None else [bool(f) for f in record.tolist()]
    if len(flags) != len(names):
        flags = [False] * len(names)  # a record of another adapter: its weights cannot be told apart; unmerged
    bank.pending_merged = {n: f for n, f in zip(names, flags)
                           if any(prefix + n + k in state_dict for k in (".weight", ".base.weight"))}
    task = bytes(task.tolist()).decode(errors="replace") if task is not None and task.dim() == 1 else None
    bank.pending_task = task if task in (bank.spec.tasks or ()) else None  # unknown: merged_task_of refuses to guess


def _accept_plain_checkpoint(model, incompatible) -> None:
    """load_state_dict post-hook of an adapted root: a checkpoint without any factor (a plain base checkpoint)
    loads with the factors kept as they are and not reported missing; one with only some factors reports
    the others. (A missing base key stays torch's own error.)"""
    bank = getattr(model, BANK_ATTR, None)
    if not isinstance(bank, FactorBank):
        return
    pending = getattr(bank, "pending_merged", {})
    for name, merged in pending.items():  # the load succeeded: the record holds
        model.get_submodule(name).merged = merged
    if pending:
        merged = any(w.merged for _, w in wrappers(model))
        bank.merged_task = getattr(bank, "pending_task", None) if merged else None
        bank.merged_unknown = bool(bank.spec.tasks) and merged and bank.merged_task is None
    bank.pending_merged, bank.pending_task = {}, None
    ours = {k for k in incompatible.missing_keys if f"{BANK_ATTR}." in k}
    if len(ours) == len(bank.state_dict()):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in ours]


def bank_of(model: nn.Module) -> FactorBank:
    """The model's FactorBank, or NotAppliedError."""
    bank = getattr(model, BANK_ATTR, None)
    if not isinstance(bank, FactorBank):
        raise NotAppliedError("the model carries no tying adapter; call tying.apply_(model, spec) first")
    return bank


def wrappers(model: nn.Module) -> Iterator[tuple[str, SiteAdapter]]:
    """(name, wrapper) for every adapted site of the model."""
    for name, m in model.named_modules():
        if isinstance(m, SiteAdapter):
            yield name, m


def merged_task_of(model: nn.Module) -> str | None:
    """The task whose update is merged into the base weights (None: no task merged). Sites loaded merged from a
    checkpoint that does not say which task's update they hold are a clear error, never a guess."""
    bank = bank_of(model)
    if bank.merged_unknown:  # set by a load (_accept_plain_checkpoint), the one way to get there
        raise NotMergeableError(
            "the base weights hold a merged task update, but the checkpoint they were loaded from does not say which "
            f"task's (tasks: {', '.join(map(repr, bank.spec.tasks))}), so it can be neither taken out nor routed "
            "around; load base weights saved unmerged (or saved by this version of tying, which records the task)")
    return bank.merged_task


def _merge_task(model: nn.Module, sign: int, task: str | None) -> str | None:
    """The task whose update merge_ (sign 1) folds in or unmerge_ takes out; None for a single-task adapter."""
    tasks = bank_of(model).spec.tasks
    if not tasks:
        if task is not None:
            raise TyingError(f"task={task!r}: the adapter has no tasks; merge it without task=")
        return None
    merged = merged_task_of(model)
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


def _merge_all(model: nn.Module, sign: int, dequantize: bool = False, task: str | None = None) -> None:
    """merge_ / unmerge_: every site is checked first, so a refusal changes no weight."""
    bank = bank_of(model)
    if bank.rows is not None or bank.task is not None:
        raise NotMergeableError("merge_/unmerge_ inside a tying.adapters block: leave the block first")
    task = _merge_task(model, sign, task)
    facts = bank.spec.adapter.facts
    todo = [(name, w) for name, w in wrappers(model) if w.merged != (sign > 0)]
    for name, w in todo:
        if not facts.mergeable:
            raise NotMergeableError(f"module {name!r}: {w.no_merge}")
        try:
            w.check_merge(sign, dequantize)
        except NotMergeableError as e:
            raise NotMergeableError(f"module {name!r}: {e}") from None
    owners: dict[int, list[str]] = {}  # parameter -> every name it has in the model (tied weights: several)
    for pname, q in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(q), []).append(pname)
    for name, w in todo:
        weight = getattr(w.base, "weight", None)
        others = [o for o in owners.get(id(weight), []) if not o.startswith(f"{name}.")]
        if others:
            raise NotMergeableError(
                f"module {name!r} shares its weight with {others[:3]} (tied weights, e.g. input embeddings and "
                "lm_head): merging would change them too. Keep the adapter unmerged, or untie the weights first")
    bank.task = task  # factor() of a multi-task site reads it
    try:
        for _, w in todo:
            w.merge(sign)
    finally:
        bank.task = None
    bank.merged_task = task if sign > 0 else None


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes its base alone (the adapter stays applied, its factors untouched), as
    PEFT's ``disable_adapter()``; a merged adapter cannot be disabled (its update is in the weights)."""
    sites = [w for _, w in wrappers(model)] if bank_of(model) is not None else []
    if any(w.merged for w in sites):
        raise NotMergeableError("the adapter is merged into the base weights, so it cannot be disabled; call "
                                "tying.unmerge_(model) first")
    before = [w.disabled for w in sites]
    for w in sites:
        w.disabled = True
    try:
        yield
    finally:
        for w, d in zip(sites, before):
            w.disabled = d


def merge_(model: nn.Module, *, dequantize: bool = False, task: str | None = None) -> None:
    """Fold every site's update into its base weight in place; forward then skips the adapter.
    Kinds without a merged form (bottleneck, prefix) raise NotMergeableError before any weight changes, and so
    does a quantized base unless ``dequantize=True`` (decode the weight, add, re-encode: lossy). A multi-task
    adapter folds in the update of one ``task``."""
    _merge_all(model, +1, dequantize, task)


def unmerge_(model: nn.Module, *, dequantize: bool = False, task: str | None = None) -> None:
    """Subtract what ``merge_`` added (with the factors as they are now)."""
    _merge_all(model, -1, dequantize, task)


def unapply_(model: nn.Module, merge: bool = False, *, dequantize: bool = False, task: str | None = None) -> None:
    """Put the original modules back and remove the bank. With ``merge=True`` the update is kept,
    folded into the base weights (of one ``task``, for a multi-task adapter); otherwise the base weights are as
    before ``apply_``."""
    bank = bank_of(model)
    (merge_ if merge else unmerge_)(model, dequantize=dequantize, task=task)
    for name, w in list(wrappers(model)):
        w.detach()
        model.set_submodule(name, w.base)
    if not merge:  # the train_modules' values as before apply_ (a loaded adapter may have replaced them)
        for name, state in bank.modules_before.items():
            model.get_submodule(name).load_state_dict(state)
    delattr(model, BANK_ATTR)
    for hook in bank.hooks:
        hook.remove()
    for n, q in model.named_parameters():
        if n in bank.requires_grad_before:
            q.requires_grad_(bank.requires_grad_before[n])
