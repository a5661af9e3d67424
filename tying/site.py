"""The base of every kind's wrapper.

A wrapper keeps the original module as ``base`` and adds its kind's update by composition; it never materialises
``W + BA`` on the training path. It does not own its factors: it holds a plain (unregistered) handle to the
root-owned :class:`~tying.bank.FactorBank` and looks its factors up by key at call time, so every tied factor has
exactly one owner (one state_dict entry, one optimizer slot, one FSDP owner). What depends on the module's type
(sizes, products, weight layout) it asks its :class:`~tying.modtypes.ModuleType`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import pools, route, view
from .errors import NotMergeableError
from .modtypes import ModuleType
from .route import Selection
from .shared_down import SharedDown


def _identity(x):
    return x


_ABSENT = {None: None}  # stands for the bank's dict of a factor the spec leaves out: a light lookup needs no branch


class _Decides:
    """A site attribute whose change decides its light path again (:meth:`SiteAdapter.settle`)."""

    def __init__(self, default):
        self.default = default

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else obj.__dict__.get(self.slot, self.default)

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value
        obj.settle()


class SiteAdapter(view.Wrapper):
    """Base wrapper of one adapted module. A kind subclasses it and defines ``forward`` (and ``merge`` where its
    facts say it merges); the low-rank helpers ``project`` and ``down``/``up`` serve the LoRA family.

    **The light path.** Whether a forward can skip every check but three is decided when something changes, never
    per call: :meth:`settle` runs at apply time and whenever the site is merged, disabled, split or given tasks, and
    sets ``light`` to the site's factors as ``(dict, key)`` pairs in ``light_factors`` order (``None``: take the
    general path). A kind's forward then asks three things (a light site, an active adapter, no route in this call)
    and reads its factors without a branch. A site is light without tasks, pools, a router or tensor parallelism,
    unmerged and enabled."""

    light_factors: tuple[str, ...] = ()  # a kind with a light path: its factors, in the order its forward reads them
    merged = _Decides(False)  # the update is folded into the base weight
    disabled = _Decides(False)  # this site computes its base alone (PEFT's per-layer enable_adapters(False))

    def __init__(self, base: nn.Module, bank: nn.Module, keys: Mapping[str, str], scale: float, dropout: float,
                 mtype: ModuleType):
        super().__init__()
        self.base = base
        object.__setattr__(self, "bank", bank)  # a handle, not a child: the root owns the bank
        self.mtype = mtype
        self.keys = dict(keys)  # factor name -> parameter key in the bank
        self.task_keys: dict[str, dict[str, str]] = {}  # a multi-task adapter: task -> factor -> key (set_task_keys)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 and mtype.input_dropout else None
        object.__setattr__(self, "drop", self.dropout or _identity)  # a plain alias: no branch per call
        self.share: SharedDown | None = None  # set by link_shared_down
        a = bank.spec.adapter
        drawn = {f: a.factors[f] for f in self.keys if f in a.factors and a.factors[f].pool is not None}
        self.drawn = {f: (d, a.pools[d.pool], a.facts.factors[f]) for f, d in drawn.items() if d.mix != "router"}
        self.router = next(((f, d, a.pools[d.pool]) for f, d in drawn.items() if d.mix == "router"), None)
        # checkpoints see the unchanged base: ``q_proj.weight``, never ``q_proj.base.weight``
        self.register_state_dict_post_hook(_base_keys_out)
        self.register_load_state_dict_pre_hook(_base_keys_in)
        self.settle()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for name in ("merged", "disabled"):  # pickled by an earlier tying: plain attributes, no light path
            if name in self.__dict__:
                self.__dict__["_" + name] = self.__dict__.pop(name)
        self.settle()

    def settle(self) -> None:
        """Decide the light path (see the class docstring); called whenever what it depends on changes."""
        plain = (self.light_factors and not self.task_keys and self.tp is None and not self.drawn
                 and self.router is None and not self.merged and not self.disabled)
        bank = self.bank
        self.light = tuple((bank[f] if self.keys.get(f) is not None else _ABSENT, self.keys.get(f))
                           for f in self.light_factors) if plain else None

    tying_site = True  # marks site wrappers for code that imports no runtime class
    shares_down = True  # a kind whose sites read ``h`` of project() may share it between siblings
    tensor_parallel = False  # a kind whose update is project() and up() alone follows tensor parallelism's split
    tp = None  # set by apply_ on a tensor-parallel model (then settle()): the site's part of the split; a plain
    # attribute, not a _Decides: project() reads it on every call
    no_merge = "this adapter kind has no merged form; keep it unmerged"  # the reason, for kinds without merge()

    def selection(self, x: torch.Tensor | None = None) -> Selection | None:
        """What this forward computes: None for the base alone (the update is merged, the adapter disabled, or the
        call's route leaves it out), else a :class:`~tying.route.Selection`: ``route.ALL`` (every row, the adapter's
        one task) or, for a kind that :meth:`routes_rows`, some rows or a task per row. A batch ``x`` whose rows do not
        fit the route is a clear error."""
        sel = route.current(self.bank)
        if sel is None:
            return None if self.merged or self.disabled or not self.bank.state.active else route.ALL
        if sel.off:
            return None
        if x is not None and sel.count is not None:
            route.check_rows(sel, x.shape[0])
        return sel

    @property
    def bypass(self) -> bool:
        """Whether the forward is the base module's alone (see :meth:`selection`). A kind's forward returns the base
        output when it is set."""
        return self.selection() is None

    # PEFT's BaseTunerLayer protocol (tying.integrations.peft_method registers SiteAdapter as one), so that PEFT's and
    # transformers' status, checks and switches see a tying site as one layer of its adapter
    adapter_layer_names = other_param_names = ()  # the factors live in the bank, never in a layer

    # (active, merged and available adapters are the model's: PEFT sets and reads them for every layer alike)
    @property
    def active_adapters(self) -> list[str]:
        return [n for n, b in self.bank.family().items() if b.state.active]

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    @property
    def merged_adapters(self) -> list[str]:
        return [n for n, b in self.bank.family().items() if b.state.merged]

    def _get_available_adapters(self) -> set[str]:
        return set(self.bank.family())

    _all_available_adapter_names = _get_available_adapters

    @property
    def in_features(self) -> int:
        return self.mtype.dims(view.unwrap(self))[0]

    @property
    def out_features(self) -> int:
        return self.mtype.dims(view.unwrap(self))[1]

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled and self.merged:  # its weight holds the update: disabled, it would not be the base
            raise NotMergeableError("this site's update is merged into its weight; unmerge the adapter before "
                                    "disabling it")
        self.disabled = not enabled

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        self.bank.state.active = self.bank.name in ([adapter_names] if isinstance(adapter_names, str) else adapter_names)

    def get_base_layer(self) -> nn.Module:
        """The base module under this and any other wrappers."""
        return view.unwrap(self)

    def routes_rows(self) -> bool:  # (a kind that can says so, for sites without factors drawn from pools)
        """Whether this site's forward can take a mixed selection (some rows of the batch only, or the tasks of a
        multi-task adapter row by row); otherwise every row of a batch takes the adapter and one task."""
        return False

    def per_row(self, name: str, sel: Selection, n: int, fill: float) -> torch.Tensor | None:
        """The factor ``name`` for a forward of ``n`` rows: the one tensor where every row takes the same, else one
        per row (a leading row axis) gathered with gradients to each task's copy; rows the selection leaves out get
        ``fill`` (the factor's neutral value)."""
        if not sel.mixed:
            return self.factor(name)
        f = self.factor(name) if sel.tasks is None else self.task_rows(name, sel.tasks)
        if f is None or sel.rows is None:
            return f
        rows = sel.on(sel.rows, f.device)
        f = f.expand(rows.shape[0], *f.shape) if sel.tasks is None else f
        return f.new_full((n, *f.shape[1:]), fill).index_copy(0, rows, f)

    def factor(self, name: str) -> torch.Tensor | None:
        """The factor ``name`` of this site (of the batch's task, for a multi-task adapter), or None when the spec
        leaves it out."""
        key = self.keys.get(name) if not self.task_keys else self.task_keys[self.bank.current_task()].get(name)
        if key is None:
            return None
        t = self.bank[name][key] if self.tp is None else self.bank[name][key].to_local()  # this process's part
        if not self.drawn or name not in self.drawn:
            return t
        spec, pool, symbols = self.drawn[name]  # a static mix of a pool's entries (tying.pools)
        return pools.draw(self.factor(spec.pool), t, spec.mix, spec.k, symbols, pool.entry is not None)

    def set_task_keys(self, task_keys: Mapping[str, Mapping[str, str]]) -> None:
        """Make this site one of a multi-task adapter: ``task -> factor -> key`` (from the plan)."""
        self.task_keys = {t: dict(k) for t, k in task_keys.items()}
        self._rows_of = {}  # factor -> (distinct keys, position of each task's key) for task_rows
        self.settle()

    def task_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor | None:
        """The factor ``name`` for the rows of a mixed batch (``rows``: each row's position in the spec's tasks):
        the one shared tensor where every task uses the same copy, else one copy per row (a leading row axis),
        gathered with gradients to each task's copy."""
        if name not in self._rows_of:
            keys = [k.get(name) for k in self.task_keys.values()]
            distinct = list(dict.fromkeys(keys))
            self._rows_of[name] = (distinct, torch.tensor([distinct.index(k) for k in keys]))
        distinct, pos = self._rows_of[name]
        if distinct[0] is None:
            return None
        if len(distinct) == 1:
            return self.bank[name][distinct[0]]
        stack = torch.stack([self.bank[name][k] for k in distinct])
        return stack[pos.to(stack.device)[rows.to(stack.device)]]

    # ---- the low-rank path (LoRA family) ----------------------------------------------------------------------
    def down_factors(self) -> tuple:
        return self.factor("A"), self.factor("u"), self.factor("G")

    def project(self, x: torch.Tensor, down: tuple | None = None) -> torch.Tensor:
        """h = G diag(u) A dropout(x) in the module type's layout (features of a Linear: (r, tokens)); ``down``: the
        factors (A, u, G) where the caller has them."""
        if self.tp is not None:
            return self.tp.project(self, x)
        return self.mtype.down(self.base, self.drop(x), *(down or self.down_factors()))

    def down(self, x: torch.Tensor, down: tuple | None = None) -> torch.Tensor:
        """:meth:`project`, shared with the sibling sites of one forward where they compute the same."""
        if self.share is None:
            return self.project(x, down)
        return self.share.get(self, x, down or self.down_factors())

    def up(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """out + the update of the features ``h`` (scale diag(v) B h)."""
        return self.mtype.up(self.base, out, h, self.factor("B"), self.factor("v"), self.scale)

    # ---- merging ----------------------------------------------------------------------------------------------
    def check_merge(self, sign: int, dequantize: bool = False) -> None:
        """Raise NotMergeableError if ``merge(sign)`` cannot be done; called on every site before any merges (the
        engine refuses kinds without a merged form before asking)."""
        if self.mtype.weight is None:
            raise NotMergeableError(f"a {self.mtype.name} module has no weight tying can fold an update into; "
                                    "keep the adapter unmerged")
        if self.mtype.quantized and not dequantize:
            raise NotMergeableError(
                f"the base is a quantized {self.mtype.name}: merging decodes its weight, adds the update and "
                "re-encodes it, which loses precision (docs/quantized.md measures how much). Keep the adapter "
                "unmerged, or ask for it explicitly: tying.merge_(model, dequantize=True)")

    def merged_preview(self, sign: int = 1) -> list[torch.Tensor]:
        """What ``merge(sign)`` would write (the weight, and anything else the kind changes), computed aside, for a
        safe merge to check first. The LoRA family's: the weight plus the dense delta; a kind with another merge
        overrides it."""
        weight = self.mtype.weight(self.base).detach().float()
        return [weight + sign * self.delta().detach().float()]

    def merge(self, sign: int = 1) -> None:
        """Fold (sign=1) or unfold (sign=-1) the update into the base weight; a kind that merges defines it."""
        raise NotMergeableError(self.no_merge)

    def edit_weight(self, edit) -> None:
        """Apply ``edit`` in place to the base weight seen as a (d_out, d_in) matrix, and re-encode it where the
        module type decodes a copy (quantized types)."""
        with torch.no_grad():
            w = self.mtype.weight(self.base)
            edit(w)
            if self.mtype.store is not None:
                self.mtype.store(self.base, w)

    # ---- life cycle -------------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Called once the wrapper is in the model (a kind that installs something global does it here)."""

    def detach(self) -> None:
        """Called before the wrapper leaves the model; undoes :meth:`attach`."""

    def extra_repr(self) -> str:
        tasks = f", tasks={list(self.task_keys)}" if self.task_keys else ""
        return f"type={self.mtype.name}, keys={self.keys}{tasks}, scale={self.scale:g}, merged={self.merged}"


_BASE = "base."


def _base_keys_out(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook of a wrapper: move ``<site>.base.<k>`` to ``<site>.<k>``."""
    inner = prefix + _BASE
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + k[len(inner):]] = state_dict.pop(k)


def _base_keys_in(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a wrapper: accept ``<site>.<k>`` (plain and adapted checkpoints) as well
    as the older ``<site>.base.<k>``."""
    inner = prefix + _BASE
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + k[len(prefix):]] = state_dict.pop(k)
