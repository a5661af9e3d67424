"""The shared down projection: sibling sites that compute one ``h`` compute it once per forward.

Sites of one parent module whose down side is one tie group (same A, u and G keys),
such as q, k and v of a layer under ``lora`` or TL6, receive the same input and so compute the same
``h = G diag(u) A x``: the paper's fused-QKV LoRA. Within one forward of their parent module, the first of them computes
``h`` and the others reuse it; autograd then sums their gradients of ``h`` before the one backward of ``A x``. The
cache (:class:`SharedDown`) has an explicit lifetime: forward pre-hooks of the parent module and of the root model
open it, their forward hooks close it, and the outermost close clears it (also when the forward raises), so nothing
outlives a forward. The parent's hooks make activation checkpointing, which runs the parent's forward again outside
the root's, recompute exactly the products of the first pass; the root's make sharing work where the parent is a
plain container whose forward never runs. Reuse is exact or nothing: the very same
input tensor object, unchanged (version counter), unchanged factors, the same grad mode; anything else
recomputes. Calls outside both forwards, and traces under ``torch.compile``, take the plain per-site path.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn


class SharedDown:
    """The ``h`` of one group of sites while a forward of their parent module or of the root model runs; see the
    module docstring. Scopes nest (the root's forward contains the parent's): the outermost opens and clears."""

    def __init__(self):
        self.depth = 0  # open scopes (forwards of the parent or the root), not counting torch.compile traces
        self.entry = None  # (weakref to x, stamp, h)

    def open(self, *_) -> None:
        if not torch.compiler.is_compiling():
            self.depth += 1

    def close(self, *_) -> None:
        if not torch.compiler.is_compiling():
            self.depth = max(self.depth - 1, 0)  # torch calls an always_call hook even when an earlier pre-hook raised
            if self.depth == 0:
                self.entry = None

    def __deepcopy__(self, memo):  # a copy (or a pickle) starts closed: h belongs to one forward
        return SharedDown()

    def __reduce__(self):
        return SharedDown, ()

    def get(self, site: nn.Module, x: torch.Tensor, down: tuple) -> torch.Tensor:
        """``h`` of ``x`` under the site's down factors ``down`` (A, u, G): reused, or computed by the site."""
        if not self.depth:
            return site.project(x, down)
        stamp = (torch.is_grad_enabled(), None if x.is_inference() else x._version,
                 *(f._version for f in down if f is not None))
        e = self.entry
        if e is not None and e[0]() is x and e[1] == stamp:
            return e[2]
        h = site.project(x, down)
        self.entry = (weakref.ref(x), stamp, h)
        return h


def link_shared_down(model: nn.Module, wrappers: Mapping[str, nn.Module]) -> list:
    """Give every wrapper that can share its down projection a :class:`SharedDown` in ``share``, opened and closed
    by hooks on its parent module and on the root; return the hook handles. Members: wrappers whose class allows
    it, without dropout (each site draws its own mask), of one class, module type and parent, with the same A, u
    and G keys, on Linear-like modules (whose down product depends on the input and the factors alone; a
    convolution's also on its stride and padding); groups of one are left alone."""
    groups: dict[tuple, list[nn.Module]] = {}
    for name, w in wrappers.items():
        if w.shares_down and w.dropout is None and "A" in w.keys and w.mtype.has("linear"):
            key = (type(w), w.mtype.name, name.rpartition(".")[0], tuple(w.keys.get(f) for f in "AuG"))
            groups.setdefault(key, []).append(w)
    handles, shared = [], []
    for (_, _, parent, _), members in groups.items():
        if len(members) < 2:
            continue
        group = SharedDown()
        for w in members:
            w.share = group
        shared.append(group)
        module = model.get_submodule(parent)
        if module is not model:
            handles += [module.register_forward_pre_hook(group.open),
                        module.register_forward_hook(group.close, always_call=True)]
    if shared:
        root = _Groups(shared)
        handles += [model.register_forward_pre_hook(root.open),
                    model.register_forward_hook(root.close, always_call=True)]
    return handles


class _Groups:
    """The root's hooks: open and close every group (an object, so that copies and pickles of the model keep
    their own groups)."""

    def __init__(self, groups: list[SharedDown]):
        self.groups = groups

    def open(self, *_) -> None:
        for g in self.groups:
            g.open()

    def close(self, *_) -> None:
        for g in self.groups:
            g.close()
