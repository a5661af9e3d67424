"""Peak training memory per process, predicted before any weight exists (issue 36.4; docs/memory.md).

    from tying.integrations.memory import predict_memory
    m = predict_memory(meta_model("llama2-7b"), "tl6", rank=8, quant="nf4", batch=1, seq=64)
    m.total, m.to_dict()            # bytes: base, adapter, activations, logits, working, overhead

The model is a Llama-style decoder (any device, the meta device included: only shapes are read) and the adapter a
tying spec or ``"peft-lora"`` (PEFT LoRA at ``rank`` on ``targets``). Components, in bytes (B = batch x seq tokens,
c = bytes of the compute dtype; derivations in docs/memory.md):

- **base**: every parameter and buffer once (tied weights once); quantized Linear layers (all but ``lm_head``) at
  nf4 (half a byte a weight, a float32 absmax per 64, a 16-entry code) or int8 (a byte a weight, a float32 scale per
  row); with ``processes`` > 1 (FSDP) a process holds its shard plus two gathered decoder layers;
- **adapter**: float32 factors, and for each trained one its gradient and AdamW's two moments (16 bytes a trained
  parameter, 4 a frozen one), divided among the FSDP processes;
- **activations**: what autograd saves for the backward of a frozen base with the adapter on (counted op by op for
  a Llama decoder layer; checked against ``torch.autograd.graph.saved_tensors_hooks`` in tests), or with gradient
  checkpointing each layer's input plus one layer recomputed;
- **logits**: the float32 log-probabilities the loss saves, their gradient and the logits' gradient (12 B x vocab);
- **working**: the largest transient: a quantized weight dequantized to the compute dtype for its matmul, and the
  gradients flowing back through one MLP;
- **overhead**: a fixed runtime cost (kernels' code and caches, the autograd graph, allocator slack) that is measured,
  not derived: :data:`OVERHEAD` holds what ``benchmarks/memory.py`` measured on a tiny model on this CPU; pass your
  own (a GPU's CUDA context) with ``overhead=``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import TyingError

QUANTS = ("none", "nf4", "int8")
DECODERS = ("llama", "mistral", "qwen2")  # decoder layers of one shape: RMSNorm, attention (GQA), SwiGLU MLP
NOT_QUANTIZED = ("lm_head",)  # transformers' bitsandbytes loading keeps the output layer in the compute dtype
NF4_BLOCK = 64
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj")  # the targets of tying's qkv presets (tl6), for a like-for-like LoRA
# Where a site's input comes from (which adapted sites of a layer share one saved input), by module name.
INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out", "gate_proj": "mlp_in",
          "up_proj": "mlp_in", "down_proj": "mlp_mid"}
# The fixed runtime overhead (bytes) by quantization: benchmarks/memory.py's tiny model on this CPU (AMD EPYC, one
# thread, torch 2.14.1, bitsandbytes 0.50.2), its measured peak minus its other predicted components (docs/memory.md).
# int8 was not measured: it takes the bfloat16 value.
OVERHEAD = {"none": 35_600_000, "nf4": 38_100_000, "int8": 35_600_000}


@dataclass(frozen=True)
class Memory:
    """Predicted peak training memory of one process, by component (bytes)."""

    base: int
    adapter: int
    activations: int
    logits: int
    working: int
    overhead: int

    @property
    def total(self) -> int:
        return self.base + self.adapter + self.activations + self.logits + self.working + self.overhead

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _dtype(given) -> torch.dtype:
    dtype = getattr(torch, given, None) if isinstance(given, str) else given
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TyingError(f"dtype {given!r}: give a floating-point compute dtype (float32, bfloat16, float16)")
    return dtype


def _positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise TyingError(f"{name}={v!r}: give a whole number of at least 1")


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers a bitsandbytes load quantizes: all but the output layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in NOT_QUANTIZED}


def weight_bytes(numel: int, rows: int, quant: str) -> int:
    """Bytes of one quantized Linear weight of ``numel`` weights in ``rows`` output rows (``quant`` nf4 / int8)."""
    if quant == "nf4":
        return math.ceil(numel / 2) + 4 * math.ceil(numel / NF4_BLOCK) + 4 * 16
    return numel + 4 * rows


def base_bytes(model: nn.Module, dtype=torch.bfloat16, quant: str = "none") -> int:
    """Bytes of the base: parameters in ``dtype`` (quantized Linear weights as ``quant`` stores them), buffers as
    they are; a parameter shared by several modules (tied embeddings) once."""
    dtype = _dtype(dtype)
    q = {id(m.weight): m for m in quantized_linears(model).values()} if quant != "none" else {}
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        m = q.get(id(p))
        total += weight_bytes(p.numel(), m.out_features, quant) if m is not None else p.numel() * dtype.itemsize
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in DECODERS:
        raise TyingError(f"the activation model counts Llama-style decoders ({', '.join(DECODERS)}); this model is "
                         f"{kind or type(model).__name__!r}")
    return config


def _layer(names: dict[str, str]) -> dict[str, str]:
    """The adapted sites of decoder layer 0 (every layer has the same): last name -> its down factor's key."""
    out = {}
    for n, key in names.items():
        parts = n.split(".")
        if "layers" in parts and parts[parts.index("layers") + 1] == "0":
            out[n] = key
    return out


