"""Sharded models (FSDP2's ``fully_shard``, tensor parallelism): where a tied factor may live, and reading and writing
factors that are DTensors. Everything that knows of FSDP2 and DTensors is here and in :mod:`tying.tensor_parallel`.

**Where a tied factor lives (FSDP2).** Every factor of an adapter is one parameter of its bank, a child of the root
model. FSDP2 gathers a group's parameters around the forward of that group's modules, and a wrapper reads its
factors inside the forward of the module it adapts; so a factor must belong to a group whose forward holds the
forward of every module that uses it. A factor tied across layers, across q/k/v or across tasks is used inside
several blocks, and the one group that holds them all is the root's: shard the blocks, then the root
(``fully_shard(model)`` last), and the banks join the root's group. :func:`check_placement` refuses the two wraps
that break the rule (a ShardingError; ``save_adapter``, ``load_adapter`` and the first forward of each distributed
process after the sharding changed check it):

- ``fully_shard`` on a bank or a part of it, alone or in a list with a block: its factors would be gathered only
  around that group's forward (a bank has none; a block is one of several users), never around the others';
- blocks sharded but not the root: the banks belong to no group, so their gradients would not be reduced across
  processes and each process would silently train its own copy.

``apply_`` comes before ``fully_shard`` (FSDP2 shards the parameters that exist when it is called): ``apply_`` (and
``load_adapter`` of an adapter the model does not carry) on a sharded model is refused.

**Collectives.** ``save_adapter`` of a sharded model gathers each factor (``DTensor.full_tensor``): every process must
call it; process 0 writes the folder while the others wait, and all return its folder or raise its error.
``load_adapter`` into a sharded model: every process calls it and sets its own shards from the file (no
communication). ``apply_`` on a tensor-parallel model distributes the new factors from process 0: every process
calls it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import errors
from .errors import AdapterFileError, ShardingError
from .view import occupant, unwrap

_CLASSES: dict[str, type | None] = {}


def _cls(name: str) -> type | None:
    """torch's ``DTensor`` or ``FSDPModule``, imported on first use (None where torch.distributed lacks them)."""
    if name not in _CLASSES:
        cls = None
        if torch.distributed.is_available():
            try:
                if name == "DTensor":
                    from torch.distributed.tensor import DTensor as cls
                else:
                    from torch.distributed.fsdp import FSDPModule as cls
            except ImportError:  # torch < 2.6: FSDP2 not public
                cls = None
        _CLASSES[name] = cls
    return _CLASSES[name]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (a sharded or replicated tensor of torch.distributed)."""
    cls = _cls("DTensor")
    return cls is not None and isinstance(t, cls)


def is_fsdp(module: nn.Module) -> bool:
    """Whether ``fully_shard`` made ``module`` an FSDP module."""
    cls = _cls("FSDPModule")
    return cls is not None and isinstance(module, cls)


def distributed() -> bool:
    """Whether this process belongs to an initialised process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_sharded(model: nn.Module, bank: nn.Module) -> bool:
    """Whether ``bank``'s factors are sharded, so that saving them is collective: the root is an FSDP module (the
    bank is in its group), or a factor is a DTensor (tensor parallelism)."""
    return is_fsdp(model) or any(is_dtensor(p) for p in bank.parameters())


def refuse_sharded(model: nn.Module) -> None:
    """``apply_`` on a model that ``fully_shard`` already sharded: a ShardingError (apply first, then shard)."""
    sharded = [n or "the root" for n, m in model.named_modules() if is_fsdp(m)]
    if sharded:
        names = ", ".join(sharded[:3]) + (" ..." if len(sharded) > 3 else "")
        raise ShardingError(
            f"the model is sharded with fully_shard already ({names}), "
            "so new factors would belong to no FSDP group (their gradients would not be reduced across processes). "
            "Apply the adapter (tying.apply_, or tying.load_adapter of one the model does not carry) first, then "
            "fully_shard the blocks and the root")


