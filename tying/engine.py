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
from .bank import _ONLY, AdapterBanks, FactorBank, bank_of, banks, named_base_parameters, trained_of, wrappers
from .errors import AlreadyAppliedError, NotMergeableError, SpecError, TyingError
from .merging import _accept_plain_checkpoint, _merge_all, _read_merge_record, _record_merge
from .planner import Counts, Plan, plan
from .shared_down import link_shared_down
from .spec import TyingSpec, load_spec
from .trained import TrainedModule
from .view import ADAPTERS_ATTR, BANK_ATTR, SERVING_ATTR, named_base_modules, occupant, remove_wrapper, slot, unwrap

SpecLike = TyingSpec | dict | str


def _as_plan(model: nn.Module, spec: SpecLike | Plan) -> Plan:
    if not isinstance(spec, Plan):
        return plan(model, load_spec(spec))
    fresh = plan(model, spec.spec)  # a plan is data: check it still describes this model
    if fresh != spec:
        raise TyingError("the plan was made for a different model (or the model changed since); plan again")
    return fresh


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
                        *link_shared_down(model, wrappers_)]  # q, k, v with one A and one input: A x once per forward
    if bank.state.unset is not None:  # only an adapter applied on meta waits; it never starts waiting later
        bank.state.hooks.append(model.register_forward_pre_hook(meta.MetaCheck(bank)))
    return p.counts


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
    for n, t in list(trained_of(model, bank)):
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
