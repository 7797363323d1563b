"""Name registries and seed derivation shared by every fedshield package.

Run configs are not read here: :mod:`runconfig` parses them, and a component is built
from its parsed spec with :meth:`Registry.build`.

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
    "unknown_name_message",
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
