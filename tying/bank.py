"""The FactorBank: one root-owned module that holds every factor exactly once.

Layout: ``bank[factor][key]`` is an ``nn.Parameter``; ``factor`` is one of the kind's factors (LoRA: A, B, u, v, G),
a pool or a pool's mixing weights, and ``key`` the tie group key from the plan (the module name with tied captures
replaced by ``*``; ``#<task>`` for a task's copy). Its state_dict keys, ``A.model:layers:*:self_attn:*``, are the keys
of the saved adapter file; the modules the adapter trains whole are copies under ``trained``. What ``apply_`` changed
and what is merged is one typed record, :class:`BankState` (``bank.state``); its merge part, a :class:`MergeRecord`,
travels in the model's state_dict beside the factors (``merged``, ``merged_task``) and reads back from a checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import nn

from . import route
from .errors import NotAppliedError, ServingError, TyingError
from .planner import Plan
from .spec import Init, TyingSpec
from .trained import TrainedModule, trained_key
from .view import ADAPTERS_ATTR, BANK_ATTR, named_base_modules, occupant


@torch.no_grad()
def init_(t: torch.Tensor, init: Init, index: int = 0) -> torch.Tensor:
    """Fill ``t`` in place by ``init``; a seeded init uses ``seed + index`` on its own generator."""
    if t.device.type == "meta":
        return t
    if init.kind in ("zeros", "ones", "constant"):
        return t.fill_({"zeros": 0.0, "ones": 1.0}.get(init.kind, init.value))
    gen = None
    if init.seed is not None:
        gen = torch.Generator().manual_seed(init.seed + index)
    tmp = torch.empty(t.shape, dtype=torch.float32)  # draw on CPU in float32: same values on every device
    if init.kind == "kaiming_uniform":  # torch's nn.Linear default: bound 1/sqrt(fan_in)
        nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=gen)
    elif init.kind == "normal":
        nn.init.normal_(tmp, init.mean, init.std, generator=gen)
    elif init.kind == "uniform":
        nn.init.uniform_(tmp, -init.bound, init.bound, generator=gen)
    elif init.kind == "orthogonal":
        nn.init.orthogonal_(tmp, init.gain, generator=gen)
    return t.copy_(tmp)


def bank_path(name: str | None) -> str:
    """Where the bank of adapter ``name`` (None: the unnamed one) sits under the model's root."""
    return BANK_ATTR if name is None else f"{ADAPTERS_ATTR}.{name}"


