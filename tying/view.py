"""The model as its base: adapters stack wrappers on modules, and every question about the base (which modules a
selector matches, where a module sits) is asked of this view.

A wrapper (a site's adapter, or a module a spec trains whole) keeps the module it wraps as its child ``base`` and
sits where that module sat; a second adapter on the same module wraps the first wrapper. So the real path of a base
module is its *logical* name with a ``.base`` per wrapper inserted, and the outermost wrapper occupies the logical
name. Wrappers mark themselves with the class attribute ``tying_wraps`` (this module imports no runtime class).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

BANK_ATTR = "tying_bank"  # the unnamed adapter's factors
ADAPTERS_ATTR = "tying_adapters"  # named adapters' factors, one FactorBank per name
SERVING_ATTR = "tying_serving"  # the store of adapters served in mixed batches (tying.serving)
OWN = (BANK_ATTR, ADAPTERS_ATTR, SERVING_ATTR)  # the root's children that belong to tying, never to the base


class Wrapper(nn.Module):
    """The base of tying's wrappers: it wraps its child ``base``, and attributes it lacks (``weight``,
    ``in_features``, ...) are the base module's, so code that reads ``model.q_proj.weight`` (transformers,
    torch.distributed.checkpoint) keeps working."""

    tying_wraps = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None or name == "base":
                raise
            return getattr(base, name)

    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint's contract (torch/distributed/checkpoint/state_dict.py) with a module whose
        # state_dict hooks rename keys: each name the base module's state has under this wrapper's prefix maps to the
        # child it lives in, so that get/set_model_state_dict name it ``q_proj.weight`` as the state_dict does. ("":
        # a base without state still marks ``base`` as a child left out of the names.)
        base = unwrap(self)
        return dict.fromkeys([*base._parameters, *base._buffers, *base._modules] or [""], "base")


def is_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is one of tying's wrappers (it wraps its child ``base``)."""
    return getattr(type(module), "tying_wraps", False)


def unwrap(module: nn.Module) -> nn.Module:
    """The base module under any number of wrappers."""
    while is_wrapper(module):
        module = module._modules["base"]
    return module


def named_base_modules(model: nn.Module, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """(logical name, base module) for the model as it was before any adapter: wrappers are looked through, and
    tying's own children of the root are left out. Parents come before their children, as in ``named_modules``."""
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module):
        if remove_duplicate:
            if id(module) in seen:
                return
            seen.add(id(module))
        yield prefix, module
        for name, child in module._modules.items():
            if child is None or (module is model and name in OWN):
                continue
            yield from walk(f"{prefix}.{name}" if prefix else name, unwrap(child))

    yield from walk("", unwrap(model))


def slot(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent, attribute) of the logical name ``name``: ``parent._modules[attribute]`` is the outermost wrapper
    there, or the base module itself."""
    parent_name, _, attr = name.rpartition(".")
    parent = model
    for part in parent_name.split(".") if parent_name else ():
        parent = unwrap(parent)._modules[part]
    parent = unwrap(parent)
    if attr not in parent._modules:
        raise AttributeError(f"{type(parent).__name__} has no submodule {attr!r} (module {name!r})")
    return parent, attr


def occupant(model: nn.Module, name: str) -> nn.Module:
    """What sits at the logical name ``name``: the outermost wrapper, or the base module."""
    parent, attr = slot(model, name)
    return parent._modules[attr]


def remove_wrapper(model: nn.Module, name: str, wrapper: nn.Module) -> None:
    """Take ``wrapper`` out of the stack at the logical name ``name``; what it wrapped takes its place."""
    parent, attr = slot(model, name)
    outer, current = None, parent._modules[attr]
    while current is not wrapper:
        if not is_wrapper(current):
            raise LookupError(f"no such wrapper at module {name!r}")
        outer, current = current, current._modules["base"]
    if outer is None:
        setattr(parent, attr, wrapper._modules["base"])
    else:
        outer.base = wrapper._modules["base"]
