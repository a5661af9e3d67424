"""Adapter kinds beyond LoRA, governed by the same tie / train / init rules.

- ``ia3``: learned vectors scale the module's output (``v``, d_out) and/or its input (``u``, d_in;
  Linear and Conv1D), as IA3 does for attention outputs and feed-forward inputs; both start at ones.
  Mergeable: the base weight's output rows (and bias) are scaled by v, its input columns by u.
- ``bottleneck``: a residual bottleneck adapter after the module's output,
  ``out + v * B(gelu(A(out))) * scale`` with A (r, d_out) "down", B (d_out, r) "up" and an optional
  output scale v. Non-linear, so it cannot be merged (``merge_`` says so before changing anything).
- ``prefix``: prefix tuning on transformers attention modules: ``pk`` and ``pv`` (r x kv width; keys, values)
  are r virtual tokens that every query of the layer attends to, prepended inside the attention
  function (so positions, the KV cache and ``generate()`` are untouched). Needs the ``sdpa``
  attention implementation; no merged form.

All use the bank and the factor lookup of :class:`~tying.layers.TiedAdapter`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import UnsupportedModuleError
from .layers import SUPPORTED, NotMergeableError, TiedAdapter, kv_dim, module_kind

# which factors each kind needs and allows
KIND_FACTORS = {"lora": ({"A", "B"}, {"A", "B", "u", "v", "G"}), "ia3": (set(), {"u", "v"}),
                "bottleneck": ({"A", "B"}, {"A", "B", "v"}), "prefix": ({"pk", "pv"}, {"pk", "pv"})}


def _out_axis(module_kind: str) -> int:
    """The output-channel axis of the activations counted from the end (conv: before the spatial axes)."""
    return {"Conv1d": -2, "Conv2d": -3}.get(module_kind, -1)


def _weight_out_axis(module_kind: str) -> int:
    """The output-channel axis of the base weight."""
    return {"Linear": 0, "Conv1d": 0, "Conv2d": 0, "Conv1D": 1, "Embedding": 1}[module_kind]


def _in_axis(module_kind: str) -> int:
    """The input-feature axis of the base weight (IA3's u: Linear and Conv1D only)."""
    return {"Linear": 1, "Conv1D": 0}[module_kind]


class IA3Adapter(TiedAdapter):
    """Scales the base input by u (input features) and/or its output by v (output channels)."""

    def __init__(self, base, bank, keys, scale, dropout):
        super().__init__(base, bank, keys, scale, 0.0)
        self.module_kind = module_kind(base)

    def _shaped(self, v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[axis] = -1
        return v.view(shape)

    def forward(self, x, *args, **kwargs):
        u, v = self.factor("u"), self.factor("v")
        if self.merged:
            return self.base(x, *args, **kwargs)
        out = self.base(x if u is None else x * u.to(x.dtype), *args, **kwargs)
        if v is None:
            return out
        v = v.to(out.dtype)
        axis = _out_axis(self.module_kind)
        return out * (v if axis == -1 else self._shaped(v, out.ndim, out.ndim + axis))

    def check_merge(self, sign: int) -> None:
        if sign < 0 and any((f == 0).any() for f in (self.factor("u"), self.factor("v")) if f is not None):
            raise NotMergeableError("cannot unmerge an IA3 vector with zeros (the scaling is not invertible)")

    @torch.no_grad()
    def merge(self, sign: int = 1) -> None:
        w = self.base.weight
        u, v = self.factor("u"), self.factor("v")
        if u is not None:
            w.mul_(self._shaped(u if sign > 0 else 1.0 / u, w.ndim, _in_axis(self.module_kind)).to(w.dtype))
        if v is not None:
            v = v if sign > 0 else 1.0 / v
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


class PrefixAdapter(TiedAdapter):
    """Prefix tuning on a transformers attention module: its keys and values gain ``rank`` learned
    entries (factors ``pk`` for keys and ``pv`` for values, rank x kv width) that every query may attend to."""

    def __init__(self, base, bank, keys, scale, dropout):
        super().__init__(base, bank, keys, scale, 0.0)
        self.kv_heads = kv_dim(base) // base.head_dim
        _check_sdpa(base)
        _install_prefix_attention()

    def forward(self, *args, **kwargs):
        _check_sdpa(self.base)  # another implementation would silently ignore the prefix
        prefix = (self.factor("pk"), self.factor("pv"), self.kv_heads)
        return self.base(*args, tying_prefix=prefix, **kwargs)

    def check_merge(self, sign: int) -> None:
        raise NotMergeableError("prefix tuning adds attention entries rather than changing a weight, so it has "
                                "no merged form; keep it unmerged")


def _check_sdpa(attn) -> None:
    impl = attn.config._attn_implementation
    if impl != "sdpa":
        raise UnsupportedModuleError(
            f"prefix adapters need the 'sdpa' attention implementation; this model uses {impl!r}. Load it with "
            "attn_implementation='sdpa' or call model.set_attn_implementation('sdpa')")


def _prefixed_sdpa(module, query, key, value, attention_mask, *args, tying_prefix=None, **kwargs):
    """transformers' sdpa attention with ``tying_prefix = (keys, values, kv_heads)`` prepended to the keys
    and values; every query sees the whole prefix, the causal/padding mask of the real keys is kept."""
    if tying_prefix is None:
        return _SDPA(module, query, key, value, attention_mask, *args, **kwargs)
    pk, pv, heads = tying_prefix
    b, _, sq, _ = query.shape
    sk, r = key.shape[2], pk.shape[0]

    def heads_first(p):
        return p.to(key.dtype).view(r, heads, -1).transpose(0, 1).expand(b, -1, -1, -1)

    key, value = torch.cat([heads_first(pk), key], 2), torch.cat([heads_first(pv), value], 2)
    if attention_mask is None:
        causal = kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)
        attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device)
        if causal and sq > 1:
            attention_mask = attention_mask.tril(sk - sq)
        attention_mask = attention_mask[None, None]
    # bool masks: True = attend; float masks: 0 = attend
    seen = torch.ones if attention_mask.dtype == torch.bool else torch.zeros
    attention_mask = torch.cat([seen(*attention_mask.shape[:-1], r, dtype=attention_mask.dtype,
                                     device=attention_mask.device), attention_mask[..., -sk:]], -1)
    kwargs["is_causal"] = False
    return _SDPA(module, query, key, value, attention_mask, *args, **kwargs)


