"""A base module that a spec trains whole (``train_modules``, e.g. a classification head).

The adapter trains its own copy of the module, held in its bank (``<bank>.trained.<name>``) like a factor: the base
module keeps its values and its keys, so a disabled adapter is exactly the base (as PEFT's ``modules_to_save``), a
plain checkpoint still loads, and several adapters may each train their own copy of one module. In the model the
module's place is taken by a :class:`TrainedModule`, which answers with the adapter's copy where the adapter applies
and with what it wraps (the base, or another adapter's wrapper) elsewhere: while it is disabled, or for the rows a
route gives to the base or to another adapter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import route
from .errors import ServingError
from .view import Wrapper


def trained_key(name: str) -> str:
    """The key of module ``name``'s copy in its bank's ``trained`` ModuleDict (dots are not allowed there)."""
    return name.replace(".", ":")


class TrainedModule(Wrapper):
    """Sits where a module trained whole sat: ``base`` (what it wraps, under the module's own keys) answers where the
    adapter does not apply, the bank's copy where it does."""

    def __init__(self, base: nn.Module, bank: nn.Module, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.disabled = False  # the base alone here (PEFT's per-layer enable_adapters(False))
        self.attached = True  # False once unapply_ took the wrapper out
        object.__setattr__(self, "bank", bank)  # a handle, not a child: the root owns the bank
        self.register_state_dict_post_hook(_keys_out)
        self.register_load_state_dict_pre_hook(_keys_in)

    @property
    def trained(self) -> nn.Module:
        """The adapter's copy of the module."""
        return self.bank.trained[trained_key(self.name)]

    def forward(self, *args, **kwargs):
        sel = route.current(self.bank)
        if sel is None:
            if self.disabled or not self.bank.state.active:
                return self.base(*args, **kwargs)
            if any(t.bank.state.active for t in self.chain()[1:]):
                raise ServingError(f"module {self.name!r} is trained whole by several active adapters "
                                   f"({', '.join(repr(n) for n in self.active_adapters)}), and whole modules do not "
                                   "add up: activate one of them, or route rows with tying.adapters")
            return self._run(*args, **kwargs)
        if sel.off:
            return self.base(*args, **kwargs)
        if sel.rows is None:
            return self._run(*args, **kwargs)
        trained, base = self._run(*args, **kwargs), self.base(*args, **kwargs)
        if not isinstance(trained, torch.Tensor):
            raise ServingError(f"module {self.name!r}, which the adapter trains whole, returns a "
                               f"{type(trained).__name__}, so its rows cannot be mixed with the base's; give every "
                               "row of the batch this adapter, or none")
        rows = sel.on(sel.rows, trained.device)
        return base.index_copy(0, rows, trained.index_select(0, rows))

    def _run(self, *args, **kwargs):
        """The copy's forward; a copy kept in another floating dtype than the inputs (float32 for training a
        half-precision model) gets its floating inputs cast to it, and gives its output back in theirs."""
        module = self.trained
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()),
                     None)
        own = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        if first is None or own is None or own == first.dtype:
            return module(*args, **kwargs)

        def cast(a):
            return a.to(own) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        out = module(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        return out.to(first.dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    def chain(self) -> list[TrainedModule]:
        """This wrapper and the ones it wraps (other adapters training the same module), outermost first."""
        out, m = [], self
        while isinstance(m, TrainedModule):
            out.append(m)
            m = m._modules["base"]
        return out

    # PEFT's layer protocol (tying.integrations.peft_method registers the class): its adapters' copies by name
    adapter_layer_names, other_param_names, merged_adapters, merged = ("modules_to_save",), (), [], False

    @property
    def modules_to_save(self) -> Copies:
        """The copies of every adapter that trains this module whole, by adapter name (a live view)."""
        return Copies(self)

    @property
    def active_adapters(self) -> list[str]:
        return [t.bank.name for t in self.chain() if t.bank.state.active]

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    def _get_available_adapters(self) -> set[str]:
        return {t.bank.name for t in self.chain()}

    _all_available_adapter_names = _get_available_adapters

    def get_base_layer(self) -> nn.Module:
        return self.chain()[-1].base

    def enable_adapters(self, enabled: bool) -> None:
        for t in self.chain():
            t.disabled = not enabled

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        for t in self.chain():
            t.bank.state.active = t.bank.name in names


class Copies(Mapping):
    """Adapter name -> its copy of a module trained whole, for every adapter still training it (PEFT's
    ``modules_to_save``; also ``copies.<name>``)."""

    def __init__(self, wrapper: TrainedModule):
        self._wrapper = wrapper

    def _live(self) -> dict[str, nn.Module]:
        return {t.bank.name: t.trained for t in self._wrapper.chain() if t.attached}

    def __getitem__(self, name: str) -> nn.Module:
        return self._live()[name]

    def __getattr__(self, name: str) -> nn.Module:
        try:
            return self._live()[name]
        except KeyError:
            raise AttributeError(name) from None

    def __iter__(self):
        return iter(self._live())

    def __len__(self) -> int:
        return len(self._live())


def _keys_out(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: ``<name>.base.<k>`` becomes ``<name>.<k>`` (the base's own keys)."""
    inner = prefix + "base."
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + k[len(inner):]] = state_dict.pop(k)


def _keys_in(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: ``<name>.<k>`` loads into the base."""
    inner = prefix + "base."
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + k[len(prefix):]] = state_dict.pop(k)
