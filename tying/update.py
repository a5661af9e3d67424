"""One home for the update's math: ``delta x = scale * diag(v) B G diag(u) A x`` (u, v and the r x r core G
optional), its folds into two small matrices, the dense delta, the low-rank products with a hand-written backward,
and the routed product of a mixed batch (factors shared by every row or one per row). Wrappers, module types, merging
and export use these, and so do served adapters (tying.serving): they fold each row's factors here and run the same
routed product as the wrappers of applied adapters.

Compute dtype, one rule: factors are cast to the activations. The down product runs in the input's dtype, the
up product in the base output's dtype (as autocast would), so a bfloat16 base computes in bfloat16 with its
float32 factors cast (small matrices), never its activations; gradients reach the factors in their own dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fold_up(B: torch.Tensor, v: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """scale * diag(v) B: the up side of a site, (d_out, r); also any matrix scaled by one value per row."""
    if v is not None:
        return B * (v[:, None] if scale == 1.0 else v[:, None] * scale)
    return B if scale == 1.0 else B * scale


def fold_down(A: torch.Tensor, u: torch.Tensor | None = None, G: torch.Tensor | None = None) -> torch.Tensor:
    """G diag(u) A: the down side of a site, (r, d_in)."""
    A = fold_up(A, u)
    return A if G is None else G @ A


def fold_into_up(B, u=None, v=None, G=None, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """scale diag(v) B G diag(u): everything but A on the up side, (..., d_out, r). Leading axes batch it (serving
    folds one per row of a mixed batch, with ``scale`` a tensor of the leading shape)."""
    if isinstance(scale, torch.Tensor):
        scale = scale.to(B.dtype)[..., None, None]
    B = B * scale if v is None else B * (v[..., :, None] * scale)
    B = B if G is None else B @ G
    return B if u is None else B * u[..., None, :]


def fold(A, B, u=None, v=None, G=None, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(G diag(u) A, scale * diag(v) B) in A's dtype: the per-site pair that merging, serving and export need."""
    A = fold_down(A, u, G)
    return A, fold_up(B, v, scale).to(A.dtype)


def delta(A, B, u=None, v=None, G=None, scale: float = 1.0) -> torch.Tensor:
    """The update as a dense (d_out, d_in) matrix."""
    down, up = fold(A, B, u, v, G, scale)
    return up @ down


def _row_grad(gM: torch.Tensor, M: torch.Tensor, s: torch.Tensor | None, scale: float, needs: tuple[bool, bool]):
    """Gradients of M and s for ``M * s[:, None] * scale``, given the gradient ``gM`` of that product."""
    gs = None
    if s is not None and needs[1]:
        gs = (gM * M).sum(1) if scale == 1.0 else (gM * M).sum(1).mul_(scale)
        gs = gs.to(s.dtype)
    return (fold_up(gM, s, scale).to(M.dtype) if needs[0] else None), gs


class LowRankDown(torch.autograd.Function):
    """``h^T = diag(u) A x^T`` of shape (r, tokens) for a 2-D ``x``, computed in ``x``'s dtype.

    Each product takes the operand layouts that rank-r GEMMs run fastest on a CPU (``A x^T`` forward; ``g x`` and
    ``g^T A`` backward, measured in benchmarks/results/speed-layouts*.md); torch's own ``F.linear`` runs ``x A^T``
    1.6-2.1x slower in float32. Folding u here, not as separate autograd ops, also saves their per-op overhead."""

    @staticmethod
    def forward(ctx, x, A, u):
        Ae = fold_up(A, u).to(x.dtype)
        ctx.save_for_backward(x, A, u, Ae)
        return torch.mm(Ae, x.t())

    @staticmethod
    def backward(ctx, g):  # in g's dtype: under autocast the forward's products ran in another than the inputs'
        x, A, u, Ae = ctx.saved_tensors
        gx = torch.mm(g.t(), Ae.to(g.dtype)) if ctx.needs_input_grad[0] else None
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return gx, None, None
        return gx, *_row_grad(torch.mm(g, x.to(g.dtype)).to(A.dtype), A, u, 1.0, ctx.needs_input_grad[1:])


