"""The FactorBank: one root-owned module that holds every factor exactly once.

Layout: ``bank[factor][key]`` is an ``nn.Parameter``; ``factor`` is A, B, u or v and ``key`` the tie
group key from the plan (the module name with tied captures replaced by ``*``). Its state_dict keys,
``A.model:layers:*:self_attn:*``, are the keys of the saved adapter file.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ServingError
from .planner import Plan
from .spec import Init, TyingSpec


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
    """Owns every factor once; see the module docstring. ``plan`` is the plan it was built from."""

    def __init__(self, plan: Plan, placement: dict[tuple[str, str], tuple[torch.device, torch.dtype]] | None = None):
        """``placement[(factor, key)]`` gives a group's (device, dtype); torch's defaults otherwise."""
        super().__init__({g.factor: nn.ParameterDict() for g in plan.groups})
        self.plan = plan  # plain attribute: frozen data, travels with deepcopy and torch.save
        self._inits = {}
        for g in plan.groups:
            dev, dt = (placement or {}).get((g.factor, g.key), (None, None))
            self[g.factor][g.key] = nn.Parameter(torch.empty(g.shape, device=dev, dtype=dt), requires_grad=g.train)
            self._inits[(g.factor, g.key)] = (plan.spec.adapter.factors[g.factor].init, g.index)
        self.reset_parameters()
        # a multi-task adapter's routing (tying.tasks.route): one task for the whole batch, or one per row
        self.task: str | None = None
        self.rows: torch.Tensor | None = None  # (rows,) positions in spec.tasks
        self.row_count: int | None = None  # the rows a batch must have (a list of names was given)
        self.merged_task: str | None = None  # the task whose update merge_ folded into the base weights
        self.merged_unknown = False  # sites loaded merged from a checkpoint that does not say which task's update

    def current_task(self) -> str:
        """The task every row of this forward uses; a clear error when none (or one per row) was named."""
        if self.task is not None:
            return self.task
        tasks = self.spec.tasks
        if self.rows is not None:
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
