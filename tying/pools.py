"""Factors drawn from pools: the shapes and the math of soft tying (docs/pools.md).

A pool (``adapter.pools``) holds ``size`` entries; a factor that names it is, at each site, a mix of them. The mixing
parameters are the factor's own (tied and trained as its spec says):

- ``weights``: logits over the entries; the factor is their softmax-weighted sum (MTL-LoRA's per-task weights).
- ``topk``: logits over the entries; the factor is the softmax-weighted sum of the ``k`` largest (VB-LoRA; with
  ``k: 1`` and frozen random logits, a fixed selection by index: MoS).
- ``router``: a linear map of the site's input (``router: input``, x) or of its down projection (``router: down``,
  h = A x) gives logits per token; their softmax mixes the entries per token (``reduce: token``: HydraLoRA) or
  averaged over every token of the batch (``reduce: batch``: Lily). The update then depends on the input: no merge.

A pool of whole entries has entries of the factor's shape. A pool of vectors (``entry: L``) assembles each factor tile
by tile: the factor's width axis (d_in or d_out; its other axis is the rank) is cut into pieces of length L, and every
piece has its own mix (VB-LoRA's vector bank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import SpecError


def width_axis(symbols: tuple[str, ...]) -> int:
    """The position of the width axis (d_in or d_out) in a factor of ``symbols`` (the other axis is the rank)."""
    return next(i for i, s in enumerate(symbols) if s != "rank")


def entry_length(pool, symbols: tuple[str, ...], shape: tuple[int, ...]) -> int | None:
    """L, the length of a pool's vectors where a factor of ``shape`` draws from it (None: whole entries)."""
    return shape[width_axis(symbols)] if pool.entry == "width" else pool.entry


def entry_shape(pool, symbols: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The pool tensor's shape where a factor of ``shape`` draws from it: (size, L) or (size, *shape)."""
    length = entry_length(pool, symbols, shape)
    return (pool.size, length) if length is not None else (pool.size, *shape)


def mixer_shape(factor, pool, symbols: tuple[str, ...], shape: tuple[int, ...], d_in: int, site: str) -> tuple:
    """The shape of the mixing parameters of a factor of ``shape`` at ``site``."""
    if factor.mix == "router":
        return (pool.size, d_in if factor.router == "input" else shape[symbols.index("rank")])
    length = entry_length(pool, symbols, shape)
    if length is None:
        return (pool.size,)
    w = width_axis(symbols)
    if shape[w] % length:
        raise SpecError(f"site {site!r}: factor shape {shape} cannot be cut into vectors of length {length} "
                        f"({shape[w]} is not a multiple of it); choose an entry length that divides every width")
    tiles = list(shape)
    tiles[w] = shape[w] // length
    return (*tiles, pool.size)


def weights(logits: torch.Tensor, mix: str, k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weights, indices) of a static mix over the last axis: softmax of all logits (indices None), or of the k
    largest (indices of those)."""
    if mix == "weights":
        return F.softmax(logits, dim=-1), None
    top, idx = logits.topk(k, dim=-1)
    return F.softmax(top, dim=-1), idx


def draw(pool: torch.Tensor, logits: torch.Tensor, mix: str, k: int | None, symbols: tuple[str, ...],
         tiled: bool) -> torch.Tensor:
    """The factor a static mix (``weights`` or ``topk``) draws from ``pool`` with ``logits``, in the factor's shape."""
    w, idx = weights(logits, mix, k)
    w = w.to(pool.dtype)
    if not tiled:  # whole entries: (size, *shape)
        chosen = pool if idx is None else pool[idx]
        return torch.tensordot(w, chosen, dims=([0], [0]))
    chosen = pool.unsqueeze(0) if idx is None else pool[idx]  # (..., k, L) or all (1, size, L) broadcast
    tiles = (w.unsqueeze(-1) * chosen).sum(-2)  # (*tile grid, L)
    axis = width_axis(symbols)  # the L pieces follow their tile index on the width axis
    tiles = tiles.movedim(-1, axis + 1)
    shape = list(tiles.shape[:axis]) + [tiles.shape[axis] * tiles.shape[axis + 1]] + list(tiles.shape[axis + 2:])
    return tiles.reshape(shape)


def route(router: torch.Tensor, inputs: torch.Tensor, reduce: str) -> torch.Tensor:
    """Mixing weights from a router (size, in) and its ``inputs`` (tokens, in): (tokens, size), or (size,) averaged
    over every token of the batch."""
    p = F.softmax(F.linear(inputs.to(router.dtype), router), dim=-1)
    return p.mean(0) if reduce == "batch" else p


def effective(adapter, keys: dict[str, str], get, site: str = "") -> dict[str, torch.Tensor]:
    """The factors of one site (name -> tensor, in the kind's shapes) from its group ``keys`` and ``get(part, key)``
    (the bank's or a file's tensors): plain factors as they are, drawn ones mixed from their pools. A factor mixed by
    a router has no form without an input: a clear error (merge, export and serving need one)."""
    out = {}
    for name in adapter.facts.factors:
        f = adapter.factors.get(name)
        if f is None:
            continue
        if f.pool is None:
            out[name] = get(name, keys[name])
            continue
        if f.mix == "router":
            raise SpecError(f"site {site!r}: factor {name} is mixed by a router on the input, so the update depends on "
                            "the input: it has no merged form, no PEFT LoRA export and no served form")
        out[name] = draw(get(f.pool, keys[f.pool]), get(name, keys[name]), f.mix, f.k, adapter.facts.factors[name],
                         adapter.pools[f.pool].entry is not None)
    return out


def undrawn(spec):
    """``spec`` with every factor drawn from a pool made a plain factor of its own per site (no pools): the form a
    static mix takes where each site's factor is computed once (serving)."""
    data = spec.model_dump(mode="json", exclude_defaults=True)
    adapter = data["adapter"]
    if not adapter.pop("pools", None):
        return spec
    for f in adapter["factors"].values():
        if f.pop("pool", None) is not None:
            for knob in ("mix", "k", "router", "reduce"):
                f.pop(knob, None)
            f["tie"] = []
            f["init"] = "zeros"
    return type(spec).model_validate(data)
