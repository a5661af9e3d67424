"""The module-type registry: what tying needs to know of a kind of ``nn.Module`` to adapt it.

A :class:`ModuleType` gives the module's sizes (``d_in``, ``d_out``), the low-rank products on its activations
(``down``: x -> h; ``up``: out + update of h), its weight as a (d_out, d_in) matrix (a live view, or a dequantized
copy that ``store`` writes back), and its capabilities. Core types: ``Linear``, ``Conv1d``, ``Conv2d``,
``Embedding``. Bridges register more on demand: the planner imports ``vocab.BRIDGES[package]`` the first time it
meets a module or weight of that package (transformers' ``Conv1D`` and attention; bitsandbytes and torchao
quantized linear layers). Users add their own with :func:`register_module_type`.

A module's type is found along its class's MRO (the most derived registered class wins; a type with a ``match``
predicate is tried before a plain one of the same class), so subclasses are adapted as their parents are.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from . import update, vocab
from .errors import RegistryError, UnsupportedModuleError


@dataclass(frozen=True, eq=False)
class ModuleType:
    """One registered module type; see the module docstring and :func:`register_module_type`."""

    name: str
    cls: type
    dims: Callable[[nn.Module], tuple[int, int]]
    down: Callable[..., torch.Tensor] | None = None  # (module, x, A, u, G) -> h
    up: Callable[..., torch.Tensor] | None = None  # (module, out, h, B, v, scale) -> out + update
    weight: Callable[[nn.Module], torch.Tensor] | None = None  # -> (d_out, d_in): a live view, or a copy
    store: Callable[[nn.Module, torch.Tensor], None] | None = None  # write back what ``weight`` gave (if a copy)
    quantized: bool = False  # ``weight`` decodes and ``store`` re-encodes: a merge loses precision, so it is explicit
    match: Callable[[nn.Module], bool] | None = None  # more than the class (e.g. a quantized weight's type)
    check: Callable[[str, nn.Module], None] | None = None  # raise UnsupportedModuleError for an unfit instance
    dtype: Callable[[nn.Module], torch.dtype] | None = None  # the factors' default dtype
    out_axis: int = -1  # the output-channel axis of the activations, counted from the end
    input_dropout: bool = True  # whether the spec's dropout applies to the input (not to token ids)
    caps: Mapping[str, Any] = field(default_factory=dict)  # capability -> True or an object the kind uses
    peft: Callable[..., dict[str, torch.Tensor]] | None = None  # (module, down, up) -> PEFT tensors by suffix
    peft_config: Mapping[str, Any] = field(default_factory=dict)  # PEFT config entries this type needs
    owner: str = "?"

    def has(self, capability: str) -> bool:
        """Whether this type offers ``capability`` (vocab.CAPABILITIES)."""
        if capability == "lowrank":
            return self.down is not None and self.up is not None
        if capability == "weight":
            return self.weight is not None
        return capability in self.caps

    def factor_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the factors of a site of this type get by default."""
        if self.dtype is not None:
            return self.dtype(module)
        return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())

    def __reduce__(self):  # pickles and copies by name: the registry holds the one instance
        return module_type, (self.name,)

    def __repr__(self) -> str:
        return f"ModuleType({self.name!r}, {self.cls.__module__}.{self.cls.__qualname__})"


_TYPES: dict[str, ModuleType] = {}
_BY_CLASS: dict[type, list[ModuleType]] = {}
_BRIDGED: set[str] = set()


def register_module_type(name: str, cls: type, *, dims: Callable, parent: str | None = None,
                         owner: str | None = None, **facts) -> ModuleType:
    """Register a module type (see :class:`ModuleType` for every fact); return it.

    ``name``, ``cls`` (an ``nn.Module`` subclass) and ``dims`` are required; ``down`` and ``up`` come together
    (without them only kinds that need no low-rank product, such as ia3, apply); ``store`` and ``quantized`` only
    with ``weight``; ``parent``, a registered type this one specialises (``types: [parent]`` selects it too). A
    name that exists, or a second type for a class without a ``match`` predicate, is refused, naming the holder.
    """
    if name in _TYPES:
        raise RegistryError(f"module type {name!r} is registered already (by {_TYPES[name].owner}); "
                            "choose another name")
    problems = []
    if not isinstance(name, str) or not name.isidentifier():
        problems.append(f"name {name!r} is not an identifier")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        problems.append(f"cls {cls!r} is not an nn.Module subclass")
    if not callable(dims):
        problems.append("dims (module -> (d_in, d_out)) is missing")
    if (facts.get("down") is None) != (facts.get("up") is None):
        problems.append("give down and up together")
    if (facts.get("store") is not None or facts.get("quantized")) and facts.get("weight") is None:
        problems.append("store and quantized need weight (what store writes back)")
    if facts.get("quantized") and facts.get("store") is None:
        problems.append("a quantized type needs store (to re-encode a merged weight)")
    for fact in ("down", "up", "weight", "store", "match", "check", "dtype", "peft"):
        if facts.get(fact) is not None and not callable(facts[fact]):
            problems.append(f"{fact} is not callable")
    if facts.get("match") is None and any(t.match is None for t in _BY_CLASS.get(cls, ())):
        holder = next(t for t in _BY_CLASS[cls] if t.match is None)
        problems.append(f"{getattr(cls, '__name__', cls)} has a plain module type already ({holder.name!r}, by "
                        f"{holder.owner}); give a match predicate to tell the instances apart")
    unknown = set(facts) - set(ModuleType.__dataclass_fields__) - {"name", "cls", "dims", "owner"}
    if unknown:
        problems.append(f"unknown facts {sorted(unknown)}")
    unknown_caps = set(facts.get("caps", {})) - set(vocab.CAPABILITIES)
    if unknown_caps:
        problems.append(f"unknown capabilities {sorted(unknown_caps)}; known: {', '.join(vocab.CAPABILITIES)}")
    if problems:
        raise RegistryError(f"module type {name!r} is not well declared: " + "; ".join(problems))
    owner = owner or sys._getframe(1).f_globals.get("__name__", "?")
    mt = ModuleType(name, cls, dims, owner=owner, **facts)
    vocab.add_module_type(name, mt.owner, parent)
    _TYPES[name] = mt
    plain = _BY_CLASS.setdefault(cls, [])
    plain.insert(0 if mt.match is not None else len(plain), mt)
    return mt


