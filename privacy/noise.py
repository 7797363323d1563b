"""Gaussian noise from a ``torch.Generator``, and its calibration to ``(epsilon, delta)``.

Floating-point Gaussian sampling from a seeded pseudo-random generator is fine for
research but is not a hardened DP implementation [Mironov, 2012]: do not use it to protect
real data as is.

References
----------
Dwork, Roth. "The Algorithmic Foundations of Differential Privacy". 2014, Thm. A.1.
Balle, Wang. "Improving the Gaussian Mechanism for Differential Privacy: Analytical
Calibration and Optimal Denoising". ICML 2018.
Mironov. "On Significance of the Least Significant Bits for Differential Privacy". CCS 2012.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .checks import check_delta, check_int, check_positive, is_real

__all__ = ["gaussian_noise", "gaussian_sigma"]


def gaussian_noise(
    d: int,
    std: float,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``N(0, std^2 I_d)`` noise drawn from ``generator``.

    Parameters
    ----------
    d
        Dimension, ``>= 0``.
    std
        Standard deviation ``>= 0`` (``0`` gives zeros but still advances the generator,
        so the stream does not depend on the value).
    generator
        Source of randomness; must live on ``device``.
    dtype, device
        Of the result; ``device`` defaults to the generator's device.

    Returns
    -------
    Tensor
        ``(d,)``.

    Raises
    ------
    ValueError
        If ``d < 0``, ``std`` is negative or not finite, or the generator is on another
        device.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> bool((gaussian_noise(3, 0.0, generator=g) == 0).all())
    True
    >>> gaussian_noise(3, 2.0, generator=g, dtype=torch.float64).shape
    torch.Size([3])
    """
    check_int("d", d, 0)
    if not is_real(std) or not math.isfinite(std) or std < 0:
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
    dev = torch.device(device) if device is not None else generator.device
    if dev.type != generator.device.type:
        raise ValueError(
            f"generator is on {generator.device} but the noise is asked for on {dev}: "
            f"create the generator with torch.Generator(device={str(dev)!r})"
        )
    return torch.randn(d, generator=generator, dtype=dtype, device=dev) * std


def _analytic_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    from scipy import special

    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    return float(special.ndtr(a - b) - math.exp(epsilon + special.log_ndtr(-a - b)))


def gaussian_sigma(
    epsilon: float,
    delta: float,
    sensitivity: float,
    *,
    method: Literal["analytic", "classic"] = "analytic",
) -> float:
    """Noise standard deviation making one Gaussian release ``(epsilon, delta)``-DP.

    ``"classic"`` [Dwork & Roth, 2014, Thm. A.1]: ``sigma = Delta sqrt(2 ln(1.25/delta))
    / epsilon``, proven for ``epsilon < 1`` only.

    ``"analytic"`` [Balle & Wang, 2018, Thm. 8]: the smallest ``sigma`` with

    ``Phi(Delta/(2 sigma) - epsilon sigma/Delta)
    - e^epsilon Phi(-Delta/(2 sigma) - epsilon sigma/Delta) <= delta``,

    exact for every ``epsilon > 0`` and never larger than the classic value.

    Parameters
    ----------
    epsilon, delta
        Target, ``epsilon > 0``, ``delta`` in ``(0, 1)``.
    sensitivity
        L2 sensitivity ``Delta > 0``.
    method
        ``"analytic"`` or ``"classic"``.

    Returns
    -------
    float
        ``sigma > 0``.

    Raises
    ------
    ValueError
        On out-of-range arguments, or ``method="classic"`` with ``epsilon >= 1``.

    Examples
    --------
    >>> round(gaussian_sigma(0.5, 1e-5, 1.0, method="classic"), 4)
    9.6896
    >>> gaussian_sigma(0.5, 1e-5, 1.0) < 9.6896
    True
    """
    eps = check_positive("epsilon", epsilon)
    d = check_delta(delta)
    sens = check_positive("sensitivity", sensitivity)
    if method == "classic":
        if eps >= 1:
            raise ValueError(
                f"the classic Gaussian calibration is proven for epsilon < 1 only, got "
                f"epsilon={eps}: use method='analytic' (Balle & Wang 2018)"
            )
        return sens * math.sqrt(2 * math.log(1.25 / d)) / eps
    if method != "analytic":
        raise ValueError(f"unknown method {method!r}; valid: analytic, classic")
    from scipy import optimize

    lo, hi = sens, sens
    while _analytic_delta(lo, eps, sens) <= d:
        lo /= 2
    while _analytic_delta(hi, eps, sens) > d:
        hi *= 2
    root = optimize.brentq(
        lambda s: _analytic_delta(s, eps, sens) - d, lo, hi, xtol=1e-14 * hi, rtol=1e-14,
        maxiter=500,
    )
    # brentq may land a hair below the root; step up until the condition holds.
    sigma = float(root)
    while _analytic_delta(sigma, eps, sens) > d:
        sigma = math.nextafter(sigma, math.inf)
    return sigma
