"""Quantisation of clipped, weighted updates to the ring ``Z_{2^k}`` and back.

Secure aggregation adds masked integers modulo ``2^k``; an update must become integers
first. Each coordinate is clipped to ``[-c, c]`` and rounded to the nearest of ``L + 1``
levels ``-c, -c + s, ..., c`` (step ``s = 2c / L``); client ``i`` uploads its level
``z_i`` times its integer weight ``w_i``. The server learns ``S = sum_i w_i z_i`` and
``W = sum_i w_i`` and decodes the weighted mean

.. math:: \\hat{x} = s \\, S / W - c, \\qquad
          |\\hat{x} - \\textstyle\\sum_i w_i \\mathrm{clip}(x_i) / W| \\le s / 2 = c / L

coordinate-wise (a weighted mean of per-client rounding errors, each at most ``s / 2``;
float64 arithmetic adds at most ``2^-46 c``, see :attr:`Quantiser.error_bound`).
Nothing wraps around as long as ``n \\cdot w_{max} \\cdot L < 2^k``, so ``L`` is chosen
per round as ``floor((2^k - 1) / (n \\, w_{max}))`` for the ``n`` clients of the round and
the public weight bound ``w_max``. Example: ``k = 32``, ``n = 100``, ``w_max = 1024``,
``c = 1``: ``L = 41943``, error at most ``2.4e-5`` per coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["Quantiser", "ring_dtype"]

MIN_BITS, MAX_BITS = 8, 64


def ring_dtype(bits: int) -> type[np.unsignedinteger]:
    """The unsigned dtype whose wrap-around arithmetic holds ``Z_{2^bits}``."""
    return np.uint32 if bits <= 32 else np.uint64


@dataclass(frozen=True)
class Quantiser:
    """Clip to ``[-clip, clip]``, round to ``levels + 1`` levels, weight, work mod ``2^bits``.

    Parameters
    ----------
    clip
        ``c > 0``, the coordinate-wise clipping range.
    bits
        ``k`` in ``[8, 64]``: arithmetic modulo ``2^k``; uploads are 4 bytes per coordinate
        for ``k <= 32``, else 8.
    levels
        ``L >= 2``; use :meth:`for_round`, which picks the largest ``L`` that cannot wrap.

    Examples
    --------
    >>> q = Quantiser.for_round(clip=1.0, bits=32, num_clients=2, max_weight=10)
    >>> a, _ = q.encode(np.array([0.5, -2.0]), weight=3)
    >>> b, _ = q.encode(np.array([0.1, 0.0]), weight=1)
    >>> np.round(q.decode(a + b, 4), 6)  # (3*0.5 + 0.1)/4, (3*-1 + 0)/4: -2 clipped to -1
    array([ 0.4 , -0.75])
    """

    clip: float
    bits: int
    levels: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise ValueError(f"secagg clip must be a finite number > 0, got {self.clip}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"secagg bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if self.levels < 2:
            raise ValueError(f"quantisation needs at least 2 levels, got {self.levels}")

    @classmethod
    def for_round(cls, *, clip: float, bits: int, num_clients: int, max_weight: int) -> Quantiser:
        """The finest quantiser for which ``num_clients`` weighted uploads cannot wrap.

        Raises
        ------
        ValueError
            If ``2^bits`` is too small for ``num_clients * max_weight * 2`` (raise ``bits``
            or lower ``max_weight``).
        """
        if num_clients < 1 or max_weight < 1:
            raise ValueError(
                f"need num_clients >= 1 and max_weight >= 1, got {num_clients}, {max_weight}")
        levels = (2**bits - 1) // (num_clients * max_weight)
        if levels < 2:
            raise ValueError(
                f"bits={bits} leaves {levels} quantisation levels for {num_clients} clients of "
                f"weight up to max_weight={max_weight}: raise bits or lower max_weight"
            )
        return cls(clip=float(clip), bits=bits, levels=levels)

    @property
    def step(self) -> float:
        """``s = 2c / L``, the distance between two levels."""
        return 2 * self.clip / self.levels

    @property
    def error_bound(self) -> float:
        """``s / 2 + 2^-46 c``: the largest coordinate error of the decoded mean of clipped
        updates (the second term is float64 rounding, which matters only for ``bits > 45``)."""
        return self.step / 2 + self.clip * 2.0**-46

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return ring_dtype(self.bits)

    @property
    def modulus_mask(self) -> int:
        return (1 << self.bits) - 1

    def reduce(self, x: NDArray[np.unsignedinteger]) -> NDArray[np.unsignedinteger]:
        """``x mod 2^bits`` for a ring array (a no-op when ``bits`` fills the dtype)."""
        if self.bits in (32, 64):
            return x
        return x & self.dtype(self.modulus_mask)

    def encode(
        self, update: NDArray[np.floating], weight: int
    ) -> tuple[NDArray[np.unsignedinteger], int]:
        """``(w z, clipped)``: the weighted levels ``(d,)`` and how many coordinates were clipped.

        Raises
        ------
        ValueError
            If the update is not finite or the weight is not a positive integer.
        """
        if isinstance(weight, bool) or int(weight) != weight or weight < 1:
            raise ValueError(f"secagg weights must be positive integers, got {weight!r}")
        x = np.asarray(update, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError("the update contains NaN or Inf; it cannot be quantised")
        clipped = np.clip(x, -self.clip, self.clip)
        num_clipped = int(np.count_nonzero(clipped != x))
        # levels in [0, L]; above 2^53 levels float64 cannot hold L itself, and the top of
        # the range rounds past it (bits=64, L ~ 3.7e17: z = L + 8, and a weight of 50 then
        # wrapped the sum to -clip): capped at the largest float64 <= L, a change of at most
        # 2^-52 L levels, inside error_bound's rounding term
        z = np.minimum(np.rint((clipped + self.clip) / self.step), self._top_level)
        return (z.astype(self.dtype) * self.dtype(int(weight))), num_clipped

    @property
    def _top_level(self) -> float:
        """The largest float64 that is at most ``levels`` (``levels`` itself up to 2^53)."""
        top = float(self.levels)
        return top if int(top) <= self.levels else float(np.nextafter(top, 0.0))

    def decode(self, total: NDArray[np.unsignedinteger], weight: int) -> NDArray[np.float64]:
        """The weighted mean ``(d,)`` float64 from ``S = sum_i w_i z_i`` and ``W = sum_i w_i``."""
        if weight < 1:
            raise ValueError(f"total weight must be >= 1, got {weight}")
        return self.step * (np.asarray(total).astype(np.float64) / weight) - self.clip
