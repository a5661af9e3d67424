"""Target sets by name for Hugging Face transformers models.

``targets(model, "attn_qkv" | "attn" | "mlp" | "all_linear" | "attention")`` returns spec targets for
the model's family (detected from its module names); ``attention`` selects the attention modules
themselves (prefix adapters). In every family the ``proj`` capture spans only the
projections that read the *same input* (q/k/v; gate/up), so a factor tied along ``proj`` is shared
exactly where the paper's fused-QKV LoRA shares A; output and down projections capture only
``layer`` and get their own factors.

    spec = tying.integrations.transformers.spec(model, "tl6", "all_linear", rank=8)
    tying.apply_(model, spec)
"""

from __future__ import annotations

from torch import nn

from ..errors import SelectorError
from ..spec import TyingSpec, load_spec

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


def spec(model: nn.Module, preset: str, target_set: str | None = None, **overrides) -> TyingSpec:
    """A preset (or YAML path) retargeted to one of this model's target sets (default: ``attention`` for
    prefix adapters, else ``attn_qkv``, the paper's setting)."""
    if target_set is None:
        target_set = "attention" if load_spec(preset).adapter.kind == "prefix" else "attn_qkv"
    return load_spec(preset, targets=targets(model, target_set), **overrides)
