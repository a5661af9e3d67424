"""Serve many adapters on one base model in one mixed batch, each kept in its tied form.

    tying.load_adapters_(model, {"alice": "adapters/alice", "bob": "adapters/bob"})
    with tying.adapters(model, ["alice", "bob", None, "alice"]):   # one name per row; None = the base
        logits = model(input_ids).logits                            # and model.generate(...)
    tying.unload_adapter_(model, "bob")

Adapters of the kinds whose facts map their factors to served roles (the LoRA family: lora, tied-*, sharelora,
lora-group*, lotr, any ranks; and ia3) mix in one batch, on module types with features on the last axis; other
kinds (bottleneck, prefix, dora) and adapters with ``train_modules`` are refused. The factors live stacked in
``model.tying_serving`` (:mod:`tying.serving_bank`), once per tie group and adapter. Each served module
keeps its place in the model (so ``state_dict`` keys and ``tying.plan`` see the plain base) and gains two
hooks. Entering ``adapters(model, names)`` gathers, once per batch, each site's per-row factors:
``A`` (one shared entry, or one per row) and ``B' = scale diag(v) B G diag(u)`` per row, with u, v, G and the
scale folded in (or, when every row shares A, B and G, the shared ``A`` and ``B G`` and each row's u and scale
diag(v)). Each call of a site is then :func:`tying.update.routed_add`, the routed product the wrappers of applied
adapters run too (``A x`` one matmul for the whole batch when all rows share A, as VeRA-like adapters do); no
Python loop over adapters. Outside an ``adapters`` block the model computes the base model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import modtypes, pools, route, update
from .bank import banks
from .errors import AlreadyAppliedError, NotAppliedError, NotMergeableError, ServingError, SpecError, TyingError
from .merging import merged_task_of
from .planner import SERVING_ATTR, Plan, plan
from .serving_bank import COL, NEUTRAL, ROLES, ServingBank, stack_key
from .state import _want, check_tensors, read_adapter
from .task_files import multi_want, task_tensors


@dataclass
class _Route:
    """What one site needs for one batch of ``rows`` rows (tensors gathered when the block is entered): the factors
    of :func:`tying.update.routed_add`, each shared by every row or one per row."""

    rows: int
    A: torch.Tensor | None = None  # (R, d_in) shared by every row, or (rows, R, d_in); None: no low-rank part
    B: torch.Tensor | None = None  # (d_out, R) shared (B G), or (rows, d_out, R): scale diag(v) B G diag(u) per row
    u: torch.Tensor | None = None  # (rows, R) with a shared B
    v: torch.Tensor | None = None  # (rows, d_out) or (rows, 1): scale diag(v), with a shared B
    x_scale: torch.Tensor | None = None  # (rows, d_in) IA3 input scaling
    y_scale: torch.Tensor | None = None  # (rows, d_out) IA3 output scaling


class _Site:
    """The two hooks of one served module. A plain object: the bank owns every tensor; the route belongs to the call
    (:mod:`tying.route`)."""

    def __init__(self, name: str, bank: ServingBank):
        self.name = name
        self.bank = bank
        self.handles = []

    @property
    def route(self) -> _Route | None:
        """This call's route of the site (None: outside any tying.adapters block, the base)."""
        sel = route.current(self.bank)
        return None if sel is None or sel.off else sel.data[1].get(self.name)

    def pre(self, module: nn.Module, args: tuple):
        r = self.route
        if r is None:
            return None
        x = args[0]
        if x.shape[0] != r.rows:
            raise ServingError(f"module {self.name!r} got a batch of {x.shape[0]} rows, but tying.adapters was given "
                               f"{r.rows} names; give one name per row")
        if r.x_scale is None:
            return None
        return (x * r.x_scale.view(x.shape[0], *[1] * (x.ndim - 2), -1).to(x.dtype), *args[1:])

    def post(self, module: nn.Module, args: tuple, out: torch.Tensor):
        r = self.route
        if r is None:
            return None
        if r.y_scale is not None:
            out = out * r.y_scale.view(out.shape[0], *[1] * (out.ndim - 2), -1).to(out.dtype)
        return out if r.A is None else update.routed_add(out, args[0], r.A, r.B, r.u, r.v)


