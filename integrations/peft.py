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
from safetensors.torch import save_file
from torch import nn

from .. import kinds, modtypes, pools
from ..engine import bank_of
from ..errors import AdapterFileError, SpecError
from ..files import replace_folder
from ..planner import plan
from ..spec import preset_names
from ..state import _want, check_tensors, read_adapter
from ..task_files import check_task
from .peft_imports import import_peft  # noqa: F401  (import_peft lives there; importable from here)

PREFIX = "base_model.model."


VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts (vllm/config/lora.py)


CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# PEFT's task types, by the suffix of a transformers model class (what AutoPeftModel* needs to pick its class)
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
              "ForQuestionAnswering": "QUESTION_ANS", "ForSeq2SeqLM": "SEQ_2_SEQ_LM"}
PEFT_TASK_TYPES = (*TASK_TYPES.values(), "FEATURE_EXTRACTION")


def export_peft(model: nn.Module, out_dir: str | os.PathLike, adapter: str | os.PathLike | None = None,
                base_model_name_or_path: str | None = None, pad_rank: bool = True, task: str | None = None,
                task_type: str | None = None) -> Path:
    """Write a PEFT LoRA adapter for ``model``'s tying adapter (or for the adapter folder ``adapter``,
    planned on ``model``, which may then be a meta-device model). ``model`` may be a PeftModel of a TyingConfig.

    The factors are exact (``lora_A = G diag(u) A``, ``lora_B = scale diag(v) B``, never an SVD). With ``pad_rank``
    (the default) the rank is padded with zeros to the next one vLLM and SGLang serve (1, 8, 16, ..., 512; the same
    function); ``target_modules`` are the modules' last names (``q_proj``, as vLLM maps them) where those select
    exactly the adapted modules, else their full names. A multi-task adapter exports one task, named by ``task``.
    ``task_type`` (PEFT's: CAUSAL_LM, SEQ_CLS, ...) defaults to the one a transformers model's class names
    (``*ForCausalLM``: CAUSAL_LM), so that ``AutoPeftModelForCausalLM`` loads the export. The folder is replaced
    whole (:func:`tying.files.replace_folder`): after any failure it holds the old export or the new one."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise AdapterFileError(f"{out_dir} is a file: export_peft writes a folder (adapter_config.json + "
                               "adapter_model.safetensors); give the path of a folder")
    model, peft_config = _unwrap(model)
    if task_type is None:
        task_type = next((t for end, t in TASK_TYPES.items() if type(model).__name__.endswith(end)),
                         getattr(peft_config, "task_type", None))
    task_type = getattr(task_type, "value", task_type)
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise AdapterFileError(f"task_type {task_type!r} is not one of PEFT's: {', '.join(PEFT_TASK_TYPES)}")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(peft_config, "base_model_name_or_path", None)
    spec, tensors = (bank_of(model).spec, None) if adapter is None else read_adapter(adapter)
    where = "the model's adapter" if adapter is None else str(adapter)
    if spec.tasks and task is None:
        raise AdapterFileError(f"{where} is a multi-task adapter (tasks: {', '.join(spec.tasks)}); a PEFT LoRA holds "
                               f"one task: export_peft(model, out_dir, task={spec.tasks[0]!r})")
    if task is not None:
        check_task(spec, task, where)
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
    padded = next((v for v in VLLM_RANKS if v >= r), r) if pad_rank else r
    state, extra_config = {}, {}
    for site in p.sites:
        mt, module = modtypes.module_type(site.module_type), modules[site.name]
        if mt.peft is None:
            raise AdapterFileError(f"module {site.name!r} is a {mt.name}, which has no PEFT layout; it cannot be "
                                   "exported to PEFT")
        keys = site.task_keys[task] if task else site.keys
        try:  # a factor drawn from a pool is mixed from it (tying.pools); a router's mix has no export
            factors = {f: t.float() for f, t in pools.effective(spec.adapter, keys,
                                                                lambda part, k: tensors[f"{part}.{k}"], site.name).items()}
        except SpecError as e:
            raise AdapterFileError(str(e)) from None
        weight = functools.partial(_base_weight, mt, module, site.name, site.name in merged)  # only dora calls it
        down, up, extra = kind.export(factors, scale, weight)
        down = torch.cat([down, down.new_zeros(padded - r, down.shape[1])])  # zero rows and columns: the same update
        up = torch.cat([up, up.new_zeros(up.shape[0], padded - r)], 1)
        for suffix, t in {**mt.peft(module, down, up), **extra}.items():
            state[f"{PREFIX}{site.name}.{suffix}"] = t.detach().clone().contiguous()  # tied: one copy per module
        extra_config.update(mt.peft_config)
    config = {"peft_type": "LORA", "r": padded, "lora_alpha": padded, "lora_dropout": spec.adapter.dropout,
              "bias": "none", "target_modules": _target_names(model, [s.name for s in p.sites]),
              "task_type": task_type, "inference_mode": True,
              "fan_in_fan_out": False, "init_lora_weights": True, "base_model_name_or_path": base_model_name_or_path,
              "use_rslora": False, "use_dora": False, **extra_config, **kind.peft_config}

    def fill(new: Path) -> None:
        save_file(state, str(new / WEIGHTS_FILE), metadata={"format": "pt"})
        (new / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterFileError(f"cannot create the folder {out.parent} for the export: {e}") from None
    replace_folder(out, fill, own=(WEIGHTS_FILE, CONFIG_FILE))  # the old export or the new one, never a mix
    return out


def _unwrap(model: nn.Module):
    """A PeftModel's base model (the model that carries the tying adapter) and its active config; others as
    they are."""
    config = getattr(model, "peft_config", None)
    inner = getattr(getattr(model, "base_model", None), "model", None)
    if not isinstance(config, dict) or not isinstance(inner, nn.Module):
        return model, None
    return inner, config.get(getattr(model, "active_adapter", None))


def _target_names(model: nn.Module, sites: list[str]) -> list[str]:
    """The sites' last names where they select exactly the sites among the model's modules, else the full names."""
    leaves = {s.rpartition(".")[2] for s in sites}
    selected = {n for n, _ in model.named_modules() if n.rpartition(".")[2] in leaves}
    return sorted(leaves) if selected == set(sites) else sorted(sites)


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


def config_spec(spec, folder: str | os.PathLike | None = None):
    """The ``spec`` field of a TyingConfig loaded from an adapter folder (untrusted input), as load_spec takes it:
    the spec inline (a mapping, as ``save_pretrained`` writes it) or a preset name; a file path only inside
    ``folder`` (relative to it), and none where the folder is not known. tying never reads a local file that a folder
    names."""
    if not isinstance(spec, str) or spec in preset_names():
        return spec
    where = "a file, and a folder's config may name none"
    if folder is not None:
        root, path = Path(folder).resolve(), (Path(folder) / spec).resolve()
        inside = not Path(spec).is_absolute() and path.is_relative_to(root)
        if inside and path.is_file():
            return path
        where = "no file in the folder" if inside else "outside the folder"
    raise AdapterFileError(f"adapter_config.json: spec {spec[:200]!r} is {where}: a TyingConfig folder carries its "
                           "spec inline (save_pretrained writes it so) or names a preset; tying reads no other local "
                           "file for it. Save the adapter again with save_pretrained, or write the spec's YAML mapping "
                           "into the spec field")


# ---- a PEFT-native config: peft.get_peft_model(model, TyingConfig(spec="tl6", rank=8)) ----------------------------
# lives in tying.integrations.peft_method (it imports peft); these names stay importable from here.

MIN_PEFT = (0, 21)


def _peft_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in re.findall(r"\d+", version("peft"))[:2])


def register() -> bool:
    """Teach PEFT the TYING method; False (nothing done) on PEFT older than 0.21."""
    if _peft_version() < MIN_PEFT:
        return False
    import sys

    module = sys.modules.get(f"{__package__}.peft_method")
    if module is not None and not hasattr(module, "register"):
        return True  # it is being imported (it imported peft, which called us): it registers itself when done
    from . import peft_method

    return peft_method.register()


def __getattr__(name: str):
    """``TyingConfig`` and ``TyingTuner`` (PEFT is an optional dependency)."""
    if name in ("TyingConfig", "TyingTuner"):
        if _peft_version() < MIN_PEFT:
            raise ImportError(f"TyingConfig needs peft >= {'.'.join(map(str, MIN_PEFT))} (older versions hard-wire "
                              "their methods where they save and load); with older PEFT use tying.save_adapter and "
                              "export_peft")
        from . import peft_method

        peft_method.register()
        return getattr(peft_method, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