def check_placement(model: nn.Module, banks) -> None:
    """Raise a ShardingError where an FSDP2 wrap breaks the placement rule (module docstring) for ``banks``."""
    fsdp = _cls("FSDPModule")
    if fsdp is None:
        return
    for bank in banks:
        # a module trained whole may be a group of its own (its copy's forward runs inside its wrapper's); factors not
        own = next((n for n, m in bank.named_modules() if isinstance(m, fsdp) and not n.startswith("trained.")), None)
        if own is not None:
            where = bank.path + (f".{own}" if own else "")
            g = max((g for g in bank.plan.groups if own in ("", g.factor)), key=lambda g: len(g.members))
            users = ", ".join(g.members[:3]) + (" ..." if len(g.members) > 3 else "")
            raise ShardingError(
                f"{where} is an FSDP group of its own (fully_shard was called on it, alone or in a list with other "
                "modules), so its factors would be gathered only around that group's forward, not around the forwards "
                f"of the modules that use them (factor {g.factor}.{g.key} is used by {len(g.members)} modules: "
                f"{users}). A tied factor lives in the group whose forward holds every module that uses it, the "
                f"root's: fully_shard the blocks, then the root model (which holds {bank.path}), never {where}")
    if not isinstance(model, fsdp):
        sharded = [n for n, m in model.named_modules() if isinstance(m, fsdp)]
        if sharded:
            raise ShardingError(
                f"modules of the model are sharded with fully_shard ({', '.join(sharded[:3])}"
                f"{' ...' if len(sharded) > 3 else ''}) but its root ({type(model).__name__}) is not, so the adapter's "
                f"factors ({', '.join(b.path for b in banks)}, children of the root) belong to no FSDP group: their "
                "gradients would not be reduced across processes, and each would train its own copy. Call "
                "fully_shard(model) on the root after its blocks")


class PlacementCheck:
    """A forward pre-hook of the root: in a distributed process, :func:`check_placement` again whenever the model's
    sharding changed since it last ran (``fully_shard`` changes the classes of the modules it wraps and replaces
    their parameters: the root's class, the bank's and the type of a site's parameter tell)."""

    def __init__(self, bank: nn.Module):
        self.bank = bank
        self.seen = None

    def __call__(self, model: nn.Module, *_) -> None:
        if not distributed():
            return
        sites = self.bank.plan.sites
        first = next(unwrap(occupant(model, sites[0].name)).parameters(), None) if sites else None
        seen = (type(model), type(self.bank), type(first))
        if seen != self.seen:
            check_placement(model, [self.bank])
            self.seen = seen


def write_gathered(tensors: dict[str, torch.Tensor], write: Callable[[dict[str, torch.Tensor]], Path]) -> Path:
    """Every process: gather ``tensors`` (each DTensor made whole: a collective), then process 0 calls ``write`` with
    the whole tensors while the others wait; every process returns its result, or raises its error."""
    whole = {k: (v.full_tensor() if is_dtensor(v) else v).detach() for k, v in tensors.items()}
    if not distributed():
        return write(whole)
    dist = torch.distributed
    out, error = None, None
    if dist.get_rank() == 0:
        try:
            out = write(whole)
        except Exception as e:  # noqa: BLE001  every process raises it: none waits for a folder that will not come
            error = e
    box = [out, None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        name, message = box[1]
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.TyingError)):
            cls, message = AdapterFileError, f"process 0 could not write the adapter ({name}: {message})"
        raise cls(message)
    return box[0]


def before_load(model: nn.Module) -> None:
    """Before factors are set in place: FSDP2's root group holds its sharded parameters again (after a forward it may
    hold gathered copies, which the next reshard would drop together with what was loaded into them)."""
    if is_fsdp(model):
        model.reshard()


def fill_(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Set ``param`` (a plain tensor, or a DTensor: its own shard) from the whole tensor ``whole``."""
    if is_dtensor(param):
        whole = _distribute(whole.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements)
    param.copy_(whole)


def _distribute(whole: torch.Tensor, mesh, placements):
    """A DTensor of this process's shards of ``whole``, which every process holds: cut locally, no communication
    (torch >= 2.7; before, torch scatters process 0's, and every process calls this anyway)."""
    from torch.distributed.tensor import distribute_tensor

    if "src_data_rank" in inspect.signature(distribute_tensor).parameters:
        return distribute_tensor(whole, mesh, placements, src_data_rank=None)
    return distribute_tensor(whole, mesh, placements)


def refuse_checkpoint_folder(src: Path) -> None:
    """A torch.distributed.checkpoint folder (``.metadata`` + ``*.distcp``), or a Trainer checkpoint holding only such
    folders, given where an adapter folder is expected: an AdapterFileError that says what it is."""
    dcp = [p for p in (src, *(c for c in src.iterdir() if c.is_dir())) if (p / ".metadata").is_file()] \
        if src.is_dir() else []
    if dcp:
        where = "it is" if dcp[0] == src else f"it holds {dcp[0].name}/, which is"
        raise AdapterFileError(
            f"{src} is not an adapter folder: {where} a sharded torch.distributed.checkpoint folder (.metadata and "
            "*.distcp files, one set per process), which holds a state dict, not an adapter. Load it with "
            "torch.distributed.checkpoint.load into get_model_state_dict(model) and then set_model_state_dict(model, "
            "...) on the sharded model; an adapter folder (spec.yaml + adapter.safetensors) is what tying.save_adapter "
            "writes, also from a sharded model")
