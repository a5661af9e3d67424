"""Adapter kinds beyond LoRA, governed by the same tie / train / init rules.

- ``ia3``: a learned vector ``v`` (d_out) scales the module's output (IA3); ``v`` starts at ones.
  Mergeable: the base weight's output rows (and bias) are scaled by v.
- ``bottleneck``: a residual bottleneck adapter after the module's output,
  ``out + v * B(gelu(A(out))) * scale`` with A (r, d_out) "down", B (d_out, r) "up" and an optional
  output scale v. Non-linear, so it cannot be merged (``merge_`` says so before changing anything).

Both use the bank and the factor lookup of :class:`~tying.layers.TiedAdapter`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import UnsupportedModuleError
from .layers import SUPPORTED, NotMergeableError, TiedAdapter, module_kind

# which factors each kind needs and allows
KIND_FACTORS = {"lora": ({"A", "B"}, {"A", "B", "u", "v", "G"}), "ia3": ({"v"}, {"v"}),
                "bottleneck": ({"A", "B"}, {"A", "B", "v"})}


def _out_axis(module_kind: str) -> int:
    """The output-channel axis of the activations counted from the end (conv: before the spatial axes)."""
    return {"Conv1d": -2, "Conv2d": -3}.get(module_kind, -1)


def _weight_out_axis(module_kind: str) -> int:
    """The output-channel axis of the base weight."""
    return {"Linear": 0, "Conv1d": 0, "Conv2d": 0, "Conv1D": 1, "Embedding": 1}[module_kind]


class IA3Adapter(TiedAdapter):
    """Scales the base output by the factor v along its output channels."""

    def __init__(self, base, bank, keys, scale, dropout):
        super().__init__(base, bank, keys, scale, 0.0)
        self.module_kind = module_kind(base)

    def _shaped(self, v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[axis] = -1
        return v.view(shape)

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if self.merged:
            return out
        v = self.factor("v").to(out.dtype)
        axis = _out_axis(self.module_kind)
        return out * (v if axis == -1 else self._shaped(v, out.ndim, out.ndim + axis))

    def check_merge(self, sign: int) -> None:
        if sign < 0 and (self.factor("v") == 0).any():
            raise NotMergeableError("cannot unmerge an IA3 vector with zeros (the scaling is not invertible)")

    @torch.no_grad()
    def merge(self, sign: int = 1) -> None:
        v = self.factor("v")
        v = v if sign > 0 else 1.0 / v
        w = self.base.weight
        w.mul_(self._shaped(v, w.ndim, _weight_out_axis(self.module_kind)).to(w.dtype))
        if getattr(self.base, "bias", None) is not None:
            self.base.bias.mul_(v.to(self.base.bias.dtype))
        self.merged = sign > 0


class BottleneckAdapter(TiedAdapter):
    """A residual bottleneck on the base output (last-axis outputs only)."""

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        A, B, v = self.factor("A"), self.factor("B"), self.factor("v")
        h = out.to(A.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        y = F.linear(F.gelu(F.linear(h, A)), B if v is None else B * v[:, None])
        return out + (y * self.scale if self.scale != 1.0 else y).to(out.dtype)

    def check_merge(self, sign: int) -> None:
        raise NotMergeableError("a bottleneck adapter is non-linear (gelu), so it has no merged form; "
                                "keep it unmerged or use lora / ia3")


def wrapper_class(adapter_kind: str, kind: str, name: str) -> type[TiedAdapter]:
    """The wrapper class for an adapter kind on a module kind."""
    if adapter_kind == "lora":
        return SUPPORTED[kind]
    if adapter_kind == "bottleneck" and _out_axis(kind) != -1:
        raise UnsupportedModuleError(f"module {name!r} is a {kind}: bottleneck adapters support modules "
                                     "with last-axis outputs (Linear, Conv1D, Embedding)")
    return IA3Adapter if adapter_kind == "ia3" else BottleneckAdapter
