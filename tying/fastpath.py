"""One down projection per input for sites that share their down factors.

Sites of one parent module whose down side is the same tie group (same A, u and G keys), such as
q, k and v of a layer under ``lora`` or TL6, receive the same input ``x`` and so compute the same
``h = G diag(u) A x``: the paper's fused-QKV LoRA. The first of them in a forward computes ``h``;
the later ones reuse it. Autograd then sums the sites' gradients of ``h`` before the one backward
of ``A x``, so A's and x's gradients also cost one product each instead of one per site.

Reuse is exact or nothing: ``h`` is reused only by a later member of the group (members are
numbered in module order; a new forward starts over at the first), for the very same input tensor
object, unchanged, with unchanged factors and under the same grad mode; anything else recomputes.
The last member drops the entry, so nothing outlives the forward. Not used under ``torch.compile``,
which traces the plain per-site path (its common-subexpression elimination merges equal products).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

import torch
from torch import nn


class SharedDown:
    """The pending ``h`` of one group of ``size`` sites; see the module docstring."""

    def __init__(self, size: int):
        self.size = size
        self.entry = None  # (index of the last member that used it, weakref to x, stamp, h)

    def __deepcopy__(self, memo):  # a copy (or a pickle) starts empty: h belongs to one forward
        return SharedDown(self.size)

    def __reduce__(self):
        return SharedDown, (self.size,)

    def down(self, index: int, x: torch.Tensor, factors, compute: Callable[[torch.Tensor], torch.Tensor]
             ) -> torch.Tensor:
        """``compute(x)``, or the ``h`` an earlier member computed in this forward for this very ``x``, with
        ``x`` and the down ``factors`` unchanged since (version counters) and the same grad mode."""
        stamp = (torch.is_grad_enabled(), None if x.is_inference() else x._version,
                 *(f._version for f in factors if f is not None))
        e = self.entry
        if e is not None and index > e[0] and e[1]() is x and e[2] == stamp:
            h = e[3]
        else:
            h = compute(x)
        self.entry = None if index == self.size - 1 else (index, weakref.ref(x), stamp, h)
        return h


def link_shared_down(wrappers: Mapping[str, nn.Module]) -> None:
    """Give every wrapper that can share its down projection ``(group, index)`` in ``share_down``.

    Members: wrappers whose class allows it (``shares_down``), without dropout (each site draws its own
    mask), with the same parent module and the same A, u and G keys; groups of one are left alone.
    """
    groups: dict[tuple, list[nn.Module]] = {}
    for name, w in wrappers.items():
        if getattr(type(w), "shares_down", False) and w.dropout is None:
            down_keys = tuple(w.keys.get(f) for f in "AuG")
            groups.setdefault((type(w), name.rpartition(".")[0], down_keys), []).append(w)
    for members in groups.values():
        if len(members) > 1:
            shared = SharedDown(len(members))
            for i, w in enumerate(members):
                w.share_down = (shared, i)


def fold_up(B: torch.Tensor, v: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """scale * diag(v) B: the up side of a site, (d_out, r); also any matrix scaled by one value per row."""
    if v is not None:
        return B * (v[:, None] if scale == 1.0 else v[:, None] * scale)
    return B if scale == 1.0 else B * scale


def _row_grad(gM: torch.Tensor, M: torch.Tensor, s: torch.Tensor | None, scale: float, needs: tuple[bool, bool]):
    """Gradients of M and s for ``M * s[:, None] * scale``, given the gradient ``gM`` of that product."""
    gs = None
    if s is not None and needs[1]:
        gs = (gM * M).sum(1) if scale == 1.0 else (gM * M).sum(1).mul_(scale)
        gs = gs.to(s.dtype)
    return (fold_up(gM, s, scale).to(M.dtype) if needs[0] else None), gs


class LowRankDown(torch.autograd.Function):
    """``h^T = diag(u) A x^T`` of shape (r, tokens) for a 2-D ``x``, computed in ``x``'s dtype.

    Each product takes the operand layouts that rank-r GEMMs run fastest on this CPU (``A x^T`` forward;
    ``g x`` and ``g^T A`` backward, measured in benchmarks/results/speed-layouts*.md); torch's own
    ``F.linear`` runs ``x A^T`` 1.6-2.1x slower in float32. Folding u here, not as separate autograd ops,
    also saves their per-op overhead."""

    @staticmethod
    def forward(ctx, x, A, u):
        Ae = fold_up(A, u, 1.0).to(x.dtype)
        ctx.save_for_backward(x, A, u, Ae)
        return torch.mm(Ae, x.t())

    @staticmethod
    def backward(ctx, g):
        x, A, u, Ae = ctx.saved_tensors
        gx = torch.mm(g.t(), Ae) if ctx.needs_input_grad[0] else None
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return gx, None, None
        return gx, *_row_grad(torch.mm(g, x).to(A.dtype), A, u, 1.0, ctx.needs_input_grad[1:])


class LowRankUp(torch.autograd.Function):
    """``out + h (scale diag(v) B)^T`` for 2-D ``out`` (tokens, d_out) and ``hT`` (r, tokens), in one fused
    GEMM-and-add, computed in ``hT``'s dtype. The backward computes ``B^T g^T`` and ``h^T g`` as (r, ·)
    products, 3.5-3.8x faster in float32 than torch's ``g B`` and ``g^T h`` (speed-layouts.md); v and the
    scale are folded here too."""

    @staticmethod
    def forward(ctx, out, hT, B, v, scale):
        Bt = fold_up(B, v, scale).t().to(hT.dtype, memory_format=torch.contiguous_format)  # (r, d_out)
        ctx.save_for_backward(hT, B, v, Bt)
        ctx.scale = scale
        return torch.addmm(out, hT.t(), Bt)

    @staticmethod
    def backward(ctx, g):
        hT, B, v, Bt = ctx.saved_tensors
        gh = torch.mm(Bt, g.t()) if ctx.needs_input_grad[1] else None
        if not (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
            return g, gh, None, None, None
        gB, gv = _row_grad(torch.mm(hT, g).t().to(B.dtype), B, v, ctx.scale, ctx.needs_input_grad[2:4])
        return g, gh, gB, gv, None
