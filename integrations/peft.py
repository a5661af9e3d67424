"""PEFT interop: materialise any tied adapter as a standard per-module PEFT LoRA adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads,
and import a PEFT LoRA adapter into tying.

Export absorbs u, v, G and the scale into per-module factors: ``lora_A = G diag(u) A`` and
``lora_B = scale * diag(v) B`` with ``lora_alpha = r`` (PEFT scale 1), so the PEFT model computes
exactly ``v * B(u * A x) * scale``. A tied factor is written once per module that uses it: that is
the price of serving with stacks that know only per-module LoRA (PEFT, vLLM). What a kind writes (and whether it
exports at all) is its registered ``export``; how a module type lays the tensors out is its ``peft``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import kinds, modtypes
from ..engine import apply_, bank_of
from ..errors import AdapterFileError
from ..planner import plan
from ..spec import load_spec
from ..state import _atomic_write, _want, check_tensors, read_adapter

PREFIX = "base_model.model."
_SUFFIX = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def export_peft(model: nn.Module, out_dir: str | os.PathLike, adapter: str | os.PathLike | None = None,
                base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA adapter for ``model``'s tying adapter (or for the adapter folder ``adapter``,
    planned on ``model``, which may then be a meta-device model)."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise AdapterFileError(f"{out_dir} is a file: export_peft writes a folder (adapter_config.json + "
                               "adapter_model.safetensors); give the path of a folder")
    spec, tensors = (bank_of(model).spec, None) if adapter is None else read_adapter(adapter)
    kind = kinds.get(spec.adapter.kind)
    if not kind.facts.exportable or spec.train_modules:
        raise AdapterFileError(f"only adapters of a kind with a PEFT export (lora, dora) and without train_modules "
                               f"export to PEFT (kind {spec.adapter.kind!r}, train_modules {spec.train_modules})")
    merged = set()
    if adapter is None:
        bank = bank_of(model)
        p, tensors = bank.plan, {k: v.detach().cpu() for k, v in bank.state_dict().items()}
        modules = {n: getattr(m, "base", m) for n, m in model.named_modules()}
        merged = {n for n, m in model.named_modules() if getattr(m, "merged", False)}
    else:
        p = plan(model, spec)
        check_tensors(adapter, tensors, _want(p, model))
        modules = dict(model.named_modules())
    out, scale, r = Path(out_dir), spec.adapter.scale, spec.adapter.rank
    state, extra_config = {}, {}
    for site in p.sites:
        mt, module = modtypes.module_type(site.kind), modules[site.name]
        if mt.peft is None:
            raise AdapterFileError(f"module {site.name!r} is a {mt.name}, which has no PEFT layout; it cannot be "
                                   "exported to PEFT")
        factors = {f: tensors[f"{f}.{key}"].float() for f, key in site.keys.items()}
        weight = functools.partial(_base_weight, mt, module, site.name, site.name in merged)  # only dora calls it
        down, up, extra = kind.export(factors, scale, weight)
        for suffix, t in {**mt.peft(module, down, up), **extra}.items():
            state[f"{PREFIX}{site.name}.{suffix}"] = t.detach().clone().contiguous()  # tied: one copy per module
        extra_config.update(mt.peft_config)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": spec.adapter.dropout, "bias": "none",
              "target_modules": sorted(s.name for s in p.sites), "task_type": None, "inference_mode": True,
              "fan_in_fan_out": False, "init_lora_weights": True, "base_model_name_or_path": base_model_name_or_path,
              "use_rslora": False, "use_dora": False, **extra_config, **kind.peft_config}
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(out / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return out


def _base_weight(mt, module: nn.Module, name: str, merged: bool) -> torch.Tensor:
    """The site's dense base weight, for kinds whose export needs it (dora): real and unmerged."""
    if merged:
        raise AdapterFileError(f"module {name!r} is merged: its weight holds the update; call tying.unmerge_(model) "
                               "before exporting")
    weight = mt.weight(module).detach()
    if weight.device.type == "meta":
        raise AdapterFileError(f"a {mt.name} module on the meta device has no weight; this adapter kind exports "
                               "values computed from the base weight: export from a model with real weights")
    return weight.float()


def import_peft(model: nn.Module, peft_dir: str | os.PathLike) -> None:
    """Apply a PEFT LoRA adapter folder to ``model`` as an untied tying adapter (one A, one B per module)."""
    src = Path(peft_dir)
    cfg_path, w_path = src / "adapter_config.json", src / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterFileError(f"{src} is not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    unsupported = {k: cfg.get(k) for k in ("use_dora", "rank_pattern", "alpha_pattern", "lora_bias") if cfg.get(k)}
    if cfg.get("peft_type") != "LORA" or unsupported:
        raise AdapterFileError(f"{cfg_path}: only plain PEFT LoRA adapters import (peft_type LORA without "
                               f"{', '.join(unsupported) or 'other options'}); got peft_type {cfg.get('peft_type')!r}")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{w_path} is not a readable safetensors file ({e})") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(f"{w_path} holds NaN or infinite values in {bad[:3]}; nothing was imported")
    other = [k for k in tensors if not _SUFFIX.search(k)]
    if other:
        raise AdapterFileError(f"{w_path}: tensors other than lora_A / lora_B ({other[:3]}) cannot be imported")
    names = sorted({_SUFFIX.sub("", k).removeprefix(PREFIX) for k in tensors})
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
    spec = load_spec({"targets": [{"select": "re:" + "|".join(map(re.escape, names))}],
                      "adapter": {"rank": r, "alpha": scale * r, "dropout": cfg.get("lora_dropout", 0.0),
                                  "factors": {"A": {"init": "zeros"}, "B": {"init": "zeros"}}}})
    p = plan(model, spec)
    shapes = {f"{g.factor}.{g.key}": g.shape for g in p.groups}
    values = {}
    for site in p.sites:
        for f, suffixes in (("A", ("lora_A.weight", "lora_embedding_A")), ("B", ("lora_B.weight", "lora_embedding_B"))):
            t = next(tensors[k] for k in (f"{PREFIX}{site.name}.{s}" for s in suffixes) if k in tensors)
            key = f"{f}.{site.keys[f]}"
            if t.numel() != torch.Size(shapes[key]).numel():
                raise AdapterFileError(f"{w_path}: {site.name} {f} has shape {tuple(t.shape)}, the model needs "
                                       f"{shapes[key]} (an adapter for a different model?)")
            values[key] = t.reshape(shapes[key])
    apply_(model, p)
    with torch.no_grad():
        for k, param in bank_of(model).state_dict(keep_vars=True).items():
            param.copy_(values[k])
