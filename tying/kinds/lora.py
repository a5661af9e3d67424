"""``lora``: the LoRA family, ``out + scale * diag(v) B G diag(u) A dropout(x)`` (u, v and the r x r core G
optional). Every tied-LoRA preset (tl5, tl6, VeRA-like, ShareLoRA, LoTR, ...) is this kind with other ties."""

from __future__ import annotations

from .. import update
from ..adapter import SiteAdapter
from . import register_kind


class LoRA(SiteAdapter):
    """The low-rank update on any module type with down/up products (Linear, Conv1D, Conv, Embedding, quantized)."""

    def routes_rows(self) -> bool:
        return self.mtype.has("linear")  # routed_add works in the Linear layout (features on the last axis)

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if self.bypass:
            return out
        rows = self.mixed_rows(x)
        if rows is not None:  # a mixed batch of a multi-task adapter: row i takes the factors of its own task
            return update.routed_add(out, self.drop(x), *(self.task_rows(n, rows) for n in "ABuvG"), self.scale)
        return self.up(out, self.down(x))

    def delta(self):
        """The update as a dense (d_out, d_in) matrix."""
        return update.delta(*(self.factor(n) for n in "ABuvG"), self.scale)

    def merge(self, sign: int = 1) -> None:
        d = self.delta()
        self.edit_weight(lambda w: w.add_(d.to(w.dtype), alpha=sign))
        self.merged = sign > 0


def export(factors: dict, scale: float, weight):
    """PEFT LoRA of one site: lora_A = G diag(u) A, lora_B = scale diag(v) B (exact, no SVD); ``weight`` (a
    callable giving the base weight) is not needed."""
    down, up = update.fold(*(factors.get(n) for n in "ABuvG"), scale)
    return down, up, {}


FACTORS = {"A": ("rank", "d_in"), "B": ("d_out", "rank"), "u": ("rank",), "v": ("d_out",), "G": ("rank", "rank")}
register_kind("lora", wrapper=LoRA, factors=FACTORS, required=("A", "B"),
              serving={"A": "A", "B": "B", "u": "u", "v": "v", "G": "G"}, export=export)
