"""Local differential privacy: the client clips and noises its own update before sending it.

Guarantee: each release is ``(epsilon, delta)``-DP for the client's whole update, against
anyone who sees it, server included; nothing is trusted. Over ``R`` rounds the releases
compose (this module books nothing). Clipping and the calibration of the noise come from
the privacy core (:func:`privacy.clip_updates`, :func:`privacy.gaussian_sigma`).

References
----------
Dwork, Roth. "The Algorithmic Foundations of Differential Privacy". 2014, Thm. A.1.
Balle, Wang. "Improving the Gaussian Mechanism for Differential Privacy: Analytical
Calibration and Optimal Denoising". ICML 2018.
Sun, Qian, Chen. "LDP-FL: Practical Private Aggregation in Federated Learning with Local
Differential Privacy". IJCAI 2021.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from privacy import clip_updates, gaussian_noise, gaussian_sigma
from privacy.checks import check_nonnegative, check_positive

__all__ = ["local_dp_update"]


def local_dp_update(
    update: Tensor,
    clipping_norm: float,
    *,
    noise_std: float | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    method: Literal["analytic", "classic"] = "analytic",
    generator: torch.Generator,
) -> Tensor:
    """Local DP: clip the client's update to ``C`` and add Gaussian noise before sending.

    ``out = x min(1, C / ||x||) + N(0, sigma^2 I_d)``.

    Local DP must hold for *any* two updates the client could send, and two updates
    clipped to norm ``C`` differ by up to ``2 C``: the L2 sensitivity is ``Delta = 2 C``,
    so ``(epsilon, delta)`` gives ``sigma = gaussian_sigma(epsilon, delta, 2 C, method)``
    (classic: ``2 C sqrt(2 ln(1.25/delta)) / epsilon``, ``epsilon < 1``). (Flower's
    ``LocalDpMod`` calibrates with sensitivity ``C``, which covers add/remove of a zero
    update only.) Alternatively give ``noise_std`` directly (no guarantee is claimed).

    Parameters
    ----------
    update
        ``(d,)`` float, finite: the update the client would send.
    clipping_norm
        ``C > 0``.
    noise_std
        ``sigma >= 0``; exclusive with ``epsilon`` / ``delta``.
    epsilon, delta
        Per-release target; both or neither.
    method
        Calibration, see :func:`privacy.gaussian_sigma`.
    generator
        Source of the noise, on the update's device.

    Returns
    -------
    Tensor
        ``(d,)``, dtype and device of ``update``.

    Raises
    ------
    ValueError
        If the update is not a finite 1-D float tensor, ``C <= 0``, or the noise is not
        specified exactly one way (or as :func:`privacy.gaussian_sigma` raises).

    Examples
    --------
    >>> x = torch.tensor([3.0, 4.0])
    >>> out = local_dp_update(x, 1.0, noise_std=0.0, generator=torch.Generator())
    >>> torch.allclose(out, torch.tensor([0.6, 0.8])), float(out.norm()) <= 1.0
    (True, True)
    """
    if not isinstance(update, Tensor) or update.dim() != 1 or not update.is_floating_point():
        raise ValueError(
            "local_dp_update: update must be a 1-D floating-point tensor (d,), got "
            f"{type(update).__name__} {tuple(update.shape) if isinstance(update, Tensor) else ''}"
        )
    if not bool(torch.isfinite(update).all()):
        raise ValueError("local_dp_update: update contains NaN or Inf")
    c = check_positive("clipping_norm", clipping_norm)
    if noise_std is not None:
        if epsilon is not None or delta is not None:
            raise ValueError("give either noise_std or (epsilon, delta), not both")
        sigma = check_nonnegative("noise_std", noise_std)
    else:
        if epsilon is None or delta is None:
            raise ValueError(
                "local_dp_update needs noise_std, or both epsilon and delta: got "
                f"epsilon={epsilon!r}, delta={delta!r}"
            )
        sigma = gaussian_sigma(epsilon, delta, 2 * c, method=method)
    if generator.device.type != update.device.type:
        raise ValueError(
            f"generator is on {generator.device} but the update is on {update.device}"
        )
    clipped, _, _ = clip_updates(update.unsqueeze(0), c)  # (1, d)
    noise = gaussian_noise(update.numel(), sigma, generator=generator, dtype=update.dtype,
                           device=update.device)
    return clipped[0] + noise
