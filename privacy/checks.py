"""Validation of DP parameters, shared by the mechanisms so every one says the same thing.

Each check returns the value converted to ``float`` or ``int`` and raises ``ValueError``
naming the parameter, the rule and the value; ``bool`` is never accepted as a number.
"""

from __future__ import annotations

import math
from typing import cast

__all__ = ["check_delta", "check_int", "check_nonnegative", "check_positive", "is_real"]


def is_real(x: object) -> bool:
    """``True`` for an ``int`` or ``float`` that is not a ``bool``.

    Examples
    --------
    >>> is_real(1), is_real(0.5), is_real(True), is_real("1")
    (True, True, False, False)
    """
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_positive(name: str, value: object) -> float:
    """``value`` as a float, which must be finite and ``> 0``.

    Raises
    ------
    ValueError
        Otherwise.

    Examples
    --------
    >>> check_positive("clipping_norm", 2)
    2.0
    """
    if not is_real(value) or not math.isfinite(float(cast(float, value))) or not (
        float(cast(float, value)) > 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(cast(float, value))


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a float, which must be finite and ``>= 0``.

    Raises
    ------
    ValueError
        Otherwise.

    Examples
    --------
    >>> check_nonnegative("noise_std", 0)
    0.0
    """
    if not is_real(value) or not math.isfinite(float(cast(float, value))) or not (
        float(cast(float, value)) >= 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(cast(float, value))


def check_delta(delta: object) -> float:
    """``delta`` as a float in ``(0, 1)``.

    Raises
    ------
    ValueError
        Otherwise, with the usual advice on choosing it.

    Examples
    --------
    >>> check_delta(1e-5)
    1e-05
    """
    if not is_real(delta) or not 0 < float(cast(float, delta)) < 1:
        raise ValueError(
            f"delta must be in (0, 1), got {delta!r}: pick delta well below 1/N for N "
            "protected units (clients for client-level DP, examples for DP-SGD), e.g. 1e-5"
        )
    return float(cast(float, delta))


def check_int(name: str, value: object, minimum: int) -> int:
    """``value``, which must be an ``int`` (not a ``bool``) ``>= minimum``.

    Raises
    ------
    ValueError
        Otherwise.

    Examples
    --------
    >>> check_int("steps", 3, 1)
    3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