def load_adapters_(model: nn.Module, adapters: Mapping[str, str | os.PathLike], *, trainable: bool = False,
                   replace_modules: bool = False) -> None:
    """Load the adapter folders ``{name: folder}`` (as written by :func:`tying.save_adapter`) onto ``model``
    for mixed-batch serving. May be called again to add adapters. Every adapter must adapt the same modules
    as the others; every check runs before anything changes, so on an error the loaded adapters stay as they
    were. A multi-task folder serves each of its tasks as ``name/task``, the factors its tasks share stored once.

    ``trainable=True`` loads each folder as a named adapter instead (``tying.load_adapter(..., name=)``): the adapters
    may adapt different modules, train through ``tying.adapters`` blocks (each adapter's factors get exactly its own
    rows' gradients) and save one by one (``tying.save_adapter(model, out, name=...)``); a folder that fails to load
    takes the ones loaded before it off again. (Served adapters stack their factors for very many adapters in one
    batch, inference only; named ones are a layer of wrappers each.)"""
    if trainable:
        _load_named(model, adapters, replace_modules)
        return
    if banks(model):
        merged = any(getattr(m, "merged", False) for m in model.modules())
        raise AlreadyAppliedError(f"the model carries a tying adapter{' merged into its base weights' if merged else ''}"
                                  " (tying.apply_ / tying.load_adapter); serve adapters on a plain base model: call "
                                  "tying.unapply_(model) first")
    if not isinstance(adapters, Mapping) or not adapters:
        raise ServingError(f"load_adapters_ takes a non-empty mapping {{name: adapter folder}}; got {adapters!r}")
    bank = getattr(model, SERVING_ATTR, None)
    ref = None if bank is None else (bank.sites, "the loaded adapters")
    read = {}
    for name, folder in adapters.items():
        if not isinstance(name, str) or not name:
            raise ServingError(f"adapter names are non-empty strings; got {name!r}")
        if not isinstance(folder, (str, os.PathLike)):
            raise ServingError(f"adapter {name!r}: {folder!r} is not a folder; give the path of an adapter folder "
                               "(as tying.save_adapter writes it)")
        for served_name, p, tensors in _read(model, name, folder):
            if (bank is not None and served_name in bank.adapters) or served_name in read:
                raise ServingError(f"adapter {served_name!r} is loaded already; call tying.unload_adapter_(model, "
                                   f"{served_name!r}) first to replace it")
            sites = {s.name: (s.d_in, s.d_out) for s in p.sites}
            if ref is None:
                ref = (sites, f"adapter {served_name!r}")
            elif sites != ref[0]:
                only, lacks = sorted(set(sites) - set(ref[0])), sorted(set(ref[0]) - set(sites))
                raise ServingError(f"adapter {served_name!r} adapts other modules than {ref[1]}: only in "
                                   f"{served_name!r}: {only[:3]}, missing: {lacks[:3]}. Adapters served together must "
                                   "select the same modules")
            read[served_name] = (p, tensors)
    if bank is None:
        bank = ServingBank(ref[0], *_placement(model, next(iter(ref[0]))))
        for site in bank.sites:
            hooks = bank.hooked[site] = _Site(site, bank)
            module = model.get_submodule(site)
            hooks.handles = [module.register_forward_pre_hook(hooks.pre), module.register_forward_hook(hooks.post)]
        bank.checks = model.register_forward_pre_hook(route.RowCheck(bank), with_kwargs=True)
        setattr(model, SERVING_ATTR, bank)
    bank.device, bank.dtype = _placement(model, next(iter(bank.sites)))  # the model may have moved since
    bank.add([(name, p, tensors) for name, (p, tensors) in read.items()])


def _load_named(model: nn.Module, adapters: Mapping, replace_modules: bool) -> None:
    from .engine import unapply_
    from .state import load_adapter

    if getattr(model, SERVING_ATTR, None) is not None:
        raise AlreadyAppliedError("the model serves adapters (tying.load_adapters_ without trainable=True); trainable "
                                  "adapters load onto a model that serves none: tying.unload_adapter_ them first")
    if not isinstance(adapters, Mapping) or not adapters:
        raise ServingError(f"load_adapters_ takes a non-empty mapping {{name: adapter folder}}; got {adapters!r}")
    done = []
    try:
        for name, folder in adapters.items():
            try:
                load_adapter(model, folder, name=name, replace_modules=replace_modules)
            except TyingError as e:
                raise type(e)(f"adapter {name!r} ({folder}): {e}") from None
            done.append(name)
    except BaseException:
        for name in reversed(done):
            unapply_(model, name=name)
        raise


