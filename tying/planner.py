"""``plan(model, spec)``: pure. Selects the sites, resolves the tie groups, checks every shape and
computes the counts. Every error is raised here, before the model is touched."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from . import modtypes, pools, vocab
from .errors import ConflictError, SelectorError, SpecError, TieError, UnsupportedModuleError
from .selectors import closest_names, compile_selector, fullmatch, time_budget
from .spec import Adapter, Factor, TyingSpec
from .view import BANK_ATTR, SERVING_ATTR, named_base_modules  # noqa: F401  (BANK_ATTR, SERVING_ATTR: re-exported)


@dataclass(frozen=True)
class Site:
    """One adapted module: its name, module type, dims, captures and the bank key of each factor."""

    name: str
    module_type: str  # the module type's name (tying.modtypes); an adapter's kind is the spec's, never a site's
    d_in: int
    d_out: int
    captures: Mapping[str, str]
    keys: Mapping[str, str]  # factor -> group key (of a multi-task spec: the key without the task's suffix)
    task_keys: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # task -> factor -> group key

    @property
    def kind(self) -> str:
        """The module type's name: the older name of :attr:`module_type`, kept for code that reads it."""
        return self.module_type


@dataclass(frozen=True)
class Group:
    """One tie group: one parameter in the bank, shared by ``members``."""

    factor: str
    key: str
    shape: tuple[int, ...]
    train: bool
    members: tuple[str, ...]
    index: int  # position among the factor's groups (offsets a seeded init)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Counts:
    """Adapter parameter counts: totals, per factor and per tie group."""

    trainable: int  # trained factors plus the parameters of train_modules
    frozen: int  # frozen factors
    by_factor: Mapping[str, Mapping[str, int]]
    by_group: Mapping[str, int]
    modules: int = 0  # parameters of the spec's train_modules (trained, saved with the adapter)
    tasks: int = 0  # a multi-task spec: how many tasks (0: a single-task spec)
    per_task: int = 0  # a multi-task spec: the trainable parameters one more task adds (its own copies)

    def to_dict(self) -> dict:
        """JSON-ready dict: ``trainable``, ``frozen``, ``by_factor``, ``by_group``, ``modules`` (and ``tasks``,
        ``per_task`` for a multi-task spec)."""
        out = {"trainable": self.trainable, "frozen": self.frozen, "modules": self.modules,
               "by_factor": {k: dict(v) for k, v in self.by_factor.items()}, "by_group": dict(self.by_group)}
        return out if not self.tasks else {**out, "tasks": self.tasks, "per_task": self.per_task}


