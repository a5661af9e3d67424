"""``dora``: weight-decomposed low-rank adaptation (DoRA, Liu et al. 2024, arXiv 2402.09353) with tying.

The adapted weight is ``W' = mag * (W + dW) / ||W + dW||`` row by row (``dW`` the LoRA update, u, v and G included),
so the forward is ``mag * (W x + dW x) + bias`` with ``mag = m * ||W|| / ||W + dW||``. As in the paper and PEFT,
the norm ``||W + dW||`` is a constant for the backward. The magnitude ``m`` (d_out) is stored *relative* to the
base weight's row norms ``||W||``: it starts at ones (the base model exactly, with a zero update), and a magnitude
tied across layers whose weights differ stays meaningful. Export writes PEFT's absolute ``lora_magnitude_vector``
(``m * ||W||``), so it needs the real, unmerged base weights. Merge is exact up to rounding (the applied ``mag`` is
kept to divide out again). With dropout in training, the dropped input reaches only the update's term (PEFT drops
it in the base term too); at inference both are the same. Not mixable in served batches (the output scale depends
on each row's adapter and on the base weight).
"""

from __future__ import annotations

import torch

from ..errors import NotMergeableError
from . import register_kind
from .lora import FACTORS, LoRA
from .lora import export as lora_export


def _magnitude(m, W, dW) -> torch.Tensor:
    """m * ||W|| / ||W + dW|| per output row; the norms are constants (no gradient); a zero row keeps scale 0."""
    with torch.no_grad():
        norm = (W + dW.to(W.dtype)).norm(dim=1)
        ratio = W.norm(dim=1) / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return m * ratio.to(m.dtype)


class DoRA(LoRA):
    """The magnitude-scaled LoRA update on modules with features on the last axis and a readable weight."""

    tensor_parallel = False  # the magnitude needs the whole weight's column norms
    light_factors = ()  # its forward reads no light path (the magnitude needs the weight's norms each time)

    def routes_rows(self) -> bool:
        return False  # the output scale depends on each row's factors and the base weight: one task per batch

    applied = None  # the per-row scale a merge applied (None: not merged here, e.g. merged in a loaded checkpoint)

    def magnitude(self) -> torch.Tensor:
        """The applied per-row scale ``m * ||W|| / ||W + dW||``."""
        return _magnitude(self.factor("m"), self.mtype.weight(self.base).detach(), self.delta().detach())

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if self.selection(x) is None:
            return out
        bias = getattr(self.base, "bias", None)
        bias = None if bias is None else bias.to(out.dtype)
        y = self.up(out if bias is None else out - bias, self.down(x)) * self.magnitude().to(out.dtype)
        return y if bias is None else y + bias

    def check_merge(self, sign: int, dequantize: bool = False) -> None:
        super().check_merge(sign, dequantize)
        if sign < 0 and self.applied is None:
            raise NotMergeableError("this DoRA site was merged in a loaded checkpoint, which does not store the scale "
                                    "the merge applied; load an unmerged checkpoint instead")
        if sign < 0 and (self.applied == 0).any():
            raise NotMergeableError("cannot unmerge a DoRA update whose magnitude has zeros (rows scaled to 0)")

    def merge(self, sign: int = 1) -> None:
        d = self.delta()
        if sign > 0:
            mag = self.applied = self.magnitude().detach()  # the exact scale to divide out again
            self.edit_weight(lambda w: w.add_(d.to(w.dtype)).mul_(mag[:, None].to(w.dtype)))
        else:
            mag = self.applied
            self.edit_weight(lambda w: w.div_(mag[:, None].to(w.dtype)).sub_(d.to(w.dtype)))
        self.merged = sign > 0


def export(factors: dict, scale: float, weight):
    """PEFT DoRA of one site: LoRA's factors and the absolute magnitude ``m * ||W||`` (``weight()`` gives the
    site's dense, unmerged base weight)."""
    down, up, _ = lora_export(factors, scale, weight)
    return down, up, {"lora_magnitude_vector": factors["m"] * weight().float().norm(dim=1).to(factors["m"].dtype)}


register_kind("dora", wrapper=DoRA, factors={**FACTORS, "m": ("d_out",)}, required=("A", "B", "m"),
              needs={"lowrank", "linear", "weight"}, export=export, peft_config={"use_dora": True})
