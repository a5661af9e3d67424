"""Target sets by name for Hugging Face transformers models.

``targets(model, "attn_qkv" | "attn" | "mlp" | "all_linear" | "attention")`` returns spec targets for
the model's family (detected from its module names); ``attention`` selects the attention modules
themselves (prefix adapters). In every family the ``proj`` capture spans only the
projections that read the *same input* (q/k/v; gate/up), so a factor tied along ``proj`` is shared
exactly where the paper's fused-QKV LoRA shares A; output and down projections capture only
``layer`` and get their own factors.

    spec = tying.integrations.transformers.spec(model, "tl6", "all_linear", rank=8)
    tying.apply_(model, spec)

Checkpoints: an adapted model's ``state_dict`` keeps every base key, so ``save_pretrained``,
``from_pretrained`` and the plain ``Trainer`` see an unchanged base (plus ``tying_bank.*``).
:class:`TyingTrainer` (and :func:`adapter_trainer` for subclasses such as TRL's ``SFTTrainer``) write
adapter-only checkpoints instead, as PEFT does, and resume from them exactly, also under FSDP2; they also accept a
quantized model (``BitsAndBytesConfig``, ``TorchAoConfig``) that carries trainable tying factors
(:mod:`tying.integrations.trainer`).

The bridge registers transformers' module types with the core (imported by the planner the first time it meets a
transformers module): ``Conv1D`` (GPT-2's linear layer, weight stored d_in x d_out) and ``Attention`` (an attention
module with ``head_dim`` and a config naming its implementation; the ``prefix`` kind's site). Prefix entries reach
the attention function through transformers' ``AttentionInterface``: its ``sdpa`` entry is routed through
:func:`_prefixed_sdpa` while a prefix adapter is applied, and restored when the last one is removed.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import SelectorError, UnsupportedModuleError
from ..modtypes import LINEAR_LIKE, register_module_type
from ..spec import TyingSpec, load_spec
from .trainer import TASK_COLUMN, AdapterCheckpoints, adapter_trainer  # noqa: F401  (the Trainer's part, here too)

# family -> (qkv, attention output, mlp input(s), mlp output); each a glob under "<prefix>.<layer>."
FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "llama": ("self_attn.{proj:q_proj|k_proj|v_proj}", "self_attn.o_proj",
              "mlp.{proj:gate_proj|up_proj}", "mlp.down_proj"),  # Llama, Mistral, Qwen2/3, SmolLM, Gemma
    "gpt2": ("attn.{proj:c_attn}", "attn.c_proj", "mlp.{proj:c_fc}", "mlp.c_proj"),
    "phi3": ("self_attn.{proj:qkv_proj}", "self_attn.o_proj", "mlp.{proj:gate_up_proj}", "mlp.down_proj"),
    "neox": ("attention.{proj:query_key_value}", "attention.dense", "mlp.{proj:dense_h_to_4h}", "mlp.dense_4h_to_h"),
    "bert": ("attention.*.{proj:query|key|value}", "attention.output.dense", "intermediate.{proj:dense}",
             "output.dense"),  # BERT, RoBERTa
    "vit": ("attention.{proj:q_proj|k_proj|v_proj}", "attention.o_proj", "mlp.{proj:fc1}", "mlp.fc2"),  # HF ViT (v5)
}
# family -> the attention module under "<prefix>.<layer>." (prefix adapters)
ATTENTION = {"llama": "self_attn", "gpt2": "attn", "phi3": "self_attn", "neox": "attention", "bert": "attention.self",
             "vit": "attention"}
_MARKERS = {"llama": ".self_attn.q_proj", "gpt2": ".attn.c_attn", "phi3": ".self_attn.qkv_proj",
            "neox": ".attention.query_key_value", "bert": ".query", "vit": ".attention.q_proj"}
SETS = {"attn_qkv": (0,), "attn": (0, 1), "mlp": (2, 3), "all_linear": (0, 1, 2, 3), "attention": ()}


def family(model: nn.Module) -> str:
    """The family of a transformers model, from its module names."""
    names = [n for n, _ in model.named_modules()]
    for fam, marker in _MARKERS.items():
        if any(n.endswith(marker) for n in names):
            return fam
    raise SelectorError(f"{type(model).__name__}: no known attention naming ({', '.join(_MARKERS.values())}); "
                        "write the targets yourself with selectors")


def targets(model: nn.Module, name: str = "attn_qkv") -> list[dict]:
    """Spec targets of the target set ``name`` for this model: attn_qkv, attn, mlp, all_linear (linear
    layers), or attention (the attention modules themselves, for prefix adapters)."""
    if name not in SETS:
        raise SelectorError(f"unknown target set {name!r}; choose one of {', '.join(SETS)}")
    fam = family(model)
    if name == "attention":
        return [{"select": "**.{layer:#}." + ATTENTION[fam], "types": ["Attention"]}]
    return [{"select": "**.{layer:#}." + FAMILIES[fam][i], "types": ["Linear", "Conv1D"]} for i in SETS[name]]


def default_target_set(spec: TyingSpec) -> str:
    """``attention`` for kinds that adapt attention modules (prefix), else ``attn_qkv`` (the paper's setting)."""
    return "attention" if "attention" in spec.adapter.facts.needs else "attn_qkv"


def spec(model: nn.Module, preset: str, target_set: str | None = None, **overrides) -> TyingSpec:
    """A preset (or YAML path) retargeted to one of this model's target sets (default: ``attention`` for
    prefix adapters, else ``attn_qkv``, the paper's setting)."""
    if target_set is None:
        target_set = default_target_set(load_spec(preset))
    return load_spec(preset, targets=targets(model, target_set), **overrides)


def __getattr__(name: str):
    """``TyingTrainer``: ``transformers.Trainer`` with adapter-only checkpoints (created on first use)."""
    if name == "TyingTrainer":
        from transformers import Trainer

        globals()[name] = cls = adapter_trainer(Trainer)
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- module types: Conv1D and attention ---------------------------------------------------------------------------

def is_attention(m: nn.Module) -> bool:
    """A transformers attention module (``*Attention`` with ``head_dim`` and a config naming its attention
    implementation): the site of ``prefix`` adapters."""
    return (type(m).__name__.endswith("Attention") and isinstance(getattr(m, "head_dim", None), int)
            and hasattr(getattr(m, "config", None), "_attn_implementation"))


def kv_dim(m: nn.Module) -> int:
    """Width of an attention module's keys (= values): key/value heads x head_dim (GQA-aware)."""
    cfg = m.config
    return (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * m.head_dim


def _check_sdpa(where: str, attn: nn.Module) -> None:
    impl = attn.config._attn_implementation
    if impl != "sdpa":
        raise UnsupportedModuleError(
            f"{where}: prefix adapters need the 'sdpa' attention implementation; this model uses {impl!r}. "
            "Load it with attn_implementation='sdpa' or call model.set_attn_implementation('sdpa')")


def _prefixed_sdpa(module, query, key, value, attention_mask, *args, tying_prefix=None, **kwargs):
    """transformers' sdpa attention with ``tying_prefix = (keys, values, kv_heads)`` prepended to the keys
    and values; every query sees the whole prefix, the causal/padding mask of the real keys is kept."""
    original = _SDPA.original or _sdpa_forward()
    if tying_prefix is None:
        return original(module, query, key, value, attention_mask, *args, **kwargs)
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
    return original(module, query, key, value, attention_mask, *args, **kwargs)


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


class _SdpaPrefix:
    """The ``attention`` capability of the Attention type: routes transformers' ``sdpa`` entry through
    :func:`_prefixed_sdpa` while any prefix wrapper is attached (a copy of an adapted model joins on its first
    forward), and restores the original entry when the last one detaches or is collected."""

    def __init__(self):
        self.users: weakref.WeakSet = weakref.WeakSet()
        self.original = None

    def forward(self, wrapper, pk, pv, *args, **kwargs):
        _check_sdpa(f"a {type(wrapper.base).__name__} module", wrapper.base)  # another implementation ignores it
        if wrapper not in self.users:
            self.acquire(wrapper)
        heads = kv_dim(wrapper.base) // wrapper.base.head_dim
        return wrapper.base(*args, tying_prefix=(pk, pv, heads), **kwargs)

    def acquire(self, wrapper) -> None:
        from transformers import AttentionInterface

        if self.original is None:
            self.original = AttentionInterface._global_mapping["sdpa"]
            AttentionInterface.register("sdpa", _prefixed_sdpa)
        self.users.add(wrapper)
        weakref.finalize(wrapper, self._release_if_unused)

    def release(self, wrapper) -> None:
        self.users.discard(wrapper)
        self._release_if_unused()

    def _release_if_unused(self) -> None:
        # iterate rather than len(): a wrapper being collected may still be counted by the set's length
        if self.original is not None and next(iter(self.users), None) is None:
            from transformers import AttentionInterface

            AttentionInterface.register("sdpa", self.original)
            self.original = None


_SDPA = _SdpaPrefix()


def _register_types() -> None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # the target-set helpers above work without transformers; the types need it
        return
    # y = x @ W + b with W stored (d_in, d_out): a Linear-like type whose (d_out, d_in) view is W.T
    register_module_type("Conv1D", Conv1D, dims=lambda m: tuple(m.weight.shape), weight=lambda m: m.weight.T,
                         match=lambda m: getattr(m, "weight", None) is not None and m.weight.ndim == 2,
                         peft_config={"fan_in_fan_out": True}, owner=__name__, **LINEAR_LIKE)
    register_module_type("Attention", nn.Module, dims=lambda m: (kv_dim(m), kv_dim(m)), match=is_attention,
                         check=lambda name, m: _check_sdpa(f"module {name!r}", m), caps={"attention": _SDPA},
                         owner=__name__)


_register_types()
