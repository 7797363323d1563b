"""Partition a labelled training set among ``n`` simulated clients.

``partition(name, labels, n, generator=g, **params)`` returns ``n`` int64 index tensors
that are pairwise disjoint and together cover every sample exactly once: a scheme that
cannot place every sample raises instead of dropping any.

Schemes (the ``PARTITIONERS`` registry)
---------------------------------------
``iid``
    A uniformly random split into sizes that differ by at most one.
``dirichlet(alpha, min_size=1)``
    Label skew: each class is split among the clients by proportions drawn from a
    symmetric Dirichlet [Yurochkin et al., 2019; Hsu et al., 2019]. Small ``alpha`` gives
    each client few classes; large ``alpha`` approaches ``iid``.
``shards(shards_per_client=2)``
    Pathological non-IID [McMahan et al., 2017]: sort by label, cut into
    ``n * shards_per_client`` shards, deal ``shards_per_client`` random shards to each
    client.

All randomness comes from the ``torch.Generator`` argument: one 62-bit seed is drawn from
it and drives a numpy ``Generator``, so a generator in the same state gives the same
partition on any device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from aggregation.catalog import Factory, register_function
from aggregation.registry import Registry

__all__ = ["PARTITIONERS", "dirichlet", "iid", "label_counts", "partition", "shards"]

IntArray = npt.NDArray[np.int64]
PartitionFn = Callable[..., list[IntArray]]
"""A kernel ``fn(labels (N,) int64, n, rng, /, **params) -> n index arrays``."""

PARTITIONERS: Registry[Factory[PartitionFn]] = Registry("partitioner")
"""``PARTITIONERS.build(name, **params)`` is the kernel with its hyperparameters bound."""

_DIRICHLET_MAX_TRIES = 1000


def partition(
    name: str,
    labels: Tensor,
    num_clients: int,
    *,
    generator: torch.Generator,
    **params: Any,
) -> list[Tensor]:
    """Split the sample indices ``0..N-1`` among ``num_clients`` clients by scheme ``name``.

    Parameters
    ----------
    name
        ``iid``, ``dirichlet`` or ``shards`` (``PARTITIONERS.names()``).
    labels
        ``(N,)`` integer class labels, non-negative.
    num_clients
        ``n``, with ``1 <= n <= N``.
    generator
        Source of all randomness; it is advanced by one draw.
    **params
        The scheme's hyperparameters (``alpha``, ``min_size``, ``shards_per_client``).

    Returns
    -------
    list[Tensor]
        ``n`` tensors of int64 indices on ``labels.device``, each sorted ascending,
        pairwise disjoint, whose union is ``{0, ..., N-1}``.

    Raises
    ------
    KeyError
        Unknown scheme (the message lists the valid ones).
    TypeError
        Unknown hyperparameter, or ``labels`` is not an integer tensor.
    ValueError
        ``labels`` not 1-d, empty or negative; ``num_clients`` outside ``[1, N]``; a
        hyperparameter out of range; or a scheme that cannot satisfy its constraints.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> parts = partition("iid", torch.arange(10) % 2, 3, generator=g)
    >>> sorted(len(p) for p in parts)
    [3, 3, 4]
    >>> torch.cat(parts).sort().values.tolist() == list(range(10))
    True
    """
    fn = PARTITIONERS.build(name, **params)
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-d (N,), got shape {tuple(labels.shape)}")
    n_samples = int(labels.shape[0])
    if n_samples == 0:
        raise ValueError("labels is empty: there is nothing to partition")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative class indices, got min {int(labels.min())}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int):
        raise TypeError(f"num_clients must be an int, got {num_clients!r}")
    if not 1 <= num_clients <= n_samples:
        raise ValueError(
            f"partition needs 1 <= num_clients <= N, got num_clients={num_clients}, "
            f"N={n_samples}: lower num_clients or use more data"
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    rng = np.random.default_rng(seed)
    y = labels.detach().to("cpu", torch.int64).numpy()
    parts = fn(y, num_clients, rng)
    _check_cover(name, parts, n_samples, num_clients)
    return [torch.from_numpy(np.sort(p).astype(np.int64)).to(labels.device) for p in parts]


def _check_cover(name: str, parts: Sequence[IntArray], n_samples: int, n: int) -> None:
    """Every index in ``0..N-1`` appears in exactly one part (a kernel bug otherwise)."""
    if len(parts) != n:
        raise RuntimeError(f"partitioner {name!r} returned {len(parts)} parts for n={n}")
    counts = np.bincount(np.concatenate(parts), minlength=n_samples) if parts else np.zeros(0)
    if counts.shape[0] != n_samples or not (counts == 1).all():
        raise RuntimeError(
            f"partitioner {name!r} did not place every sample exactly once; this is a bug"
        )


def label_counts(labels: Tensor, parts: Sequence[Tensor], num_classes: int) -> Tensor:
    """Per-client label histogram: ``counts[i, k] = |{j in parts[i] : labels[j] = k}|``.

    Returns
    -------
    Tensor
        ``(n, num_classes)`` int64 on ``labels.device``.

    Raises
    ------
    ValueError
        If a label is outside ``[0, num_classes)``.

    Examples
    --------
    >>> y = torch.tensor([0, 1, 1, 2])
    >>> label_counts(y, [torch.tensor([0, 1]), torch.tensor([2, 3])], 3).tolist()
    [[1, 1, 0], [0, 1, 1]]
    """
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}"
        )
    rows = [torch.bincount(labels[p].long(), minlength=num_classes) for p in parts]
    if not rows:
        return torch.zeros(0, num_classes, dtype=torch.int64, device=labels.device)
    return torch.stack(rows)


@register_function(PARTITIONERS, "iid")
def iid(labels: IntArray, n: int, rng: np.random.Generator, /) -> list[IntArray]:
    """IID partition: a uniformly random permutation cut into ``n`` near-equal blocks.

    Client sizes are ``floor(N / n)`` or ``ceil(N / n)``, so they differ by at most one.

    Returns
    -------
    list of ``n`` int64 index arrays.

    Examples
    --------
    >>> parts = iid(np.zeros(7, np.int64), 2, np.random.default_rng(0))
    >>> [len(p) for p in parts]
    [4, 3]
    """
    return [p.astype(np.int64) for p in np.array_split(rng.permutation(labels.shape[0]), n)]


@register_function(PARTITIONERS, "dirichlet")
def dirichlet(
    labels: IntArray, n: int, rng: np.random.Generator, /, *, alpha: float, min_size: int = 1
) -> list[IntArray]:
    """Dirichlet label skew [Yurochkin et al., 2019; Hsu et al., 2019].

    For each class ``k`` with ``N_k`` samples draw ``p_k ~ Dir(alpha * 1_n)`` and give
    client ``i`` the samples of class ``k`` at positions
    ``[round(N_k * c_{i-1}), round(N_k * c_i))`` of a random permutation, where
    ``c_i = p_k1 + ... + p_ki`` (so every sample is placed). The whole draw is repeated,
    up to 1000 times, until every client holds at least ``min_size`` samples.

    Parameters
    ----------
    alpha
        Concentration, ``> 0``: 0.1 is strongly skewed, 100 is close to IID.
    min_size
        Smallest acceptable client size, ``>= 0`` and ``n * min_size <= N``. With 0 a
        client may get no data: the partition is still made, but the simulation engine
        refuses a run with an empty partition (its client could never train).

    Returns
    -------
    list of ``n`` int64 index arrays.

    Raises
    ------
    ValueError
        ``alpha <= 0``, ``min_size`` out of range, or no draw in 1000 met ``min_size``.

    Examples
    --------
    >>> y = np.repeat(np.arange(4), 25)
    >>> parts = dirichlet(y, 5, np.random.default_rng(0), alpha=0.5)
    >>> sum(len(p) for p in parts)
    100
    """
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"dirichlet needs alpha > 0, got alpha={alpha}: try 0.5")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"dirichlet needs an int min_size >= 0, got min_size={min_size!r}")
    n_samples = labels.shape[0]
    if n * min_size > n_samples:
        raise ValueError(
            f"dirichlet cannot give each of n={n} clients min_size={min_size} samples out of "
            f"N={n_samples}: lower min_size or num_clients"
        )
    by_class = [rng.permutation(np.flatnonzero(labels == k)) for k in np.unique(labels)]
    smallest = 0
    for _ in range(_DIRICHLET_MAX_TRIES):
        chunks: list[list[IntArray]] = [[] for _ in range(n)]
        for idx in by_class:
            p = rng.dirichlet(np.full(n, alpha))
            if not np.isfinite(p).all():  # underflow at tiny alpha: redraw everything
                break
            cuts = np.rint(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for i, block in enumerate(np.split(idx, np.clip(cuts, 0, idx.size))):
                chunks[i].append(block)
        else:
            parts = [np.concatenate(c).astype(np.int64) for c in chunks]
            smallest = min(len(p) for p in parts)
            if smallest >= min_size:
                return parts
    raise ValueError(
        f"dirichlet could not give every one of n={n} clients >= min_size={min_size} "
        f"samples in {_DIRICHLET_MAX_TRIES} draws with alpha={alpha}, N={n_samples} (last "
        f"draw's smallest client: {smallest}): raise alpha or lower num_clients or min_size"
    )


@register_function(PARTITIONERS, "shards")
def shards(
    labels: IntArray, n: int, rng: np.random.Generator, /, *, shards_per_client: int = 2
) -> list[IntArray]:
    """Pathological non-IID shards [McMahan et al., 2017].

    Sort the samples by label (ties in random order), cut the sorted list into
    ``S = n * shards_per_client`` contiguous shards of ``floor(N/S)`` or ``ceil(N/S)``
    samples, and deal a random ``shards_per_client`` of them to each client. A client
    therefore holds at most ``shards_per_client`` labels whenever no shard straddles two
    classes (e.g. every class size is a multiple of ``N/S``).

    Parameters
    ----------
    shards_per_client
        ``>= 1``, with ``n * shards_per_client <= N``.

    Returns
    -------
    list of ``n`` int64 index arrays.

    Raises
    ------
    ValueError
        ``shards_per_client < 1`` or more shards than samples.

    Examples
    --------
    >>> y = np.repeat(np.arange(4), 10)
    >>> parts = shards(y, 2, np.random.default_rng(0), shards_per_client=2)
    >>> [len(set(y[p].tolist())) for p in parts]
    [2, 2]
    """
    spc = shards_per_client
    if isinstance(spc, bool) or not isinstance(spc, int) or spc < 1:
        raise ValueError(f"shards needs an int shards_per_client >= 1, got {spc!r}")
    n_samples = labels.shape[0]
    n_shards = n * spc
    if n_shards > n_samples:
        raise ValueError(
            f"shards needs n * shards_per_client <= N, got n={n}, shards_per_client={spc}, "
            f"N={n_samples}: lower shards_per_client or num_clients"
        )
    shuffled = rng.permutation(n_samples)
    ordered = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(ordered, n_shards)
    deal = rng.permutation(n_shards).reshape(n, spc)
    return [np.concatenate([pieces[s] for s in row]).astype(np.int64) for row in deal]
