"""``dora``: weight-decomposed low-rank adaptation (DoRA, Liu et al. 2024, arXiv 2402.09353) with tying.

The adapted weight is ``W' = mag * (W + dW) / ||W + dW||`` row by row (``dW`` the LoRA update, u, v and G included),
so the forward is ``mag * (W x + dW x) + bias`` with ``mag = m * ||W|| / ||W + dW||``. As in the paper and PEFT,
the norm ``||W + dW||`` is a constant for the backward. The magnitude ``m`` (d_out) is stored *relative* to the
base weight's row norms ``||W||``: it starts at ones (the base model exactly, with a zero update), and a magnitude
tied across layers whose weights differ stays meaningful. Export writes PEFT's absolute ``lora_magnitude_vector``
(``m * ||W||``), so it needs the real base weights. Merge is exact (the applied ``mag`` is kept to unmerge).
Not mixable in served batches (the output scale depends on each row's adapter and the base weight).
"""

from __future__ import annotations

import torch

from .. import update
from ..adapter import SiteAdapter
from ..errors import AdapterFileError
from . import register_kind
from .lora import FACTORS


def _magnitude(m, W, dW) -> torch.Tensor:
    """m * ||W|| / ||W + dW|| per output row; the norms are constants (no gradient)."""
    with torch.no_grad():
        ratio = W.norm(dim=1) / (W + dW.to(W.dtype)).norm(dim=1)
    return m * ratio.to(m.dtype)


class DoRA(SiteAdapter):
    """The magnitude-scaled LoRA update on modules with features on the last axis and a readable weight."""

    def delta(self) -> torch.Tensor:
        return update.delta(*(self.factor(n) for n in "ABuvG"), self.scale)

    def magnitude(self) -> torch.Tensor:
        """The applied per-row scale ``m * ||W|| / ||W + dW||``."""
        return _magnitude(self.factor("m"), self.mtype.weight(self.base).detach(), self.delta().detach())

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if self.merged:
            return out
        bias = getattr(self.base, "bias", None)
        bias = None if bias is None else bias.to(out.dtype)
        y = self.up(out if bias is None else out - bias, self.down(x)) * self.magnitude().to(out.dtype)
        return y if bias is None else y + bias

    def merge(self, sign: int = 1) -> None:
        if sign > 0:
            d, mag = self.delta(), self.magnitude().detach()
            self.applied = mag  # the exact scale to divide out again
            self.edit_weight(lambda w: w.add_(d.to(w.dtype)).mul_(mag[:, None].to(w.dtype)))
        else:
            d, mag = self.delta(), self.applied
            self.edit_weight(lambda w: w.div_(mag[:, None].to(w.dtype)).sub_(d.to(w.dtype)))
        self.merged = sign > 0


def export(factors: dict, scale: float, weight=None):
    """PEFT DoRA of one site: LoRA's factors and the absolute magnitude ``m * ||W||``."""
    if weight is None or weight.device.type == "meta":
        raise AdapterFileError("a dora adapter exports its magnitude relative to the base weight's row norms; "
                               "export it from a model with real weights, not a meta-device one")
    down, up = update.fold(*(factors.get(n) for n in "ABuvG"), scale)
    return down, up, {"lora_magnitude_vector": factors["m"] * weight.float().norm(dim=1).to(factors["m"].dtype)}


register_kind("dora", wrapper=DoRA, factors={**FACTORS, "m": ("d_out",)}, required=("A", "B", "m"),
              needs={"lowrank", "linear", "weight"}, export=export, peft_config={"use_dora": True})
