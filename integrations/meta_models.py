"""A small registry of meta-device models (no weights allocated) for counting and inspecting.

``llama2-7b`` and ``gpt-2b-001`` are the paper's two base models with the shapes of PAPER.md.
GPT-2B-001 (NeMo: 24 layers, d 2048, 16 heads, SwiGLU FFN 5440, RoPE, no biases, untied embeddings,
vocab 256000) is built as a Llama-architecture model, which has exactly those shapes; the paper's
fused QKV maps to separate q/k/v with A shared across them (same counts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import TyingError

REGISTRY: dict[str, tuple[str, dict]] = {
    "llama2-7b": ("llama", {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                            "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}),
    "gpt-2b-001": ("llama", {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
                             "num_key_value_heads": 16, "intermediate_size": 5440, "vocab_size": 256000,
                             "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}),
    "smollm2-135m": ("llama", {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                               "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                               "tie_word_embeddings": True}),
    "gpt2": ("gpt2", {}),
}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("this needs transformers: pip install 'tying[hf]'") from None
    return transformers


def meta_model(name_or_path: str) -> nn.Module:
    """A model on the meta device: a REGISTRY name or the path of a transformers config JSON."""
    tf = _transformers()
    if name_or_path in REGISTRY:
        model_type, kwargs = REGISTRY[name_or_path]
        data = {"model_type": model_type, **kwargs}
    elif Path(name_or_path).is_file():
        try:
            data = json.loads(Path(name_or_path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TyingError(f"{name_or_path} is not a JSON file ({e}); give a transformers config.json") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise TyingError(f"{name_or_path} has no 'model_type'; is it a transformers config.json?")
    else:
        raise TyingError(f"unknown model {name_or_path!r}: give one of {', '.join(REGISTRY)} "
                         "or the path of a transformers config.json")
    data = dict(data)
    model_type = data.pop("model_type")
    try:
        config = tf.AutoConfig.for_model(model_type, **data)
    except Exception as e:  # noqa: BLE001  an unknown model_type, a value transformers (or its hub) refuses
        raise TyingError(f"{name_or_path}: transformers cannot build a {model_type!r} config: {_first_line(e)}") from None
    with torch.device("meta"):
        try:
            return tf.AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM (e.g. an encoder or a ViT): the bare model
            pass
        try:
            return tf.AutoModel.from_config(config)
        except Exception as e:  # noqa: BLE001
            raise TyingError(f"{name_or_path}: transformers cannot build a {model_type!r} model from this config: "
                             f"{_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    """The gist of a library's error: its last non-empty line (the cause), at most 200 characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    text = lines[-1] if len(lines) > 1 else lines[0]
    return text if len(text) <= 200 else text[:200] + " ..."
