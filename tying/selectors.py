"""One selector grammar for module names.

A selector is either a regex, written ``re:<pattern>``, or a glob. Both are matched against the
*whole* dotted module name (``fullmatch``). In a glob:

- ``*`` matches one name segment (no dot), ``**`` any run of characters (dots included);
- ``{name}`` captures one segment under ``name``; ``{name:#}`` captures a number (digits);
  ``{name:a|b}`` captures one of the alternatives.

So ``model.layers.{layer:#}.self_attn.{proj:q_proj|k_proj|v_proj}`` is the same selector as
``re:model\\.layers\\.(?P<layer>\\d+)\\.self_attn\\.(?P<proj>q_proj|k_proj|v_proj)``.
Named captures describe a site; factors are tied along them (see ``spec.Factor.tie``).

A spec may come from someone else's adapter folder, so a selector is untrusted input: patterns run on the
``regex`` engine with a time limit per module name (:data:`MATCH_SECONDS`), and one that backtracks
catastrophically stops with a SelectorError instead of hanging.
"""

from __future__ import annotations

import difflib
import functools
import re

import regex

from .errors import SelectorError

MATCH_SECONDS = 1.0  # per module name; real selectors take microseconds

_GLOB_TOKEN = re.compile(r"\*\*|\*|\{(?P<name>[A-Za-z_]\w*)(?::(?P<alts>[^{}]+))?\}|[{}]")


@functools.lru_cache(maxsize=256)
def compile_selector(selector: str) -> regex.Pattern:
    """Compile a selector into a regex to ``fullmatch`` module names; raise SelectorError if invalid."""
    if not isinstance(selector, str) or not selector.strip() or selector.strip() == "re:":
        raise SelectorError(f"empty selector {selector!r}: write a glob such as 'layers.{{layer}}.q_proj' "
                            "or a regex prefixed with 're:'")
    if selector.startswith("re:"):
        try:
            re.compile(selector[3:])  # Python's grammar decides what is valid (regex would take a name twice)
            return regex.compile(selector[3:])
        except (re.error, regex.error, ValueError) as e:
            raise SelectorError(f"invalid regex in selector {selector!r}: {e}") from None
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


def fullmatch(pattern: regex.Pattern, name: str):
    """``pattern.fullmatch(name)`` within :data:`MATCH_SECONDS`; a SelectorError if the pattern runs longer."""
    try:
        return pattern.fullmatch(name, timeout=MATCH_SECONDS)
    except TimeoutError:
        raise SelectorError(f"selector {pattern.pattern!r} ran over {MATCH_SECONDS:g} s on module name {name!r} "
                            "(catastrophic backtracking); rewrite it without nested repetition, or use a glob")


def closest_names(selector: str, names: list[str], n: int = 5) -> list[str]:
    """The module names most similar to a selector's text, for 'matched nothing' messages."""
    text = selector.removeprefix("re:")
    text = re.sub(r"\(\?P<\w+>|[\\()?*+^$\[\]{}|]", "", text)
    return difflib.get_close_matches(text, names, n=n, cutoff=0.0)
