"""``ia3``: learned vectors scale the module's output (``v``, d_out) and/or its input (``u``, d_in; modules with
features on the last axis), as IA3 does for attention outputs and feed-forward inputs; both start at ones.
Mergeable: the base weight's output rows (and bias) are scaled by v, its input columns by u."""

from __future__ import annotations

import torch

from ..errors import NotMergeableError
from ..site import SiteAdapter
from . import register_kind


def along(t: torch.Tensor, ndim: int, axis: int, rows: bool = False) -> torch.Tensor:
    """``t`` shaped to broadcast along ``axis`` (counted from the end) of an ``ndim``-dim tensor; with ``rows``,
    ``t`` has one vector per row of the batch (the tensor's first axis)."""
    shape = [1] * ndim
    shape[axis] = -1
    if rows:
        shape[0] = t.shape[0]
    return t.view(shape)


class IA3(SiteAdapter):
    """Scales the base input by u (input features) and/or its output by v (output channels)."""

    shares_down = False

    def routes_rows(self) -> bool:
        return True  # element-wise: row i scaled by its task's vectors, on every module type with batch-first data

    def forward(self, x, *args, **kwargs):
        sel = self.selection(x)
        if sel is None:
            return self.base(x, *args, **kwargs)
        u, v = (self.per_row(n, sel, x.shape[0], 1.0) for n in "uv")  # rows left out: scaled by one
        if u is not None:
            x = x * along(u.to(x.dtype), x.ndim, -1, u.dim() == 2)
        out = self.base(x, *args, **kwargs)
        return out if v is None else out * along(v.to(out.dtype), out.ndim, self.mtype.out_axis, v.dim() == 2)

    def check_merge(self, sign: int, dequantize: bool = False) -> None:
        super().check_merge(sign, dequantize)
        if sign < 0 and any((f == 0).any() for f in (self.factor("u"), self.factor("v")) if f is not None):
            raise NotMergeableError("cannot unmerge an IA3 vector with zeros (the scaling is not invertible)")

    def merged_preview(self, sign: int = 1) -> list[torch.Tensor]:
        u, v = (None if f is None else (f if sign > 0 else 1.0 / f).float() for f in (self.factor("u"),
                                                                                     self.factor("v")))
        w = self.mtype.weight(self.base).detach().float()
        w = w * (1.0 if u is None else u[None, :]) * (1.0 if v is None else v[:, None])
        bias = getattr(self.base, "bias", None)
        return [w] if bias is None or v is None else [w, bias.detach().float() * v]

    def merge(self, sign: int = 1) -> None:
        u, v = (None if f is None else (f if sign > 0 else 1.0 / f) for f in (self.factor("u"), self.factor("v")))

        def scale(w):  # w is (d_out, d_in)
            if u is not None:
                w.mul_(u[None, :].to(w.dtype))
            if v is not None:
                w.mul_(v[:, None].to(w.dtype))
        self.edit_weight(scale)
        bias = getattr(self.base, "bias", None)
        if v is not None and bias is not None:
            with torch.no_grad():
                bias.mul_(v.to(bias.dtype))
        self.merged = sign > 0


register_kind("ia3", wrapper=IA3, factors={"u": ("d_in",), "v": ("d_out",)}, required=(("u", "v"),),
              rank_limit=(), needs={"weight"}, factor_needs={"u": {"linear"}}, serving={"u": "in", "v": "out"})
