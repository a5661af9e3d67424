"""Many LoRAs of one base into one tied adapter: shared factors plus a small factor per task (Compress-then-Serve's
idea, ICML'25, as a tying spec).

For each adapted module m and LoRA i, with update ``dW_i = s_i B_i A_i``, the compressed adapter keeps a shared
``B_m`` (d_out x R, orthonormal columns) and ``A_m`` (R x d_in, orthonormal rows), and per task either a core ``G_i``
(R x R: ``dW_i ~ B_m G_i A_m``) or a scaling ``u_i`` (R: ``dW_i ~ B_m diag(u_i) A_m``). B_m spans the leading
left singular vectors of [dW_1, ..., dW_N] and A_m the leading right ones, computed from the LoRAs' low-rank forms
(never a dense d_out x N d_in matrix): with ``R >= sum of the ranks`` they span every update and the adapter is exact;
below, each task's core is the least-squares best for the shared bases (``G_i = B_m^T dW_i A_m^T``), and the report
gives each task's relative error ``||dW_i - B_m G_i A_m|| / ||dW_i||`` per module and overall. ``share="layers"``
ties B and A across the layers of a projection as well (one pair per projection for the whole model).

The result is a multi-task tied adapter folder (one task per LoRA): ``load_adapter(task=)``, ``load_adapters_``
and ``tying.adapters`` with every task in one batch, ``export_peft(task=)``, TyingConfig. ``compress_peft`` needs no
base model: the modules' names and shapes come from the LoRA files (Linear-like modules).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterFileError
from ..planner import plan
from ..spec import load_spec
from ..state import write_adapter
from .peft_imports import PREFIX, peft_targets, read_folder

CORES = ("full", "diag")


def compress_peft(adapters: dict[str, str | os.PathLike], out_dir: str | os.PathLike, rank: int, *,
                  core: str = "full", share: str = "module") -> dict:
    """Compress PEFT LoRA folders ``{task name: folder}`` of one base into one multi-task tied adapter at
    ``out_dir`` (see the module docstring); return the report (also written as ``compression.json`` beside the
    adapter's files). Folders of other bases, module sets, shapes or methods are refused by name; nothing is written
    on an error."""
    if core not in CORES or share not in ("module", "layers"):
        raise AdapterFileError(f"core is one of {CORES} (got {core!r}); share is 'module' or 'layers' (got {share!r})")
    if not isinstance(adapters, dict) or len(adapters) < 2:
        raise AdapterFileError("compress_peft takes at least two LoRA folders, {task name: folder}")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterFileError(f"rank is a positive whole number; got {rank!r}")
    loras = {n: _lora(n, f) for n, f in adapters.items()}
    names, first = _agree(loras)
    spec = load_spec({"targets": peft_targets(sorted({m.rpartition(".")[2] for m in names})), "tasks": list(loras),
                      "adapter": {"rank": rank, "factors": _factors(core, share)}})
    p = plan(_skeleton({m: (a.shape[1], b.shape[0]) for m, (a, b) in first["updates"].items()}), spec)
    sites = {s.name: s for s in p.sites}
    groups: dict[tuple[str, str], list[str]] = {}
    for s in p.sites:  # the modules that share one pair of bases
        groups.setdefault((s.keys["A"], s.keys["B"]), []).append(s.name)
    tensors, errors = {}, {t: {} for t in loras}
    for (akey, bkey), members in groups.items():
        updates = [(t, m, *loras[t]["updates"][m]) for m in members for t in loras]
        B, A = _bases(updates, rank)
        tensors[f"A.{akey}"], tensors[f"B.{bkey}"] = A, B  # tied across the tasks: one key for all
        for t, m, a, b in updates:
            site = sites[m]
            small = (B.T @ b) @ (a @ A.T)  # (R, R): the best core for the shared bases
            part = "G" if core == "full" else "u"
            tensors[f"{part}.{site.task_keys[t][part]}"] = small if core == "full" else small.diagonal().clone()
            errors[t][m] = _error(a, b, B, small if core == "full" else torch.diag(small.diagonal()), A)
    dims = {m: min(a.shape[1], b.shape[0]) for m, (a, b) in first["updates"].items()}
    exact_at = max(min(len(members) * sum(lr["rank"] for lr in loras.values()), *(dims[m] for m in members))
                   for members in groups.values())  # a pair of bases spans every update of its group
    report = {"rank": rank, "core": core, "share": share, "exact_at": exact_at,
              "tasks": {t: {"relative_error": _overall(errors[t], loras[t]["updates"]), "modules": errors[t]}
                        for t in loras}}
    out = write_adapter(out_dir, spec, {k: v.float().contiguous() for k, v in tensors.items()})
    (Path(out) / "compression.json").write_text(json.dumps(report, indent=1))
    return report


def _lora(task: str, folder) -> dict:
    """One LoRA folder: its base, rank and each module's (A, scale B) in float32."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", str(task)) or len(str(task)) > 64:
        raise AdapterFileError(f"task name {task!r}: letters, digits, '_' and '-' (a tying task name)")
    cfg, tensors, where = read_folder(folder)
    if cfg.get("peft_type") != "LORA" or any(cfg.get(k) for k in ("use_dora", "rank_pattern", "alpha_pattern")):
        raise AdapterFileError(f"adapter {task!r} ({where}): only plain PEFT LoRA folders compress (peft_type LORA "
                               f"without DoRA or rank patterns); got {cfg.get('peft_type')!r}")
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
    updates = {}
    for k, a in tensors.items():
        if k.endswith(".lora_A.weight"):
            m = k.removesuffix(".lora_A.weight").removeprefix(PREFIX)
            b = tensors.get(f"{PREFIX}{m}.lora_B.weight")
            if b is None or a.ndim != 2:
                raise AdapterFileError(f"adapter {task!r} ({where}): module {m!r} is not a Linear-like LoRA (lora_A "
                                       "and lora_B matrices); only those compress")
            updates[m] = (a.float(), b.float() * scale)
    rest = sorted(set(tensors) - {f"{PREFIX}{m}.lora_{x}.weight" for m in updates for x in "AB"})
    if rest:  # an embedding's LoRA, LoRA biases, modules_to_save: compressing without them would change the task
        raise AdapterFileError(f"adapter {task!r} ({where}) holds more than the lora_A / lora_B matrices of Linear "
                               f"modules, which alone compress: {', '.join(rest[:3])}{' ...' * (len(rest) > 3)}")
    if not updates:
        raise AdapterFileError(f"adapter {task!r} ({where}) holds no lora_A / lora_B matrices")
    return {"base": cfg.get("base_model_name_or_path"), "rank": r, "updates": updates, "where": where}


def _agree(loras: dict) -> tuple[list[str], dict]:
    """The module names every LoRA adapts, after checking they are of one base with one set of modules and shapes."""
    (t0, first), *rest = loras.items()
    for t, lr in rest:
        if lr["base"] != first["base"] and None not in (lr["base"], first["base"]):
            raise AdapterFileError(f"adapter {t!r} is of base {lr['base']!r}, adapter {t0!r} of {first['base']!r}: "
                                   "LoRAs of one base compress together")
        only, lacks = sorted(set(lr["updates"]) - set(first["updates"])), sorted(set(first["updates"]) - set(lr["updates"]))
        if only or lacks:
            raise AdapterFileError(f"adapter {t!r} adapts other modules than {t0!r}: only in {t!r}: {only[:3]}, "
                                   f"missing: {lacks[:3]}")
        for m, (a, b) in lr["updates"].items():
            a0, b0 = first["updates"][m]
            if (a.shape[1], b.shape[0]) != (a0.shape[1], b0.shape[0]):
                raise AdapterFileError(f"adapter {t!r}: module {m!r} is {b.shape[0]} x {a.shape[1]}, in {t0!r} "
                                       f"{b0.shape[0]} x {a0.shape[1]} (another base?)")
    return sorted(first["updates"]), first


def _factors(core: str, share: str) -> dict:
    tie = ["task", "layer"] if share == "layers" else ["task"]
    shared = {"tie": tie, "train": True, "init": "zeros"}
    small = {"G": {"tie": [], "init": "zeros"}} if core == "full" else {"u": {"tie": [], "init": "zeros"}}
    return {"A": shared, "B": shared, **small}


class _Module(nn.Module):
    pass


def _skeleton(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """A meta-device model with a Linear (d_in, d_out) at each module name: what planning the folder needs."""
    root = _Module()
    for name, (d_in, d_out) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, _Module())
            parent = parent._modules[part]
        parent.add_module(leaf, nn.Linear(d_in, d_out, bias=False, device="meta"))
    return root


def _bases(updates: list, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared B (d_out x rank) and A (rank x d_in) for the updates [(task, module, a, b)], from their low-rank
    forms: dW dW^T = (b R^T)(b R^T)^T with a^T = Q R, so the left singular vectors of [b_i R_i^T] are those of
    [dW_i]; the right ones likewise. Zero columns pad a rank beyond what the updates span."""
    left = torch.cat([b @ torch.linalg.qr(a.T).R.T for _, _, a, b in updates], 1)  # (d_out, sum r)
    right = torch.cat([torch.linalg.qr(b).R @ a for _, _, a, b in updates], 0)  # (sum r, d_in)
    U = torch.linalg.svd(left, full_matrices=False).U[:, :rank]
    V = torch.linalg.svd(right, full_matrices=False).Vh[:rank]
    B = torch.zeros(left.shape[0], rank)
    A = torch.zeros(rank, right.shape[1])
    B[:, :U.shape[1]], A[:V.shape[0]] = U, V
    return B, A


def _error(a, b, B, G, A) -> float:
    """||b a - B G A|| / ||b a|| (Frobenius), dense per module (the updates are small beside the base)."""
    dw = b @ a
    return float(torch.linalg.norm(dw - B @ G @ A) / torch.linalg.norm(dw).clamp_min(1e-30))


def _overall(errors: dict[str, float], updates: dict) -> float:
    """One task's error over all its modules: sqrt(sum err_m^2 ||dW_m||^2 / sum ||dW_m||^2)."""
    norms = {m: float(torch.linalg.norm(b @ a)) ** 2 for m, (a, b) in updates.items()}
    return (sum(errors[m] ** 2 * norms[m] for m in errors) / max(sum(norms.values()), 1e-30)) ** 0.5