class LowRankUp(torch.autograd.Function):
    """``out + h (scale diag(v) B)^T`` for 2-D ``out`` (tokens, d_out) and ``hT`` (r, tokens), in one fused
    GEMM-and-add in ``out``'s dtype. The backward computes ``B^T g^T`` and ``h^T g`` as (r, ·) products, 3.5-3.8x
    faster in float32 than torch's ``g B`` and ``g^T h`` (speed-layouts.md); v and the scale are folded here too."""

    @staticmethod
    def forward(ctx, out, hT, B, v, scale):
        hT = hT.to(out.dtype)
        Bt = fold_up(B, v, scale).t().to(out.dtype, memory_format=torch.contiguous_format)  # (r, d_out)
        ctx.save_for_backward(hT, B, v, Bt)
        ctx.scale = scale
        return torch.addmm(out, hT.t(), Bt)

    @staticmethod
    def backward(ctx, g):
        hT, B, v, Bt = ctx.saved_tensors
        gh = torch.mm(Bt.to(g.dtype), g.t()) if ctx.needs_input_grad[1] else None
        if not (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
            return g, gh, None, None, None
        gB, gv = _row_grad(torch.mm(hT.to(g.dtype), g).t().to(B.dtype), B, v, ctx.scale, ctx.needs_input_grad[2:4])
        return g, gh, gB, gv, None


def linear_down(x: torch.Tensor, A, u=None, G=None) -> torch.Tensor:
    """h^T = G diag(u) A x^T, (r, tokens), for features on the last axis of ``x``."""
    if G is not None:  # the core mixes the rank axis: fold it (autograd ops on r x d_in), then the plain product
        A, u = fold_down(A, u, G), None
    return LowRankDown.apply(x.reshape(-1, x.shape[-1]), A, u)


def linear_up(out: torch.Tensor, hT: torch.Tensor, B, v=None, scale: float = 1.0) -> torch.Tensor:
    """out + h (scale diag(v) B)^T for the features ``hT`` of :func:`linear_down`; ``out`` keeps its shape."""
    return LowRankUp.apply(out.reshape(-1, out.shape[-1]), hT, B, v, scale).view(out.shape)


def linear_add_(out: torch.Tensor, hT: torch.Tensor, B, v=None, scale: float = 1.0) -> torch.Tensor:
    """:func:`linear_up` added into ``out`` in place (no autograd; ``out`` contiguous and nobody else's): at
    inference it saves an output-sized copy per site (GPT-2's 2304-wide c_attn, 256 tokens: 264 -> 96 us)."""
    out.view(-1, out.shape[-1]).addmm_(hT.t().to(out.dtype), fold_up(B, v, scale).t().to(out.dtype))
    return out


def _per_row(t: torch.Tensor, ndim: int) -> bool:
    return t.ndim > ndim


def routed_add(out: torch.Tensor, x: torch.Tensor, A, B, u=None, v=None, G=None, scale: float = 1.0) -> torch.Tensor:
    """out + scale diag(v) B G diag(u) A x for a mixed batch, rows on the first axis of ``x`` and ``out``: each
    factor is either shared by every row (its own shape: one dense product for the batch) or one per row (a
    leading row axis: batched products). Down in x's dtype, up in out's, as the rest of this module. The one routed
    product: wrappers of applied adapters (with autograd) and served adapters (their rows' factors gathered) run it."""
    b = out.shape[0]
    xs = x.reshape(b, -1, x.shape[-1])
    A = A.to(x.dtype)
    h = torch.bmm(xs, A.transpose(1, 2)) if _per_row(A, 2) else F.linear(xs, A)  # (rows, tokens, r)
    if u is not None:
        h = h * (u[:, None, :] if _per_row(u, 1) else u).to(h.dtype)
    if G is not None:
        G = G.to(h.dtype)
        h = torch.bmm(h, G.transpose(1, 2)) if _per_row(G, 2) else F.linear(h, G)
    h, B = h.to(out.dtype), B.to(out.dtype)
    if v is None and scale == 1.0 and _per_row(B, 2):  # B folded per row (served adapters): out + h B^T, one kernel
        return torch.baddbmm(out.reshape(b, -1, out.shape[-1]), h, B.transpose(1, 2)).view(out.shape)
    y = torch.bmm(h, B.transpose(1, 2)) if _per_row(B, 2) else F.linear(h, B)  # (rows, tokens, d_out)
    s = scale if v is None else (v[:, None, :] if _per_row(v, 1) else v).to(out.dtype) * scale
    return out + (y * s).view(out.shape)
