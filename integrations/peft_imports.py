"""PEFT adapter folders into tying: LoRA (one A, one B per module), and the sharing methods whose tying form stores
each shared tensor once where PEFT writes it per layer: VeRA (frozen shared A, B; per-module scalings), Lily (A per
stride of layers, a pool of B's, a router per module), VB-LoRA (one vector bank, top-k logits per module).

``import_peft(model, folder)`` reads the folder (nothing unpickled, every value finite), writes the equivalent spec,
plans it, checks every tensor's shape against the plan and every copy PEFT wrote of a shared tensor against the
others (a folder whose copies differ does not share as its method says: refused), then applies and fills the adapter.
The imported adapter computes what PEFT's does (tests/test_pools.py: 1e-5).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..engine import apply_, bank_of
from ..errors import AdapterFileError, SpecError
from ..planner import Counts, Plan, plan
from ..spec import TyingSpec, load_spec

PREFIX = "base_model.model."
# per peft_type: the per-module tensors it writes (suffix -> the tying part it fills)
SUFFIXES = {"LORA": ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"),
            "VERA": ("vera_lambda_d", "vera_lambda_b"), "LILY": ("lily_A.weight", "lily_B.weight", "lily_router.weight"),
            "VBLORA": ("vblora_logits_A", "vblora_logits_B")}


def import_peft(model: nn.Module, peft_dir: str | os.PathLike, *, name: str | None = None) -> Counts:
    """Apply a PEFT adapter folder (LoRA, VeRA, Lily or VB-LoRA) to ``model`` as the equivalent tying adapter (named
    ``name``, or the unnamed one); return its counts. Nothing changes on a refusal."""
    cfg, tensors, w_path = read_folder(peft_dir)
    cfg_path, kind = Path(peft_dir) / "adapter_config.json", cfg.get("peft_type")
    if kind not in SUFFIXES:
        raise AdapterFileError(f"{cfg_path}: peft_type {kind!r} does not import; tying imports "
                               f"{', '.join(SUFFIXES)}")
    suffix = re.compile(r"\.(" + "|".join(map(re.escape, SUFFIXES[kind])) + ")$")
    per_module = {k: t for k, t in tensors.items() if suffix.search(k)}
    names = sorted({suffix.sub("", k).removeprefix(PREFIX) for k in per_module})
    if not names:
        raise AdapterFileError(f"{w_path} holds no {kind} tensors ({', '.join(SUFFIXES[kind])})")
    spec, fill = IMPORTERS[kind](cfg, tensors, names, str(cfg_path))
    p = plan(model, spec)
    by_site = {s: {m.group(1): t for k, t in per_module.items()
                   if (m := suffix.search(k)) and k[:m.start()].removeprefix(PREFIX) == s} for s in names}
    values = _checked(p, fill(p, by_site), str(w_path))
    counts = apply_(model, p, name=name)
    with torch.no_grad():
        for k, param in bank_of(model, name).state_dict(keep_vars=True).items():
            param.copy_(values[k])
    return counts


def read_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], str]:
    """A PEFT adapter folder's config, its tensors (safetensors only, every value finite) and the weights' path."""
    src = Path(folder)
    cfg_path, w_path = src / "adapter_config.json", src / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterFileError(f"{src} is not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = load_file(str(w_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_path} is not a JSON file ({e})") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{w_path} is not a readable safetensors file ({e})") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(f"{w_path} holds NaN or infinite values in {bad[:3]}; nothing was imported")
    return cfg, tensors, str(w_path)


def _checked(p: Plan, found: dict[str, list[torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    """One value per group from every copy the folder holds of it: the shapes the plan needs, the copies equal."""
    shapes = {f"{g.factor}.{g.key}": g.shape for g in p.groups}
    values = {}
    for key, shape in shapes.items():
        copies = found.get(key)
        if not copies:
            raise AdapterFileError(f"{where}: nothing for {key} (an adapter for a different model?)")
        first = copies[0]
        if tuple(first.shape) != tuple(shape):
            raise AdapterFileError(f"{where}: {key} has shape {tuple(first.shape)}, the model needs {shape} (an "
                                   "adapter for a different model?)")
        if any(not torch.equal(c, first) for c in copies[1:]):
            raise AdapterFileError(f"{where}: the {len(copies)} copies of {key} differ, though the method shares one "
                                   "tensor there: this folder does not share as its config says; nothing was imported")
        values[key] = first
    return values


def peft_targets(target_modules: str | list[str]) -> list[dict]:
    """PEFT's ``target_modules`` as tying targets. A list of names selects every module whose name ends in one of
    them (PEFT's rule), capturing ``layer`` (the last number in the name before it) and ``proj`` (the name), so tied
    presets tie across layers and projections as they do on their own targets. A string is a regular expression
    matched against the whole name (PEFT's rule); its named groups are its captures."""
    if isinstance(target_modules, str):
        return [{"select": "re:" + target_modules}]
    names = sorted(set(target_modules))
    if not names or not all(isinstance(n, str) and n for n in names):
        raise SpecError(f"target_modules is a regular expression or a non-empty list of module names; got "
                        f"{target_modules!r}")
    alt = "|".join(map(re.escape, names))
    return [{"select": rf"re:(?:(?:.*\.)?(?P<layer>\d+)\.(?:.*\.)?|(?:.*\.)?)(?P<proj>{alt})"}]


def _sites(names: list[str]) -> list[dict]:
    return [{"select": "re:" + "|".join(map(re.escape, names))}]


Fill = Callable[[Plan, dict], dict]


def _lora(cfg: dict, tensors: dict, names: list[str], where: str) -> tuple[TyingSpec, Fill]:
    unsupported = {k: cfg.get(k) for k in ("use_dora", "rank_pattern", "alpha_pattern", "lora_bias") if cfg.get(k)}
    if unsupported:
        raise AdapterFileError(f"{where}: only plain PEFT LoRA adapters import (not {', '.join(unsupported)})")
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
    spec = load_spec({"targets": _sites(names), "adapter": {"rank": r, "alpha": scale * r,
                                                          "dropout": cfg.get("lora_dropout", 0.0),
                                                          "factors": {"A": {"init": "zeros"}, "B": {"init": "zeros"}}}})

    def fill(p: Plan, by_site: dict) -> dict:
        shapes = {f"{g.factor}.{g.key}": g.shape for g in p.groups}
        out = {}
        for s in p.sites:
            for f in "AB":  # an embedding's A and B are stored transposed: reshape to the plan's shapes
                t = next(t for k, t in by_site[s.name].items() if k.startswith(f"lora_{f}") or k == f"lora_embedding_{f}")
                key = f"{f}.{s.keys[f]}"
                out[key] = [t.reshape(shapes[key]) if t.numel() == torch.Size(shapes[key]).numel() else t]
        return out
    return spec, fill


def _vera(cfg: dict, tensors: dict, names: list[str], where: str) -> tuple[TyingSpec, Fill]:
    A, B = tensors.get("base_model.vera_A"), tensors.get("base_model.vera_B")
    if A is None or B is None:
        raise AdapterFileError(f"{where}: the folder holds no vera_A / vera_B (saved with save_projection=False: PEFT "
                               "regenerates them from a seed); save it again with save_projection=True to import it")
    frozen = {"tie": "all", "train": False, "shape_aware": True, "init": "zeros"}
    spec = load_spec({"targets": _sites(names), "adapter": {
        "rank": cfg["r"], "dropout": cfg.get("vera_dropout", 0.0),
        "factors": {"A": frozen, "B": frozen, "u": {"init": "ones"}, "v": {"init": "zeros"}}}})

    def fill(p: Plan, by_site: dict) -> dict:
        out = {}
        for s in p.sites:  # PEFT slices its shared pair to each module's size
            out.setdefault(f"A.{s.keys['A']}", []).append(A[:, :s.d_in])
            out.setdefault(f"B.{s.keys['B']}", []).append(B[:s.d_out, :])
            out[f"u.{s.keys['u']}"] = [by_site[s.name]["vera_lambda_d"]]
            out[f"v.{s.keys['v']}"] = [by_site[s.name]["vera_lambda_b"]]
        return out
    return spec, fill


def _lily(cfg: dict, tensors: dict, names: list[str], where: str) -> tuple[TyingSpec, Fill]:
    targets = peft_targets(sorted({n.rpartition(".")[2] for n in names}))
    spec = load_spec("lily", rank=cfg["r"], stride_a=cfg["stride_A"], num_b=cfg["num_B"],
                     scaling=cfg.get("scaling", 1.0), targets=targets)

    def fill(p: Plan, by_site: dict) -> dict:
        out, nb = {}, cfg["num_B"]
        for s in p.sites:
            t = by_site[s.name]
            pool = t["lily_B.weight"].reshape(nb, -1, s.d_out).transpose(1, 2)  # (num_B, d_out, r)
            for part, value in (("A", t["lily_A.weight"]), ("Bs", pool), ("B", t["lily_router.weight"])):
                out.setdefault(f"{part}.{s.keys[part]}", []).append(value)
        return out
    return spec, fill


def _vblora(cfg: dict, tensors: dict, names: list[str], where: str) -> tuple[TyingSpec, Fill]:
    if cfg.get("save_only_topk_weights"):
        raise AdapterFileError(f"{where}: saved with save_only_topk_weights=True (only the top-k logits, for inference "
                               "in PEFT); save it again with save_only_topk_weights=False to import it")
    bank = tensors.get("base_model.vblora_vector_bank")
    if bank is None:
        raise AdapterFileError(f"{where}: the folder holds no vblora_vector_bank")
    spec = load_spec("vb-lora", rank=cfg["r"], num_vectors=cfg["num_vectors"], vector_length=cfg["vector_length"],
                     topk=cfg["topk"], targets=_sites(names), dropout=cfg.get("vblora_dropout", 0.0))

    def fill(p: Plan, by_site: dict) -> dict:
        out = {}
        for s in p.sites:
            out.setdefault(f"bank.{s.keys['bank']}", []).append(bank)
            out[f"A.{s.keys['A']}"] = [by_site[s.name]["vblora_logits_A"]]
            out[f"B.{s.keys['B']}"] = [by_site[s.name]["vblora_logits_B"]]
        return out
    return spec, fill


IMPORTERS: dict[str, Callable] = {"LORA": _lora, "VERA": _vera, "LILY": _lily, "VBLORA": _vblora}
