"""Tensor parallelism (transformers' ``tp_plan``, or torch's ``parallelize_module`` with ``ColwiseParallel`` /
``RowwiseParallel``): the factors follow the split of the modules that use them. Split the model first, then
``apply_`` (which sees each split module's weight as a DTensor and builds the factors to match; every process calls
it, and the new factors take process 0's values).

A colwise linear layer keeps rows of its weight (output features) on each process, a rowwise one columns (input
features). Their factors split the same way (Megatron's layout for LoRA):

======================  ==================  =====================  ================
factor                  colwise site        rowwise site           a site not split
======================  ==================  =====================  ================
A (r, d_in)             whole               columns (Shard(1))     whole
B (d_out, r), v (d_out) rows (Shard(0))     whole                  whole
u (r), G (r, r)         whole               whole                  whole
======================  ==================  =====================  ================

A colwise site gets the whole input: ``h = G diag(u) A x`` is the same on every process, which adds its rows of the
update, so the gradient of ``h`` is summed across processes in the backward. A rowwise site gets its columns of the
input: its columns of A give part of ``A x``, summed across processes in the forward, then u and G apply. Each factor
is a DTensor on the split's mesh (whole ones Replicate), so the optimizer, ``save_adapter``, ``load_adapter`` and
torch.distributed.checkpoint see it as one tensor.

A factor tied across modules has one split: B tied across the layers of a colwise q_proj is rows at every layer, A
tied across q/k/v (colwise) is whole everywhere. A tied across q/k/v and o_proj (rowwise) would be whole for the ones
and columns for the other: ``apply_`` refuses it, naming the factor, the modules and their splits.

Supported: the ``lora`` kind (every tied-LoRA preset) on Linear modules split along one mesh dimension, without
dropout (each process would draw its own mask for the same input), tasks or ``train_modules`` on split modules; the
rest is refused by ``apply_`` before anything changes. ``merge_`` is refused on a split model.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ShardingError
from .sharded import is_dtensor

SPLITS = {"colwise": {"B": 0, "v": 0}, "rowwise": {"A": 1}}  # style -> factor -> the dim it is cut along
WHAT = {None: "whole on every process", 0: "split by rows", 1: "split by columns"}


def site_style(name: str, module: nn.Module, mtype) -> tuple[str, object] | None:
    """('colwise' | 'rowwise', mesh) of a module whose weight tensor parallelism split; None for one not split."""
    w = module._parameters.get("weight")
    if not is_dtensor(w) or all(p.is_replicate() for p in w.placements):
        return None
    where = f"module {name!r} ({type(module).__name__}, weight placed {tuple(w.placements)})"
    if w.device_mesh.ndim != 1:
        raise ShardingError(f"{where}: tying follows tensor parallelism on a mesh of one dimension; this weight is "
                            f"placed on a {w.device_mesh.ndim}-dimensional mesh (FSDP with TP is not supported). "
                            "Nothing was applied")
    from torch.distributed.tensor import Shard

    linear = mtype.has("linear") and not mtype.quantized and mtype.weight is not None and mtype.weight(module) is w
    place = w.placements[0]  # a plain Shard: a subclass (transformers' packed gate_up: _StridedShard) cuts otherwise
    dim = place.dim if type(place) is Shard else None
    style = "colwise" if dim == 0 else "rowwise" if dim in (1, -1) else None
    if not linear or style is None:
        raise ShardingError(f"{where}: tying follows the column and row splits of Linear layers (ColwiseParallel, "
                            "RowwiseParallel); exclude this module from the targets, or do not split it. Nothing was "
                            "applied")
    return style, w.device_mesh


class Split:
    """How tensor parallelism splits an adapter: each site's style and each factor's placement (None: whole, else the
    dim it is cut along), on one mesh."""

    def __init__(self, mesh, styles: dict[str, str | None], dims: dict[tuple[str, str], int | None]):
        self.mesh, self.styles, self.dims = mesh, styles, dims

    def distribute(self, bank: nn.Module) -> None:
        """Make each factor of ``bank`` a DTensor with its placement, from process 0's values (a collective)."""
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        for (factor, key), dim in self.dims.items():
            p = bank[factor][key]
            placement = Replicate() if dim is None else Shard(dim)
            bank[factor][key] = nn.Parameter(distribute_tensor(p.detach(), self.mesh, [placement]),
                                             requires_grad=p.requires_grad)

    def attach(self, wrappers: dict[str, nn.Module]) -> None:
        group = self.mesh.get_group()
        for name, w in wrappers.items():
            w.tp = SiteSplit(self.styles[name], group)
            w.settle()