def _peft_sites(model: nn.Module, targets) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise TyingError(f"PEFT LoRA targets {list(targets)} match no Linear layer of the model")
    return names


def adapter_params(model: nn.Module, spec, rank: int | None, targets=PEFT_TARGETS) -> tuple[int, int, dict[str, str]]:
    """(trainable, frozen, sites) of a tying spec or of ``"peft-lora"`` at ``rank`` on ``targets``; ``sites``: each
    adapted module's name -> the key of its down factor A (sites with one key share ``A x``; PEFT: each its own)."""
    if spec == "peft-lora":
        _positive(rank=rank)
        names = _peft_sites(model, targets)
        mods = [model.get_submodule(n) for n in names]
        return sum(rank * (m.in_features + m.out_features) for m in mods), 0, {n: n for n in names}
    from ..planner import plan
    from ..spec import load_spec

    p = plan(model, load_spec(spec, **({"rank": rank} if rank is not None else {})))
    return p.counts.trainable, p.counts.frozen, {s.name: s.keys.get("A", s.name) for s in p.sites}


def activation_bytes(model: nn.Module, sites: dict[str, str], peft: bool, rank: int, batch: int, seq: int, dtype,
                     checkpointing: bool = False) -> int:
    """Bytes autograd saves for backward over a forward of ``batch`` x ``seq`` tokens of a Llama-style decoder whose
    base is frozen and whose ``sites`` (module name -> down factor's key, as :func:`adapter_params` gives them)
    carry an adapter of ``rank`` with float32 factors: ``peft``: PEFT's LoRA, which casts each site's input to
    float32 and saves it with ``A x`` per site; else tying's, which saves the input in the compute dtype once, ``A x``
    once per shared down factor, and the factors cast to the compute dtype. Logits aside."""
    cfg, c = _config(model), _dtype(dtype).itemsize
    tokens, h, inter, layers = batch * seq, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    norm = 4 * tokens * h + 4 * tokens  # RMSNorm: its float32 input (pow, mul) and rsqrt
    attention = c * tokens * heads * head_dim * 2 + 2 * c * tokens * kv * head_dim + 4 * batch * heads * seq  # q, out, k, v, lse
    mlp = 3 * c * tokens * inter  # silu's input, its output and up's output (the product's two factors)
    mine = _layer(sites)
    unknown = sorted({n.split(".")[-1] for n in mine} - set(INPUTS))
    if unknown:
        raise TyingError(f"the activation model knows the sites {', '.join(INPUTS)} of a decoder layer; the adapter "
                         f"also targets {unknown}")
    adapter, inputs, downs = 0, {}, {}
    for name, key in mine.items():
        m = model.get_submodule(name)
        inputs[INPUTS[name.split(".")[-1]]] = m.in_features
        if peft:
            adapter += 4 * tokens * rank + (4 * tokens * m.in_features if c != 4 else 0)  # A x; x cast to float32
        else:
            downs[key] = m.in_features
            adapter += c * rank * m.out_features  # B cast to the compute dtype
    adapter += sum(c * tokens * rank + c * rank * d for d in downs.values())  # per down factor: A x, A cast
    if not peft or c == 4:
        adapter += sum(c * tokens * d for d in inputs.values())  # one saved input per distinct input
    layer = 2 * norm + attention + mlp + adapter
    rope = 2 * c * seq * head_dim  # cos and sin, shared by the layers
    labels = 8 * tokens
    if checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        return layers * c * tokens * h + norm + rope + labels + layer
    return layers * layer + rope + labels  # layer 0's input norm saves nothing (no gradient there), the final one does


