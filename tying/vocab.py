"""The vocabulary a spec is validated against: adapter kinds and their declarative facts, module-type names,
and the shape symbols. Torch-free, so the declaration (``spec.py``) stands on nothing of the runtime.

Kinds and module types enter by registration (:func:`tying.register_kind`, :func:`tying.register_module_type`);
the built-in kinds register when ``tying`` is imported. A *fact* is data: which factors a kind has and their
shapes in the symbols ``rank``, ``d_in`` and ``d_out`` of a site, which factors it needs, what limits the rank,
whether it merges, how its factors map to the roles of a served batch, and which capabilities it needs of a
module type. The runtime (wrappers, math) lives in ``tying/kinds/`` and ``tying/modtypes.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import RegistryError

SYMBOLS = ("rank", "d_in", "d_out")
TASK = "task"  # the tie axis of a multi-task spec (``tasks: [...]``), beside the selectors' captures
# The roles of a served mixed batch (tying.serving_bank), the one role vocabulary: the shape each role's factor must
# have, and the roles an adapter may lack (served as their neutral entry: ones, the identity); the others (A, B) are
# the low-rank pair. Rank axes are zero-padded to the largest rank served.
ROLE_SHAPES = {"A": ("rank", "d_in"), "B": ("d_out", "rank"), "u": ("rank",), "G": ("rank", "rank"),
               "v": ("d_out",), "in": ("d_in",), "out": ("d_out",)}
NEUTRAL_ROLES = frozenset({"u", "G", "v", "in", "out"})
# Module-type capabilities a kind may need, with the words an error uses for each.
CAPABILITIES = {
    "lowrank": "down and up products (Linear-like modules, convolutions, embeddings)",
    "linear": "features on the last axis of input and output (Linear-like modules: Linear, Conv1D, quantized Linear)",
    "out_last": "outputs with their features on the last axis (Linear-like modules, embeddings)",
    "weight": "a weight the update acts on",
    "attention": "attention entries (transformers attention modules, e.g. model.layers.{layer}.self_attn)",
}


@dataclass(frozen=True)
class KindFacts:
    """What the planner, the spec, serving and export need to know of an adapter kind; no behaviour.

    ``factors``: factor name -> shape in SYMBOLS, in the order the update applies them. ``required``: each entry a
    factor name, or a tuple of names of which at least one must be given. ``rank_limit``: the symbols whose minimum
    bounds the rank (empty: any rank). ``needs``: capabilities every adapted module type must have;
    ``factor_needs``: more capabilities when a factor is present. ``serving``: factor -> role of a served mixed
    batch (ROLE_SHAPES), or None when the kind cannot be mixed row by row. ``exportable``: writes a PEFT adapter.
    """

    name: str
    factors: Mapping[str, tuple[str, ...]]
    required: tuple[str | tuple[str, ...], ...] = ()
    rank_limit: tuple[str, ...] = ("d_in", "d_out")
    mergeable: bool = True
    needs: frozenset[str] = frozenset({"lowrank"})
    factor_needs: Mapping[str, frozenset[str]] = field(default_factory=dict)
    serving: Mapping[str, str] | None = None
    exportable: bool = False
    routed: tuple[str, ...] = ()  # factors that may be mixed from a pool by a router on the input (the kind computes it)
    owner: str = "?"  # the module that registered it, for 'already registered' messages

    def __post_init__(self):
        # ``required`` entries become tuples of alternatives, ``needs`` sets: one form for every reader
        required = tuple((e,) if isinstance(e, str) else tuple(e) for e in self.required)
        object.__setattr__(self, "required", required)
        problems = []
        if not isinstance(self.name, str) or not self.name.isidentifier():
            problems.append(f"name {self.name!r} is not an identifier")
        if not isinstance(self.factors, Mapping) or not self.factors:
            problems.append("factors (name -> shape) is missing or empty")
        else:
            for f, shape in self.factors.items():
                if not (isinstance(f, str) and f.isidentifier()):
                    problems.append(f"factor name {f!r} is not an identifier")
                if not isinstance(shape, tuple) or not shape or any(s not in SYMBOLS for s in shape):
                    problems.append(f"factor {f!r} has shape {shape!r}; give a tuple of {SYMBOLS}")
        names = set(self.factors) if isinstance(self.factors, Mapping) else set()
        for alts in self.required:
            if not alts or any(a not in names for a in alts):
                problems.append(f"required factor {' or '.join(alts)!r} is not among the factors {sorted(names)}")
        for s in self.rank_limit:
            if s not in ("d_in", "d_out"):
                problems.append(f"rank_limit symbol {s!r} is not d_in or d_out")
        for cap in {*self.needs, *(c for caps in self.factor_needs.values() for c in caps)}:
            if cap not in CAPABILITIES:
                problems.append(f"capability {cap!r} is unknown; known: {', '.join(CAPABILITIES)}")
        for f in self.routed:
            if f not in names:
                problems.append(f"routed names factor {f!r}, which the kind does not have")
        for f in self.factor_needs:
            if f not in names:
                problems.append(f"factor_needs names factor {f!r}, which the kind does not have")
        for f, role in (self.serving or {}).items():
            if f not in names or role not in ROLE_SHAPES:
                problems.append(f"serving maps {f!r} to {role!r}; map the kind's factors to roles {list(ROLE_SHAPES)}")
            elif self.factors[f] != ROLE_SHAPES[role]:
                problems.append(f"serving role {role!r} needs shape {ROLE_SHAPES[role]}, factor {f!r} has "
                                f"{self.factors[f]}")
        if problems:
            raise RegistryError(f"adapter kind {self.name!r} is not well declared: " + "; ".join(problems))

    @property
    def needed(self) -> list[str]:
        """The required factors as words: 'A', or 'u or v' for alternatives."""
        return [" or ".join(alts) for alts in self.required]

    def missing(self, given: set[str]) -> list[str]:
        """The required factors (or alternatives) that ``given`` lacks, as words."""
        return [" or ".join(alts) for alts in self.required if not given & set(alts)]


_KINDS: dict[str, KindFacts] = {}
# Module-type name -> (owner, parent type name or None). Names of the types that bridges register on demand are
# declared here too, so a spec may name them before the bridge's library is imported.
_MODULE_TYPES: dict[str, tuple[str, str | None]] = {}
# Library top-level package -> the tying module that registers its module types, imported the first time the
# planner meets a module (or a weight) of that library. Data, not code: tying.modtypes imports them.
BRIDGES = {"transformers": "tying.integrations.transformers", "bitsandbytes": "tying.integrations.quant",
           "torchao": "tying.integrations.quant"}
QUANTIZERS = ("bitsandbytes", "torchao")  # packages whose weights only a quantized module type may read
BRIDGE_TYPES = {"Conv1D": "transformers", "Attention": "transformers", "Linear4bit": "bitsandbytes",
                "Linear8bitLt": "bitsandbytes", "TorchAOLinear": "torchao"}


def add_kind(facts: KindFacts) -> None:
    """Record a kind's facts; a name that exists is refused, naming its holder."""
    if facts.name in _KINDS:
        raise RegistryError(f"adapter kind {facts.name!r} is registered already (by {_KINDS[facts.name].owner}); "
                            "choose another name")
    _KINDS[facts.name] = facts


