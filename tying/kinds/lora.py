"""``lora``: the LoRA family, ``out + scale * diag(v) B G diag(u) A dropout(x)`` (u, v and the r x r core G
optional). Every tied-LoRA preset (tl5, tl6, VeRA-like, ShareLoRA, LoTR, ...) is this kind with other ties."""

from __future__ import annotations

import torch

from .. import pools, route, update
from ..errors import NotMergeableError
from ..site import SiteAdapter
from . import register_kind


class LoRA(SiteAdapter):
    """The low-rank update on any module type with down/up products (Linear, Conv1D, Conv, Embedding, quantized)."""

    tensor_parallel = True
    light_factors = ("A", "B", "u", "v", "G")

    def routes_rows(self) -> bool:  # routed_add works in the Linear layout (features on the last axis), on one process
        return self.mtype.has("linear") and self.tp is None and not self.drawn and self.router is None

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if self.light is not None and self.bank.state.active and not route.routed_now():  # (see SiteAdapter: light path)
            (dA, kA), (dB, kB), (du, ku), (dv, kv), (dG, kG) = self.light  # (the bank's dict, key) per factor
            A, B, u, v, G = dA[kA], dB[kB], du[ku], dv[kv], dG[kG]
            return self.mtype.up(self.base, out, self.down(x, (A, u, G)), B, v, self.scale)
        sel = self.selection(x)
        if sel is None:
            return out
        if not sel.mixed:
            return self.up(out, self.down(x)) if self.router is None else self.routed_up(out, x)
        # a routed batch: the rows that take this adapter (all or some), each with its task's factors
        rows = None if sel.rows is None else sel.on(sel.rows, x.device)
        xs, base = (x, out) if rows is None else (x.index_select(0, rows), out.index_select(0, rows))
        f = (self.factor(n) if sel.tasks is None else self.task_rows(n, sel.tasks) for n in "ABuvG")
        y = update.routed_add(base, self.drop(xs), *f, self.scale)
        return y if rows is None else out.index_copy(0, rows, y)

    def routed_up(self, out, x):
        """out + the update whose B a router mixes from a pool, per token or for the whole batch (tying.pools)."""
        name, spec, _ = self.router
        hT = self.down(x)  # (r, tokens)
        inputs = x.reshape(-1, x.shape[-1]) if spec.router == "input" else hT.t()
        w = pools.route(self.factor(name), inputs, spec.reduce)
        P = self.factor(spec.pool)  # (size, d_out, r)
        v = self.factor("v")
        if spec.reduce == "batch":
            return update.linear_up(out, hT, torch.tensordot(w.to(P.dtype), P, dims=([0], [0])), v, self.scale)
        y = torch.einsum("tk,kor,rt->to", w.to(P.dtype), P, hT.to(P.dtype))  # each token its own mix of B
        y = update.fold_up(y.t(), v, self.scale).t() if v is not None or self.scale != 1.0 else y
        return out + y.to(out.dtype).view(out.shape)

    def delta(self):
        """The update as a dense (d_out, d_in) matrix."""
        if self.router is not None:
            raise NotMergeableError(self.no_merge)
        return update.delta(*(self.factor(n) for n in "ABuvG"), self.scale)

    def check_merge(self, sign: int, dequantize: bool = False) -> None:
        if self.router is not None:
            raise NotMergeableError(self.no_merge)
        super().check_merge(sign, dequantize)

    @property
    def no_merge(self) -> str:
        return (f"factor {self.router[0]} is mixed by a router on the input, so the update depends on the input and "
                "has no merged form (nor a PEFT LoRA export); keep it unmerged" if self.router is not None else
                super().no_merge)

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
register_kind("lora", wrapper=LoRA, factors=FACTORS, required=("A", "B"), routed=("B",),
              serving={"A": "A", "B": "B", "u": "u", "v": "v", "G": "G"}, export=export)
