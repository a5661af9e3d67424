"""The only mutation: ``apply_`` swaps wrappers in and attaches the bank; ``merge_``, ``unmerge_`` and
``unapply_`` undo or fold it. All checks happen in :func:`tying.planner.plan` first.

A model may carry several adapters: the unnamed one (``apply_(model, spec)``, factors under ``tying_bank``) and named
ones (``apply_(model, spec, name="b")``, factors under ``tying_adapters.b``). Each has its own bank and wrappers; a
second adapter on a module wraps the first one's wrapper (:mod:`tying.view`), so their updates add up. Every verb
takes ``name=``; without it, it acts on the model's only adapter.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import kinds, meta, modtypes, route, sharded, tensor_parallel
from .bank import AdapterBanks, FactorBank, MergeRecord, banks
from .errors import AlreadyAppliedError, NotAppliedError, NotMergeableError, SpecError, TyingError
from .planner import Counts, Plan, plan
from .site import SiteAdapter, link_shared_down
from .spec import TyingSpec, load_spec
from .trained import TrainedModule
from .view import ADAPTERS_ATTR, BANK_ATTR, SERVING_ATTR, named_base_modules, occupant, remove_wrapper, slot, unwrap

SpecLike = TyingSpec | dict | str
_ONLY = object()  # name= left out: the model's only adapter


def _as_plan(model: nn.Module, spec: SpecLike | Plan) -> Plan:
    if not isinstance(spec, Plan):
        return plan(model, load_spec(spec))
    fresh = plan(model, spec.spec)  # a plan is data: check it still describes this model
    if fresh != spec:
        raise TyingError("the plan was made for a different model (or the model changed since); plan again")
    return fresh


def bank_of(model: nn.Module, name: str | None = _ONLY) -> FactorBank:  # type: ignore[assignment]
    """The bank of the adapter ``name`` (None: the unnamed one; left out: the model's only adapter), or a clear
    error (NotAppliedError when the model carries none)."""
    have = banks(model)
    if name is _ONLY:
        if len(have) == 1:
            return next(iter(have.values()))
        if not have:
            raise NotAppliedError("the model carries no tying adapter; call tying.apply_(model, spec) first")
        raise TyingError(f"the model carries several adapters ({_names(have)}); say which: name=...")
    if name not in have:
        which = "the unnamed adapter" if name is None else f"adapter {name!r}"
        raise NotAppliedError(f"the model carries no {which}; it carries {_names(have) or 'none'}")
    return have[name]


def _names(have) -> str:
    return ", ".join("the unnamed one" if n is None else repr(n) for n in have)


def wrappers(model: nn.Module, bank: FactorBank | None = None) -> Iterator[tuple[str, SiteAdapter]]:
    """(site name, wrapper) for every adapted site of ``bank``'s adapter (of the model's only adapter when
    ``bank`` is None)."""
    bank = bank_of(model) if bank is None else bank
    for site in bank.plan.sites:
        module = occupant(model, site.name)
        while module is not None and getattr(module, "bank", None) is not bank:
            module = module._modules.get("base") if getattr(type(module), "tying_wraps", False) else None
        if module is not None:
            yield site.name, module


def _trained(model: nn.Module, bank: FactorBank) -> Iterator[tuple[str, TrainedModule]]:
    """(name, wrapper) of every module ``bank``'s adapter trains whole."""
    for name in bank.plan.train_modules:
        module = occupant(model, name)
        while getattr(module, "bank", None) is not bank:
            module = module._modules["base"]
        yield name, module


