"""Run-config overrides ``key=value``, as ``fedshield run`` and ``flwr run --run-config`` take them.

Run-config keys are words with hyphens (``num-server-rounds``), which the component-spec
grammar of :mod:`runconfig.spec` does not allow as parameter names; this module reads
them. A value is, in this order:

1. ``true`` / ``false`` in any case: a bool;
2. a TOML scalar (what ``flwr run --run-config`` accepts): ``3``, ``0.5``, ``1e-3``,
   ``inf``, ``"text"``, ``'literal text'``;
3. a Python literal scalar: ``.5``, ``'it''s'``;
4. otherwise the text itself, stripped: ``krum``, ``f=2, m=5``, ``/data/x.npz``.

A TOML or Python literal that is not a bool, int, float or string (a list, a date,
``None``) is kept as its text.
"""

from __future__ import annotations

import ast
import re
import tomllib

__all__ = ["Scalar", "parse_override", "parse_overrides", "split_overrides"]

Scalar = bool | int | float | str

_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _literal(raw: str) -> object:
    """``raw`` read as a TOML value, else as a Python literal, else ``raw`` itself."""
    if "\n" not in raw and "\r" not in raw:  # one value, never a document with more keys
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def _scalar(raw: str) -> Scalar:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    value = _literal(raw)
    return value if isinstance(value, (bool, int, float, str)) else raw


def parse_override(text: str) -> tuple[str, Scalar]:
    """Parse one ``key=value`` override (see the module docstring for the value).

    Parameters
    ----------
    text
        ``key=value``; the first ``=`` separates them, so the value may hold more.

    Returns
    -------
    tuple
        ``(key, value)`` with ``value`` a bool, int, float or str.

    Raises
    ------
    ValueError
        If ``text`` has no ``=`` or the key is not a word of letters, digits, ``_``,
        ``-`` and ``.``.

    Examples
    --------
    >>> parse_override("num-malicious=3")
    ('num-malicious', 3)
    >>> parse_override("aggregator=krum")
    ('aggregator', 'krum')
    >>> parse_override("aggregator-params=f=2, m=5")
    ('aggregator-params', 'f=2, m=5')
    >>> parse_override("out-dir='/tmp/a b'")
    ('out-dir', '/tmp/a b')
    >>> parse_override("resume=True")
    ('resume', True)
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} is not key=value, e.g. num-server-rounds=3")
    if not _KEY.fullmatch(key):
        raise ValueError(
            f"override {text!r}: the key {key!r} must be letters, digits, '_', '-' and '.', "
            "e.g. num-server-rounds=3"
        )
    return key, _scalar(raw.strip())


def split_overrides(text: str) -> list[str]:
    """Split ``"k=1 k2='a b'"`` on whitespace outside single or double quotes.

    Raises
    ------
    ValueError
        If a quote is not closed.

    Examples
    --------
    >>> split_overrides("num-server-rounds=3  out-dir='/tmp/a b' x=\\"it's\\"")
    ['num-server-rounds=3', "out-dir='/tmp/a b'", 'x="it\\'s"']
    """
    items: list[str] = []
    current: list[str] = []
    quote = ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch.isspace():
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(ch)
    if quote:
        raise ValueError(f"unclosed {quote} quote in overrides {text!r}")
    if current:
        items.append("".join(current))
    return items


def parse_overrides(text: str) -> dict[str, Scalar]:
    """Parse whitespace-separated ``key=value`` overrides, e.g. a ``--run-config`` value.

    Quote a value that holds spaces: ``out-dir='/tmp/a b'``.

    Raises
    ------
    ValueError
        If an item is not ``key=value``, a quote is not closed, or a key repeats.

    Examples
    --------
    >>> parse_overrides("num-server-rounds=3 aggregator='krum' resume=true")
    {'num-server-rounds': 3, 'aggregator': 'krum', 'resume': True}
    >>> parse_overrides("  ")
    {}
    """
    out: dict[str, Scalar] = {}
    for item in split_overrides(text):
        key, value = parse_override(item)
        if key in out:
            raise ValueError(f"overrides {text!r} set {key!r} twice; keep one")
        out[key] = value
    return out
