"""The declarative spec: which modules to adapt, which factors are tied along which captures,
which are trained, and how each starts. Pydantic v2, frozen, ``extra="forbid"``; never mutated."""

from __future__ import annotations

import inspect
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import vocab
from .errors import SelectorError, SpecError
from .presets.families import FAMILIES
from .selectors import check_budget, compile_selector

SPEC_VERSION = 1
MAX_TASKS = 4096  # tasks of one spec: each adds its own factors to every site (an untrusted folder's spec is bounded)
_PRESET_FILE = Path(__file__).parent / "presets" / "presets.yaml"


def _compiles(s: str) -> str:
    compile_selector(s)  # SelectorError is a ValueError: pydantic reports it with its field path
    return s


Selector = Annotated[str, AfterValidator(_compiles)]
Finite = Annotated[float, Field(allow_inf_nan=False)]  # .inf or .nan in a spec is a typo or an attack


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):  # YAML's true/false would otherwise count as 1/0
        raise ValueError(f"expected a whole number, got the boolean {v}")  # noqa: TRY004  pydantic reports ValueErrors
    return v


Int = Annotated[int, BeforeValidator(_no_bool)]
PositiveWhole = Annotated[Int, Field(gt=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Init(_Frozen):
    """How a factor starts. ``seed`` makes a random init reproducible without touching the global RNG
    (group i of a factor uses ``seed + i``)."""

    kind: Literal["zeros", "ones", "constant", "kaiming_uniform", "normal", "uniform", "orthogonal"]
    value: Finite = 0.0  # constant
    mean: Finite = 0.0  # normal
    std: Finite = Field(1.0, gt=0)  # normal
    bound: Finite = Field(1.0, gt=0)  # uniform(-bound, bound)
    gain: Finite = Field(1.0, gt=0)  # orthogonal
    seed: Annotated[Int, Field(ge=-2**62, le=2**62)] | None = None  # torch's generators take 64 bits (+ index)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data


def _tie_shorthand(cls, v: Any) -> Any:
    """``none`` or null: no tie; a bare capture name: a list of one."""
    if v in (None, "none"):
        return []
    return [v] if isinstance(v, str) and v != "all" else v


def _distinct(self):
    names = [] if self.tie == "all" else [a.capture for a in self.tie]
    if len(names) != len(set(names)):
        raise ValueError(f"tie names a capture twice: {names}")
    return self


class TieAxis(_Frozen):
    """Share a factor across the values of one capture: all of them, buckets of ``every`` consecutive
    integer values, or explicit ``groups`` of values. A bare string ``"layer"`` means all values."""

    capture: str
    every: PositiveWhole | None = None
    groups: list[list[int | str]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"capture": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_rule(self) -> TieAxis:
        if self.every is not None and self.groups is not None:
            raise ValueError(f"tie on {self.capture!r}: give 'every' or 'groups', not both")
        if self.groups is not None:
            seen = [str(v) for g in self.groups for v in g]
            if len(seen) != len(set(seen)):
                raise ValueError(f"tie on {self.capture!r}: a value appears in two groups: {self.groups}")
        return self


class Factor(_Frozen):
    """One factor of the update ``v * B(G(u * A(x))) * scale`` (u, v and the r x r core G optional).

    ``tie``: ``all`` (one copy for every site), ``[]`` or ``none`` (one copy per site), or a list of
    captures (one copy per combination of the *other* captures). ``shape_aware``: split a tie group
    by shape instead of failing when members differ (e.g. policy layers of several widths).
    """

    tie: Literal["all"] | list[TieAxis] = Field(default_factory=list)
    train: bool = True
    init: Init
    shape_aware: bool = False
    # drawn from a pool (adapter.pools): the factor is then a mix of the pool's entries, and tie/train/init are
    # those of the mixing parameters (weights: softmax of trained logits; topk: of the k largest; router: a trained
    # linear map of the input x or of the down projection h = A x, per token or averaged over the batch)
    pool: str | None = None
    mix: Literal["weights", "topk", "router"] | None = None
    k: PositiveWhole | None = None
    router: Literal["input", "down"] = "down"
    reduce: Literal["token", "batch"] = "token"

    _tie = field_validator("tie", mode="before")(_tie_shorthand)
    _distinct_captures = model_validator(mode="after")(_distinct)

    @model_validator(mode="after")
    def _mix_fits(self) -> Factor:
        if (self.pool is None) != (self.mix is None):
            raise ValueError("a factor drawn from a pool names both: pool (a name in adapter.pools) and mix (weights, "
                             "topk or router)")
        if (self.mix == "topk") != (self.k is not None):
            raise ValueError("k (how many entries a topk mix keeps) goes with mix: topk, and only with it")
        return self


MIXES = ("weights", "topk", "router")  # how a site's factor is drawn from a pool (docs/pools.md)


class Pool(_Frozen):
    """Entries that factors of several sites are drawn from (``adapter.pools``). ``size`` entries, each either the
    shape of the factor that draws from it, or with ``entry: L`` a vector of length L that factors are assembled
    from, tile by tile (along their non-rank axis; VB-LoRA's vector bank); ``entry: width`` takes L as the factor's
    whole width (each of its rank rows or columns one entry: MoS's shards). ``tie`` says which sites share one pool
    (as a factor's tie; default ``all``); ``init`` and ``train`` are the entries'."""

    size: PositiveWhole
    entry: PositiveWhole | Literal["width"] | None = None
    tie: Literal["all"] | list[TieAxis] = "all"
    train: bool = True
    init: Init
    shape_aware: bool = False

    _tie = field_validator("tie", mode="before")(_tie_shorthand)
    _distinct_captures = model_validator(mode="after")(_distinct)


class Adapter(_Frozen):
    """The adapter placed on every selected module. ``kind`` names a registered adapter kind (lora, ia3,
    bottleneck, prefix, dora, or one added with :func:`tying.register_kind`), whose facts say which factors it
    has. ``alpha`` defaults to ``rank`` (scale 1, as the paper)."""

    kind: str = "lora"
    rank: PositiveWhole
    alpha: Finite | None = Field(None, gt=0)
    dropout: Finite = Field(0.0, ge=0.0, lt=1.0)
    factors: dict[str, Factor]
    pools: dict[str, Pool] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, name: str) -> str:
        vocab.kind(name)  # a ValueError listing the known kinds
        return name

    @field_validator("factors")
    @classmethod
    def _factors_fit_kind(cls, factors: dict[str, Factor], info: ValidationInfo) -> dict[str, Factor]:
        if "kind" not in info.data:  # the kind itself failed; its error says why
            return factors
        facts = vocab.kind(info.data["kind"])
        missing, extra = facts.missing(set(factors)), [f for f in factors if f not in facts.factors]
        if missing or extra:
            raise ValueError(f"a {facts.name} adapter needs factors {facts.needed} and allows {list(facts.factors)}; "
                             f"missing {missing}, not allowed {extra}")
        for name, f in factors.items():  # (a factor drawn from a pool: the init is its mixer's, checked at plan time)
            if f.pool is None and len(facts.factors[name]) == 1 and f.init.kind in ("kaiming_uniform", "orthogonal"):
                raise ValueError(f"factor {name} is a vector: init {f.init.kind!r} needs a matrix; "
                                 "use ones, zeros, constant, normal or uniform")
        return factors

    @model_validator(mode="after")
    def _pools_fit(self) -> Adapter:
        facts = vocab.kind(self.kind)
        for name in self.pools:
            if name in facts.factors or not name.isidentifier():
                raise ValueError(f"adapter.pools.{name}: a pool's name is an identifier other than the kind's factors "
                                 f"({', '.join(facts.factors)})")
        for name, f in self.factors.items():
            if f.pool is None:
                continue
            if f.pool not in self.pools:
                raise ValueError(f"adapter.factors.{name}.pool names {f.pool!r}; pools: {list(self.pools) or 'none'}")
            pool, shape = self.pools[f.pool], facts.factors[name]
            if f.mix == "router" and (name not in facts.routed or pool.entry is not None):
                raise ValueError(f"adapter.factors.{name}: a {self.kind} adapter mixes by router only "
                                 f"{list(facts.routed) or 'no factor'}, from whole entries (no entry: L)")
            if pool.entry is not None and "rank" not in shape:
                raise ValueError(f"adapter.factors.{name}: a pool of vectors (entry: {pool.entry}) assembles matrices "
                                 f"of a rank axis and a width axis; {name} has shape {shape}")
            if f.k is not None and f.k > pool.size:
                raise ValueError(f"adapter.factors.{name}.k is {f.k}, larger than pool {f.pool!r}'s {pool.size} entries")
        return self

    def part(self, name: str) -> Factor | Pool:
        """A factor or a pool by name: what the planner and the bank make groups of."""
        return self.factors[name] if name in self.factors else self.pools[name]

    @property
    def facts(self) -> vocab.KindFacts:
        """The declarative facts of this adapter's kind."""
        return vocab.kind(self.kind)

    @property
    def scale(self) -> float:
        """The multiplier of the update: alpha / rank."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class Target(_Frozen):
    """A selector over module names, an optional filter on module types (``Linear``, ``Conv1D``, ``Conv1d``,
    ``Conv2d``, ``Embedding``, the quantized linear layers, ``Attention`` for prefix adapters, or a type added with
    :func:`tying.register_module_type`; a type's descendants count, so ``Linear`` selects ``Linear4bit``), and
    exclusions."""

    select: Selector
    types: list[str] | None = None
    exclude: list[Selector] = Field(default_factory=list)

    @field_validator("types")
    @classmethod
    def _known_types(cls, types: list[str] | None) -> list[str] | None:
        known = vocab.module_type_names()
        unknown = [t for t in types or [] if t not in known]
        if unknown:
            raise ValueError(f"unsupported module type(s) {unknown}; supported: {', '.join(known)}")
        return types

    @property
    def captures(self) -> set[str]:
        """Names of the captures this target's selector defines."""
        return set(compile_selector(self.select).groupindex)


TaskName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_-]*$", max_length=64)]


class TyingSpec(_Frozen):
    """The whole spec. Build it with :func:`load_spec`.

    ``tasks``: the names of the tasks (or environments, users) one adapter serves. ``task`` is then a tie axis
    beside the selectors' captures: a factor that lists it in ``tie`` (or ties ``all``) is one copy for every task
    (or one per bucket of tasks); any other factor has one copy per task (docs/multitask.md)."""

    version: Literal[1] = SPEC_VERSION
    targets: list[Target] = Field(min_length=1)
    adapter: Adapter
    freeze_base: bool = True
    train_modules: list[Selector] = Field(default_factory=list)  # base modules trained and saved with the adapter
    tasks: list[TaskName] | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        """Bounds checked before anything is validated, in time linear in the input: the number of tasks, and the
        number and cost of the selectors (tying.selectors)."""
        if not isinstance(data, dict):
            return data
        tasks = data.get("tasks")
        if isinstance(tasks, (list, tuple)) and len(tasks) > MAX_TASKS:
            raise ValueError(f"tasks: {len(tasks):,} task names; a spec has at most {MAX_TASKS:,} tasks (each adds its "
                             "own factors at every site); serve more adapters with tying.load_adapters_")
        selectors = []
        for t in data.get("targets") if isinstance(data.get("targets"), list) else []:
            t = t.model_dump() if isinstance(t, BaseModel) else t
            if isinstance(t, dict):
                selectors += [t.get("select"), *(t.get("exclude") if isinstance(t.get("exclude"), list) else [])]
        if isinstance(data.get("train_modules"), list):
            selectors += data["train_modules"]
        check_budget([x for x in selectors if isinstance(x, str)])
        return data

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, tasks: list[str] | None) -> list[str] | None:
        twice = sorted(t for t, n in Counter(tasks or []).items() if n > 1)
        if twice:
            raise ValueError(f"task names must be distinct; written twice: {twice}")
        return tasks

    @model_validator(mode="after")
    def _task_axis(self) -> TyingSpec:
        for t in self.targets:
            if vocab.TASK in t.captures:
                raise ValueError(f"target selector {t.select!r} defines a capture named {vocab.TASK!r}, which is the "
                                 "task axis of a multi-task spec; rename the capture")
        for name, axis in self._task_ties():
            if self.tasks is None:
                raise ValueError(f"adapter.factors.{name}.tie names {vocab.TASK!r}, but the spec has no tasks; add "
                                 "`tasks: [name, ...]` at the top, or drop 'task' from the tie")
            if axis.groups is not None:
                values = {str(v) for g in axis.groups for v in g}
                unknown, left = sorted(values - set(self.tasks)), [t for t in self.tasks if t not in values]
                if unknown or left:
                    raise ValueError(f"adapter.factors.{name}.tie.task.groups must place every task in one group: "
                                     f"unknown tasks {unknown}, tasks in no group {left} (tasks: {self.tasks})")
        return self

    def _task_ties(self):
        for name, f in {**self.adapter.factors, **self.adapter.pools}.items():
            for axis in [] if f.tie == "all" else f.tie:
                if axis.capture == vocab.TASK:
                    yield name, axis

    def task_suffix(self, factor: str, task: str) -> str:
        """What the group key of ``factor`` gains for ``task``: '' for a factor shared by every task, ``#task`` for
        one per task, ``#[a,b]`` (or ``#[0-1]``, task positions) for a bucket of tasks."""
        f = self.adapter.part(factor)
        if f.tie == "all":
            return ""
        axis = next((a for a in f.tie if a.capture == vocab.TASK), None)
        if axis is None:
            return f"#{task}"
        if axis.every is not None:
            lo = self._task_position[task] // axis.every * axis.every
            return f"#[{lo}-{lo + axis.every - 1}]"
        if axis.groups is not None:
            return "#[" + ",".join(map(str, self._task_groups[factor][task])) + "]"
        return ""

    @cached_property
    def _task_position(self) -> dict[str, int]:
        """Each task's position in ``tasks`` (a dict: the planner asks once per site, factor and task)."""
        return {t: i for i, t in enumerate(self.tasks or ())}

    @cached_property
    def _task_groups(self) -> dict[str, dict[str, list]]:
        """factor -> task -> the group of the factor's ``task`` tie that holds the task."""
        return {name: {str(v): g for g in axis.groups or () for v in g} for name, axis in self._task_ties()}

    def single_task(self) -> TyingSpec:
        """The spec of one task's adapter: no ``tasks``, no ``task`` axis in any tie (the same groups otherwise)."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data.pop("tasks", None)
        for f in data["adapter"]["factors"].values():
            if isinstance(f.get("tie"), list):
                f["tie"] = [a for a in f["tie"] if a["capture"] != vocab.TASK]
        return TyingSpec.model_validate(data)

    @model_validator(mode="after")
    def _ties_name_known_captures(self) -> TyingSpec:
        known = set().union(*(t.captures for t in self.targets))
        for name, f in {**self.adapter.factors, **self.adapter.pools}.items():
            if f.tie == "all":
                continue
            for axis in f.tie:
                if axis.capture not in known and axis.capture != vocab.TASK:
                    raise ValueError(f"adapter.factors.{name}.tie names capture {axis.capture!r}, but no target "
                                     f"selector defines it (known captures: {sorted(known) or 'none'}); "
                                     "add a named group such as (?P<layer>\\d+) or {layer} to a selector")
        return self

    def to_yaml(self) -> str:
        """The spec as YAML text that :func:`load_spec` reads back to an equal spec."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def preset_names() -> list[str]:
    """Names of the presets shipped with tying (the pool family's take knobs: tying.presets.families)."""
    return [*_presets(), *FAMILIES]


def _family(name: str, overrides: dict) -> dict:
    """The spec of preset ``name`` of the pool family, built with the knobs among ``overrides``, on the q/k/v
    targets of the other presets."""
    build = FAMILIES[name]
    knobs = inspect.signature(build).parameters
    try:
        data = build(**{k: v for k, v in overrides.items() if k in knobs})
    except TypeError:
        need = [k for k, p in knobs.items() if p.default is inspect.Parameter.empty]
        raise SpecError(f"preset {name!r} needs {need} (its knobs: {', '.join(knobs)})") from None
    return {"targets": _presets()["lora"]["targets"], **data}


def _presets() -> dict[str, dict]:
    data = yaml.safe_load(_PRESET_FILE.read_text())
    return data["presets"]


def _shared_across_tasks(adapter: dict) -> dict:
    """``adapter`` with ``task`` added to the tie of every factor shared across layers (load_spec's tasks rule)."""
    factors = {}
    for name, f in (adapter.get("factors") or {}).items():
        if isinstance(f, dict) and isinstance(f.get("tie"), (list, str)):
            tie = [f["tie"]] if isinstance(f["tie"], str) and f["tie"] != "all" else f["tie"]
            captures = [] if tie == "all" else [a if isinstance(a, str) else a.get("capture") for a in tie]
            if "layer" in captures and vocab.TASK not in captures:
                f = {**f, "tie": [*tie, vocab.TASK]}
        factors[name] = f
    return {**adapter, "factors": factors}


def _format_validation(e: ValidationError, where: str) -> str:
    rows = []
    for err in e.errors():
        # drop pydantic's union-branch tags such as "literal['all']" or "list[...]" from the path
        path = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or "(" in p)))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against the spec reference, docs/spec.md)"
        rows.append((path, msg, err["type"]))
    # in a union, a failed literal branch is noise when another branch failed deeper down
    rows = [r for r in rows if not (r[2] == "literal_error" and any(o[0].startswith(r[0] + ".") for o in rows))]
    lines = [f"invalid spec ({where}):"] + [f"  {p}: {m}" if p else f"  {m}" for p, m, _ in rows]
    return "\n".join(lines)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is written twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"YAML syntax error in {where}{at}: {getattr(e, 'problem', e)}") from None


