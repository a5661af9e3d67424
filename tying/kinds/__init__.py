"""The adapter-kind registry. One file per kind registers a :class:`Kind`: its declarative facts (recorded in
:mod:`tying.vocab`, where the spec and the planner read them), its wrapper class (the forward and the merge, for
every module type through the type's products) and its PEFT export. The planner, the engine, serving, export and
the CLI ask this registry; no code outside a kind's own file compares kind names.

    tying.register_kind("mykind", wrapper=MyWrapper, factors={"A": ("rank", "d_in"), "B": ("d_out", "rank")},
                        required=("A", "B"))

See ``examples/custom_kind.py`` and docs/extending.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import vocab
from ..errors import RegistryError
from ..site import SiteAdapter


@dataclass(frozen=True)
class Kind:
    """A registered adapter kind: its facts, its wrapper class and its PEFT export (None: refused)."""

    facts: vocab.KindFacts
    wrapper: type[SiteAdapter]
    export: Callable[..., dict] | None = None  # (factors by name, scale, dense base weight or None) -> PEFT tensors
    peft_config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.facts.name


_KINDS: dict[str, Kind] = {}


def register_kind(name: str, *, wrapper: type[SiteAdapter] | None = None, factors: Mapping | None = None,
                  export: Callable | None = None, peft_config: Mapping | None = None, owner: str | None = None,
                  **facts) -> Kind:
    """Register an adapter kind; return it.

    Required: ``wrapper`` (a :class:`~tying.site.SiteAdapter` subclass; it merges if it defines ``merge``) and
    ``factors`` (name -> shape in the symbols ``rank``, ``d_in``, ``d_out``). Optional facts
    (:class:`tying.vocab.KindFacts`): ``required``, ``rank_limit``, ``needs``, ``factor_needs``, ``serving`` (factor
    -> role of a served mixed batch; omitted: not mixable); ``export`` (one site's PEFT tensors: ``(factors, scale,
    weight) -> (down, up, extra)``; omitted: export refused) with ``peft_config``.
    A name that exists, a missing fact or a malformed one raises :class:`~tying.errors.RegistryError`.
    """
    missing = [k for k, v in (("wrapper", wrapper), ("factors", factors)) if v is None]
    if missing:
        raise RegistryError(f"adapter kind {name!r} is not well declared: missing {', '.join(missing)}")
    if not (isinstance(wrapper, type) and issubclass(wrapper, SiteAdapter)):
        raise RegistryError(f"adapter kind {name!r}: wrapper {wrapper!r} is not a tying.site.SiteAdapter subclass")
    if export is not None and not callable(export):
        raise RegistryError(f"adapter kind {name!r}: export must be callable or None")
    if not isinstance(factors, Mapping):
        raise RegistryError(f"adapter kind {name!r}: factors must map factor names to shapes, got {factors!r}")
    for fact in ("needs", "required", "rank_limit"):
        if isinstance(facts.get(fact), str):
            raise RegistryError(f"adapter kind {name!r}: {fact} is a collection of names, not the string "
                                f"{facts[fact]!r} (write ({facts[fact]!r},))")
    for fact in ("factor_needs", "serving"):
        if facts.get(fact) is not None and not isinstance(facts[fact], Mapping):
            raise RegistryError(f"adapter kind {name!r}: {fact} must be a mapping, got {facts[fact]!r}")
    unknown = set(facts) - set(vocab.KindFacts.__dataclass_fields__) | ({"mergeable", "exportable"} & set(facts))
    if unknown:
        raise RegistryError(f"adapter kind {name!r}: unknown facts {sorted(unknown)}")
    facts = {**facts, "needs": frozenset(facts.get("needs", {"lowrank"})),
             "factor_needs": {f: frozenset(c) for f, c in facts.get("factor_needs", {}).items()}}
    owner = owner or sys._getframe(1).f_globals.get("__name__", "?")
    kf = vocab.KindFacts(name, dict(factors), mergeable=wrapper.merge is not SiteAdapter.merge,
                         exportable=export is not None, owner=owner, **facts)
    vocab.add_kind(kf)
    kind = _KINDS[name] = Kind(kf, wrapper, export, dict(peft_config or {}))
    return kind


def unregister_kind(name: str) -> None:
    """Remove a registered kind (tests, plugins that unload); a RegistryError for a name that is not registered."""
    if name not in _KINDS:
        raise RegistryError(f"adapter kind {name!r} is not registered, so it cannot be unregistered; registered: "
                            f"{', '.join(_KINDS)}")
    del _KINDS[name]
    vocab.remove_kind(name)


def get(name: str) -> Kind:
    """The registered kind ``name``."""
    try:
        return _KINDS[name]
    except KeyError:
        raise RegistryError(f"adapter kind {name!r} is not registered; registered: {', '.join(_KINDS)}") from None



from . import bottleneck, dora, ia3, lora, prefix  # noqa: F401  the built-in kinds register themselves
