"""Wrappers that add ``v * B(G(u * A(dropout(x)))) * scale`` to a module's output, by composition
(u, v and the r x r core G are optional).

A wrapper keeps the original module as ``base`` and never materialises ``W + BA`` on the training
path. It does not own its factors: it holds a plain (unregistered) handle to the root-owned
:class:`~tying.bank.FactorBank` and looks its factors up by key at call time, so every tied factor
has exactly one owner (one state_dict entry, one optimizer slot, one FSDP owner).

One small class per module kind; ``SUPPORTED`` maps module kinds to them. Factor shapes are the
same for every kind: A (r, d_in), B (d_out, r), u (r,), v (d_out,), G (r, r), with d_in of a convolution
being in_channels * prod(kernel_size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .errors import TyingError, UnsupportedModuleError
from .fastpath import LowRankDown, LowRankUp, fold_up


class NotMergeableError(TyingError, RuntimeError):
    """The update cannot be folded into (or out of) the base weight."""


def fold_down(A, u=None, G=None) -> torch.Tensor:
    """G diag(u) A: the down side of a site, (r, d_in)."""
    if u is not None:
        A = A * u[:, None]
    return A if G is None else G @ A


def fold_factors(A, B, u=None, v=None, G=None, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(G diag(u) A, scale * diag(v) B) in A's dtype: the per-site pair that every kind of use needs."""
    A = fold_down(A, u, G)
    return A, fold_up(B, v, scale).to(A.dtype)  # factors of one site may live in different dtypes


class TiedAdapter(nn.Module):
    """Base wrapper: subclasses define how A, B and the merged delta act on their module kind."""

    def __init__(self, base: nn.Module, bank: nn.Module, keys: dict[str, str], scale: float, dropout: float):
        super().__init__()
        self.base = base
        object.__setattr__(self, "bank", bank)  # a handle, not a child: the root owns the bank
        self.keys = dict(keys)  # factor name -> parameter key in the bank
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None  # p = 0: skip the op entirely
        self.merged = False
        # checkpoints see the unchanged base: ``q_proj.weight``, never ``q_proj.base.weight``
        self.register_state_dict_post_hook(_base_keys_out)
        self.register_load_state_dict_pre_hook(_base_keys_in)

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks (``weight``, ``in_features``, ...) are the base module's, so code
        that reads ``model.q_proj.weight`` (transformers, torch.distributed.checkpoint) keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None or name == "base":
                raise
            return getattr(base, name)

    def factor(self, name: str) -> torch.Tensor | None:
        """The factor ``name`` (A, B, u or v) of this site, or None when the spec leaves it out."""
        key = self.keys.get(name)
        return None if key is None else self.bank[name][key]

    # Subclasses: down(x, A) -> (..., r) features; add_up(out, h, B) -> out + up(h); fold(delta) in weight layout.
    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return F.linear(x, A)

    def add_up(self, out: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        if out.dtype != B.dtype or h.dtype != B.dtype:
            return out + F.linear(h, B).to(out.dtype)
        # one fused GEMM-and-add: no output-sized temporary for the update
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.t()).view(out.shape)

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G diag(u) A, scale * diag(v) B): u, v, the core G and the scale folded into the small factor
        matrices, so the forward pass does no elementwise work on activations."""
        return fold_factors(*(self.factor(n) for n in "ABuvG"), self.scale)

    share_down = None  # (SharedDown, index) where sibling sites share this one's down projection: fastpath.py

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """h = G diag(u) A dropout(x), (..., r). A floating ``x`` sets the compute dtype, as under autocast: a
        bfloat16 base computes in bfloat16 with its float32 factors cast (small), never its activations."""
        A = fold_down(self.factor("A"), self.factor("u"), self.factor("G"))
        if x.is_floating_point():
            A = A.to(x.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.down(x, A)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if self.merged:
            return out
        if self.share_down is None or torch.compiler.is_compiling():
            h = self.project(x)
        else:
            shared, index = self.share_down
            h = shared.down(index, x, (self.factor("A"), self.factor("u"), self.factor("G")), self.project)
        return self.up(out, h)

    def up(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """out + h (scale diag(v) B)^T, for the features ``h`` of :meth:`project`."""
        return self.add_up(out, h, fold_up(self.factor("B"), self.factor("v"), self.scale).to(h.dtype))

    def delta_weight(self) -> torch.Tensor:
        """scale * diag(v) B diag(u) A as a (d_out, d_in) matrix."""
        A, B = self.effective()
        return B @ A

    def fold(self, delta: torch.Tensor) -> torch.Tensor:
        """delta_weight() in the layout of ``base.weight``."""
        return delta

    def check_merge(self, sign: int) -> None:
        """Raise NotMergeableError if ``merge(sign)`` cannot be done; called on every site before any merges."""

    @torch.no_grad()
    def merge(self, sign: int = 1) -> None:
        """Add (sign=1) or subtract (sign=-1) the delta in place in the base weight."""
        w = self.base.weight
        w.add_(self.fold(self.delta_weight()).to(w.dtype), alpha=sign)
        self.merged = sign > 0

    def extra_repr(self) -> str:
        return f"keys={self.keys}, scale={self.scale:g}, merged={self.merged}"


_BASE = "base."


def _base_keys_out(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook of a wrapper: move ``<site>.base.<k>`` to ``<site>.<k>``."""
    inner = prefix + _BASE
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + k[len(inner):]] = state_dict.pop(k)


