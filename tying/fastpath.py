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

    def down(self, index: int, x: torch.Tensor, factors, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
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
