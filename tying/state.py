"""Saving and loading adapters: ``spec.yaml`` + ``adapter.safetensors`` (each tied factor once, nothing of the base
model but the spec's ``train_modules``). Nothing is ever unpickled.

The folder is the unit users save, ship and serve, and one from someone else is untrusted input:

- **Atomic.** The weights file carries the spec in its metadata, so the one rename that replaces it replaces the
  whole adapter and commits the save; ``spec.yaml`` (for people and older readers) follows, and where the two
  differ after a crash the weights file's copy wins. A save that cannot write ``spec.yaml`` after its commit
  succeeds with a warning and removes the old one (never a raise after the commit). Files are fsynced before the
  rename and the folder after.
- **One writer at a time.** A save holds a lock on the folder (:func:`tying.files.locked`): a second save waits
  for the first, then replaces its adapter whole; temporaries a killed save left behind are removed by the next
  save, under the lock, so never a live writer's.
- **Read once.** The spec and every tensor come through one handle, so a save in between cannot mix two adapters.
- **Checked before anything changes**: keys, shapes, dtypes, finite values; a folder that would replace base
  modules (``train_modules``) is refused unless the caller opts in, naming what it would replace.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import meta, sharded
from .bank import MergeRecord, bank_path
from .engine import _ONLY, apply_, bank_of, banks
from .errors import AdapterFileError, AlreadyAppliedError
from .files import atomic_write as _atomic_write
from .files import locked
from .planner import Plan, plan
from .spec import TyingSpec, load_spec, parse_spec
from .task_files import check_task, multi_want, task_tensors
from .trained import trained_key
from .view import named_base_modules

SPEC_FILE = "spec.yaml"
WEIGHTS_FILE = "adapter.safetensors"
SPEC_KEY = "tying_spec"  # the spec's YAML in the weights file's metadata (format 2)
LOCK_FILE = ".tying.lock"  # held while a save writes into the folder; removed after


def _clean_stale(folder: Path) -> None:
    """Remove the temporaries of saves that were killed before their rename (under the folder's lock: no live
    writer has one)."""
    for name in (WEIGHTS_FILE, SPEC_FILE):
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, name: str | None = _ONLY) -> Path:  # type: ignore[assignment]
    """Write the model's adapter (the one named ``name`` where it carries several; spec and factors) to
    ``directory``, replacing an adapter there atomically; return the folder. The folder is an ordinary adapter
    folder whatever the adapter's name on this model.

    From a sharded model (FSDP2, tensor parallelism) the call is collective: every process calls it, the factors
    are gathered whole, process 0 writes and the others wait for it (:mod:`tying.sharded`)."""
    bank = bank_of(model, name)
    meta.check(bank, "save_adapter")
    tensors = _adapter_state(model, bank)
    if sharded.is_sharded(model, bank):
        sharded.check_placement(model, [bank])
        return sharded.write_gathered(tensors, lambda whole: write_adapter(directory, bank.spec, whole))
    return write_adapter(directory, bank.spec, tensors)


def adapter_tensors(bank, state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapter file's tensors taken from a full ``state_dict`` of the adapted model (e.g. the one FSDP gathers
    for a checkpoint): the bank's factors and its trained copies of the train_modules."""
    return {file_key(bank, k): state_dict[f"{prefix}{bank.path}.{k}"] for k in bank.state_dict()}


def file_key(bank, key: str) -> str:
    """The adapter file's key of the bank's state_dict key ``key``: a factor keeps its key, a trained module's
    ``trained.<a:b>.<k>`` is ``modules.<a.b>.<k>``."""
    if not key.startswith("trained."):
        return key
    name, _, k = key[len("trained."):].partition(".")
    return f"{MODULES}{name.replace(':', '.')}.{k}"