def _check_room(model: nn.Module, p: Plan, name: str | None) -> None:
    """A new adapter ``name`` fits beside the ones the model carries: a free name, and no module that one adapter
    trains whole is adapted or trained by another."""
    if getattr(model, SERVING_ATTR, None) is not None:
        raise AlreadyAppliedError("the model serves adapters (tying.load_adapters_): their rows would get this "
                                  "adapter's update too. Unload them first (tying.unload_adapter_), or apply to "
                                  "another copy of the base")
    have = banks(model)
    if name in have:
        raise AlreadyAppliedError("the model already carries a tying adapter; call tying.unapply_(model) first"
                                  if name is None else f"the model carries an adapter named {name!r} already; "
                                  f"unapply it first (tying.unapply_(model, name={name!r})) or choose another name")
    if name is not None and (not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name)):
        raise TyingError(f"an adapter name is a non-empty string without dots that is not an attribute of a module "
                         f"(such as 'training' or 'keys'); got {name!r}")
    for other, bank in have.items():  # a module trained whole copies its insides: no other adapter's site there
        for mine, theirs in ((p.train_modules, [s.name for s in bank.plan.sites]),
                             ([s.name for s in p.sites], bank.plan.train_modules)):
            clash = [m for m in mine for t in theirs if m == t or m.startswith(t + ".") or t.startswith(m + ".")]
            if clash:
                raise AlreadyAppliedError(
                    f"module {clash[0]!r} is trained whole by one adapter and adapted (or holds a site adapted) by "
                    f"another ({'the unnamed one' if other is None else repr(other)}); train it whole in both, or "
                    "adapt it in both")


def apply_(model: nn.Module, spec: SpecLike | Plan, *, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None, name: str | None = None) -> Counts:
    """Adapt ``model`` in place from a spec (or a plan made for this model); return the counts.

    Factors live on the device of their first member and in the dtype its module type gives factors (the
    weight's; float32 on quantized bases) unless ``device``/``dtype`` are given. With ``spec.freeze_base`` (the
    default) every base parameter is frozen, except those of ``spec.train_modules``; ``unapply_`` restores the
    original ``requires_grad`` flags and the train_modules' values. ``name`` adds a named adapter beside the ones
    the model carries (its updates add to theirs while both are enabled; ``tying.adapters`` routes rows to one).
    """
    p = _as_plan(model, spec)
    _check_room(model, p, name)
    sharded.refuse_sharded(model)  # FSDP2 shards the parameters that exist: apply_, then fully_shard
    bases = dict(named_base_modules(model))
    types = {s.name: modtypes.module_type(s.module_type) for s in p.sites}
    first = {}
    for site in p.sites:
        module = bases[site.name]
        place = (torch.device(device) if device else next(module.parameters()).device,
                 dtype or types[site.name].factor_dtype(module))
        if not (isinstance(place[1], torch.dtype) and place[1].is_floating_point):
            given = f"apply_(dtype={dtype})" if dtype else f"module type {site.module_type!r} (its dtype fact)"
            raise SpecError(f"{given} gives the factors of {site.name!r} the dtype {place[1]}; factors are trained, so "
                            "their dtype is a floating-point one: float32, bfloat16 or float16")
        for keys in (site.keys, *site.task_keys.values()):
            for factor, key in keys.items():
                first.setdefault((factor, key), place)
    a = p.spec.adapter
    wrapper = kinds.get(a.kind).wrapper
    split = tensor_parallel.plan_split(p, bases, types, wrapper)  # a tensor-parallel model: factors follow its split
    bank = FactorBank(p, first, name, {n: bases[n] for n in p.train_modules})  # may fail: the model is untouched
    if split is not None:
        split.distribute(bank)
    wrappers_ = {s.name: wrapper(occupant(model, s.name), bank, s.keys, a.scale, a.dropout, types[s.name])
                 for s in p.sites}
    if split is not None:
        split.attach(wrappers_)
    for s in p.sites if p.spec.tasks else ():
        wrappers_[s.name].set_task_keys(s.task_keys)
    trained = {n: TrainedModule(occupant(model, n), bank, n) for n in p.train_modules}
    bank.state.unmixable = tuple(n for n, w in wrappers_.items() if not w.routes_rows())
    if meta.waits(model, bank):  # a base on the meta device: the factors take their values when it arrives
        bank.state.unset = {}
    # From here on nothing can fail: mutate.
    bank.state.requires_grad_before = {n: q.requires_grad for n, q in named_base_parameters(model)}
    if p.spec.freeze_base:
        for _, q in named_base_parameters(model):
            q.requires_grad_(False)
    for n, t in trained.items():
        setattr(*slot(model, n), t)
    if name is None:
        setattr(model, BANK_ATTR, bank)
    else:
        if getattr(model, ADAPTERS_ATTR, None) is None:
            setattr(model, ADAPTERS_ATTR, AdapterBanks())
        getattr(model, ADAPTERS_ATTR)[name] = bank
    for n, w in wrappers_.items():
        setattr(*slot(model, n), w)
        w.attach()
    bank.state.hooks = [model.register_state_dict_post_hook(functools.partial(_record_merge, name)),
                  model.register_load_state_dict_pre_hook(functools.partial(_read_merge_record, name)),
                  model.register_load_state_dict_post_hook(functools.partial(_accept_plain_checkpoint, name)),
                  model.register_forward_pre_hook(route.RowCheck(bank), with_kwargs=True),
                  model.register_forward_pre_hook(sharded.PlacementCheck(bank)),
                  model.register_forward_pre_hook(meta.MetaCheck(bank)),
                  *link_shared_down(model, wrappers_)]  # q, k, v with one A and one input: A x once per forward
    return p.counts


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