@dataclass(frozen=True)
class Plan:
    """Frozen result of :func:`plan`: sites, groups and counts for one model and one spec."""

    spec: TyingSpec
    sites: tuple[Site, ...]
    groups: tuple[Group, ...]
    train_modules: dict[str, int] = field(default_factory=dict)  # name -> parameter count
    counts: Counts = field(init=False)

    def __post_init__(self):
        by_factor: dict[str, dict[str, int]] = {}
        for g in self.groups:
            row = by_factor.setdefault(g.factor, {"trainable": 0, "frozen": 0, "groups": 0})
            row["trainable" if g.train else "frozen"] += g.numel
            row["groups"] += 1
        modules = sum(self.train_modules.values())
        tasks = self.spec.tasks or []
        own = f"#{tasks[0]}" if tasks else None  # the groups of one task's own copies
        counts = Counts(
            trainable=sum(g.numel for g in self.groups if g.train) + modules,
            frozen=sum(g.numel for g in self.groups if not g.train),
            by_factor=by_factor,
            by_group={f"{g.factor}.{g.key}": g.numel for g in self.groups},
            modules=modules,
            tasks=len(tasks),
            per_task=sum(g.numel for g in self.groups if g.train and own and g.key.endswith(own)),
        )
        object.__setattr__(self, "counts", counts)

    def summary(self) -> str:
        """A readable table of the sites and the tie groups."""
        a = self.spec.adapter
        lines = [f"{len(self.sites)} sites, {len(self.groups)} tie groups, rank {a.rank}, scale {a.scale:g}", "",
                 f"{'site':<48} {'type':<9} {'d_in':>6} {'d_out':>6}"]
        lines += [f"{s.name:<48} {s.module_type:<9} {s.d_in:>6} {s.d_out:>6}" for s in self.sites]
        lines += ["", f"{'factor':<6} {'group':<48} {'shape':<12} {'members':>7} {'params':>10}  train"]
        for g in self.groups:
            shape = "x".join(map(str, g.shape))
            lines.append(f"{g.factor:<6} {g.key:<48} {shape:<12} {len(g.members):>7} {g.numel:>10,}  "
                         f"{'trained' if g.train else 'frozen'}")
        c = self.counts
        lines += [f"module {n:<48} {'':<12} {'':>7} {k:>10,}  trained" for n, k in self.train_modules.items()]
        lines += ["", f"trainable {c.trainable:,}   frozen {c.frozen:,}"]
        if c.tasks:
            lines.append(f"tasks {c.tasks} ({', '.join(self.spec.tasks)}): one more task adds {c.per_task:,} trainable "
                         f"parameters (factors without 'task' in their tie; keys end in #<task>)")
        return "\n".join(lines)


def _shape(symbols: tuple[str, ...], rank: int, d_in: int, d_out: int) -> tuple[int, ...]:
    return tuple({"rank": rank, "d_in": d_in, "d_out": d_out}[s] for s in symbols)


def _check_fit(name: str, mt: modtypes.ModuleType, adapter: Adapter, d_in: int, d_out: int) -> None:
    """The module type offers what the kind needs, and the rank fits the module."""
    facts = adapter.facts
    for cap, factor in [(c, None) for c in sorted(facts.needs)] + [
            (c, f) for f in adapter.factors for c in sorted(facts.factor_needs.get(f, ()))]:
        if not mt.has(cap):
            having = ", ".join(t.name for t in modtypes.registered() if t.has(cap)) or "none yet"
            raise UnsupportedModuleError(
                f"module {name!r} is a {mt.name}: {adapter.kind} adapters{f' with factor {factor}' if factor else ''}"
                f" need modules with {vocab.CAPABILITIES[cap]}; registered types with it: {having}. "
                "Narrow the selector, add `types:` to the target, or choose another kind")
    dims = {"d_in": d_in, "d_out": d_out}
    limit = min((dims[s] for s in facts.rank_limit), default=None)
    if limit is not None and adapter.rank > limit:
        raise SpecError(f"adapter.rank {adapter.rank} is larger than module {name!r} allows "
                        f"(d_in={d_in}, d_out={d_out}); use rank <= {limit}")


def _bucket(axis, value: str, site: str) -> str:
    if axis.every is not None:
        if not value.isdigit():
            raise TieError(f"site {site!r}: tie on {axis.capture!r} with every={axis.every} needs integer "
                           f"values, got {value!r}")
        lo = int(value) // axis.every * axis.every
        return f"[{lo}-{lo + axis.every - 1}]"
    if axis.groups is not None:
        for g in axis.groups:
            if value in map(str, g):
                return "[" + ",".join(map(str, g)) + "]"
        raise TieError(f"site {site!r}: {axis.capture}={value} is in no group of tie.{axis.capture}.groups "
                       f"{axis.groups}; add it to a group")
    return "*"


