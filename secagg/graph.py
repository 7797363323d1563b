"""The neighbour graph of SecAgg+ [Bell et al., CCS 2020] and the per-client threshold.

Each client masks with, and shares its secrets among, its neighbours only. With every other
client as neighbour this is the original SecAgg [Bonawitz et al., CCS 2017] (``O(n)`` masks
per client); with ``k = O(log n)`` neighbours in a random Harary graph it is SecAgg+
(``O(log n)``). The graph is a function of the members and a public seed, so every party
computes the same one and a client checks its neighbour list itself.

The Harary graph ``H(n, k)``: order the members by ``SHA-256(seed || id)`` (a random order
that any Python, NumPy or torch version computes identically) and join each to the
``k / 2`` next members on either side of the circle (``k`` rounded up to even).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

__all__ = ["neighbour_count", "neighbours", "threshold_for"]


def neighbour_count(spec: int | str, n: int) -> int:
    """``k`` for ``n`` members: ``"all"`` -> ``n - 1``; ``"log"`` -> ``2 ceil(log2 n)``; an
    int ``k >= 1`` as given (rounded up to even); never more than ``n - 1``.

    Raises
    ------
    ValueError
        An unknown spec, or ``k < 1``.
    """
    if n < 2:
        return 0
    if spec == "all":
        k = n - 1
    elif spec == "log":
        k = 2 * math.ceil(math.log2(n))
    elif isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        k = spec + spec % 2
    else:
        raise ValueError(f"secagg neighbours must be 'all', 'log' or an int >= 1, got {spec!r}")
    return min(k, n - 1)


def neighbours(members: Sequence[int], k: int, seed: int) -> dict[int, frozenset[int]]:
    """Each member's neighbours in the random Harary graph ``H(n, k)`` (symmetric).

    Examples
    --------
    >>> g = neighbours([5, 6, 7, 8, 9], 2, seed=0)
    >>> sorted(len(v) for v in g.values()), all(a in g[b] for a in g for b in g[a])
    ([2, 2, 2, 2, 2], True)
    """
    ids = sorted(set(members))
    if len(ids) != len(members):
        raise ValueError("graph members must be distinct")
    n = len(ids)
    if k >= n - 1:
        return {i: frozenset(j for j in ids if j != i) for i in ids}
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    half = (k + 1) // 2
    out: dict[int, set[int]] = {i: set() for i in ids}
    for p, i in enumerate(order):
        for step in range(1, half + 1):
            j = order[(p + step) % n]
            out[i].add(j)
            out[j].add(i)
    return {i: frozenset(v) for i, v in out.items()}


def threshold_for(spec: int | float, k: int) -> int:
    """``t``, the shares needed out of ``k``: an int is absolute, a float ``q`` in ``(0, 1]``
    gives ``ceil(q k)`` (at least 1).

    Raises
    ------
    ValueError
        A spec out of range, or an absolute ``t > k``.
    """
    if isinstance(spec, bool):
        raise ValueError(f"secagg threshold must be an int or a float, got {spec!r}")
    if isinstance(spec, int):
        if not 1 <= spec <= max(k, 1):
            raise ValueError(
                f"secagg threshold={spec} shares but a client has only {k} neighbours to hold "
                "them: lower threshold, give a fraction, or raise neighbours")
        return spec
    if not 0 < spec <= 1:
        raise ValueError(f"a fractional secagg threshold must be in (0, 1], got {spec}")
    return max(1, math.ceil(spec * k - 1e-9))