def named_base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(logical name, parameter) of the base model, every name of a shared parameter included."""
    for mname, module in named_base_modules(model, remove_duplicate=False):
        for pname, q in module._parameters.items():
            if q is not None:
                yield (f"{mname}.{pname}" if mname else pname), q


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes its base alone (the adapters stay applied, their factors untouched; the
    modules a spec trains whole answer with their original values), as PEFT's ``disable_adapter()``. It belongs to
    the call (other threads are not affected). A merged adapter cannot be disabled (its update is in the weights)."""
    have = banks(model)
    for name, bank in have.items():
        if bank.state.merged:
            raise NotMergeableError(f"the adapter{'' if name is None else f' {name!r}'} is merged into the base "
                                    "weights, so it cannot be disabled; call tying.unmerge_(model) first")
    with route.routed(dict.fromkeys(have.values(), route.OFF)):
        yield


def merge_(model: nn.Module, *, dequantize: bool = False, task: str | None = None, name: str | None = _ONLY,
           safe: bool = False) -> None:  # type: ignore[assignment]
    """Fold every site's update into its base weight in place; forward then skips the adapter.
    Kinds without a merged form (bottleneck, prefix) raise NotMergeableError before any weight changes, and so
    does a quantized base unless ``dequantize=True`` (decode the weight, add, re-encode: lossy). A multi-task
    adapter folds in the update of one ``task``. ``safe=True`` first checks that every merged weight is finite."""
    _merge_all(model, bank_of(model, name), +1, dequantize, task, safe)


def unmerge_(model: nn.Module, *, dequantize: bool = False, task: str | None = None,
             name: str | None = _ONLY) -> None:  # type: ignore[assignment]
    """Subtract what ``merge_`` added (with the factors as they are now)."""
    _merge_all(model, bank_of(model, name), -1, dequantize, task)


def unapply_(model: nn.Module, merge: bool = False, *, dequantize: bool = False, task: str | None = None,
             name: str | None = _ONLY) -> None:  # type: ignore[assignment]
    """Put the original modules back and remove the bank. With ``merge=True`` the update is kept,
    folded into the base weights (of one ``task``, for a multi-task adapter); otherwise the base weights are as
    before ``apply_``."""
    bank = bank_of(model, name)
    _merge_all(model, bank, +1 if merge else -1, dequantize, task)
    for site, w in list(wrappers(model, bank)):
        w.detach()
        remove_wrapper(model, site, w)
    for n, t in list(_trained(model, bank)):
        if merge:  # the trained copy's values become the module's
            with torch.no_grad():
                for (_, b), (_, c) in zip(unwrap(t).state_dict(keep_vars=True).items(),
                                          t.trained.state_dict(keep_vars=True).items()):
                    b.copy_(c)
        remove_wrapper(model, n, t)
        t.attached = False
    if bank.name is None:
        delattr(model, BANK_ATTR)
    else:
        named = getattr(model, ADAPTERS_ATTR)
        del named[bank.name]
        if not len(named):
            delattr(model, ADAPTERS_ATTR)
    for hook in bank.state.hooks:
        hook.remove()
    for n, q in named_base_parameters(model):
        if n in bank.state.requires_grad_before:
            q.requires_grad_(bank.state.requires_grad_before[n])
