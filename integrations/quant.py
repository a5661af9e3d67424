"""Quantized bases: bitsandbytes 4-bit (nf4, fp4) and 8-bit linear layers, and torchao int8 weight-only linear
layers, registered as module types. Imported by the planner the first time it meets such a module (or weight), so
``tying.apply_`` works unchanged on a model loaded with ``BitsAndBytesConfig`` or ``TorchAoConfig``.

Each type reads its weight by decoding it through the library's own API (a float copy) and can re-encode one, so
the factors train on the quantized base as on any other (in float32 by default, computed in the activations'
dtype), and ``tying.merge_(model)`` refuses unless asked to ``dequantize=True``: decode, add the update, re-encode
(lossy; docs/quantized.md measures how much). bitsandbytes repacks 4-bit weights into a CPU inference layout in
eval mode; a packed weight is decoded through bitsandbytes' own matmul, without changing the layer.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=tying.integrations.quant.config("nf4"))
    tying.apply_(model, tying.load_spec("tl6", rank=8))
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import TyingError
from ..modtypes import LINEAR_LIKE, linear_dims, register_module_type

CONFIGS = ("nf4", "fp4", "int8", "torchao-int8")


def _require(package: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"quantized bases need {package}: pip install 'tying[quant]'") from None


def config(name: str, compute_dtype: torch.dtype | None = None):
    """A transformers quantization config by name: ``nf4`` / ``fp4`` (bitsandbytes 4-bit; ``compute_dtype`` its
    matmul dtype, float32 by default), ``int8`` (bitsandbytes 8-bit), ``torchao-int8`` (torchao int8
    weight-only)."""
    if name not in CONFIGS:
        raise TyingError(f"unknown quantization {name!r}; choose one of {', '.join(CONFIGS)}")
    transformers = _require("transformers")
    if name == "torchao-int8":
        _require("torchao")
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig())
    _require("bitsandbytes")
    if name == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name,
                                           bnb_4bit_compute_dtype=compute_dtype or torch.float32)


def _float32(module: nn.Module) -> torch.dtype:
    return torch.float32


# ---- bitsandbytes 4-bit -------------------------------------------------------------------------------------

def _bnb4_weight(m: nn.Module) -> torch.Tensor:
    bnb = _require("bitsandbytes")
    state = m.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # In eval mode on a CPU with avx512bf16, bitsandbytes repacks the weight for inference. Its own inverse
        # (run by its state_dict) leaves the scales transposed when they are not double-quantized (0.50), so
        # decode through its matmul instead: I W^T = W^T, exact in the packed layout's bfloat16, nothing mutated.
        eye = torch.eye(m.in_features, dtype=torch.bfloat16, device=m.weight.device)
        return bnb.matmul_4bit(eye, m.weight, quant_state=state).float().T
    return bnb.functional.dequantize_4bit(m.weight.data, state).float()


def _bnb4_store(m: nn.Module, w: torch.Tensor) -> None:
    bnb = _require("bitsandbytes")
    old = m.weight
    new = bnb.nn.Params4bit(w.to(old.quant_state.dtype), requires_grad=False, quant_type=old.quant_type,
                            blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                            quant_storage=old.quant_storage, module=m)
    m.weight = new.to(old.device)  # moving an unquantized Params4bit to a device quantizes it


# ---- bitsandbytes 8-bit -------------------------------------------------------------------------------------

def _bnb8_weight(m: nn.Module) -> torch.Tensor:
    bnb = _require("bitsandbytes")
    scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB  # the layer moves it on its first forward
    return bnb.functional.int8_vectorwise_dequant(m.weight.data, scb).float()


def _bnb8_store(m: nn.Module, w: torch.Tensor) -> None:
    bnb = _require("bitsandbytes")
    device = m.weight.device
    m.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    m.state.CB = m.state.SCB = None  # the next forward takes the new ones from the weight


# ---- torchao int8 weight-only -------------------------------------------------------------------------------

def _int8_tensor():
    from torchao.quantization import Int8Tensor

    return Int8Tensor


def _torchao_weight(m: nn.Module) -> torch.Tensor:
    return m.weight.dequantize().float()


def _torchao_store(m: nn.Module, w: torch.Tensor) -> None:
    from torchao.quantization.granularity import PerRow, PerTensor

    old = m.weight
    granularity = PerRow() if list(old.block_size) == [1, old.shape[-1]] else PerTensor()
    m.weight = nn.Parameter(_int8_tensor().from_hp(w.to(old.dtype), granularity), requires_grad=False)


def _register() -> None:
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        bnb = None
    if bnb is not None:
        register_module_type("Linear4bit", bnb.nn.Linear4bit, parent="Linear", owner=__name__,
                             dims=linear_dims, match=lambda m: getattr(m.weight, "quant_state", None) is not None,
                             weight=_bnb4_weight, store=_bnb4_store, quantized=True, dtype=_float32, **LINEAR_LIKE)
        register_module_type("Linear8bitLt", bnb.nn.Linear8bitLt, parent="Linear", owner=__name__,
                             dims=linear_dims, match=lambda m: m.weight.dtype == torch.int8,
                             weight=_bnb8_weight, store=_bnb8_store, quantized=True, dtype=_float32, **LINEAR_LIKE)
    try:
        Int8Tensor = _int8_tensor()
    except ImportError:
        return
    register_module_type("TorchAOLinear", nn.Linear, parent="Linear", owner=__name__,
                         dims=linear_dims, match=lambda m: isinstance(m.weight, Int8Tensor),
                         weight=_torchao_weight, store=_torchao_store, quantized=True, dtype=_float32, **LINEAR_LIKE)


_register()
