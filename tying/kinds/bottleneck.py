"""``bottleneck``: a residual bottleneck adapter after the module's output, ``out + v * B(gelu(A(out))) * scale``
with A (r, d_out) "down", B (d_out, r) "up" and an optional output scale v. Non-linear, so it has no merged form
(``merge_`` says so before changing anything)."""

from __future__ import annotations

import torch.nn.functional as F

from .. import update
from ..site import SiteAdapter
from . import register_kind


class Bottleneck(SiteAdapter):
    """A residual bottleneck on the base output (last-axis outputs only)."""

    shares_down = False
    no_merge = ("a bottleneck adapter is non-linear (gelu), so it has no merged form; keep it unmerged or use "
                "lora / ia3")

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if self.selection(x) is None:
            return out
        A = self.factor("A")
        h = F.gelu(F.linear(self.drop(out.to(A.dtype)), A))
        return out + F.linear(h, update.fold_up(self.factor("B"), self.factor("v"), self.scale)).to(out.dtype)


register_kind("bottleneck", wrapper=Bottleneck, factors={"A": ("rank", "d_out"), "B": ("d_out", "rank"),
                                                         "v": ("d_out",)},
              required=("A", "B"), rank_limit=("d_out",), needs={"out_last"})
