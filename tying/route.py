"""The route of a call: which adapter, and which of its tasks, each row of a batch takes.

A route belongs to the call, never to the model. ``tying.adapters(model, names)`` pushes one for its block onto a
context variable (each thread and each asyncio task sees its own), and the wrappers and served adapters of that model
read it while the block runs. So two threads serving one model each get their own rows, and nothing stays routed
after a block. Blocks nest and leave innermost first; leaving an outer block first is refused, and undoes the inner
ones too, so nothing stays routed after either.

An entry maps an adapter's owner (a :class:`~tying.bank.FactorBank`, or the store of served adapters) to what it
computes: ``OFF`` (nothing, the base alone), or a :class:`Selection`. An owner without an entry is not routed: its
adapter applies to every row while it is enabled.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ServingError


@dataclass(frozen=True)
class Selection:
    """What one adapter computes in a routed forward."""

    rows: torch.Tensor | None = None  # the rows of the batch that take the adapter (None: every row)
    task: str | None = None  # a multi-task adapter: the one task of every selected row
    tasks: torch.Tensor | None = None  # or each selected row's position in the spec's tasks
    count: int | None = None  # the rows every batch of the block must have (None: any number)
    off: bool = False  # the adapter computes nothing: its sites are the base alone
    data: Any = None  # what the owner gathered for the block (served adapters: their routes per site)
    _copies: dict = field(default_factory=dict, compare=False, repr=False)

    def on(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``t`` (``rows`` or ``tasks``) on ``device``, copied there once per block."""
        if t.device == device:
            return t
        key = (id(t), device)
        if key not in self._copies:
            self._copies[key] = t.to(device)
        return self._copies[key]

    @property
    def mixed(self) -> bool:
        """Whether the adapter applies to some rows only, or its rows take different tasks."""
        return self.rows is not None or self.tasks is not None


OFF = Selection(off=True)
ALL = Selection()  # every row, the adapter's one (or only) task

_STACK: ContextVar[tuple] = ContextVar("tying_route", default=())  # ((block, {owner: Selection}), ...) innermost last


def current(owner: object) -> Selection | None:
    """The entry of ``owner`` in this call's innermost route (None: not routed)."""
    stack = _STACK.get()
    return stack[-1][1].get(owner) if stack else None


def routed_now() -> bool:
    """Whether any route is open in this call (a light site takes its general path then)."""
    return bool(_STACK.get())


def is_routed(owner: object) -> bool:
    """Whether ``owner`` has an entry in this call's route."""
    stack = _STACK.get()
    return bool(stack) and owner in stack[-1][1]


@contextmanager
def routed(entries: Mapping[object, Selection]) -> Iterator[None]:
    """Route the owners of ``entries`` for the block (on top of what outer blocks route)."""
    stack = _STACK.get()
    block = object()
    _STACK.set((*stack, (block, {**(stack[-1][1] if stack else {}), **entries})))
    try:
        yield
    finally:
        now = _STACK.get()
        at = next((i for i, (b, _) in enumerate(now) if b is block), None)
        if at is not None:  # None: an outer block left first and took this one with it
            _STACK.set(now[:at])
            if at != len(now) - 1:
                raise ServingError("a tying.adapters block was left while a block opened inside it was still open; "
                                   "leave blocks innermost first (use `with`). Both are closed now")


def check_rows(selection: Selection, n: int) -> None:
    """A batch of ``n`` rows fits a route that named ``selection.count`` rows."""
    if selection.count is not None and n != selection.count:
        raise ServingError(f"the batch has {n} rows but tying.adapters was given {selection.count} names; give one "
                           "name per row (with generate(num_beams=k) or num_return_sequences=k, repeat each name k "
                           "times), or one name for the whole batch")


class RowCheck:
    """A forward pre-hook of the root (with kwargs): a batch whose rows do not fit this call's route of ``owner``
    is refused before anything runs (the wrappers check again at each site)."""

    def __init__(self, owner: object):
        self.owner = owner

    def __call__(self, module, args: tuple, kwargs: dict) -> None:
        sel = current(self.owner)
        if sel is not None and sel.count is not None:
            n = batch_rows(args, kwargs)
            if n is not None:
                check_rows(sel, n)


def batch_rows(args: tuple, kwargs: dict) -> int | None:
    """The number of rows of a model call's batch (input_ids, inputs_embeds or the first argument), if it shows."""
    for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(t, torch.Tensor) and t.ndim >= 2:
            return t.shape[0]
    return None