def unregister_module_type(name: str) -> None:
    """Remove a registered module type (tests, plugins that unload); modules already wrapped keep working. A
    RegistryError for a name that is not registered."""
    if name not in _TYPES:
        raise RegistryError(f"module type {name!r} is not registered, so it cannot be unregistered; registered: "
                            f"{', '.join(_TYPES)}")
    mt = _TYPES.pop(name)
    _BY_CLASS[mt.cls].remove(mt)
    vocab.remove_module_type(name)


def site_dims(mt: ModuleType, name: str, module: nn.Module) -> tuple[int, int]:
    """``mt.dims(module)``, checked: two positive whole numbers that agree with the type's weight (d_out, d_in) where
    it has a cheap one (not a quantized type's decoding), so that a type whose dims are swapped is named here rather
    than met as a torch shape error in the first forward."""
    dims = mt.dims(module)
    if not (isinstance(dims, (tuple, list)) and len(dims) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
        raise RegistryError(f"module type {mt.name!r} (by {mt.owner}): dims gave {dims!r} for module {name!r}; it must "
                            "give (d_in, d_out), two positive whole numbers")
    d_in, d_out = dims
    if mt.weight is not None and not mt.quantized:
        shape = tuple(mt.weight(module).shape)
        if shape != (d_out, d_in):
            if mt.check is not None:  # an instance the type refuses (a grouped convolution) is refused as such
                mt.check(name, module)
            hint = " (d_in and d_out swapped in its dims?)" if shape == (d_in, d_out) else ""
            raise RegistryError(f"module type {mt.name!r} (by {mt.owner}): for module {name!r}, dims gives d_in={d_in}, "
                                f"d_out={d_out}, but its weight is {shape}, not (d_out, d_in) = {(d_out, d_in)}{hint}; "
                                "fix the type's dims or weight")
    return d_in, d_out


def module_type(name: str) -> ModuleType:
    """The registered module type ``name``."""
    if name not in _TYPES and name in vocab.BRIDGE_TYPES:
        _bridge(vocab.BRIDGE_TYPES[name])
    try:
        return _TYPES[name]
    except KeyError:
        raise RegistryError(f"module type {name!r} is not registered; registered: {', '.join(_TYPES)}") from None


def registered() -> list[ModuleType]:
    """The registered module types."""
    return list(_TYPES.values())


def lookup(module: nn.Module) -> ModuleType | None:
    """The module type of ``module`` (most derived registered class first), or None."""
    # A bridge loads for a module (or weight) whose class comes from its library, never because the library is
    # imported: transformers imports torchao wherever it is installed, and a plain model must not load the quantized
    # types (nor bitsandbytes with them; tests/test_registry.py checks it in a fresh process).
    for klass in (*type(module).__mro__, type(getattr(module, "weight", None))):  # subclasses of a bridged class too
        package = klass.__module__.partition(".")[0]
        if package in vocab.BRIDGES and package not in _BRIDGED:
            _bridge(package)
    for klass in type(module).__mro__:
        for mt in _BY_CLASS.get(klass, ()):
            if mt.match is None or mt.match(module):
                return mt
    return None


def site_type(name: str, module: nn.Module) -> ModuleType:
    """The module type of the module ``name``; UnsupportedModuleError when none fits (the type's own ``check`` of
    the instance is the planner's, after the kind's needs)."""
    mt = lookup(module)
    if mt is None:
        raise UnsupportedModuleError(
            f"module {name!r} is a {type(module).__name__}, which tying cannot adapt; supported: "
            f"{', '.join(vocab.module_type_names())} (and their subclasses; add others with "
            "tying.register_module_type). Narrow the selector or add `types:` to the target")
    weight = getattr(module, "weight", None)
    package = type(weight).__module__.partition(".")[0]
    if package in vocab.QUANTIZERS and not mt.quantized:  # a plain type would edit encoded data as if it were floats
        raise UnsupportedModuleError(
            f"module {name!r} holds a {type(weight).__name__} weight ({package}) that no registered module type "
            f"decodes; supported quantized types: {', '.join(t.name for t in _TYPES.values() if t.quantized)}. "
            "Register one with tying.register_module_type (weight= and store=), or exclude the module")
    return mt


def _bridge(package: str) -> None:
    importlib.import_module(vocab.BRIDGES[package])  # registers its types on import
    _BRIDGED.add(package)



# ---- core types -------------------------------------------------------------------------------------------------

def _linear_down(module, x, A, u, G):
    return update.linear_down(x, A, u, G)


def _unobserved(module: nn.Module, out: torch.Tensor) -> bool:
    """Whether nobody but the wrapper can hold ``out``, the module's fresh output, so that the update may be added
    into it in place: no autograd recording, no trace, no forward hook on the module, none registered globally
    (torch keeps those in a module-level registry without a public reader; if it is ever renamed: never in place)."""
    return (not torch.is_grad_enabled() and not module._forward_hooks and out.is_contiguous()
            and not getattr(_torch_module, "_global_forward_hooks", True) and not torch.compiler.is_compiling())


def _linear_up(module, out, h, B, v, scale):
    if _unobserved(module, out):
        return update.linear_add_(out, h, B, v, scale)
    return update.linear_up(out, h, B, v, scale)


def _lora_keys(module, down, up):
    return {"lora_A.weight": down, "lora_B.weight": up}


def _conv(module):
    return F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d


def _conv_down(module, x, A, u, G):
    A = update.fold_down(A, u, G).to(x.dtype)
    # the base's own convolution (stride, padding and its mode, dilation) with A as its kernel
    return module._conv_forward(x, A.view(A.shape[0], module.in_channels, *module.kernel_size), None)


def _conv_up(module, out, h, B, v, scale):
    B = update.fold_up(B, v, scale).to(out.dtype)
    return out + _conv(module)(h.to(out.dtype), B.view(*B.shape, *([1] * len(module.kernel_size))))


def _conv_check(name, module):
    if module.groups != 1:
        raise UnsupportedModuleError(
            f"module {name!r} ({type(module).__name__}) has groups={module.groups}; tying adapts convolutions with "
            "groups=1 only")


def _conv_weight(module):
    return module.weight.reshape(module.weight.shape[0], -1)  # a view, or a copy for a channels_last kernel


def _conv_store(module, w):
    if w.data_ptr() != module.weight.data_ptr():  # reshape copied: write the edited copy back
        module.weight.copy_(w.view(module.weight.shape))


def _conv_peft(module, down, up):
    k = module.kernel_size
    return {"lora_A.weight": down.reshape(down.shape[0], module.in_channels, *k),
            "lora_B.weight": up.reshape(*up.shape, *([1] * len(k)))}


def _embedding_down(module, x, A, u, G):
    # padding_idx as in the base: the padding token's column of A gets no gradient
    return F.embedding(x, update.fold_down(A, u, G).T, padding_idx=module.padding_idx)


def _embedding_up(module, out, h, B, v, scale):
    return out + F.linear(h.to(out.dtype), update.fold_up(B, v, scale).to(out.dtype))


# The facts every Linear-like type shares (features on the last axis, y = x W^T + b): bridges reuse them.
LINEAR_LIKE = {"down": _linear_down, "up": _linear_up, "caps": {"linear": True, "out_last": True}, "peft": _lora_keys}

def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features): the sizes of nn.Linear and its subclasses (the quantized linear layers)."""
    return module.in_features, module.out_features


register_module_type("Linear", nn.Linear, dims=linear_dims, weight=lambda m: m.weight, owner=__name__, **LINEAR_LIKE)
for _name, _cls, _axis in (("Conv1d", nn.Conv1d, -2), ("Conv2d", nn.Conv2d, -3)):
    register_module_type(_name, _cls, dims=lambda m: (m.in_channels * math.prod(m.kernel_size), m.out_channels),
                         down=_conv_down, up=_conv_up, weight=_conv_weight, store=_conv_store, check=_conv_check,
                         out_axis=_axis, peft=_conv_peft, owner=__name__)
register_module_type("Embedding", nn.Embedding, dims=lambda m: (m.num_embeddings, m.embedding_dim),
                     down=_embedding_down, up=_embedding_up, weight=lambda m: m.weight.T, caps={"out_last": True},
                     input_dropout=False,
                     peft=lambda m, down, up: {"lora_embedding_A": down, "lora_embedding_B": up}, owner=__name__)
