"""Distributed DP under secure aggregation: each client adds its share of discrete Gaussian
noise to its quantised update before masking [Kairouz et al., 2021].

With ``noise_multiplier = z > 0`` a client

1. clips its update to L2 norm ``C`` (every coordinate is then in ``[-C, C]``);
2. rounds it to integers on the grid of step ``s = 2C / L`` (``L`` even):
   ``u = rint(x / s) + L / 2`` in ``[0, L]``;
3. adds ``N_Z(0, sigma^2 / t)`` to every coordinate, the discrete Gaussian [Canonne,
   Kamath, Steinke, 2020] drawn from its own seeded generator, where ``t`` is the
   protocol's threshold (the client computes ``t`` itself at share-keys);
4. masks the result modulo ``2^bits`` as usual; its weight is 1 (DP-FedAvg's unweighted
   mean) and its clipped count 0 (a count of clipped clients would be an un-noised
   statistic).

The protocol unmasks only sums over at least ``t`` survivors, so the sum holds noise of
variance ``n_s sigma^2 / t >= sigma^2``. With
``Delta = L / 2 + sqrt(d) / 2 + 1`` (the L2 distance between the integer vectors of a
clipped update and of a zero update: ``||x|| / s <= L / 2`` plus ``1/2`` rounding per
coordinate, plus a margin of 1 for float64 rounding) and ``sigma = z Delta``, the sum is a
Gaussian mechanism with noise multiplier at least ``z``: the accountant books ``z`` (see
``docs/secagg.md`` for what is proven and what is not).

Decoding: the sum of ``n <= num_clients`` values in ``[0, L]`` plus noise within
``H = 12 sigma sqrt(num_clients)`` of zero (12 standard deviations at ``t = 1``, the worst
case) lies in ``[-H, n L + H]``; ``L`` is chosen so that this range is shorter than
``2^bits``, so the residue modulo ``2^bits`` determines the integer sum.

References
----------
Kairouz, Liu, Steinke. "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation". ICML 2021.
Agarwal, Kairouz, Liu. "The Skellam Mechanism for Differentially Private Federated
Learning". NeurIPS 2021.
Canonne, Kamath, Steinke. "The Discrete Gaussian for Differential Privacy". NeurIPS 2020.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .quantise import Quantiser, ring_dtype

__all__ = ["TAIL_SIGMAS", "DistributedDP", "discrete_gaussian", "sum_divergence_tau"]

TAIL_SIGMAS = 12  # headroom of the ring for the noise: P(|N(0,1)| > 12) < 4e-33
MAX_DP_BITS = 48  # the decoded integer sum must be exact in float64


def discrete_gaussian(size: int, variance: float, rng: np.random.Generator) -> NDArray[np.int64]:
    """``(size,)`` draws of the discrete Gaussian ``N_Z(0, variance)`` [Canonne et al., 2020].

    ``P(x) ~ exp(-x^2 / (2 variance))`` on the integers, by rejection from the discrete
    Laplace of scale ``floor(sqrt(variance)) + 1`` (their Algorithm 3), vectorised; the
    discrete Laplace is the difference of two geometric variables. The acceptance test uses
    float64 ``exp``: a research implementation, not a hardened one (see
    :mod:`privacy.noise`).

    Raises
    ------
    ValueError
        If ``variance`` is not a finite number ``> 0`` or ``size < 0``.

    Examples
    --------
    >>> x = discrete_gaussian(100_000, 25.0, np.random.default_rng(0))
    >>> x.dtype, bool(abs(x.var() - 25.0) < 0.5), bool(abs(x.mean()) < 0.05)
    (dtype('int64'), True, True)
    """
    if not (math.isfinite(variance) and variance > 0):
        raise ValueError(f"discrete Gaussian variance must be a finite number > 0, got {variance}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    scale = math.floor(math.sqrt(variance)) + 1
    p = -math.expm1(-1.0 / scale)  # success probability: P(k failures) ~ exp(-k / scale)
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        k = todo.size
        y = rng.geometric(p, k) - rng.geometric(p, k)
        accept = rng.random(k) < np.exp(-((np.abs(y) - variance / scale) ** 2) / (2 * variance))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out


def sum_divergence_tau(client_variance: float, t: int) -> float:
    """``tau = 10 sum_{k=1}^{t-1} exp(-2 pi^2 v k / (k + 1))`` [Kairouz et al., 2021, Thm. 1]:
    how far the sum of ``t`` draws of ``N_Z(0, v)`` may be from ``N_Z(0, t v)`` in their
    concentrated-DP bound (``0.0`` in float64 once ``v`` exceeds a few units).

    Examples
    --------
    >>> sum_divergence_tau(1e6, 10)
    0.0
    >>> round(sum_divergence_tau(1.0, 10), 6)
    0.000544
    """
    return 10.0 * sum(math.exp(-2 * math.pi**2 * client_variance * k / (k + 1))
                      for k in range(1, t))


@dataclass(frozen=True)
class DistributedDP:
    """The distributed discrete Gaussian of one round (see the module docstring).

    Use :meth:`for_round`. ``levels`` ``L`` is even; the grid step is ``2 clip / L``.

    Examples
    --------
    >>> dp = DistributedDP.for_round(clip=1.0, noise_multiplier=1.0, bits=32,
    ...                              num_clients=10, dim=4)
    >>> dp.levels, round(dp.sigma / dp.sensitivity, 12)
    (89576770, 1.0)
    >>> u = dp.encode(np.array([3.0, 4.0, 0.0, 0.0]))  # clipped to norm 1: (0.6, 0.8, 0, 0)
    >>> np.round(dp.decode_sum(u, 1), 6)
    array([0.6, 0.8, 0. , 0. ])
    """

    clip: float
    noise_multiplier: float
    bits: int
    levels: int
    num_clients: int
    dim: int

    @classmethod
    def for_round(cls, *, clip: float, noise_multiplier: float, bits: int, num_clients: int,
                  dim: int) -> DistributedDP:
        """The finest grid for which ``num_clients`` noised uploads decode without ambiguity.

        Raises
        ------
        ValueError
            If a parameter is out of range or ``2^bits`` leaves fewer than 2 levels (raise
            ``bits`` or lower the noise).
        """
        z = float(noise_multiplier)
        if not (math.isfinite(z) and z > 0):
            raise ValueError(f"distributed DP needs noise_multiplier > 0, got {noise_multiplier}")
        if not 8 <= bits <= MAX_DP_BITS:
            raise ValueError(f"distributed DP needs secagg bits in [8, {MAX_DP_BITS}] (the "
                             f"decoded sum must be exact in float64), got {bits}")
        if num_clients < 1 or dim < 1:
            raise ValueError(f"need num_clients >= 1 and dim >= 1, got {num_clients}, {dim}")
        # n L + 2 H <= 2^bits - 1 with H = TAIL z sqrt(n) (L/2 + r), r = sqrt(d)/2 + 1
        root_n, r = math.sqrt(num_clients), math.sqrt(dim) / 2 + 1
        room = 2**bits - 1 - 2 * TAIL_SIGMAS * z * root_n * r
        levels = int(room // (num_clients + TAIL_SIGMAS * z * root_n)) if room > 0 else 0
        levels -= levels % 2
        if levels < 2:
            raise ValueError(
                f"bits={bits} leaves {levels} quantisation levels for {num_clients} clients "
                f"with d={dim} and noise_multiplier={z}: raise secagg bits")
        return cls(clip=float(clip), noise_multiplier=z, bits=bits, levels=levels,
                   num_clients=num_clients, dim=dim)

    def __post_init__(self) -> None:
        Quantiser(clip=self.clip, bits=self.bits, levels=self.levels)  # checks clip and bits
        if self.levels % 2:
            raise ValueError(f"distributed DP needs an even number of levels, got {self.levels}")

    @property
    def step(self) -> float:
        """``s = 2C / L``."""
        return 2 * self.clip / self.levels

    @property
    def sensitivity(self) -> float:
        """``Delta = L/2 + sqrt(d)/2 + 1``: the L2 distance, on the integer grid, between a
        client's encoded update and the encoded zero update."""
        return self.levels / 2 + math.sqrt(self.dim) / 2 + 1

    @property
    def sigma(self) -> float:
        """``z Delta``: standard deviation of the noise any ``t`` survivors' sum holds."""
        return self.noise_multiplier * self.sensitivity

    @property
    def headroom(self) -> float:
        """``H``: the noise of up to ``num_clients`` shares of ``sigma^2`` stays within it."""
        return TAIL_SIGMAS * self.sigma * math.sqrt(self.num_clients)

    def client_variance(self, t: int) -> float:
        """``sigma^2 / t``: each client's share, so that any ``t`` survivors give ``sigma^2``."""
        if t < 1:
            raise ValueError(f"threshold t must be >= 1, got {t}")
        return self.sigma**2 / t

    def error_bound(self, survivors: int) -> float:
        """Largest coordinate rounding error of the decoded sum (noise aside): ``n s / 2``."""
        return survivors * self.step / 2

    def encode(self, update: NDArray[np.floating]) -> NDArray[np.unsignedinteger]:
        """``(d,)`` ring elements: the L2-clipped update on the integer grid, in ``[0, L]``.

        Raises
        ------
        ValueError
            If the update is not ``(dim,)`` or not finite.
        """
        x = np.asarray(update, dtype=np.float64)
        if x.shape != (self.dim,):
            raise ValueError(f"update has shape {x.shape}, expected ({self.dim},)")
        if not np.isfinite(x).all():
            raise ValueError("the update contains NaN or Inf; it cannot be quantised")
        norm = float(np.linalg.norm(x))
        if norm > self.clip:
            x = x * (self.clip / norm)
        x = np.clip(x, -self.clip, self.clip)  # a contraction: float rounding of the scaling
        u = np.rint(x / self.step).astype(np.int64) + self.levels // 2
        return u.astype(ring_dtype(self.bits))

    def noise(self, t: int, rng: np.random.Generator) -> NDArray[np.unsignedinteger]:
        """``(d,)`` draws of ``N_Z(0, sigma^2 / t)`` as ring elements (two's complement)."""
        e = discrete_gaussian(self.dim, self.client_variance(t), rng)
        return self._reduce(e.astype(np.uint64).astype(ring_dtype(self.bits)))

    def _reduce(self, x: NDArray[np.unsignedinteger]) -> NDArray[np.unsignedinteger]:
        return Quantiser(clip=self.clip, bits=self.bits, levels=self.levels).reduce(x)

    def decode_sum(self, total: NDArray[np.unsignedinteger], survivors: int
                   ) -> NDArray[np.float64]:
        """``(d,)`` float64: the sum of the ``survivors`` clipped updates plus the noise.

        Raises
        ------
        ValueError
            If ``survivors`` is outside ``[1, num_clients]``.
        """
        if not 1 <= survivors <= self.num_clients:
            raise ValueError(f"survivors must be in [1, {self.num_clients}], got {survivors}")
        h = math.ceil(self.headroom)
        dtype = ring_dtype(self.bits)
        shifted = self._reduce(np.asarray(total, dtype=dtype) + dtype(h))  # in [0, n L + 2H]
        integer = shifted.astype(np.int64) - h - survivors * (self.levels // 2)
        return self.step * integer.astype(np.float64)