def group_key(name: str, match, factor: Factor, shape: tuple[int, ...]) -> str:
    """The module name with each tied capture replaced by ``*`` (or its bucket); ``*`` for ``tie: all``.
    Dots become ``:`` so the key is a valid parameter name."""
    if factor.tie == "all":
        key = "*"
    else:
        spans = []
        for axis in factor.tie:
            if axis.capture in match.re.groupindex and match.group(axis.capture) is not None:
                spans.append((match.span(axis.capture), _bucket(axis, match.group(axis.capture), name)))
        spans.sort(reverse=True)
        if any(a[0][0] < b[0][1] for a, b in itertools.pairwise(spans)):
            raise TieError(f"site {name!r}: the tied captures of {[a.capture for a in factor.tie]} overlap; "
                           "tie along captures that cover separate parts of the name")
        key = name
        for (start, end), repl in spans:
            key = key[:start] + repl + key[end:]
    if factor.shape_aware:
        key += "@" + "x".join(map(str, shape))
    return key.replace(".", ":")


def plan(model: nn.Module, spec: TyingSpec) -> Plan:
    """Select sites, resolve tie groups and check shapes; never modifies ``model``. A model that carries adapters
    already is planned as its base (:mod:`tying.view`): another adapter may stack on the same modules. All selector
    matching shares one time budget (:data:`tying.selectors.PLAN_SECONDS`): a spec from an untrusted folder cannot
    make it run long."""
    with time_budget():
        return _plan(model, spec)


def _plan(model: nn.Module, spec: TyingSpec) -> Plan:
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise UnsupportedModuleError(f"the root is an nn.{type(model).__name__}: the bank would become one of its "
                                     "layers; wrap it in an nn.Module first")
    mha_children = {f"{n}.{c}" if n else c for n, m in named_base_modules(model)
                    if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_children()}
    named = [(n, m) for n, m in named_base_modules(model) if n]
    names = [n for n, _ in named]
    aliases: dict[int, list[str]] = {}  # module -> every name it has (named_modules gives only the first)
    for n, m in named_base_modules(model, remove_duplicate=False):
        if n:
            aliases.setdefault(id(m), []).append(n)
    claimed: dict[str, int] = {}
    sites, members, shapes = [], {}, {}
    rank = spec.adapter.rank
    for ti, target in enumerate(spec.targets):
        pattern = compile_selector(target.select)
        excludes = [compile_selector(e) for e in target.exclude]
        hits = []
        for name, module in named:
            match = fullmatch(pattern, name)
            if match is None or any(fullmatch(e, name) for e in excludes):
                continue
            if target.types is not None:
                mt = modtypes.lookup(module)
                if mt is None or not any(vocab.is_a(mt.name, t) for t in target.types):
                    continue
            hits.append((name, module, match))
        if not hits:
            close = closest_names(target.select, names)
            raise SelectorError(f"targets[{ti}].select {target.select!r} matches no module"
                                f"{' of types ' + str(target.types) if target.types else ''}; closest module names: "
                                f"{', '.join(close) or 'none (the model has no submodules)'}")
        for name, module, match in hits:
            if name in claimed:
                raise ConflictError(f"module {name!r} is claimed by targets[{claimed[name]}] and targets[{ti}]; "
                                    "narrow one selector or add an `exclude`")
            claimed[name] = ti
            if len(aliases[id(module)]) > 1:
                raise ConflictError(f"module {name!r} is reachable under several names {aliases[id(module)]}: calls "
                                    "through another name would bypass the adapter and a merge would act on both; "
                                    "adapt a model whose modules have one name each")
            if name in mha_children:
                raise UnsupportedModuleError(f"module {name!r} belongs to an nn.MultiheadAttention, which reads its "
                                             "weights directly instead of calling it; exclude it from the selector")
            mt = modtypes.site_type(name, module)
            d_in, d_out = modtypes.site_dims(mt, name, module)
            _check_fit(name, mt, spec.adapter, d_in, d_out)
            if mt.check is not None:
                mt.check(name, module)
            keys, task_keys = {}, {t: {} for t in spec.tasks or ()}
            for part, shape in _parts(spec, name, mt, rank, d_in, d_out):  # factors, their mixers and pools
                key = keys[part] = group_key(name, match, spec.adapter.part(part), shape)
                for k in dict.fromkeys([key + spec.task_suffix(part, t) for t in spec.tasks] if spec.tasks else [key]):
                    if name not in members.setdefault((part, k), []):  # a pool two factors draw from: one member
                        members[(part, k)].append(name)
                        shapes.setdefault((part, k), {}).setdefault(shape, []).append(name)
                for t, tk in task_keys.items():
                    tk[part] = key + spec.task_suffix(part, t)
            captures = {k: v for k, v in match.groupdict().items() if v is not None}
            sites.append(Site(name, mt.name, d_in, d_out, captures, keys, task_keys))
    groups, per_factor = [], {}
    for (fname, key), mems in members.items():
        by_shape = shapes[(fname, key)]
        if len(by_shape) > 1:
            detail = "; ".join(f"{'x'.join(map(str, s))}: {', '.join(m[:3])}{' …' if len(m) > 3 else ''}"
                               for s, m in by_shape.items())
            raise TieError(f"factor {fname} cannot be shared in tie group {key!r}: its members need different "
                           f"shapes ({detail}). Tie along fewer captures, or set shape_aware: true on {fname} "
                           "to split the group by shape")
        index = per_factor[fname] = per_factor.get(fname, -1) + 1
        f = spec.adapter.part(fname)
        groups.append(Group(fname, key, next(iter(by_shape)), f.train, tuple(mems), index))
    return Plan(spec, tuple(sites), tuple(groups), _train_modules(spec, named, claimed))


