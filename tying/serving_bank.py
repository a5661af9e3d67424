"""The store behind :mod:`tying.serving`: every loaded adapter's factors in their tied form, stacked.

``ServingBank`` (``model.tying_serving``) holds one stacked buffer per factor role and width:

    A<d_in> (N, R, d_in)   B<d_out> (N, d_out, R)   u (N, R)   G (N, R, R)   v<d_out> (N, d_out)   LoRA family
    in<d_in> (N, d_in)     out<d_out> (N, d_out)                                                 IA3 (u, v)

One entry per tie group of each adapter, so a factor tied across 30 layers is held once per adapter. R is
the largest rank loaded; smaller ranks are zero-padded (padded rows of A are zero, so padded features stay
zero). A frozen factor equal to one already held (VeRA-like adapters with the same seeded A and B) is not
stored again. Entry 0 of u, G, v, in and out is the neutral element (ones, identity) that adapters without
that factor point at. Per adapter an int32 table (sites x roles) gives each site's entry of each role; -1
marks a role the adapter lacks (A and B of an IA3 adapter). Buffers are non-persistent: the model's
``state_dict`` keeps exactly its base keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import route
from .vocab import NEUTRAL_ROLES as NEUTRAL
from .vocab import ROLE_SHAPES

ROLES = tuple(ROLE_SHAPES)  # (the roles' vocabulary is tying.vocab's) a table's columns, in this order
COL = {r: i for i, r in enumerate(ROLES)}
PADDED = {r: tuple(i for i, a in enumerate(shape) if a == "rank") for r, shape in ROLE_SHAPES.items() if "rank" in shape}


def stack_key(role: str, d_in: int, d_out: int) -> str:
    """The buffer that holds ``role`` factors for a site of widths (d_in, d_out)."""
    return {"A": f"A{d_in}", "B": f"B{d_out}", "u": "u", "G": "G", "v": f"v{d_out}",
            "in": f"in{d_in}", "out": f"out{d_out}"}[role]


@dataclass
class Served:
    """One loaded adapter: its spec, rank, scale (0 for IA3: no low-rank part) and its table."""

    spec: object
    rank: int
    scale: float
    table: torch.Tensor  # (sites, roles) int32


class ServingBank(nn.Module):
    """Stacked factors of every served adapter (see the module docstring) and the sites they act on."""

    def __init__(self, sites: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype):
        """``sites``: site name -> (d_in, d_out), in table-row order."""
        super().__init__()
        self.sites = dict(sites)
        self.row = {name: i for i, name in enumerate(self.sites)}
        self.device, self.dtype = device, dtype
        self.rank = 0
        self.adapters: dict[str, Served] = {}
        self.refs: dict[str, list[int]] = {}  # stack -> number of (adapter, group) references per entry
        self.frozen: dict[str, set[int]] = {}  # stack -> entries that may be shared by equal frozen factors
        self.hooked = {}  # site name -> its hooks (tying.serving._Site)
        self.checks = None  # the root's hook that checks a routed batch's rows (tying.route.RowCheck)

    @property
    def active(self) -> list | None:
        """The row names this call's innermost tying.adapters block gave (None: outside any block)."""
        sel = route.current(self)
        return None if sel is None else sel.data[0]

    def stack(self, key: str) -> torch.Tensor | None:
        """The stacked buffer ``key``, or None if no adapter uses it."""
        return self._buffers.get(key)

    def _neutral(self, role: str, width: int) -> torch.Tensor:
        if role == "G":
            return torch.eye(self.rank, device=self.device, dtype=self.dtype)
        return torch.ones(self.rank if role == "u" else width, device=self.device, dtype=self.dtype)

    def _pad(self, role: str, t: torch.Tensor) -> torch.Tensor:
        """Zero-pad the rank axes of ``t`` to R."""
        for ax in PADDED.get(role, ()):
            if t.shape[ax] < self.rank:
                shape = list(t.shape)
                shape[ax] = self.rank - t.shape[ax]
                t = torch.cat([t, t.new_zeros(shape)], ax)
        return t

    def grow_rank(self, rank: int) -> None:
        """Pad every rank axis to ``rank``; the neutral u and G become the larger ones and identity."""
        if rank <= self.rank:
            return
        self.rank = rank
        for key, s in list(self._buffers.items()):
            role = key.rstrip("0123456789")
            if role in PADDED:
                s = torch.stack([self._pad(role, e) for e in s])
                if role in NEUTRAL:
                    s[0] = self._neutral(role, 0)
                self.register_buffer(key, s, persistent=False)

    def add(self, items: list[tuple[str, object, dict[str, torch.Tensor]]]) -> None:
        """Store the adapters ``[(name, plan, tensors by bank key)]``, growing each stack once. Checks are done.
        A frozen factor, or one that is the very tensor another item holds (a multi-task adapter's shared factors),
        is stored once."""
        self.grow_rank(max(p.spec.adapter.rank for _, p, _ in items))
        pending: dict[str, list[torch.Tensor]] = {}
        same: dict[int, tuple[str, int]] = {}  # id of a source tensor -> its entry (shared by tasks)
        for name, plan, tensors in items:
            a = plan.spec.adapter
            roles = a.facts.serving  # factor -> role (IA3's u and v scale the module's input and output)
            dims = {s.name: (s.d_in, s.d_out) for s in plan.sites}
            index = {}
            for g in plan.groups:
                role = roles[g.factor]
                d_in, d_out = dims[g.members[0]]
                key = stack_key(role, d_in, d_out)
                if key not in self.refs and role in NEUTRAL:
                    width = d_in if role == "in" else d_out
                    pending[key], self.refs[key], self.frozen[key] = [self._neutral(role, width)], [-1], set()
                src = tensors[f"{g.factor}.{g.key}"]
                if id(src) not in same:
                    t = self._pad(role, src.to(self.device, self.dtype))
                    same[id(src)] = (key, self._entry(key, t, pending, shared=not g.train))
                index[(g.factor, g.key)] = same[id(src)]
            for key, i in set(index.values()):  # one reference per adapter and entry
                self.refs[key][i] += 1
            table = torch.full((len(self.sites), len(ROLES)), -1, dtype=torch.int32)
            table[:, [COL[r] for r in NEUTRAL]] = 0
            for s in plan.sites:
                for factor, key in s.keys.items():
                    table[self.row[s.name], COL[roles[factor]]] = index[(factor, key)][1]
            lowrank = "A" in roles.values()  # a kind without a low-rank part scales it by 0
            self.adapters[name] = Served(plan.spec, a.rank, a.scale if lowrank else 0.0, table)
        for key, new in pending.items():
            old = self.stack(key)
            new = torch.stack(new)
            self.register_buffer(key, new if old is None else torch.cat([old, new]), persistent=False)

    def _entry(self, key: str, t: torch.Tensor, pending: dict, shared: bool) -> int:
        """Index of ``t`` in stack ``key``: an equal frozen entry when there is one, else a new one."""
        old = self.stack(key)
        n_old = 0 if old is None else old.shape[0]
        refs, frozen = self.refs.setdefault(key, []), self.frozen.setdefault(key, set())
        if shared:
            for i in frozen:
                if torch.equal(old[i] if i < n_old else pending[key][i - n_old], t):
                    return i
        pending.setdefault(key, []).append(t)
        refs.append(0)
        if shared:
            frozen.add(len(refs) - 1)
        return len(refs) - 1

    def remove(self, name: str) -> None:
        """Drop the adapter ``name`` and every entry no other adapter references; renumber the tables."""
        gone = self.adapters.pop(name)
        remap = {}
        for key in list(self.refs):
            refs = self.refs[key]
            for i in self._entries(gone.table, key).tolist():
                refs[i] -= 1
            keep = [i for i, r in enumerate(refs) if r != 0]
            if len(keep) == len(refs):
                continue
            if all(refs[i] < 0 for i in keep):  # nothing left but (perhaps) the neutral entry
                del self._buffers[key], self.refs[key], self.frozen[key]
                continue
            new_index = torch.full((len(refs),), -1, dtype=torch.int32)
            new_index[keep] = torch.arange(len(keep), dtype=torch.int32)
            self.register_buffer(key, self._buffers[key][keep], persistent=False)
            self.refs[key] = [refs[i] for i in keep]
            self.frozen[key] = {int(new_index[i]) for i in self.frozen[key] if new_index[i] >= 0}
            remap[key] = new_index
        if remap and self.adapters:  # renumber every adapter's table at once (one op per stack, not per adapter)
            tables = torch.stack([a.table for a in self.adapters.values()])
            for key, new_index in remap.items():
                rows, cols = (torch.tensor(c, dtype=torch.long) for c in self._cells(key))
                vals = tables[:, rows, cols]
                tables[:, rows, cols] = torch.where(vals >= 0, new_index[vals.clamp(min=0).long()], vals)
            for served, table in zip(self.adapters.values(), tables.unbind()):
                served.table = table.clone()
        rank = max((a.rank for a in self.adapters.values()), default=0)
        if rank < self.rank:  # drop the padding that only the removed adapter needed
            self.rank = rank
            for key, buf in list(self._buffers.items()):
                role = key.rstrip("0123456789")
                if role in PADDED:
                    axes = PADDED[role]
                    index = [slice(None)] + [slice(0, rank) if ax in axes else slice(None) for ax in range(buf.ndim - 1)]
                    self.register_buffer(key, buf[tuple(index)].contiguous(), persistent=False)

    def _cells(self, key: str) -> tuple[list[int], list[int]]:
        """(rows, columns) of the table cells that index stack ``key``."""
        cells = [(self.row[site], COL[role]) for site, (d_in, d_out) in self.sites.items()
                 for role in ROLES if stack_key(role, d_in, d_out) == key]
        return [r for r, _ in cells], [c for _, c in cells]

    def _entries(self, table: torch.Tensor, key: str) -> torch.Tensor:
        """The distinct entries of stack ``key`` that ``table`` references, without -1 and a neutral entry 0."""
        rows, cols = self._cells(key)
        vals = table[rows, cols].unique()
        return vals[vals >= (1 if key.rstrip("0123456789") in NEUTRAL else 0)]

    def resident_bytes(self) -> int:
        """Bytes of every tensor held for the served adapters: stacked factors and index tables."""
        return (sum(b.numel() * b.element_size() for b in self._buffers.values())
                + sum(s.table.numel() * s.table.element_size() for s in self.adapters.values()))
