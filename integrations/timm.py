"""Target sets by name for timm vision transformers, and an optional split of the fused ``qkv``.

``targets(model, "attn_qkv" | "attn" | "mlp" | "all_linear")`` returns spec targets for a timm ViT
(``blocks.{i}.attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``). As in the transformers
integration, ``layer`` captures the block index and ``proj`` spans only the modules that read the
same input, so a factor tied along ``proj`` is shared exactly where the paper's fused-QKV LoRA shares
A; ``attn.proj`` and ``mlp.fc2`` capture only ``layer``. The selectors name no size, so a spec made
for one ViT (say depth 6, width 64) applies unchanged to another (depth 12, width 384).

The fused ``qkv`` Linear is adapted either as ONE matrix (``qkv="fused"``, the default and the
paper's fused QKV: B is 3d x r, v is 3d) or as THREE slices (``qkv="split"``: B and v per slice, A
shared along ``proj``). The split needs no engine support: :func:`split_qkv_` replaces each fused
``qkv`` by a :class:`SplitQKV` holding three ``nn.Linear`` children ``q``, ``k``, ``v`` whose weights
are views of the original rows (the same function), so selectors reach ``attn.qkv.{proj:q|k|v}``;
:func:`fuse_qkv_` puts the original modules and state_dict keys back.

    spec = tying.integrations.timm.spec(vit, "tl6", "all_linear", rank=8)             # fused qkv
    split_qkv_(vit); spec = tying.integrations.timm.spec(vit, "lora", qkv="split")      # q, k, v slices

Any other timm model (a ResNet's Conv2d layers, say) is adapted with selectors written by hand, e.g.
``{"select": "layer{stage:#}.{block:#}.conv{proj:1|2}", "types": ["Conv2d"]}``. For transformers'
``ViTForImageClassification`` use :func:`hf_vit_spec` (a thin check around the transformers
integration, whose "vit" family already has separate q_proj/k_proj/v_proj).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import nn

from ..errors import AlreadyAppliedError, SelectorError
from ..spec import TyingSpec, load_spec

# part -> glob under "<prefix>blocks.{layer:#}."; the fused and the split forms of qkv
_PARTS = {
    "qkv": "attn.{proj:qkv}",
    "qkv_split": "attn.qkv.{proj:q|k|v}",
    "proj": "attn.proj",
    "fc1": "mlp.{proj:fc1|fc1_g|fc1_x}",  # Mlp; SwiGLU's gate and input halves read the same input
    "fc2": "mlp.fc2",
}
SETS = {"attn_qkv": ("qkv",), "attn": ("qkv", "proj"), "mlp": ("fc1", "fc2"), "all_linear": ("qkv", "proj", "fc1", "fc2")}
_QKV_NAME = re.compile(r"(?P<prefix>(?:.*\.)?)blocks\.\d+\.attn\.qkv")


def _require_timm():
    try:
        import timm
    except ImportError as e:
        raise ImportError("tying.integrations.timm needs timm: pip install 'tying[timm]'") from e
    return timm


class SplitQKV(nn.Module):
    """A fused ``qkv`` Linear as three Linear children ``q``, ``k``, ``v`` (views of its weight rows).

    ``forward`` concatenates the three outputs, so the attention module above sees the same tensor.
    The original module is kept as a plain (unregistered) handle so :func:`fuse_qkv_` can restore it.
    """

    def __init__(self, fused: nn.Linear):
        super().__init__()
        if fused.out_features % 3:
            raise ValueError(f"a fused qkv Linear needs out_features divisible by 3, got {fused.out_features}")
        d = fused.out_features // 3
        self.in_features, self.out_features = fused.in_features, fused.out_features
        for i, name in enumerate("qkv"):
            part = nn.Linear(fused.in_features, d, bias=fused.bias is not None, device="meta")
            rows = slice(i * d, (i + 1) * d)
            part.weight = nn.Parameter(fused.weight.detach()[rows], requires_grad=fused.weight.requires_grad)
            if fused.bias is not None:
                part.bias = nn.Parameter(fused.bias.detach()[rows], requires_grad=fused.bias.requires_grad)
            self.add_module(name, part)
        object.__setattr__(self, "fused", fused)  # a handle, not a child: no duplicate state_dict keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    @torch.no_grad()
    def to_fused(self) -> nn.Linear:
        """The original Linear with the current q, k, v values written back (dtype and device follow
        the slices, as ``model.to`` would have moved them)."""
        parts = [self.q, self.k, self.v]
        for attr in ("weight", "bias"):
            p = getattr(self.fused, attr)
            if p is None:
                continue
            p.data = torch.cat([getattr(m, attr).detach() for m in parts])  # keeps the Parameter object
            p.requires_grad_(any(getattr(m, attr).requires_grad for m in parts))
        return self.fused


def _qkv_modules(model: nn.Module):
    """(name, module) of every timm attention ``qkv`` Linear, fused or split."""
    timm = _require_timm()
    attention = tuple(c for c in (getattr(timm.layers, "Attention", None),
                                  getattr(timm.models.vision_transformer, "Attention", None)) if c is not None)
    for name, m in model.named_modules():
        qkv = getattr(m, "qkv", None)
        if isinstance(m, attention) and isinstance(qkv, nn.Module):
            yield f"{name}.qkv" if name else "qkv", qkv


def split_qkv_(model: nn.Module) -> int:
    """Replace every fused timm attention ``qkv`` Linear by a :class:`SplitQKV`; return how many.

    The function is unchanged. Call it before ``tying.apply_``; undo with :func:`fuse_qkv_`.
    """
    todo = [(n, m) for n, m in _qkv_modules(model) if not isinstance(m, SplitQKV)]
    for name, m in todo:
        if not isinstance(m, nn.Linear):
            raise AlreadyAppliedError(f"{name} is a {type(m).__name__}, not a Linear: call tying.unapply_(model) "
                                      "before split_qkv_")
        model.set_submodule(name, SplitQKV(m))
    return len(todo)


def fuse_qkv_(model: nn.Module) -> int:
    """Put back the original fused ``qkv`` modules (same objects, same state_dict keys, current
    values); return how many. An adapter on the slices must be removed first (``tying.unapply_``,
    with ``merge=True`` to keep its update in the weights)."""
    todo = [(n, m) for n, m in _qkv_modules(model) if isinstance(m, SplitQKV)]
    for name, m in todo:
        bad = [c for c in "qkv" if not isinstance(getattr(m, c), nn.Linear)]
        if bad:
            raise AlreadyAppliedError(f"{name}.{bad[0]} carries a tying adapter: call tying.unapply_(model) "
                                      "before fuse_qkv_")
    for name, m in todo:
        model.set_submodule(name, m.to_fused())
    return len(todo)


def targets(model: nn.Module, name: str = "attn_qkv", qkv: Literal["fused", "split"] = "fused") -> list[dict]:
    """Spec targets of the target set ``name`` (attn_qkv, attn, mlp, all_linear) for a timm ViT.

    ``qkv="fused"`` adapts each ``qkv`` as one matrix; ``"split"`` adapts its q, k, v slices and needs
    :func:`split_qkv_` to have been called on the model.
    """
    if name not in SETS:
        raise SelectorError(f"unknown target set {name!r}; choose one of {', '.join(SETS)}")
    if qkv not in ("fused", "split"):
        raise SelectorError(f"qkv must be 'fused' or 'split', got {qkv!r}")
    found = list(_qkv_modules(model))
    prefixes = {m.group("prefix") for n, _ in found if (m := _QKV_NAME.fullmatch(n))}
    if not prefixes:
        raise SelectorError(f"{type(model).__name__} has no timm ViT blocks ('blocks.<i>.attn.qkv'); write the "
                            "targets yourself with selectors")
    if len(prefixes) > 1:
        raise SelectorError(f"{type(model).__name__} holds several ViTs ({sorted(prefixes)}); write the targets "
                            "yourself with selectors")
    is_split = any(isinstance(m, SplitQKV) for _, m in found)
    if "qkv" in SETS[name] and is_split != (qkv == "split"):
        fix = "call split_qkv_(model) first" if qkv == "split" else "call fuse_qkv_(model) or pass qkv='split'"
        raise SelectorError(f"qkv={qkv!r} but the model's qkv layers are {'split' if is_split else 'fused'}: {fix}")
    prefix = prefixes.pop()
    parts = ["qkv_split" if p == "qkv" and qkv == "split" else p for p in SETS[name]]
    return [{"select": f"{prefix}blocks.{{layer:#}}.{_PARTS[p]}", "types": ["Linear"]} for p in parts]


def spec(model: nn.Module, preset: str, target_set: str = "attn_qkv", qkv: Literal["fused", "split"] = "fused",
         **overrides) -> TyingSpec:
    """A preset (or YAML path) retargeted to one of this timm ViT's target sets; ``overrides`` as
    :func:`tying.load_spec` (rank, alpha, dropout, freeze_base)."""
    return load_spec(preset, targets=targets(model, target_set, qkv), **overrides)


def hf_vit_spec(model: nn.Module, preset: str, target_set: str = "attn_qkv", **overrides) -> TyingSpec:
    """The same for transformers' ``ViTModel`` / ``ViTForImageClassification``.

    In transformers 5 their attention has separate ``q_proj``/``k_proj``/``v_proj``, so there is
    nothing to split: this checks the family and returns
    ``tying.integrations.transformers.spec(model, preset, target_set, **overrides)``, where A is
    tied along ``proj`` (the fused-QKV LoRA of the paper) and B, v are per projection.
    """
    from . import transformers as hf

    fam = hf.family(model)
    if fam != "vit":
        raise SelectorError(f"{type(model).__name__} is a transformers {fam!r} model, not a ViT; use "
                            "tying.integrations.transformers.spec")
    return hf.spec(model, preset, target_set, **overrides)
