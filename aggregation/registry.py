"""Name registries and seed derivation shared by every fedshield package.

Every component (aggregator, pre-aggregator, attack, dataset, partitioner, model) is
registered by name. Configs refer to names; an unknown name raises with the valid names
and the closest match, and an unknown hyperparameter raises with the accepted ones.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import torch

__all__ = [
    "Registry",
    "check_params",
    "derive_seed",
    "make_generator",
    "parse_params",
    "resolve_object",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to components, refusing duplicates and unknown names.

    Parameters
    ----------
    kind
        What the registry holds, used in error messages ("aggregator", "attack", ...).

    Examples
    --------
    >>> reg: Registry[Callable[..., int]] = Registry("thing")
    >>> @reg.register("one")
    ... def one() -> int:
    ...     return 1
    >>> reg.get("one")()
    1
    >>> reg.names()
    ['one']
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under ``name``.

        Raises
        ------
        ValueError
            If ``name`` is already registered or is not a non-empty identifier-like string.
        """
        if not name or not isinstance(name, str) or name != name.strip():
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered; pick another name"
                )
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the component registered as ``name``.

        Raises
        ------
        KeyError
            If ``name`` is unknown; the message lists the valid names and a close match.
        """
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(unknown_name_message(self.kind, name, self.names())) from None

    def build(self, name: str, /, **params: Any) -> Any:
        """Look ``name`` up, check ``params`` against its signature, and call it.

        The one way to construct a registered component from a config: an unknown name
        raises ``KeyError`` with the closest match, an unknown parameter ``TypeError`` with
        the valid ones, and a missing required one ``TypeError`` naming it.

        Examples
        --------
        >>> reg: Registry[Callable[..., int]] = Registry("thing")
        >>> _ = reg.register("add")(lambda *, a, b=1: a + b)
        >>> reg.build("add", a=2)
        3
        >>> reg.build("add", c=1)
        Traceback (most recent call last):
        ...
        TypeError: thing 'add' got unknown parameter(s) 'c'; valid parameters: a, b
        """
        factory: Any = self.get(name)
        check_params(self.kind, name, factory, params)
        missing = _missing_params(factory, params)
        if missing:
            valid = ", ".join(inspect.signature(factory).parameters)
            raise TypeError(
                f"{self.kind} {name!r} needs parameter(s) {', '.join(map(repr, missing))}; "
                f"valid parameters: {valid}"
            )
        return factory(**params)

    def names(self) -> list[str]:
        """Sorted list of registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    """Error text for an unknown registered name, with the closest valid match."""
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} Valid names: {', '.join(valid)}"


def check_params(kind: str, name: str, factory: Callable[..., Any],
                 params: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` if ``params`` holds a keyword that ``factory`` does not accept.

    Only keyword-only and positional-or-keyword parameters count; ``**kwargs`` factories
    accept anything.
    """
    sig = inspect.signature(factory)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        close = {u: difflib.get_close_matches(u, valid, n=1) for u in unknown}
        hints = ", ".join(
            f"{u!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for u, c in close.items()
        )
        raise TypeError(
            f"{kind} {name!r} got unknown parameter(s) {hints}; "
            f"valid parameters: {', '.join(valid) or '(none)'}"
        )


def _missing_params(factory: Callable[..., Any], params: Mapping[str, Any]) -> list[str]:
    """Required keyword parameters of ``factory`` that ``params`` does not give."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature
        return []
    return [
        p.name for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.name not in params
    ]


def derive_seed(root: int, *labels: int | str) -> int:
    """Derive a 63-bit seed from a root seed and labels, stable across runs and platforms.

    ``derive_seed(seed, "client", 3, "round", 7)`` gives client 3 its own stream in round 7,
    independent of every other (client, round) pair and of the order of calls.

    Examples
    --------
    >>> derive_seed(0, "a") == derive_seed(0, "a")
    True
    >>> derive_seed(0, "a") != derive_seed(0, "b")
    True
    """
    if isinstance(root, bool) or not isinstance(root, int):
        raise TypeError(f"seed must be an int, got {type(root).__name__} {root!r}")
    h = hashlib.blake2b(digest_size=8)
    h.update(str(root).encode())
    for label in labels:
        h.update(b"\x1f")
        h.update(f"{type(label).__name__}:{label}".encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def parse_params(text: str, *, what: str = "parameters") -> dict[str, Any]:
    """Parse ``"f=2, m=5, mode='reverse'"`` into ``{"f": 2, "m": 5, "mode": "reverse"}``.

    Values are Python literals (numbers, booleans, quoted strings, tuples, ``None``); a bare
    word that is not a literal is taken as a string. Separators are commas or whitespace.
    This is how a flat run config (Flower allows only scalars) carries a component's
    hyperparameters.

    Raises
    ------
    ValueError
        If an item is not ``key=value`` or a key repeats.

    Examples
    --------
    >>> parse_params("f=2, m=5 mode=reverse")
    {'f': 2, 'm': 5, 'mode': 'reverse'}
    >>> parse_params("")
    {}
    """
    import ast
    import re

    out: dict[str, Any] = {}
    text = text.strip()
    if not text:
        return out
    # key=value where value is a bracketed literal, a quoted string or a bare token
    pattern = re.compile(
        r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"
        r"(\([^()]*\)|\[[^\[\]]*\]|'[^']*'|\"[^\"]*\"|[^\s,]+)\s*(?:,|\s|$)"
    )
    pos = 0
    while pos < len(text):
        m = pattern.match(text, pos)
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


def resolve_object(path: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute.

    Raises
    ------
    ValueError
        If ``path`` is not of the form ``module:attribute`` or cannot be imported.
    """
    import importlib

    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:attribute', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} named in {path!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} ({path!r})") from None


_KINDS: dict[type, tuple[type, ...]] = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str,),
}


def config_value(config: Mapping[str, Any], key: str, kind: type[T]) -> T:
    """Read ``config[key]`` as ``kind`` (bool, int, float or str), refusing a wrong type.

    Flower run configs are flat ``str -> scalar`` mappings; a missing key or a value of the
    wrong type is a configuration error, reported with the key and the fix.

    Raises
    ------
    KeyError
        If the key is absent.
    TypeError
        If the value has the wrong type (an int is accepted for a float, a bool is never
        accepted for a number).
    """
    if key not in config:
        raise KeyError(
            f"run config has no key {key!r}; add it to [tool.flwr.app.config] in "
            f"pyproject.toml or pass it with --run-config \"{key}=...\""
        )
    value = config[key]
    ok = isinstance(value, _KINDS[kind]) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        raise TypeError(
            f"run config key {key!r} must be {kind.__name__}, got "
            f"{type(value).__name__} {value!r}"
        )
    return kind(value)  # type: ignore[call-arg]
