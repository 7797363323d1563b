"""Where a client's batch order comes from: a seeded generator, or a counter-based hash.

A client shuffles its examples once per epoch. The run config's ``batch-order`` says how:

- ``"generator"`` (the default): client ``k`` draws from its own ``torch.Generator``
  (Mersenne Twister) seeded from the run seed, its partition and the round: first the seed
  of its dropout RNG, then one ``randperm`` per epoch. Drawing is sequential per client,
  a few tensor operations each: at a thousand clients a round, tens of milliseconds.
- ``"hashed"``: epoch ``e``'s order of client ``k`` sorts its examples ``i`` by a hash of
  ``(round seed, k, e, i)`` (:func:`hashed_permutations`). Every key is a function of its
  own coordinates, so one client's order and a thousand clients' orders come out of the
  same tensor operations, a fixed number of them per round whatever the number of
  clients: what the batched engine wants (:mod:`simulations.batched`). One client alone
  gets exactly the order it gets among a thousand.

Both are reproducible from the run seed; they give different orders, so a run's results
depend on the setting (it is saved with the run config like every other key).

The hash is multiply-xorshift mixing (the shape of Wellons' "lowbias32", 2018) over 31-bit
words, computed in int64 without overflow; two streams from different starting words make
a 62-bit sort key; ties (about one in 2**62 per pair) keep the examples' order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from aggregation.registry import derive_seed
from runconfig.config import BATCH_ORDERS

__all__ = [
    "BATCH_ORDERS",
    "BatchSource",
    "HashedOrder",
    "draw_permutations",
    "hashed_permutations",
    "hashed_round_seed",
    "segments",
]

_M31 = 0x7FFFFFFF
_STREAMS = (0x1E3779B9, 0x05EBCA6B)  # the two streams' starting words (any distinct ones)
_MAX_ROWS = 1 << 31  # an example's index is one 31-bit word


class HashedOrder(NamedTuple):
    """A client's hashed batch order: the round's seed (:func:`hashed_round_seed`) and the
    client's key (its partition id; -1 for a node with its own data). (A named tuple: a
    round makes one per client.)"""

    seed: int
    client: int

    def dropout_seed(self) -> int:
        """The seed of the client's dropout RNG this round (``local_train`` forks it)."""
        return derive_seed(self.seed, "dropout", self.client)


BatchSource = torch.Generator | HashedOrder
"""What a client's batch order is drawn from (``batch-order``)."""


@functools.lru_cache(maxsize=64)
def hashed_round_seed(run_seed: int, server_round: int) -> int:
    """The seed of every client's hashed batch order in ``server_round``."""
    return derive_seed(run_seed, "batch-order", "round", server_round)


def _mix(x: Tensor) -> Tensor:
    """Multiply-xorshift mixing of int64 holding 31-bit words: a bijection of
    ``[0, 2**31)`` (xorshifts, and products by odd constants modulo ``2**31``; the
    products stay below ``2**62``, so no int64 overflows). lowbias32's shifts and first
    constant, odd constants below ``2**31``."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M31
    x = x ^ (x >> 15)
    x = (x * 0x046CA68B) & _M31
    return x ^ (x >> 16)


def _words(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Int64 ``v`` (two's complement) as three words of 31, 31 and 2 bits."""
    return v & _M31, (v >> 31) & _M31, (v >> 62) & 3


def segments(sizes: Tensor, epochs: int) -> tuple[Tensor, Tensor]:
    """The layout of K clients' epochs, client after client, epoch after epoch: for each of
    the ``epochs * sum(sizes)`` places, its segment ``client * epochs + epoch`` and its
    index in the segment. ``sizes``: ``(K,)`` int64."""
    seg = sizes.repeat_interleave(epochs)  # (K*E,) the length of each segment
    segment = torch.repeat_interleave(seg)  # (T,)
    start = torch.cumsum(seg, 0) - seg
    return segment, torch.arange(segment.numel()) - start[segment]


