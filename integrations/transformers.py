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
adapter-only checkpoints instead, as PEFT does, and resume from them exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import SelectorError
from ..spec import TyingSpec, load_spec
from ..state import SPEC_FILE, load_adapter, save_adapter

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


class AdapterCheckpoints:
    """Mixin for ``transformers.Trainer`` and its subclasses: every checkpoint (``save_steps``,
    ``save_model()``, the best model) is the adapter folder (``spec.yaml`` + ``adapter.safetensors``, with the
    spec's ``train_modules``) beside the Trainer's optimizer, scheduler and RNG states, and resuming loads it
    back (a spec that differs from the model's raises before anything changes). Use :class:`TyingTrainer`, or
    :func:`adapter_trainer` to mix it into another Trainer class."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not (Path(resume_from_checkpoint) / SPEC_FILE).is_file():  # a full checkpoint of a plain Trainer
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if not (Path(best) / SPEC_FILE).is_file():
            return super()._load_best_model()
        load_adapter(self.accelerator.unwrap_model(self.model), best)


def adapter_trainer(trainer_class: type) -> type:
    """``trainer_class`` (a ``transformers.Trainer`` subclass, e.g. ``trl.SFTTrainer``) with adapter-only
    checkpoints (:class:`AdapterCheckpoints`)."""
    return type(f"Tying{trainer_class.__name__}", (AdapterCheckpoints, trainer_class), {})


def __getattr__(name: str):
    """``TyingTrainer``: ``transformers.Trainer`` with adapter-only checkpoints (created on first use)."""
    if name == "TyingTrainer":
        from transformers import Trainer

        globals()[name] = cls = adapter_trainer(Trainer)
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