@dataclass(frozen=True)
class MergeRecord:
    """Which sites' base weights hold the update (one flag per site, in the adapter's site order) and whose (a
    multi-task adapter's task; None: none, or a single-task adapter). A checkpoint of an adapted model carries it under
    the bank's path: ``<path>.merged`` (uint8 flags) and ``<path>.merged_task`` (the task's name in UTF-8, empty for
    none), always, so that merging does not change the state_dict's keys."""

    flags: tuple[bool, ...] = ()
    task: str | None = None
    KEYS: ClassVar[tuple[str, str]] = ("merged", "merged_task")  # under the bank's path in the model's state_dict

    def tensors(self, path: str, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The record as state_dict entries under ``path``."""
        task = list((self.task or "").encode()) if any(self.flags) else []
        return {f"{path}.merged": torch.tensor(self.flags, dtype=torch.uint8, device=device),
                f"{path}.merged_task": torch.tensor(task, dtype=torch.uint8, device=device)}

    @classmethod
    def read(cls, state_dict: Mapping[str, torch.Tensor], path: str = BANK_ATTR, *, pop: bool = False
             ) -> MergeRecord | None:
        """The record under ``path`` in ``state_dict`` (None: it holds none, as a plain base checkpoint); ``pop``
        takes its entries out."""
        get = state_dict.pop if pop else state_dict.get
        flags, task = get(f"{path}.merged", None), get(f"{path}.merged_task", None)
        if flags is None and task is None:
            return None
        task = bytes(task.tolist()).decode(errors="replace") if task is not None and task.numel() else None
        return cls(() if flags is None else tuple(bool(f) for f in flags.tolist()), task)


@dataclass
class BankState:
    """What ``apply_`` changed and what is merged, so that the adapter can be merged, disabled and taken out again:
    one adapter's state, owned by its bank (``bank.state``) and kept by the engine and the state_dict hooks."""

    active: bool = True  # chosen (PEFT's set_adapter); False: outside a route, every site computes its base alone
    merged: bool = False  # the update is folded into the base weights (every site)
    merged_task: str | None = None  # the task whose update merge_ folded into the base weights
    merged_unknown: bool = False  # sites loaded merged from a checkpoint that does not say which task's update
    unmixable: tuple[str, ...] = ()  # the sites that cannot mix rows (empty: all can)
    requires_grad_before: dict[str, bool] = field(default_factory=dict)  # every base parameter's flag, for unapply_
    hooks: list = field(default_factory=list)  # the root's hooks this adapter registered (state_dict, checks)
    pending: dict[str, bool] = field(default_factory=dict)  # a state_dict load in flight: its sites' merge flags
    pending_task: str | None = None  # and the task it says is merged (None: none, or not one of the adapter's)
    unset: dict[str, torch.Tensor] | None = None  # apply_ on meta: values waiting for the base (tying.meta)


class FactorBank(nn.ModuleDict):
    """Owns every factor of one adapter once; see the module docstring. ``plan`` is the plan it was built from.

    Besides the factors (its only state_dict entries) it owns :class:`BankState`, what ``apply_`` changed and what is
    merged."""

    def __init__(self, plan: Plan, placement: dict[tuple[str, str], tuple[torch.device, torch.dtype]] | None = None,
                 name: str | None = None, modules: dict[str, nn.Module] | None = None):
        """``placement[(factor, key)]`` gives a group's (device, dtype); torch's defaults otherwise. ``name``: the
        adapter's name (None: the model's unnamed adapter). ``modules``: the spec's train_modules (name -> module),
        of which the bank keeps a trained copy each (``trained``, keys with ``:`` for ``.``)."""
        super().__init__({g.factor: nn.ParameterDict() for g in plan.groups})
        if modules:  # one deepcopy of them all: a tensor two of them share (tied weights) stays one tensor
            self.trained = nn.ModuleDict({trained_key(n): m for n, m in copy.deepcopy(modules).items()})
            self.trained.requires_grad_(True)
        self.plan = plan  # plain attribute: frozen data, travels with deepcopy and torch.save
        self.name = name
        self._inits = {}
        for g in plan.groups:
            dev, dt = (placement or {}).get((g.factor, g.key), (None, None))
            self[g.factor][g.key] = nn.Parameter(torch.empty(g.shape, device=dev, dtype=dt), requires_grad=g.train)
            self._inits[(g.factor, g.key)] = (plan.spec.adapter.part(g.factor).init, g.index)
        self.reset_parameters()
        self.task_index = {t: i for i, t in enumerate(plan.spec.tasks or ())}  # a task's position in spec.tasks
        self.state = BankState()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "state" not in self.__dict__:  # pickled by an earlier tying, which kept these as the bank's own attributes
            old = {f.name: self.__dict__.pop(f.name) for f in fields(BankState) if f.name in self.__dict__}
            old.pop("pending", None)  # a (flags, task) pair then; no load is in flight in a pickle
            self.state = BankState(**old)

    @property
    def merged(self) -> bool:
        """``state.merged``; also what the merge record's state_dict key ``<path>.merged`` names (torch's distributed
        checkpoint resolves each key as attributes)."""
        return self.state.merged

    @property
    def merged_task(self) -> str | None:
        """``state.merged_task``, and the record's key ``<path>.merged_task``."""
        return self.state.merged_task

    def family(self) -> dict:
        """This adapter and the other named adapters of its model (name -> bank)."""
        peers = self.__dict__.get("peers")
        return dict(peers.items()) if peers is not None else {self.name: self}

    @property
    def path(self) -> str:
        """Where the bank sits under the model's root (the prefix of its state_dict keys)."""
        return bank_path(self.name)

    def current_task(self) -> str:
        """The task every row of this forward uses; a clear error when none (or one per row) was named."""
        sel = route.current(self)
        if sel is not None and sel.task is not None:
            return sel.task
        tasks = self.spec.tasks
        if sel is not None and sel.tasks is not None:
            raise ServingError(f"a {self.spec.adapter.kind} adapter computes one task per batch; give one task for "
                               f"the whole batch (tying.adapters(model, {tasks[0]!r})) or split the batch by task")
        raise ServingError(f"the adapter serves tasks {tasks}: name each row's task, `with tying.adapters(model, "
                           f"names):` (one task per row), or one task for the whole batch: tying.adapters(model, "
                           f"{tasks[0]!r})")

    @property
    def spec(self) -> TyingSpec:
        """The spec the bank was built from."""
        return self.plan.spec

    def reset_parameters(self) -> None:
        """Re-initialise every factor from the spec (seeded factors get their exact starting values)."""
        for (factor, key), (init, index) in self._inits.items():
            init_(self[factor][key], init, index)

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"{len(self._inits)} factors, {n:,} parameters"


class AdapterBanks(nn.ModuleDict):
    """The banks of a model's named adapters (``model.tying_adapters``), one per name. Each bank holds a plain handle
    to it (``peers``), so a site can answer for all the model's adapters."""

    # PEFT's BaseTunerLayer protocol (tying.integrations.peft_method): the factors of each adapter, by name
    adapter_layer_names, other_param_names = ("banks",), ()
    in_features = out_features = None
    disabled = False  # set with the sites' (PEFT's disable_adapter_layers), so that PEFT sees one state

    def __setitem__(self, name: str, bank: FactorBank) -> None:
        super().__setitem__(name, bank)
        object.__setattr__(bank, "peers", self)

    @property
    def banks(self) -> AdapterBanks:
        return self

    @property
    def active_adapters(self) -> list[str]:
        return [n for n, b in self.items() if b.state.active]

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    @property
    def merged_adapters(self) -> list[str]:
        return [n for n, b in self.items() if b.state.merged]

    @property
    def merged(self) -> bool:
        return any(b.state.merged for b in self.values())

    def _get_available_adapters(self) -> set[str]:
        return set(self.keys())

    _all_available_adapter_names = _get_available_adapters

    def get_base_layer(self) -> AdapterBanks:
        return self

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n, b in self.items():
            b.state.active = n in names


def banks(model: nn.Module) -> dict[str | None, FactorBank]:
    """Every adapter the model carries: name (None: the unnamed one) -> its bank."""
    out = {}
    bank = getattr(model, BANK_ATTR, None)
    if isinstance(bank, FactorBank):
        out[None] = bank
    named = getattr(model, ADAPTERS_ATTR, None)
    if named is not None:
        out.update(named.items())
    return out


_ONLY = object()  # name= left out: the model's only adapter


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


def wrappers(model: nn.Module, bank: FactorBank | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(site name, its :class:`~tying.site.SiteAdapter`) for every adapted site of ``bank``'s adapter (of the model's only adapter when
    ``bank`` is None)."""
    bank = bank_of(model) if bank is None else bank
    for site in bank.plan.sites:
        module = occupant(model, site.name)
        while module is not None and getattr(module, "bank", None) is not bank:
            module = module._modules.get("base") if getattr(type(module), "tying_wraps", False) else None
        if module is not None:
            yield site.name, module


def trained_of(model: nn.Module, bank: FactorBank) -> Iterator[tuple[str, TrainedModule]]:
    """(name, wrapper) of every module ``bank``'s adapter trains whole."""
    for name in bank.plan.train_modules:
        module = occupant(model, name)
        while getattr(module, "bank", None) is not bank:
            module = module._modules["base"]
        yield name, module


def named_base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(logical name, parameter) of the base model, every name of a shared parameter included."""
    for mname, module in named_base_modules(model, remove_duplicate=False):
        for pname, q in module._parameters.items():
            if q is not None:
                yield (f"{mname}.{pname}" if mname else pname), q
