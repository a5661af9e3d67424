"""Models built on the meta device: a large base is never held twice.

``apply_`` on a model whose weights are on the meta device (``with torch.device("meta"): model = ...``) creates its
factors (and its copies of the spec's ``train_modules``) on the meta device too: no memory, no values. The bank then
waits for the base (``bank.state.unset`` is not None) and takes its values when the base gets its own:

- ``model.to_empty(device=...)`` then ``model.load_state_dict(base_state_dict[, assign=True])`` (or
  ``load_state_dict(..., assign=True)`` straight on the meta model): after the load, every factor the checkpoint did
  not hold gets its spec's initial value (the same values as ``apply_`` on a real model: seeded inits are exact), on
  the device of its first member's weight, and every trained copy the base's values;
- any other way of loading the base (accelerate's per-tensor loading, ``copy_``): call :func:`materialize_` after it;
- ``load_adapter`` into a model still on meta keeps the file's tensors (adapter-sized) and sets them in place of the
  initial values when the base arrives.

Until then a forward, ``save_adapter`` or ``merge_`` raises :class:`MetaDeviceError` and changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from .bank import banks, init_
from .errors import MetaDeviceError
from .trained import trained_key
from .view import named_base_modules

FIX = ("load the base's weights into the model (model.to_empty(device=...), then model.load_state_dict(state_dict), "
       "or load_state_dict(state_dict, assign=True)): the factors take their initial values then; after loading the "
       "base any other way, call tying.materialize_(model)")


def _base_modules(model: nn.Module, bank) -> dict[str, nn.Module]:
    """The base modules the bank's adapter touches: its sites and the modules it trains whole."""
    names = {s.name for s in bank.plan.sites} | set(bank.plan.train_modules)
    return {n: m for n, m in named_base_modules(model) if n in names}


def _meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def waits(model: nn.Module, bank) -> bool:
    """Whether ``apply_`` found the adapter's base modules on the meta device (the bank then waits for the base)."""
    return any(t.is_meta for t in bank.parameters()) or any(map(_meta, _base_modules(model, bank).values()))


def check(bank, what: str) -> None:
    """A clear error when ``bank``'s factors have no values yet (still on meta, or emptied by ``to_empty``)."""
    if bank.state.unset is None:
        return
    where = ("are on the meta device" if any(t.is_meta for t in bank.parameters())
             else "were materialised by to_empty and hold no values yet")
    raise MetaDeviceError(f"{what}: the adapter's factors ({bank.path}) {where}, as the model was when tying.apply_ "
                          f"ran; nothing was done. To give them their values, {FIX}")


class MetaCheck:
    """A forward pre-hook of the root: no forward while the factors wait for the base."""

    def __init__(self, bank: nn.Module):
        self.bank = bank

    def __call__(self, model: nn.Module, *_) -> None:
        check(self.bank, "forward")


def keep(model: nn.Module, bank, tensors: dict[str, torch.Tensor]) -> None:
    """``load_adapter`` into a waiting bank: ``tensors`` (bank key -> value) become the values it waits for, set now
    if the base has its own, else when it arrives."""
    bank.state.unset = {k: t.detach().to("cpu") for k, t in tensors.items()}
    settle(model, bank)


def settle(model: nn.Module, bank, loaded: set[str] | None = None) -> bool:
    """The base has arrived (or part of it): give each of the waiting bank's tensors whose key (of the bank's
    state_dict) is not in ``loaded`` its value, on the device of the base module it belongs to. Nothing happens while
    a base module the adapter touches is still on meta. Returns whether the bank is settled."""
    if bank.state.unset is None:
        return True
    bases = _base_modules(model, bank)
    if any(map(_meta, bases.values())):
        return False
    loaded = loaded or set()
    values = bank.state.unset
    with torch.no_grad():
        for g in bank.plan.groups:
            key = f"{g.factor}.{g.key}"
            if key in loaded:
                continue
            table, old = bank[g.factor], bank[g.factor][g.key]
            device = next(iter(bases[g.members[0]].parameters())).device
            if old.is_meta:
                table[g.key] = nn.Parameter(torch.empty_like(old, device=device), requires_grad=old.requires_grad)
            t = table[g.key]
            if key in values:
                t.copy_(values[key])
            else:
                init, index = bank._inits[(g.factor, g.key)]
                init_(t, init, index)
        for name in bank.plan.train_modules:
            _settle_copy(bank, name, bases[name], values, loaded)
    if any(t.is_meta for t in bank.parameters()) or any(t.is_meta for t in bank.buffers()):
        return False  # a key the checkpoint named but could not set (loaded into meta without assign=True)
    bank.state.unset = None
    return True


def _settle_copy(bank, name: str, base: nn.Module, values: dict, loaded: set[str]) -> None:
    """The bank's copy of a module the adapter trains whole: the file's values, else the base's."""
    prefix = f"trained.{trained_key(name)}."
    copy = bank.trained[trained_key(name)]
    if _meta(copy):
        device = next(iter(base.parameters()), torch.empty(0)).device
        copy.to_empty(device=device)
    mine, theirs = copy.state_dict(keep_vars=True), base.state_dict(keep_vars=True)
    for k, t in mine.items():
        if prefix + k not in loaded:
            t.copy_(values.get(prefix + k, theirs[k]))


def materialize_(model: nn.Module) -> None:
    """Give the factors of every adapter applied on the meta device their values, once the base has its own (after
    loading it in a way that runs no ``load_state_dict`` hook, such as accelerate's per-tensor loading): initial
    values from the spec (or those of an adapter ``load_adapter`` read), on the device of the weights they adapt;
    trained copies of ``train_modules`` from the base. Adapters whose factors have values are left as they are."""
    waiting = [b for b in banks(model).values() if b.state.unset is not None]
    for bank in waiting:
        meta = [n for n, m in _base_modules(model, bank).items() if _meta(m)]
        if meta:
            raise MetaDeviceError(f"materialize_: the base modules {meta[:3]}{' ...' if len(meta) > 3 else ''} are "
                                  "still on the meta device, so the factors cannot be placed beside them; load the "
                                  "base's weights first. Nothing was done")
    for bank in waiting:
        settle(model, bank)