def _base_keys_in(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a wrapper: accept ``<site>.<k>`` (plain and adapted checkpoints) as well
    as the older ``<site>.base.<k>``."""
    inner = prefix + _BASE
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + k[len(prefix):]] = state_dict.pop(k)


class LinearAdapter(TiedAdapter):
    """nn.Linear (weight d_out x d_in).

    The features are kept transposed, ``h`` of shape (r, tokens), and B enters as a row-major (r, d_out)
    matrix, so that the small products take the operand layouts that CPU GEMMs run fastest at rank 8
    (fastpath.py's LowRankDown and LowRankUp; up to 3.8x faster than ``F.linear``'s backward in float32)."""

    shares_down = True  # siblings with one input and one A compute ``down`` once (fastpath.py)

    def project(self, x):
        if self.factor("G") is not None or not x.is_floating_point():
            return super().project(x)  # the core G is folded by autograd ops, then ``down``
        if self.dropout is not None:
            x = self.dropout(x)
        return LowRankDown.apply(x.reshape(-1, x.shape[-1]), self.factor("A"), self.factor("u"))

    def down(self, x, A):
        return LowRankDown.apply(x.reshape(-1, x.shape[-1]), A, None)

    def up(self, out, h):
        B, v = self.factor("B"), self.factor("v")
        if out.dtype != h.dtype or not torch.is_grad_enabled():
            return self.add_up(out, h, fold_up(B, v, self.scale))
        return LowRankUp.apply(out.reshape(-1, out.shape[-1]), h, B, v, self.scale).view(out.shape)

    def add_up(self, out, h, B):
        Bt = B.t().to(h.dtype)  # (r, d_out)
        if out.dtype != h.dtype:
            return out + torch.mm(h.t(), Bt).view(out.shape).to(out.dtype)
        if not torch.is_grad_enabled() and out.is_contiguous() and not _sees_output(self.base):
            # nothing records or keeps the base's fresh output: add in place, saving an output-sized copy
            out.view(-1, out.shape[-1]).addmm_(h.t(), Bt)
            return out
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.t(), Bt).view(out.shape)


def _sees_output(base: nn.Module) -> bool:
    """Whether a forward hook (the base's own or a global one) may hold the base's output, or we are tracing."""
    return bool(base._forward_hooks or getattr(_module, "_global_forward_hooks", True)) or torch.compiler.is_compiling()


class Conv1DAdapter(LinearAdapter):
    """transformers' Conv1D (GPT-2): y = x @ W + b with W of shape (d_in, d_out)."""

    def fold(self, delta):
        return delta.T


class ConvAdapter(TiedAdapter):
    """nn.Conv1d / nn.Conv2d: A is a convolution with the base's kernel, stride, padding and dilation;
    B is a 1x1 convolution."""

    def down(self, x, A):
        b = self.base
        conv = F.conv1d if isinstance(b, nn.Conv1d) else F.conv2d
        return conv(x, A.view(A.shape[0], b.in_channels, *b.kernel_size), None, b.stride, b.padding, b.dilation)

    def add_up(self, out, h, B):
        conv = F.conv1d if isinstance(self.base, nn.Conv1d) else F.conv2d
        return out + conv(h, B.view(*B.shape, *([1] * len(self.base.kernel_size)))).to(out.dtype)

    def fold(self, delta):
        return delta.view(self.base.weight.shape)


class EmbeddingAdapter(TiedAdapter):
    """nn.Embedding: A is a lookup table (r, num_embeddings); no dropout on token indices."""

    def __init__(self, base, bank, keys, scale, dropout):
        super().__init__(base, bank, keys, scale, 0.0)

    def down(self, x, A):
        # padding_idx as in the base: the padding token's column of A gets no gradient
        return F.embedding(x, A.T, padding_idx=self.base.padding_idx)

    def fold(self, delta):
        return delta.T


def _is_conv1d_transformers(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.ndim == 2


SUPPORTED = {
    "Linear": LinearAdapter,
    "Conv1D": Conv1DAdapter,
    "Conv1d": ConvAdapter,
    "Conv2d": ConvAdapter,
    "Embedding": EmbeddingAdapter,
}


def is_attention(m: nn.Module) -> bool:
    """A transformers attention module (``*Attention`` with ``head_dim`` and a config naming its attention
    implementation): the module kind that ``prefix`` adapters adapt."""
    return (type(m).__name__.endswith("Attention") and isinstance(getattr(m, "head_dim", None), int)
            and hasattr(getattr(m, "config", None), "_attn_implementation"))


def kv_dim(m: nn.Module) -> int:
    """Width of an attention module's keys (= values): key/value heads x head_dim (GQA-aware)."""
    cfg = m.config
    return (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * m.head_dim


MODULE_KINDS = (*SUPPORTED, "Attention")


def module_kind(m: nn.Module) -> str | None:
    """The module kind (a SUPPORTED key, or ``Attention``; subclasses count), or None."""
    if _is_conv1d_transformers(m):
        return "Conv1D"
    if is_attention(m):
        return "Attention"
    for kind, cls in (("Conv1d", nn.Conv1d), ("Conv2d", nn.Conv2d), ("Linear", nn.Linear), ("Embedding", nn.Embedding)):
        if isinstance(m, cls):
            return kind
    return None


def dims(name: str, m: nn.Module) -> tuple[str, int, int]:
    """(kind, d_in, d_out) of a module, or UnsupportedModuleError naming it and the supported types."""
    kind = module_kind(m)
    if kind is None:
        raise UnsupportedModuleError(
            f"module {name!r} is a {type(m).__name__}, which tying cannot adapt; supported: "
            f"{', '.join(MODULE_KINDS)} (and their subclasses). Narrow the selector or add `types:` to the target")
    if kind == "Attention":
        return kind, kv_dim(m), kv_dim(m)
    if kind == "Linear":
        return kind, m.in_features, m.out_features
    if kind == "Conv1D":
        return kind, m.weight.shape[0], m.weight.shape[1]
    if kind == "Embedding":
        return kind, m.num_embeddings, m.embedding_dim
    if m.groups != 1 or m.padding_mode != "zeros":
        raise UnsupportedModuleError(
            f"module {name!r} ({type(m).__name__}) has groups={m.groups}, padding_mode={m.padding_mode!r}; "
            "tying adapts convolutions with groups=1 and zero padding only")
    return kind, m.in_channels * math.prod(m.kernel_size), m.out_channels
