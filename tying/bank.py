"""The FactorBank: one root-owned module that holds every factor exactly once.

Layout: ``bank[factor][key]`` is an ``nn.Parameter``; ``factor`` is one of the kind's factors (LoRA: A, B, u, v, G),
a pool or a pool's mixing weights, and ``key`` the tie group key from the plan (the module name with tied captures
replaced by ``*``; ``#<task>`` for a task's copy). Its state_dict keys, ``A.model:layers:*:self_attn:*``, are the keys
of the saved adapter file; the modules the adapter trains whole are copies under ``trained``, and the merge record
(``merged``, ``merged_task``) travels in the model's state_dict beside them (tying.engine).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from . import route
from .errors import ServingError
from .planner import Plan
from .spec import Init, TyingSpec
from .trained import trained_key
from .view import ADAPTERS_ATTR, BANK_ATTR


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


class FactorBank(nn.ModuleDict):
    """Owns every factor of one adapter once; see the module docstring. ``plan`` is the plan it was built from.

    Besides the factors (its only state_dict entries) it declares what ``apply_`` changed and what is merged, so the
    adapter can be merged, disabled and taken out again; the engine and the state_dict hooks keep these."""

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
        self.active = True  # chosen (PEFT's set_adapter); False: outside a route, every site computes its base alone
        self.merged = False  # the update is folded into the base weights (every site; kept by the engine)
        self.merged_task: str | None = None  # the task whose update merge_ folded into the base weights
        self.merged_unknown = False  # sites loaded merged from a checkpoint that does not say which task's update
        self.task_index = {t: i for i, t in enumerate(plan.spec.tasks or ())}  # a task's position in spec.tasks
        self.unmixable: tuple[str, ...] = ()  # set by apply_: the sites that cannot mix rows (empty: all can)
        self.requires_grad_before: dict[str, bool] = {}  # apply_: every base parameter's flag, for unapply_
        self.hooks: list = []  # apply_: the root's hooks this adapter registered (state_dict, shared down)
        self.pending: tuple[dict[str, bool], str | None] = ({}, None)  # a state_dict load's merge record, in flight
        self.unset: dict[str, torch.Tensor] | None = None  # apply_ on meta: values waiting for the base (tying.meta)

    def family(self) -> dict:
        """This adapter and the other named adapters of its model (name -> bank)."""
        peers = self.__dict__.get("peers")
        return dict(peers.items()) if peers is not None else {self.name: self}

    @property
    def path(self) -> str:
        """Where the bank sits under the model's root (the prefix of its state_dict keys)."""
        return BANK_ATTR if self.name is None else f"{ADAPTERS_ATTR}.{self.name}"

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
        return [n for n, b in self.items() if b.active]

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    @property
    def merged_adapters(self) -> list[str]:
        return [n for n, b in self.items() if b.merged]

    @property
    def merged(self) -> bool:
        return any(b.merged for b in self.values())

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
            b.active = n in names
