"""One selector grammar for module names.

A selector is either a regex, written ``re:<pattern>``, or a glob. Both are matched against the
*whole* dotted module name (``fullmatch``). In a glob:

- ``*`` matches one name segment (no dot), ``**`` any run of characters (dots included);
- ``{name}`` captures one segment under ``name``; ``{name:#}`` captures a number (digits);
  ``{name:a|b}`` captures one of the alternatives.

So ``model.layers.{layer:#}.self_attn.{proj:q_proj|k_proj|v_proj}`` is the same selector as
``re:model\\.layers\\.(?P<layer>\\d+)\\.self_attn\\.(?P<proj>q_proj|k_proj|v_proj)``.
Named captures describe a site; factors are tied along them (see ``spec.Factor.tie``).

A spec may come from someone else's adapter folder, so a selector is untrusted input, and every cost it can cause
is bounded, each with a SelectorError that says which bound: the selectors of a spec cost at most
:data:`SELECTOR_BUDGET` elements in all (characters, counted repeats multiplied out, as the engine unrolls them:
``a{4294967294}`` is 31 characters but would take gigabytes to compile) and are at most :data:`MAX_SELECTORS`;
patterns run on the ``regex`` engine, and all the matching of one plan shares one time budget
(:data:`PLAN_SECONDS`, see :func:`time_budget`; :data:`MATCH_SECONDS` per name outside a plan).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import re
import time
from collections.abc import Iterator

import regex

from .errors import SelectorError

try:
    from re import _parser as _sre  # Python's own regex grammar (3.11+)
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre

MATCH_SECONDS = 1.0  # per module name outside a plan; real selectors take microseconds
PLAN_SECONDS = 2.0  # all the selector matching of one plan (thousands of names x a few selectors: milliseconds)
SELECTOR_BUDGET = 100_000  # elements of all of a spec's selectors (a 70B model's every module name is ~25,000)
MAX_SELECTORS = 256  # selectors of one spec: targets' select and exclude, train_modules

_GLOB_TOKEN = re.compile(r"\*\*|\*|\{(?P<name>[A-Za-z_]\w*)(?::(?P<alts>[^{}]+))?\}|[{}]")


def _size(tree) -> int:
    """How many elements the engine may unroll a parsed pattern into: counted repeats multiply their body."""
    total = 0
    for op, av in tree:
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)):
            lo, hi, body = av
            total += _size(body) * max(lo, 1 if hi == _sre.MAXREPEAT else hi)
        else:
            total += 1 + sum(_size(t) for t in _subpatterns(av))
    return total


def _subpatterns(av) -> Iterator:
    if isinstance(av, _sre.SubPattern):
        yield av
    elif isinstance(av, (list, tuple)):
        for x in av:
            yield from _subpatterns(x)


@functools.lru_cache(maxsize=256)
def selector_cost(selector: str) -> int:
    """The elements a selector costs against :data:`SELECTOR_BUDGET`: a glob its length, a regex its parsed size
    with counted repeats multiplied out (its length if Python's grammar refuses it: compiling it says why)."""
    if not selector.startswith("re:") or len(selector) > SELECTOR_BUDGET:
        return len(selector)
    try:
        return max(len(selector), _size(_sre.parse(selector[3:])))
    except (re.error, ValueError, OverflowError, RecursionError):
        return len(selector)


def check_budget(selectors: list[str], where: str = "the spec") -> None:
    """``selectors`` (all of one spec's) within :data:`MAX_SELECTORS` and :data:`SELECTOR_BUDGET`; a
    SelectorError naming the bound otherwise. Cheap: nothing is compiled."""
    if len(selectors) > MAX_SELECTORS:
        raise SelectorError(f"{where} has {len(selectors):,} selectors (targets' select and exclude, train_modules); "
                            f"at most {MAX_SELECTORS} are allowed: merge them into fewer patterns")
    if sum(map(len, selectors)) > SELECTOR_BUDGET:
        raise SelectorError(f"the selectors of {where} are {sum(map(len, selectors)):,} characters in all; at most "
                            f"{SELECTOR_BUDGET:,} are allowed: write shorter patterns (captures, globs)")
    cost = sum(selector_cost(s) for s in selectors)
    if cost > SELECTOR_BUDGET:
        worst = max(selectors, key=selector_cost)
        raise SelectorError(f"the selectors of {where} would unroll into {cost:,} elements (the most: {worst[:60]!r}, "
                            f"{selector_cost(worst):,}); at most {SELECTOR_BUDGET:,} are allowed: avoid large counted "
                            "repeats such as {1000}")


@functools.lru_cache(maxsize=256)
def compile_selector(selector: str) -> regex.Pattern:
    """Compile a selector into a regex to ``fullmatch`` module names; raise SelectorError if invalid or over
    :data:`SELECTOR_BUDGET` on its own."""
    if not isinstance(selector, str) or not selector.strip() or selector.strip() == "re:":
        raise SelectorError(f"empty selector {selector!r}: write a glob such as 'layers.{{layer}}.q_proj' "
                            "or a regex prefixed with 're:'")
    check_budget([selector], f"selector {selector[:60]!r}")
    if selector.startswith("re:"):
        try:
            re.compile(selector[3:])  # Python's grammar decides what is valid (regex would take a name twice)
            return regex.compile(selector[3:])
        except (re.error, regex.error, ValueError) as e:
            raise SelectorError(f"invalid regex in selector {selector!r}: {e}") from None
        except RecursionError:
            raise SelectorError(f"regex selector {selector[:40]!r}... nests too deeply; write it flat, or use a "
                                "glob") from None
    out, pos = [], 0
    for m in _GLOB_TOKEN.finditer(selector):
        out.append(re.escape(selector[pos:m.start()]))
        tok = m.group(0)
        if tok == "**":
            out.append(".*")
        elif tok == "*":
            out.append("[^.]+")
        elif m.group("name"):
            alts = m.group("alts")
            body = r"\d+" if alts == "#" else "|".join(map(re.escape, alts.split("|"))) if alts else "[^.]+"
            out.append(f"(?P<{m.group('name')}>{body})")
        else:
            raise SelectorError(f"unbalanced brace at position {m.start()} in glob selector {selector!r}")
        pos = m.end()
    out.append(re.escape(selector[pos:]))
    try:
        re.compile("".join(out))
        return regex.compile("".join(out))
    except (re.error, regex.error, ValueError) as e:  # e.g. the same capture name twice
        raise SelectorError(f"invalid glob selector {selector!r}: {e}") from None


class _Budget:
    """The matching time one plan may still spend, and what each pattern spent (to name the slowest)."""

    def __init__(self, seconds: float):
        self.seconds, self.spent, self.by = seconds, 0.0, {}


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("tying_selector_budget", default=None)


@contextlib.contextmanager
def time_budget(seconds: float = PLAN_SECONDS) -> Iterator[None]:
    """Inside the block, all :func:`fullmatch` calls share ``seconds`` of matching (a plan's budget; the time
    spent matching is counted, not the rest of the plan's work). Nested blocks share the outermost budget."""
    if _BUDGET.get() is not None:
        yield
        return
    token = _BUDGET.set(_Budget(seconds))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def fullmatch(pattern: regex.Pattern, name: str):
    """``pattern.fullmatch(name)`` within what is left of the plan's budget (:func:`time_budget`), else within
    :data:`MATCH_SECONDS`; a SelectorError when the time runs out."""
    budget = _BUDGET.get()
    left = MATCH_SECONDS if budget is None else budget.seconds - budget.spent
    start = time.perf_counter()
    try:
        if left <= 0:
            raise TimeoutError
        return pattern.fullmatch(name, timeout=left)
    except TimeoutError:
        pass
    finally:
        if budget is not None:
            took = time.perf_counter() - start
            budget.spent += took
            budget.by[pattern.pattern] = budget.by.get(pattern.pattern, 0.0) + took
    if budget is None:
        what = f"selector {pattern.pattern[:200]!r} ran over {MATCH_SECONDS:g} s on module name {name!r}"
    else:
        slow = sorted(budget.by, key=budget.by.get, reverse=True)[:3]
        what = (f"the selectors of one plan ran over the {budget.seconds:g} s they may take in all; the slowest: "
                + ", ".join(f"{p[:100]!r} ({budget.by[p]:.2f} s)" for p in slow))
    raise SelectorError(f"{what} (catastrophic backtracking, or many slow patterns); rewrite them without nested "
                        "repetition, or use globs")


def closest_names(selector: str, names: list[str], n: int = 5) -> list[str]:
    """The module names most similar to a selector's text, for 'matched nothing' messages."""
    text = selector.removeprefix("re:")
    text = re.sub(r"\(\?P<\w+>|[\\()?*+^$\[\]{}|]", "", text)
    return difflib.get_close_matches(text, names, n=n, cutoff=0.0)