def remove_kind(name: str) -> None:
    """Forget a kind (for tests and for plugins that unload)."""
    _KINDS.pop(name, None)


def kind(name: str) -> KindFacts:
    """The facts of kind ``name``; a ValueError that lists the known kinds otherwise."""
    try:
        return _KINDS[name]
    except KeyError:  # a RegistryError is a ValueError: pydantic reports it with the field's path
        raise RegistryError(f"unknown adapter kind {name!r}; known: {', '.join(_KINDS)} (register others with "
                            "tying.register_kind)") from None


def kind_names() -> list[str]:
    """Names of the registered kinds."""
    return list(_KINDS)


def add_module_type(name: str, owner: str, parent: str | None = None) -> None:
    """Record a module-type name. A name that exists is refused, naming its holder; so is a bridge type's name
    (BRIDGE_TYPES) registered by anyone but its bridge."""
    if name in _MODULE_TYPES:
        raise RegistryError(f"module type {name!r} is registered already (by {_MODULE_TYPES[name][0]}); "
                            "choose another name")
    if name in BRIDGE_TYPES and owner != BRIDGES[BRIDGE_TYPES[name]]:
        raise RegistryError(f"module type {name!r} is reserved for {BRIDGES[BRIDGE_TYPES[name]]}, which registers "
                            "it when the planner meets such a module; choose another name")
    if parent is not None and parent not in _MODULE_TYPES:
        raise RegistryError(f"module type {name!r}: parent {parent!r} is not a registered module type")
    _MODULE_TYPES[name] = (owner, parent)


def remove_module_type(name: str) -> None:
    """Forget a module-type name."""
    _MODULE_TYPES.pop(name, None)


def module_type_names() -> list[str]:
    """Names a target's ``types`` may use: registered types and the types bridges register on demand."""
    return list(dict.fromkeys([*_MODULE_TYPES, *BRIDGE_TYPES]))


def is_a(name: str, other: str) -> bool:
    """Whether module type ``name`` is ``other`` or descends from it (``types: [Linear]`` selects Linear4bit)."""
    while name is not None:
        if name == other:
            return True
        name = _MODULE_TYPES.get(name, (None, None))[1]
    return False
