"""The one grammar for component specs: ``name`` or ``name(key=value, ...)``.

Every place that names a component with its hyperparameters (the run config, bench
scenarios, the CLI, the ServerApp, the ClientApp and the deploy tools) writes it in this
grammar and reads it with :func:`parse_spec`, :func:`parse_specs` or :func:`parse_params`.

Grammar::

    specs  := spec (SEP spec)*          SEP is ";" for pipelines, "," or "+" for lists
    spec   := NAME [ "(" params ")" ]
    params := [ KEY "=" VALUE ( ("," | whitespace) KEY "=" VALUE )* ]

``NAME`` may hold letters, digits, ``_``, ``.``, ``-`` and ``:`` (``npz:path`` data sets
are names too). ``VALUE`` is a Python literal (number, boolean, quoted string, tuple,
list, ``None``); a bare word that is not a literal is taken as a string.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Spec", "format_params", "parse_params", "parse_spec", "parse_specs", "split_top_level"]

_NAME = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.:/\-]*)\s*(?:\((.*)\))?\s*$", re.S)
# key=value where value is a bracketed literal, a quoted string or a bare token
_PAIR = re.compile(
    r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"
    r"(\([^()]*\)|\[[^\[\]]*\]|'[^']*'|\"[^\"]*\"|[^\s,]+)\s*(?:,|\s|$)"
)


@dataclass(frozen=True)
class Spec:
    """A component named with its hyperparameters, e.g. ``krum(f=2)``."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.name}({format_params(self.params)})" if self.params else self.name


def parse_params(text: str, *, what: str = "parameters") -> dict[str, Any]:
    """Parse ``"f=2, m=5, mode='reverse'"`` into ``{"f": 2, "m": 5, "mode": "reverse"}``.

    Raises
    ------
    ValueError
        If an item is not ``key=value`` or a key repeats; the message names ``what``.

    Examples
    --------
    >>> parse_params("f=2, m=5 mode=reverse")
    {'f': 2, 'm': 5, 'mode': 'reverse'}
    >>> parse_params("")
    {}
    """
    out: dict[str, Any] = {}
    text = text.strip()
    pos = 0
    while pos < len(text):
        m = _PAIR.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(
                f"cannot parse {what} {text!r} at {text[pos:]!r}: write key=value pairs "
                f"separated by commas, e.g. \"f=2, m=5\""
            )
        key, raw = m.group(1), m.group(2)
        if key in out:
            raise ValueError(f"{what} {text!r} sets {key!r} twice")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[key] = value
        pos = m.end()
    return out


def format_params(params: Mapping[str, Any]) -> str:
    """Inverse of :func:`parse_params`: ``{"f": 2, "mode": "x"}`` -> ``"f=2, mode='x'"``.

    Examples
    --------
    >>> format_params({"f": 2, "mode": "x"})
    "f=2, mode='x'"
    >>> parse_params(format_params({"a": 1.5, "b": (1, 2), "c": None}))
    {'a': 1.5, 'b': (1, 2), 'c': None}
    """
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def parse_spec(text: str, *, what: str = "component") -> Spec:
    """Parse ``"name"`` or ``"name(key=value, ...)"``.

    Raises
    ------
    ValueError
        If ``text`` is not of that form (the message names ``what`` and shows an example).

    Examples
    --------
    >>> parse_spec("krum(f=2)")
    Spec(name='krum', params={'f': 2})
    >>> str(parse_spec(" median "))
    'median'
    """
    m = _NAME.match(text)
    if m is None:
        raise ValueError(
            f"cannot parse {what} {text.strip()!r}: write name or name(key=value, ...), "
            "e.g. \"krum(f=2)\""
        )
    name, inner = m.group(1), m.group(2)
    return Spec(name, parse_params(inner or "", what=f"{what} {name!r} parameters"))


def split_top_level(text: str, sep: str) -> list[str]:
    """Split ``text`` on ``sep`` outside parentheses and brackets; empty items raise.

    Examples
    --------
    >>> split_top_level("sign_flip(scale=4, x=1), alie", ",")
    ['sign_flip(scale=4, x=1)', 'alie']
    """
    items: list[str] = []
    depth, start, quote = 0, 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced parentheses in {text!r}")
        elif ch == sep and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0 or quote:
        raise ValueError(f"unbalanced parentheses or quotes in {text!r}")
    items.append(text[start:])
    items = [s.strip() for s in items]
    if any(not s for s in items):
        raise ValueError(f"empty item in {text!r}: write specs separated by {sep!r}")
    return items


def parse_specs(text: str, *, sep: str = ";", what: str = "component") -> list[Spec]:
    """Parse a list of specs separated by ``sep``; an empty text is an empty list.

    Examples
    --------
    >>> [str(s) for s in parse_specs("norm_clip(max_norm=5); bucketing(s=2)")]
    ['norm_clip(max_norm=5)', 'bucketing(s=2)']
    >>> parse_specs("  ")
    []
    """
    if not text.strip():
        return []
    return [parse_spec(item, what=what) for item in split_top_level(text, sep)]