def hashed_permutations(
    seed: int, clients: Sequence[int] | Tensor, sizes: Sequence[int] | Tensor, epochs: int
) -> Tensor:
    """Every client's permutation of its examples for every epoch, concatenated.

    Client ``k`` (key ``clients[k]``, ``sizes[k]`` examples) has one permutation of
    ``range(sizes[k])`` per epoch; the result holds them client after client, epoch after
    epoch: ``(epochs * sum(sizes),)`` int64. Each permutation sorts ``i`` by
    ``key(seed, clients[k], e, i)``, so a client's permutations do not depend on the other
    clients given with it.

    Raises
    ------
    ValueError
        ``clients`` and ``sizes`` of different lengths, a negative size, a client of
        ``2**31`` examples or more, or ``epochs < 1``.

    Examples
    --------
    >>> p = hashed_permutations(7, [3, 5], [4, 2], 2)
    >>> sorted(p[:4].tolist()), sorted(p[8:10].tolist())
    ([0, 1, 2, 3], [0, 1])
    >>> torch.equal(p[8:12], hashed_permutations(7, [5], [2], 2))  # alone, the same
    True
    """
    client_t = torch.as_tensor(clients, dtype=torch.int64).reshape(-1)
    n = torch.as_tensor(sizes, dtype=torch.int64).reshape(-1)
    if client_t.numel() != n.numel() or epochs < 1 or bool((n < 0).any()):
        raise ValueError(
            f"hashed_permutations needs one size >= 0 per client and epochs >= 1, got "
            f"{client_t.numel()} clients, sizes {n.tolist()[:5]}..., epochs={epochs}")
    if bool((n >= _MAX_ROWS).any()):
        raise ValueError(f"hashed_permutations handles clients of fewer than 2**31 examples, "
                         f"got {int(n.max())}")
    segment, i = segments(n, epochs)
    client, epoch = segment // epochs, segment % epochs
    words = _words(torch.tensor(seed & ((1 << 63) - 1), dtype=torch.int64))
    starts = torch.tensor(_STREAMS, dtype=torch.int64).unsqueeze(1)  # (2, 1): two streams
    h = starts
    for w in (*words, *_words(client_t)):  # (2, K) per client
        h = _mix(h ^ w)
    h = h[:, client]  # (2, T)
    h = _mix(_mix(h ^ epoch) ^ i)
    key = (h[0] << 31) | h[1]  # 62 bits
    by_key = torch.sort(key, stable=True).indices
    by_segment = torch.sort(segment[by_key], stable=True).indices
    return i[by_key[by_segment]]


def draw_permutations(sources: Sequence[BatchSource], sizes: Sequence[int], epochs: int
                      ) -> Tensor:
    """What ``local_train`` draws from each client's source, every client's permutations
    concatenated as :func:`hashed_permutations` lays them out.

    A generator gives first its dropout seed (drawn and dropped here, as ``local_train``
    draws it before the batches), then one ``randperm`` per epoch; hashed orders sharing a
    seed are computed together.

    Raises
    ------
    ValueError
        ``sources`` and ``sizes`` of different lengths, or hashed orders of different seeds.
    """
    if len(sources) != len(sizes):
        raise ValueError(f"one source per client: got {len(sources)} sources, {len(sizes)} sizes")
    hashed = [s for s in sources if isinstance(s, HashedOrder)]
    if len(hashed) == len(sources) and hashed:
        seeds = {s.seed for s in hashed}
        if len(seeds) != 1:
            raise ValueError(f"hashed orders of one round share its seed, got {len(seeds)} seeds")
        return hashed_permutations(hashed[0].seed, [s.client for s in hashed], sizes, epochs)
    draws: list[Tensor] = []
    for source, size in zip(sources, sizes, strict=True):
        if isinstance(source, HashedOrder):
            draws.append(hashed_permutations(source.seed, [source.client], [size], epochs))
        else:
            torch.randint(0, 2**62, (1,), generator=source)  # local_train's dropout seed
            draws.extend(torch.randperm(size, generator=source) for _ in range(epochs))
    return torch.cat(draws) if draws else torch.zeros(0, dtype=torch.int64)