def _parts(spec: TyingSpec, site: str, mt, rank: int, d_in: int, d_out: int):
    """(name, shape) of every group a site belongs to: each factor of the spec, or for a factor drawn from a pool its
    mixing parameters and the pool."""
    for fname, symbols in spec.adapter.facts.factors.items():
        factor = spec.adapter.factors.get(fname)
        if factor is None:
            continue
        shape = _shape(symbols, rank, d_in, d_out)
        if factor.pool is None:
            yield fname, shape
            continue
        pool = spec.adapter.pools[factor.pool]
        mixer = pools.mixer_shape(factor, pool, symbols, shape, d_in, site)
        if factor.mix == "router" and not mt.has("linear"):
            raise UnsupportedModuleError(f"module {site!r} is a {mt.name}: a router mix (factor {fname}) needs "
                                         f"modules with {vocab.CAPABILITIES['linear']}")
        if len(mixer) == 1 and factor.init.kind in ("kaiming_uniform", "orthogonal"):
            raise SpecError(f"adapter.factors.{fname}: its mixing weights are a vector ({mixer[0]} entries); init "
                            f"{factor.init.kind!r} needs a matrix: use zeros, normal or uniform")
        yield fname, mixer
        yield factor.pool, pools.entry_shape(pool, symbols, shape)


def _train_modules(spec: TyingSpec, named: list, claimed: dict) -> dict[str, int]:
    """Resolve ``spec.train_modules``: outermost matches only, none of them an adapted site; a parameter
    shared by several modules is counted once."""
    hits: dict[str, nn.Module] = {}
    for sel in spec.train_modules:
        pattern = compile_selector(sel)
        found = {n: m for n, m in named if fullmatch(pattern, n)}
        if not found:
            raise SelectorError(f"train_modules selector {sel!r} matches no module; closest module names: "
                                f"{', '.join(closest_names(sel, [n for n, _ in named]))}")
        hits.update(found)
    out, seen = {}, set()
    for name, module in hits.items():
        if any(name.startswith(o + ".") for o in hits):
            continue  # an ancestor is trained whole already
        if name in claimed or any(c.startswith(name + ".") for c in claimed):
            raise ConflictError(f"module {name!r} is both adapted (or contains an adapted site) and listed "
                                "in train_modules; a module is either adapted or trained whole")
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        out[name] = sum(p.numel() for p in params)
    return out