_SDPA = None


def _install_prefix_attention() -> None:
    """Route transformers' 'sdpa' attention through :func:`_prefixed_sdpa` (once per process). Calls
    without a prefix go straight to the original function."""
    global _SDPA
    if _SDPA is not None:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _SDPA = sdpa_attention_forward
    AttentionInterface.register("sdpa", _prefixed_sdpa)


def wrapper_class(adapter_kind: str, kind: str, name: str) -> type[TiedAdapter]:
    """The wrapper class for an adapter kind on a module kind."""
    if (adapter_kind == "prefix") != (kind == "Attention"):
        raise UnsupportedModuleError(
            f"module {name!r} is a {kind} module: " + ("prefix adapters adapt transformers attention modules "
                                                       "(e.g. model.layers.{layer}.self_attn)" if kind != "Attention"
                                                       else f"{adapter_kind} adapters need Linear-like modules; "
                                                       "use kind: prefix on attention modules, or narrow the selector"))
    if adapter_kind == "prefix":
        return PrefixAdapter
    if adapter_kind == "lora":
        return SUPPORTED[kind]
    if adapter_kind == "bottleneck" and _out_axis(kind) != -1:
        raise UnsupportedModuleError(f"module {name!r} is a {kind}: bottleneck adapters support modules "
                                     "with last-axis outputs (Linear, Conv1D, Embedding)")
    return IA3Adapter if adapter_kind == "ia3" else BottleneckAdapter
