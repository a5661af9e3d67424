"""``lora``: the LoRA family, ``out + scale * diag(v) B G diag(u) A dropout(x)`` (u, v and the r x r core G
optional). Every tied-LoRA preset (tl5, tl6, VeRA-like, ShareLoRA, LoTR, ...) is this kind with other ties."""

from __future__ import annotations

from .. import update
from ..adapter import SiteAdapter
from . import register_kind


class LoRA(SiteAdapter):
    """The low-rank update on any module type with down/up products (Linear, Conv1D, Conv, Embedding, quantized)."""

    tensor_parallel = True

    def routes_rows(self) -> bool:  # routed_add works in the Linear layout (features on the last axis), on one process
        return self.mtype.has("linear") and self.tp is None

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        sel = self.selection(x)
        if sel is None:
            return out
        if not sel.mixed:
            return self.up(out, self.down(x))
        # a routed batch: the rows that take this adapter (all or some), each with its task's factors
        rows = None if sel.rows is None else sel.on(sel.rows, x.device)
        xs, base = (x, out) if rows is None else (x.index_select(0, rows), out.index_select(0, rows))
        f = (self.factor(n) if sel.tasks is None else self.task_rows(n, sel.tasks) for n in "ABuvG")
        y = update.routed_add(base, self.drop(xs), *f, self.scale)
        return y if rows is None else out.index_copy(0, rows, y)

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
