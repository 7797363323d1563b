"""Objects named in a run config as ``package.module:attribute``."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["resolve_object"]


def resolve_object(path: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute.

    Raises
    ------
    ValueError
        If ``path`` is not of the form ``module:attribute`` or cannot be imported.
    """
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
