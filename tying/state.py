"""Saving and loading adapters: ``spec.yaml`` + ``adapter.safetensors`` (each tied factor once,
nothing of the base model but the spec's ``train_modules``). Nothing is ever unpickled; saves are atomic."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .engine import apply_, bank_of, wrappers
from .errors import AdapterFileError, AlreadyAppliedError
from .planner import BANK_ATTR, plan
from .spec import load_spec

SPEC_FILE = "spec.yaml"
WEIGHTS_FILE = "adapter.safetensors"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash leaves the old file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapter (spec and factors) to ``directory``; return the folder."""
    bank = bank_of(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _adapter_state(model).items()}
    _atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "tying", "version": "1"}))
    _atomic_write(out / SPEC_FILE, lambda tmp: Path(tmp).write_text(bank.spec.to_yaml()))
    return out


MODULES = "modules."  # key prefix of the spec's train_modules in the adapter file


def _module_state(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """The live state of the train_modules ``names``; a tensor shared by two modules appears once."""
    state, seen = {}, set()
    for name in names:
        for k, v in model.get_submodule(name).state_dict(keep_vars=True).items():
            if id(v) not in seen:
                seen.add(id(v))
                state[f"{MODULES}{name}.{k}"] = v
    return state


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bank's factors plus the state of the spec's train_modules (live tensors)."""
    bank = bank_of(model)
    return {**bank.state_dict(keep_vars=True), **_module_state(model, bank.plan.train_modules)}


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({e}); "
                               "tying reads only safetensors adapters and never unpickles") from None


def read_spec(src: Path):
    """The spec of the adapter folder ``src``, after checking that it holds both files."""
    for name in (SPEC_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise AdapterFileError(f"{src / name} not found: an adapter folder holds {SPEC_FILE} and {WEIGHTS_FILE}")
    return load_spec(src / SPEC_FILE)


def read_factors(src: Path, groups: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of ``src``'s adapter file, after checking its header against ``groups`` (key -> shape): the
    same keys, floating-point factors, the same shapes. Reads nothing else and changes nothing."""
    found = _read_header(src / WEIGHTS_FILE)
    missing, extra = sorted(set(groups) - set(found)), sorted(set(found) - set(groups))
    if missing or extra:
        raise AdapterFileError(f"adapter in {src} does not fit this model: missing factors {missing[:5]}, "
                               f"unexpected factors {extra[:5]} (was it saved from a different model?)")
    ints = [f"{k} is {found[k][1]}" for k in groups
            if not k.startswith(MODULES) and found[k][1] not in ("F16", "BF16", "F32", "F64")]
    if ints:
        raise AdapterFileError(f"adapter in {src}: dtype mismatch, factors are floating point but {'; '.join(ints[:5])}")
    wrong = [f"{k}: file {found[k][0]} vs model {groups[k]}" for k in groups if found[k][0] != groups[k]]
    if wrong:
        raise AdapterFileError(f"adapter in {src} does not fit this model; shape mismatch: {'; '.join(wrong[:5])}")
    try:
        return load_file(str(src / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{src / WEIGHTS_FILE} is corrupted: {e}") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Apply the adapter saved in ``directory`` to ``model`` and load its factors.

    If the model already carries an adapter with the same spec, only the factors are loaded. Every
    check (spec, plan, keys, shapes, dtypes) runs before the model is touched. Floating-point factors
    are cast to the model's factor dtype (e.g. an fp32 adapter into a bf16 model).
    """
    src = Path(directory)
    spec = read_spec(src)
    applied = hasattr(model, BANK_ATTR)
    if applied:
        bank = bank_of(model)
        if bank.spec != spec:
            mine, theirs = bank.spec.model_dump(), spec.model_dump()
            diff = [k for k in mine if mine[k] != theirs.get(k)]
            raise AlreadyAppliedError(f"{src} holds an adapter whose spec differs from the model's (in {diff}); "
                                      "nothing was loaded. Load it into a model without an adapter, or call "
                                      "tying.unapply_(model) first")
        if any(w.merged for _, w in wrappers(model)):
            raise AlreadyAppliedError("the model's adapter is merged; call tying.unmerge_(model) before loading "
                                      "new factors (the base weights hold the old update)")
        groups = {k: tuple(v.shape) for k, v in _adapter_state(model).items()}
    else:
        p = plan(model, spec)
        groups = {f"{g.factor}.{g.key}": g.shape for g in p.groups}
        groups.update({k: tuple(v.shape) for k, v in _module_state(model, p.train_modules).items()})
    tensors = read_factors(src, groups)
    if not applied:
        apply_(model, p)
    with torch.no_grad():
        for k, t in _adapter_state(model).items():
            t.copy_(tensors[k])