def parse_spec(text: str, where: str) -> TyingSpec:
    """A spec from YAML text (e.g. the copy an adapter file carries); ``where`` names it in errors."""
    data = _read_yaml(text, where)
    if data is None:
        raise SpecError(f"invalid spec ({where}): it is empty; a spec is a mapping with targets and adapter")
    return load_spec(data, _where=where)


_ADAPTER_OVERRIDES = ("rank", "alpha", "dropout")


def load_spec(source: TyingSpec | dict | str | Path, _where: str = "dict", **overrides: Any) -> TyingSpec:
    """Build a spec from a preset name, a YAML path, a dict or a spec.

    ``overrides`` replace fields: ``rank``, ``alpha`` and ``dropout`` of the adapter, and ``targets``,
    ``freeze_base`` or ``train_modules`` at the top. The result is validated anew; the source is never changed.
    ``tasks`` makes a single-task spec (a preset) multi-task by one rule: a factor shared across layers (its tie
    names ``layer``, or is ``all``) is shared across the tasks too, any other factor is one per task (TL6 becomes
    "TL6 across tasks": A and B shared by every task, u and v per task). A spec that has tasks takes new names.
    """
    where = _where
    if isinstance(source, TyingSpec):
        data, where = source.model_dump(mode="json"), "spec"
    elif isinstance(source, dict):
        data = source
    elif isinstance(source, str) and source in FAMILIES:
        data, where, overrides = _family(source, overrides), f"preset {source!r}", {
            k: v for k, v in overrides.items() if k not in inspect.signature(FAMILIES[source]).parameters}
    elif isinstance(source, (str, Path)):
        presets = _presets()
        if isinstance(source, str) and source in presets:
            data, where = presets[source], f"preset {source!r}"
        else:
            path = Path(source)
            if not path.is_file():
                hint = f"presets: {', '.join([*presets, *FAMILIES])}"
                if path.suffix in (".yaml", ".yml") or "/" in str(source):
                    raise SpecError(f"spec file not found: {path}")
                raise SpecError(f"unknown preset {source!r} and no such file; {hint}")
            data, where = _read_yaml(path.read_text(), str(path)), str(path)
    else:
        raise SpecError(f"cannot build a spec from a {type(source).__name__}; give a preset name, path or dict")
    if not isinstance(data, dict):
        raise SpecError(f"invalid spec ({where}): the top level must be a mapping, got {type(data).__name__}")
    top = ("targets", "freeze_base", "train_modules", "tasks")
    bad = set(overrides) - set(_ADAPTER_OVERRIDES) - set(top)
    if bad:
        raise SpecError(f"unknown override(s) {sorted(bad)}; allowed: {', '.join(_ADAPTER_OVERRIDES + top)}")
    data = dict(data)
    if any(overrides.get(k) is not None for k in _ADAPTER_OVERRIDES):
        adapter = dict(data.get("adapter") or {})
        adapter.update({k: overrides[k] for k in _ADAPTER_OVERRIDES if overrides.get(k) is not None})
        data["adapter"] = adapter
    for k in top:
        if overrides.get(k) is not None:
            data[k] = overrides[k]
    if overrides.get("tasks") is not None and isinstance(data.get("adapter"), dict):
        data["adapter"] = _shared_across_tasks(data["adapter"])
    try:
        return TyingSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation(e, where)) from None
    except SelectorError as e:  # raised outside a field validator
        raise SpecError(f"invalid spec ({where}): {e}") from None