def write_adapter(directory: str | os.PathLike, spec: TyingSpec, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter folder from its spec and tensors (see :func:`save_adapter`)."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"{out} is a file: save_adapter writes a folder ({SPEC_FILE} + {WEIGHTS_FILE}); "
                               "give the path of a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterFileError(f"cannot create the adapter folder {out}: {e}") from None
    spec = spec.to_yaml()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": "tying", "version": "2", SPEC_KEY: spec}
    with locked(out / LOCK_FILE, f"the adapter folder {out}"):
        _clean_stale(out)
        _atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
        # committed: the weights file carries the whole adapter; from here on the save succeeds
        try:
            _atomic_write(out / SPEC_FILE, lambda tmp: Path(tmp).write_text(spec))
        except OSError as e:
            _side_file_failed(out, e)
    return out


def _side_file_failed(out: Path, error: OSError) -> None:
    """spec.yaml could not be written after the commit: remove the old one, which no longer describes the adapter
    (it would be reported at every load), and say so."""
    try:
        (out / SPEC_FILE).unlink(missing_ok=True)
        left = f"{SPEC_FILE} was removed"
    except OSError:
        left = f"the old {SPEC_FILE} is left, and loads will warn that it differs"
    warnings.warn(f"{out}: the adapter was saved ({WEIGHTS_FILE} carries its spec and loads whole), but {SPEC_FILE} "
                  f"could not be written ({error}); {left}. Save again to write it", stacklevel=4)


MODULES = "modules."  # key prefix of the spec's train_modules in the adapter file


def _module_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The live state of ``modules`` (name -> module) under the file's keys; a tensor shared by two appears once."""
    state, seen = {}, set()
    for name, module in modules.items():
        for k, v in module.state_dict(keep_vars=True).items():
            if id(v) not in seen:
                seen.add(id(v))
                state[f"{MODULES}{name}.{k}"] = v
    return state


def _adapter_state(model: nn.Module, bank) -> dict[str, torch.Tensor]:
    """The bank's factors plus its trained copies of the spec's train_modules (live tensors), under the file's keys."""
    factors = {k: v for k, v in bank.state_dict(keep_vars=True).items() if not k.startswith("trained.")}
    return {**factors, **_module_state({n: bank.trained[trained_key(n)] for n in bank.plan.train_modules})}


def read_adapter(src: str | os.PathLike) -> tuple[TyingSpec, dict[str, torch.Tensor]]:
    """The spec and the tensors of the adapter folder ``src``, read through one handle. Changes nothing."""
    src = Path(src)
    path = src / WEIGHTS_FILE
    if not path.is_file():
        sharded.refuse_checkpoint_folder(src)
        raise AdapterFileError(f"{path} not found: an adapter folder holds {SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(SPEC_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (a safetensors handle, not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({e}); "
                               "tying reads only safetensors adapters and never unpickles") from None
    if text is not None:
        yaml_file = src / SPEC_FILE
        if yaml_file.is_file() and yaml_file.read_text() != text:
            warnings.warn(f"{yaml_file} differs from the spec {path} carries, which is used (a save was interrupted "
                          f"between its two files, or {SPEC_FILE} was edited: change a spec by saving the adapter "
                          "again)", stacklevel=3)
        spec = parse_spec(text, f"{path} (the spec it carries)")
    elif not (src / SPEC_FILE).is_file():  # format 1 (tying 0.1): the spec lives in spec.yaml only
        raise AdapterFileError(f"{src / SPEC_FILE} not found: an adapter folder holds {SPEC_FILE} and {WEIGHTS_FILE}")
    else:
        spec = load_spec(src / SPEC_FILE)
    _check_agree(src, spec, tensors)
    return spec, tensors


def _check_agree(src: Path, spec: TyingSpec, tensors: dict[str, torch.Tensor]) -> None:
    """The tensors are of the factors and the rank the folder's own spec names (whatever the model): a folder whose
    spec and tensors disagree was edited or damaged, and the error says so rather than blame the model."""
    a, bad = spec.adapter, []
    for k, t in tensors.items():
        factor = k.partition(".")[0]
        symbols = a.facts.factors.get(factor) if factor in a.factors else None
        if k.startswith(MODULES):
            if not spec.train_modules:
                bad.append(f"{k} is a module's tensor, but the spec has no train_modules")
        elif factor in a.pools or (symbols is not None and a.factors[factor].pool is not None):
            continue  # a pool, or a factor's mixing weights: shapes the plan checks against the model
        elif symbols is None:
            bad.append(f"{k} is of factor {factor}, which the spec's {a.kind} adapter lacks (parts: "
                       f"{', '.join([*a.factors, *a.pools])})")
        elif t.ndim != len(symbols) or any(s == "rank" and n != a.rank for s, n in zip(symbols, t.shape)):
            want = ", ".join(str(a.rank) if s == "rank" else s for s in symbols)
            bad.append(f"{k} has shape {tuple(t.shape)}, but the spec's rank {a.rank} gives it ({want})")
    if bad:
        raise AdapterFileError(f"{src}: the spec the folder holds and its tensors disagree ({'; '.join(bad[:3])}): the "
                               "folder was edited or damaged, whatever the model; nothing was loaded. Save the adapter "
                               "again from its model")


def check_tensors(src, tensors: dict[str, torch.Tensor], want: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Check an adapter's ``tensors`` against ``want`` (key -> shape and the model's dtype): the same keys,
    floating-point factors, module tensors of the model's kind of dtype, the same shapes, finite values."""
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise AdapterFileError(f"adapter in {src} does not fit this model: its spec, planned on this model, needs "
                               f"other factors than the file holds: missing factors {missing[:5]}, unexpected factors "
                               f"{extra[:5]} (was it saved from a different model, or its spec's targets or ties "
                               "edited?)")
    wrong_dtype = [f"{k} is {t.dtype}, the model's {want[k][1]}" for k, t in tensors.items()
                   if t.is_floating_point() != want[k][1].is_floating_point
                   or (not t.is_floating_point() and t.dtype != want[k][1])
                   or (not k.startswith(MODULES) and not t.is_floating_point())]
    if wrong_dtype:
        raise AdapterFileError(f"adapter in {src}: dtype mismatch: {'; '.join(wrong_dtype[:5])}")
    wrong = [f"{k}: file {tuple(t.shape)} vs model {want[k][0]}" for k, t in tensors.items()
             if tuple(t.shape) != tuple(want[k][0])]
    if wrong:
        raise AdapterFileError(f"adapter in {src} does not fit this model; shape mismatch: {'; '.join(wrong[:5])}")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(f"adapter in {src} holds NaN or infinite values in {bad[:5]}; nothing was loaded")


def _want(p: Plan, model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What an adapter file for plan ``p`` on ``model`` must hold: key -> (shape, dtype of the model's tensor)."""
    want = {f"{g.factor}.{g.key}": (g.shape, torch.float32) for g in p.groups}
    bases = dict(named_base_modules(model))
    want.update({k: (tuple(v.shape), v.dtype) for k, v in _module_state({n: bases[n] for n in p.train_modules}).items()})
    return want


def _refuse_module_replacement(src: Path, p: Plan, model: nn.Module) -> None:
    total = sum(q.numel() for q in model.parameters()) or 1
    n = sum(p.train_modules.values())
    names = ", ".join(list(p.train_modules)[:5]) + (" ..." if len(p.train_modules) > 5 else "")
    raise AdapterFileError(
        f"{src} would replace base modules of the model with tensors from the file: {names} ({n:,} parameters, "
        f"{100 * n / total:.0f} % of the model). Nothing was loaded. If you trust the folder, pass "
        "load_adapter(model, folder, replace_modules=True)")


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, replace_modules: bool = False,
                 task: str | None = None, name: str | None = None) -> None:
    """Apply the adapter saved in ``directory`` to ``model`` and load its factors.

    If the model already carries an adapter with the same spec, only the factors are loaded. Every check (spec,
    plan, keys, shapes, dtypes, finite values) runs before the model is touched. Floating-point factors are cast to
    the model's factor dtype (e.g. an fp32 adapter into a bf16 model). An adapter whose spec trains base modules
    whole (``train_modules``, e.g. a classification head) replaces those modules' weights: that needs
    ``replace_modules=True`` (``tying.unapply_`` puts the originals back). From a multi-task folder, ``task="x"``
    loads task x alone as a plain single-task adapter (merge, PEFT export, serving as usual); without it, the
    multi-task adapter whole. ``name`` loads it as the model's adapter of that name (None: the unnamed one), beside
    any others the model carries. Into a sharded model (FSDP2, tensor parallelism) every process calls it and sets
    its own shards; the adapter is applied before the model is sharded (:mod:`tying.sharded`).
    """
    src = Path(directory)
    spec, tensors = read_adapter(src)
    whole = spec
    if task is not None:
        check_task(spec, task, str(src))
        spec = spec.single_task()
    applied = name in banks(model)
    if applied:
        bank = bank_of(model, name)
        if bank.spec != spec:
            mine, theirs = bank.spec.model_dump(), spec.model_dump()
            diff = [k for k in mine if mine[k] != theirs.get(k)]
            hint = ""
            if whole.tasks and task is None and bank.spec == whole.single_task():
                hint = f" The folder holds tasks {whole.tasks}: load one of them with task=..."
            raise AlreadyAppliedError(f"{src} holds an adapter whose spec differs from the model's (in {diff}); "
                                      "nothing was loaded. Load it into a model without an adapter, or call "
                                      "tying.unapply_(model) first." + hint)
        if bank.state.merged:
            raise AlreadyAppliedError("the model's adapter is merged; call tying.unmerge_(model) before loading "
                                      "new factors (the base weights hold the old update)")
        sharded.check_placement(model, [bank])
        p = bank.plan
    else:
        p = plan(model, spec)
    if p.train_modules and not replace_modules:
        _refuse_module_replacement(src, p, model)
    want = _want(p, model)
    if task is None:
        check_tensors(src, tensors, want)
    else:  # the whole file is checked, then the task's tensors are taken out
        check_tensors(src, tensors, multi_want(whole, p, want))
        tensors = task_tensors(whole, p, tensors, task, want)
    if not applied:
        apply_(model, p, name=name)
    bank = bank_of(model, name)
    if bank.state.unset is not None:  # applied on meta: the file's values are set when the base arrives (now, if it has)
        meta.keep(model, bank, {k: tensors[file_key(bank, k)] for k in bank.state_dict(keep_vars=True)})
        return
    sharded.before_load(model)
    with torch.no_grad():
        for k, t in _adapter_state(model, bank).items():
            sharded.fill_(t, tensors[k])


def merge_record(checkpoint: Mapping[str, torch.Tensor] | str | os.PathLike, name: str | None = None) -> MergeRecord | None:
    """What a checkpoint of an adapted model says is merged into its base weights: the
    :class:`~tying.bank.MergeRecord` of the unnamed adapter (or of adapter ``name``), read from a state dict, a file
    (``.safetensors``, else a ``torch.save`` file) or a ``save_pretrained`` folder (its ``.safetensors`` shards); the
    keys may carry a prefix (a PEFT model's). None: the checkpoint holds no record of that adapter (a plain base
    checkpoint). Loads nothing into any model."""
    if not isinstance(checkpoint, Mapping):
        src = Path(checkpoint)
        files = sorted(src.glob("*.safetensors")) if src.is_dir() else [src] if src.is_file() else []
        if not files:
            raise AdapterFileError(f"{src}: no such checkpoint file (nor a folder of .safetensors files)")
        checkpoint = {}
        for f in files:
            checkpoint.update(_record_entries(f))
    path = bank_path(name)
    found = {k[:-len(".merged")] for k in checkpoint if k == f"{path}.merged" or k.endswith(f".{path}.merged")}
    if len(found) > 1:
        raise AdapterFileError(f"the checkpoint holds several merge records of this adapter ({sorted(found)}); "
                               "read the state dict of one model")
    return MergeRecord.read(checkpoint, found.pop()) if found else None


def _record_entries(src: Path) -> Mapping[str, torch.Tensor]:
    """The entries of one checkpoint file that a merge record may be made of (a torch.save file: all of them)."""
    try:
        if src.suffix == ".safetensors":
            with safe_open(str(src), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if k.rpartition(".")[2] in MergeRecord.KEYS}  # noqa: SIM118 (safe_open is not iterable)
        entries = torch.load(src, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise AdapterFileError(f"{src}: not a readable checkpoint ({e})") from None
    if not isinstance(entries, Mapping):
        raise AdapterFileError(f"{src}: holds a {type(entries).__name__}, not a state dict")
    return entries
