"""The only mutation: ``apply_`` swaps wrappers in and attaches the bank; ``merge_``, ``unmerge_`` and
``unapply_`` undo or fold it. All checks happen in :func:`tying.planner.plan` first."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Union

import torch
from torch import nn

from . import kinds, modtypes
from .adapter import SiteAdapter, link_shared_down
from .bank import FactorBank
from .errors import NotAppliedError, NotMergeableError, TyingError
from .planner import BANK_ATTR, Counts, Plan, plan
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
    weight's; float32 on quantized bases) unless ``device``/``dtype`` are given. With ``spec.freeze_base`` (the default) every base parameter is frozen, except those of
    ``spec.train_modules``; ``unapply_`` restores the original ``requires_grad`` flags.
    """
    p = _as_plan(model, spec)
    modules = dict(model.named_modules())
    types = {s.name: modtypes.module_type(s.kind) for s in p.sites}
    first = {}
    for site in p.sites:
        module = modules[site.name]
        place = (torch.device(device) if device else next(module.parameters()).device,
                 dtype or types[site.name].factor_dtype(module))
        for factor, key in site.keys.items():
            first.setdefault((factor, key), place)
    bank = FactorBank(p, first)  # allocation may fail; the model is still untouched
    a = p.spec.adapter
    wrapper = kinds.get(a.kind).wrapper
    wrappers = {s.name: wrapper(modules[s.name], bank, s.keys, a.scale, a.dropout, types[s.name]) for s in p.sites}
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
    bank.hooks = [model.register_load_state_dict_post_hook(_accept_plain_checkpoint),
                  *link_shared_down(model, wrappers)]  # q, k, v with one A and one input: A x once per forward
    return p.counts


def _accept_plain_checkpoint(model, incompatible) -> None:
    """load_state_dict post-hook of an adapted root: a checkpoint without any factor (a plain base checkpoint)
    loads with the factors kept as they are and not reported missing; one with only some factors reports
    the others. (A missing base key stays torch's own error.)"""
    bank = getattr(model, BANK_ATTR, None)
    if not isinstance(bank, FactorBank):
        return
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


def _merge_all(model: nn.Module, sign: int, dequantize: bool = False) -> None:
    """merge_ / unmerge_: every site is checked first, so a refusal changes no weight."""
    facts = bank_of(model).spec.adapter.facts
    todo = [(name, w) for name, w in wrappers(model) if w.merged != (sign > 0)]
    for name, w in todo:
        if not facts.mergeable:
            raise NotMergeableError(f"module {name!r}: {w.no_merge}")
        try:
            w.check_merge(sign, dequantize)
        except NotMergeableError as e:
            raise NotMergeableError(f"module {name!r}: {e}") from None
    owners: dict[int, list[str]] = {}
    for name, w in wrappers(model):
        if getattr(w.base, "weight", None) is not None:
            owners.setdefault(id(w.base.weight), []).append(name)
    shared = [names for names in owners.values() if len(names) > 1]
    if shared and todo:
        raise NotMergeableError(f"sites {shared[0]} share one base weight (tied weights), so their updates cannot "
                                "be folded into it separately; keep the adapter unmerged")
    for _, w in todo:
        w.merge(sign)


def merge_(model: nn.Module, *, dequantize: bool = False) -> None:
    """Fold every site's update into its base weight in place; forward then skips the adapter.
    Kinds without a merged form (bottleneck, prefix) raise NotMergeableError before any weight changes, and so
    does a quantized base unless ``dequantize=True`` (decode the weight, add, re-encode: lossy)."""
    _merge_all(model, +1, dequantize)


def unmerge_(model: nn.Module, *, dequantize: bool = False) -> None:
    """Subtract what ``merge_`` added (with the factors as they are now)."""
    _merge_all(model, -1, dequantize)


def unapply_(model: nn.Module, merge: bool = False, *, dequantize: bool = False) -> None:
    """Put the original modules back and remove the bank. With ``merge=True`` the update is kept,
    folded into the base weights; otherwise the base weights are as before ``apply_``."""
    bank = bank_of(model)
    (merge_ if merge else unmerge_)(model, dequantize=dequantize)
    for name, w in list(wrappers(model)):
        w.detach()
        model.set_submodule(name, w.base)
    delattr(model, BANK_ATTR)
    for hook in bank.hooks:
        hook.remove()
    for n, q in model.named_parameters():
        if n in bank.requires_grad_before:
            q.requires_grad_(bank.requires_grad_before[n])