def _placement(model: nn.Module, site: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the served factors take: those a site's module type gives its factors."""
    module = model.get_submodule(site)
    return next(module.parameters()).device, modtypes.lookup(module).factor_dtype(module)


def _read(model: nn.Module, name: str, folder) -> list[tuple[str, Plan, dict[str, torch.Tensor]]]:
    """Plan and read one adapter folder: [(name, plan, tensors)], one entry per task of a multi-task folder (named
    ``name/task``); every error names the adapter. Changes nothing."""
    src = Path(folder)
    try:
        spec, tensors = read_adapter(src)
        if spec.adapter.facts.serving is None:
            raise ServingError(f"it is a {spec.adapter.kind} adapter, which cannot be mixed row by row (only kinds "
                               "whose facts give serving roles can: the LoRA family and ia3); serve it alone with "
                               "tying.load_adapter")
        if spec.train_modules:
            raise ServingError(f"it trains whole base modules ({spec.train_modules}), which all rows share; only "
                               "adapters without train_modules can be mixed")
        p = plan(model, spec.single_task() if spec.tasks else spec)
        odd = [f"{s.name} ({s.module_type})" for s in p.sites if not modtypes.module_type(s.module_type).has("linear")]
        if odd:
            raise ServingError(f"it adapts {odd[:3]}; mixed batches support modules with features on the last axis "
                               "(Linear-like: Linear, Conv1D, quantized Linear)")
        if not spec.tasks:
            check_tensors(src, tensors, _want(p, model))
            return [_undrawn(model, name, p, tensors)]
        want = _want(p, model)
        check_tensors(src, tensors, multi_want(spec, p, want))
        return [_undrawn(model, f"{name}/{t}", p, task_tensors(spec, p, tensors, t, want)) for t in spec.tasks]
    except TyingError as e:
        raise type(e)(f"adapter {name!r} ({src}): {e}") from None


def _undrawn(model: nn.Module, name: str, p: Plan, tensors: dict) -> tuple[str, Plan, dict[str, torch.Tensor]]:
    """An adapter whose factors are drawn from pools, served as each site's mixed factors (computed once here; a
    router's mix has no served form: a clear error); any other adapter as it is."""
    if not p.spec.adapter.pools:
        return name, p, tensors
    flat = plan(model, pools.undrawn(p.spec))
    out = {}
    for site, mine in zip(p.sites, flat.sites):
        try:
            drawn = pools.effective(p.spec.adapter, site.keys, lambda part, k: tensors[f"{part}.{k}"], site.name)
        except SpecError as e:
            raise ServingError(str(e)) from None
        out.update({f"{f}.{mine.keys[f]}": t for f, t in drawn.items()})
    return name, flat, out


def _bank(model: nn.Module) -> ServingBank:
    bank = getattr(model, SERVING_ATTR, None)
    if not isinstance(bank, ServingBank):
        raise NotAppliedError("the model serves no adapters; call tying.load_adapters_(model, {name: folder}) first")
    return bank


def _gather(stack: torch.Tensor | None, idx: torch.Tensor, role: str) -> torch.Tensor | None:
    """The rows' entries of ``stack``; None when it is absent or every row uses the neutral entry."""
    if stack is None or (role in NEUTRAL and not idx.any()):
        return None
    return stack[idx.to(stack.device)]


@torch.no_grad()
def _routes(bank: ServingBank, names: list[str | None]) -> dict[str, _Route]:
    """Each site's per-row factors for the rows ``names`` (see the module docstring)."""
    none = torch.full((len(bank.sites), len(ROLES)), -1, dtype=torch.int32)
    none[:, [COL[r] for r in NEUTRAL]] = 0
    served = [None if n is None else bank.adapters[n] for n in names]
    table = torch.stack([none if s is None else s.table for s in served]).long()  # (rows, sites, roles)
    scale = torch.tensor([0.0 if s is None else s.scale for s in served])
    lowrank = list(range(COL["v"] + 1))  # columns A, B, u, G, v
    shared = [COL["A"], COL["B"], COL["G"]]
    routes, gathered = {}, {}
    for site, (d_in, d_out) in bank.sites.items():
        t = table[:, bank.row[site]]

        def rows(role, t=t, d_in=d_in, d_out=d_out):
            return _gather(bank.stack(stack_key(role, d_in, d_out)), t[:, COL[role]], role)

        r = routes[site] = _Route(len(names), x_scale=rows("in"), y_scale=rows("out"))
        lora = t[:, COL["A"]] >= 0
        if not lora.any():
            continue
        t[:, lowrank] = torch.where(lora[:, None], t[:, lowrank], t[lora][0, lowrank])  # rows without a low-rank
        # part borrow a LoRA row's entries; their scale is 0
        key, idx = stack_key("A", d_in, d_out), t[:, COL["A"]]
        A = bank.stack(key)
        if bool((idx == idx[0]).all()):
            r.A = A[int(idx[0])]  # one `A x` for the whole batch
        else:  # gathered once per batch for all sites that share these entries (a tied A: every site)
            memo = (key, tuple(idx.tolist()))
            if memo not in gathered:
                gathered[memo] = A[idx.to(A.device)]
            r.A = gathered[memo]
        if bool((t[:, shared] == t[0, shared]).all()):  # one A, B and G for every row: B G once, per-row u and v
            B = _entry(bank, "B", d_in, d_out, t).float()
            if int(t[0, COL["G"]]) > 0:
                B = B @ _entry(bank, "G", d_in, d_out, t).float()
            v = rows("v")
            r.B, r.u = B.to(A.dtype), rows("u")
            r.v = (scale.to(B.device)[:, None] * (1.0 if v is None else v.float())).to(A.dtype)
            continue
        B = rows("B").float()  # buffers follow model.to(); the tables and scales stay on the CPU
        u, v, G = (None if f is None else f.float() for f in (rows("u"), rows("v"), rows("G")))
        r.B = update.fold_into_up(B, u, v, G, scale.to(B.device)).to(A.dtype)
    return routes


def _entry(bank: ServingBank, role: str, d_in: int, d_out: int, t: torch.Tensor) -> torch.Tensor:
    """The one entry of ``role`` that every row of the table ``t`` uses."""
    return bank.stack(stack_key(role, d_in, d_out))[int(t[0, COL[role]])]


@contextmanager
def adapters(model: nn.Module, names: str | Sequence[str | None]) -> Iterator[None]:
    """Route row i of every batch inside the block to ``names[i]``: an adapter loaded with
    :func:`load_adapters_`, a named adapter applied with ``tying.apply_(..., name=)``, a task of an applied multi-task
    adapter (``"task"``, or ``"adapter/task"`` for a named one), or None (the base model). One name (a string) routes
    the whole batch, of any size. Applied adapters train through the block (gradients reach each adapter's factors
    from its own rows only); served ones are inference only.

    Works with ``generate()`` and its KV cache: the rows stay the rows of the batch at every step. With
    ``num_beams=k`` or ``num_return_sequences=k``, generate() runs k rows per input: repeat each name k
    times (``[n for n in names for _ in range(k)]``). The route belongs to the call: other threads are not
    affected, and blocks nest (leave them innermost first).
    """
    with route.routed(_resolve(model, names)):
        yield


def _resolve(model: nn.Module, names) -> dict:
    """The route's entries for ``names`` on ``model``: one per adapter the model carries. Checks everything."""
    applied, bank = banks(model), getattr(model, SERVING_ATTR, None)
    if not applied and bank is None:
        raise NotAppliedError("the model serves no adapters; call tying.load_adapters_(model, {name: folder}) first, "
                              "or tying.apply_ / tying.load_adapter")
    whole = isinstance(names, str)
    if whole and bank is not None:
        raise ServingError(f"tying.adapters takes a non-empty list with one adapter name (or None) per row of the "
                           f"batch; got {names!r}")
    rows = [names] if whole else names
    if not isinstance(rows, Sequence) or isinstance(rows, (bytes, bytearray)) or not rows:
        what = "adapter name (or None)" if bank is not None else "task name, adapter name or None"
        raise ServingError(f"tying.adapters takes a name for the whole batch, or a non-empty list with one {what} per "
                           f"row; got {names!r}")
    count = None if whole else len(rows)
    if bank is not None:
        return {bank: _served_entry(bank, list(rows), count)}
    picked = [None if n is None else _pick(applied, n, i) for i, n in enumerate(rows)]
    return {b: _selection(model, b, [i for i, p in enumerate(picked) if p and p[0] is b],
                          [p[1] for p in picked if p and p[0] is b], len(rows), count) for b in applied.values()}


def _pick(applied: dict, n, i: int) -> tuple:
    """(bank, task) that the row name ``n`` (row ``i``) names."""
    if not isinstance(n, str):
        raise ServingError(f"row {i}: a name is a string (or None for the base model); got {n!r}")
    bank = applied.get(n)
    if bank is not None:
        if bank.spec.tasks:
            raise ServingError(f"row {i} names adapter {n!r}, which has tasks; name one: "
                               f"{', '.join(f'{n}/{t}' for t in bank.spec.tasks)}")
        return bank, None
    head, _, tail = n.partition("/")
    if tail and head in applied and tail in (applied[head].spec.tasks or ()):
        return applied[head], tail
    owners = [b for b in applied.values() if n in (b.spec.tasks or ())]
    if len(owners) == 1:
        return owners[0], n
    if set(applied) == {None}:  # one unnamed adapter: its tasks are the names
        tasks = applied[None].spec.tasks
        if not tasks:
            raise ServingError("the model's adapter has no tasks, so it applies to every row: tying.adapters routes "
                               "rows of a multi-task adapter (a spec with tasks: [...]), of named adapters "
                               "(tying.apply_(model, spec, name=...)) or of adapters loaded with tying.load_adapters_")
        raise ServingError(f"row {i} names {n!r}, which is not a task of the adapter; tasks: {', '.join(tasks)}")
    known = [repr(k) for k in applied if k is not None] + [
        f"{'' if k is None else k + '/'}{t}" for k, b in applied.items() for t in (b.spec.tasks or ())]
    raise ServingError(f"row {i} names {n!r}, which is {'ambiguous' if owners else 'unknown'}; the model's adapters "
                       f"and tasks: {', '.join(known)}")


def _selection(model: nn.Module, bank, rows: list[int], tasks: list[str | None], n: int, count) -> route.Selection:
    """What ``bank``'s adapter computes when ``rows`` (with ``tasks``) of a batch of ``n`` take it. A merged adapter
    cannot be routed, not even to no row: its update is in the weights, so every row gets it."""
    if bank.spec.tasks and merged_task_of(model, bank.name) is not None:
        raise NotMergeableError(f"the update of task {bank.state.merged_task!r} is merged into the base weights, so every "
                                "row gets it; call tying.unmerge_(model) before routing rows to tasks")
    if bank.state.merged:
        which = "the adapter" if bank.name is None else f"adapter {bank.name!r}"
        raise NotMergeableError(f"{which} is merged into the base weights, so every row gets it; call "
                                "tying.unmerge_(model) before routing rows")
    if not rows:
        return route.OFF
    task = tasks[0] if len(set(tasks)) == 1 else None
    sel = route.Selection(rows=None if len(rows) == n else torch.tensor(rows), task=task, count=count,
                          tasks=None if task is not None or not bank.spec.tasks else
                          torch.tensor([bank.task_index[t] for t in tasks]))
    if sel.mixed and bank.state.unmixable:
        odd = bank.state.unmixable
        raise ServingError(f"module {odd[0]!r} ({len(odd)} in all) cannot mix tasks or adapters row by row (a "
                           f"{bank.spec.adapter.kind} adapter there; see its routes_rows()): give every row of the "
                           "batch this adapter, with one task, or split the batch")
    return sel


def _served_entry(bank: ServingBank, names: list, count: int) -> route.Selection:
    for i, n in enumerate(names):
        if n is not None and n not in bank.adapters:
            raise ServingError(f"adapter {n!r} (row {i}) is not loaded; loaded: {', '.join(bank.adapters) or 'none'}. "
                               f"Load it with tying.load_adapters_(model, {{{n!r}: folder}})")
    if all(n is None for n in names):
        return route.Selection(count=count, data=(names, {}))
    return route.Selection(count=count, data=(names, _routes(bank, names)))


def unload_adapter_(model: nn.Module, name: str) -> None:
    """Remove the served adapter ``name``; the others keep their outputs. When the last one goes, the model
    is the plain base again (hooks and ``model.tying_serving`` removed)."""
    bank = _bank(model)
    if name not in bank.adapters:
        raise ServingError(f"adapter {name!r} is not loaded; loaded: {', '.join(bank.adapters)}")
    if bank.active is not None and name in bank.active:
        raise ServingError(f"adapter {name!r} serves rows of the active tying.adapters block; unload it after the block")
    bank.remove(name)
    if bank.adapters:
        return
    for hooks in bank.hooked.values():
        for h in hooks.handles:
            h.remove()
    bank.checks.remove()
    delattr(model, SERVING_ATTR)


def served(model: nn.Module) -> list[str]:
    """Names of the adapters loaded on ``model`` for mixed-batch serving (empty if none)."""
    bank = getattr(model, SERVING_ATTR, None)
    return list(bank.adapters) if isinstance(bank, ServingBank) else []


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor held for the served adapters (stacked factors and index tables); 0 if none."""
    bank = getattr(model, SERVING_ATTR, None)
    return bank.resident_bytes() if isinstance(bank, ServingBank) else 0