def logits_bytes(model: nn.Module, batch: int, seq: int) -> int:
    """The loss's float32 log-probabilities (saved), their gradient and the logits' gradient."""
    return 12 * batch * seq * _config(model).vocab_size


def working_bytes(model: nn.Module, batch: int, seq: int, dtype, quant: str) -> int:
    """The largest transient: a quantized weight dequantized for its matmul, and the gradients through one MLP."""
    cfg, c = _config(model), _dtype(dtype).itemsize
    dequant = max((m.weight.numel() for m in quantized_linears(model).values()), default=0) * c if quant != "none" else 0
    return dequant + 4 * c * batch * seq * cfg.intermediate_size


def layer_bytes(model: nn.Module, dtype, quant: str) -> int:
    """Bytes of the largest decoder layer (what FSDP gathers at a time)."""
    layers = [m for n, m in model.named_modules() if n.split(".")[-1].isdigit() and ".layers." in f".{n}"]
    return max((base_bytes(m, dtype, quant) for m in layers), default=0)


def predict_memory(model: nn.Module, spec="tl6", *, rank: int | None = None, dtype=torch.bfloat16,
                   quant: str = "none", batch: int = 1, seq: int = 64, processes: int = 1, checkpointing: bool = False,
                   targets=PEFT_TARGETS, overhead: int | None = None) -> Memory:
    """Predicted peak memory of one training step (forward, backward, AdamW) per process; see the module docstring.
    ``spec``: a tying spec (preset name, dict, YAML path, TyingSpec) or ``"peft-lora"`` (then ``rank`` is needed and
    ``targets`` names the adapted Linear layers). ``batch`` is per process."""
    if quant not in QUANTS:
        raise TyingError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    _positive(batch=batch, seq=seq, processes=processes)
    if overhead is not None and (not isinstance(overhead, int) or overhead < 0):
        raise TyingError(f"overhead={overhead!r}: give a number of bytes (0 or more)")
    _config(model)
    trainable, frozen, sites = adapter_params(model, spec, rank, targets)
    peft = spec == "peft-lora"
    r = rank if rank is not None else _spec_rank(spec)
    base = base_bytes(model, dtype, quant)
    if processes > 1:
        base = math.ceil(base / processes) + 2 * layer_bytes(model, dtype, quant)
    adapter = math.ceil((16 * trainable + 4 * frozen) / processes)
    return Memory(base=base, adapter=adapter,
                  activations=activation_bytes(model, sites, peft, r, batch, seq, dtype, checkpointing),
                  logits=logits_bytes(model, batch, seq), working=working_bytes(model, batch, seq, dtype, quant),
                  overhead=OVERHEAD[quant] if overhead is None else overhead)


def _spec_rank(spec) -> int:
    from ..spec import load_spec

    return load_spec(spec).adapter.rank