def plan_split(p, bases: dict[str, nn.Module], types: dict, wrapper: type) -> Split | None:
    """The split of the adapter ``p`` plans on a tensor-parallel model (None: no site is split); a ShardingError for
    what cannot follow it, before anything changes."""
    found = {s.name: site_style(s.name, bases[s.name], types[s.name]) for s in p.sites}
    meshes = list({id(f[1]): f[1] for f in found.values() if f}.values())
    if not meshes:
        return None
    a = p.spec.adapter
    problems = []
    if len(meshes) > 1:
        problems.append("its sites are split on different meshes")
    if not getattr(wrapper, "tensor_parallel", False):
        problems.append(f"adapter kind {a.kind!r} does not follow a split (kind lora does)")
    if p.spec.tasks:
        problems.append("a multi-task adapter (tasks) is not supported")
    if a.dropout > 0:
        problems.append(f"dropout {a.dropout:g}: each process would draw its own mask for the same input; set 0")
    split_modules = [n for n in p.train_modules if any(is_dtensor(q) for q in bases[n].parameters())]
    if split_modules:
        problems.append(f"train_modules {split_modules[:3]} are split")
    if problems:
        raise ShardingError("the model is split by tensor parallelism, and this adapter cannot follow it: "
                            + "; ".join(problems) + ". Nothing was applied")
    styles = {n: f[0] if f else None for n, f in found.items()}
    dims = {}
    for g in p.groups:
        need: dict[int | None, list[str]] = {}
        for member in g.members:
            need.setdefault(SPLITS.get(styles[member], {}).get(g.factor), []).append(member)
        if len(need) > 1:
            users = "; ".join(f"{ms[0]}{f' and {len(ms) - 1} more' if len(ms) > 1 else ''} "
                              f"({styles[ms[0]] or 'not split'}: {g.factor} {WHAT[dim]})" for dim, ms in need.items())
            raise ShardingError(
                f"factor {g.factor}.{g.key} is tied across modules that tensor parallelism splits differently: "
                f"{users}. A tied factor follows one split: untie it between them (e.g. tie it across the layers of "
                "one projection, not across q/k/v and o_proj), or split those modules alike. Nothing was applied")
        dims[(g.factor, g.key)] = next(iter(need))
    return Split(meshes[0], styles, dims)


class SiteSplit:
    """A site's part of the split: its style and the process group its sums run on (see the module docstring)."""

    def __init__(self, style: str | None, group):
        self.style, self.group = style, group

    def project(self, site: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``h = G diag(u) A x`` of this process's site, whole on every process."""
        A, u, G = site.down_factors()
        x = site.drop(x)
        if self.style == "rowwise":
            h = _SumForward.apply(site.mtype.down(site.base, x, A, None, None), self.group)
            h = h if u is None else h * u.to(h.dtype)[:, None]  # h^T is (r, tokens)
            return h if G is None else G.to(h.dtype) @ h
        h = site.mtype.down(site.base, x, A, u, G)
        return _SumBackward.apply(h, self.group) if self.style == "colwise" else h


class _SumForward(torch.autograd.Function):
    """Parts of ``h`` summed across the group in the forward; the gradient, whole on every process, passes as is."""

    @staticmethod
    def forward(ctx, h, group):
        h = h.clone()
        torch.distributed.all_reduce(h, group=group)
        return h

    @staticmethod
    def backward(ctx, g):
        return g, None


class _SumBackward(torch.autograd.Function):
    """``h``, the same on every process, passes as is; its gradient (each process's output rows give part of it) is
    summed across the group in the backward."""

    @staticmethod
    def forward(ctx, h, group):
        ctx.group = group
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g, None
