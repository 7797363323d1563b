"""Defenses that detect and remove poisoned updates: FLAME, DnC and SignGuard.

Robust statistics (median, Krum, ...) bound how far ``f`` updates move the aggregate, but
updates crafted to sit inside the honest spread (min-max, ALIE, backdoors) pass them. The
rules here look for the attackers with other signals and report whom they removed:
directions (FLAME's clustering of cosine distances), the dominant direction of the
deviations (DnC's SVD scores) and signs (SignGuard's sign statistics). Each is a function
``(updates (n, d), weights=None, *, generator, hyper...) -> AggregationResult`` whose
``kept`` holds the clients it accepted, so the bench reports detection precision and
recall, and whose ``info`` holds its diagnostics.

All three draw random numbers (FLAME its noise, DnC and SignGuard their coordinate
samples) from the ``generator`` they are called with: each declares a keyword-only
``generator``, so its :class:`~aggregation.catalog.Rule` is ``random`` and refuses to run
without one; with the same generator they are deterministic. The clustering runs in scikit-learn on a CPU
copy of an ``(n, n)`` or ``(n, 3)`` matrix; everything over ``d`` stays on the updates'
device, so the rules run on CPU and CUDA tensors alike. None of them has a weighted form
(client-reported example counts are attacker-controlled) and none is covered by central
DP (each registration says why).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import check_inputs, check_int, check_real, convex_mean, finite_update, row_norms
from ._types import AggregationResult, PreconditionError
from .catalog import ALL, TS, integer, real, register_rule
from .rules import coordinate_median

__all__ = ["dnc", "flame", "signguard"]

SCALE = frozenset({"scale"})


# ---------------------------------------------------------------------------------------
# shared pieces


def _coordinates(d: int, b: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``b`` distinct coordinates of ``d`` drawn uniformly (all ``d``, in order, if ``b >= d``).

    Drawn on the generator's device, so the same generator gives the same coordinates
    whatever the device of the updates.
    """
    if b >= d:
        return torch.arange(d, device=device)
    perm = torch.randperm(d, generator=generator, device=generator.device)
    return perm[:b].to(device)


def _clip_scales(norms: Tensor, bound: Tensor) -> Tensor:
    """``min(1, bound / ||x_i||)`` per row, ``1`` for rows within the bound (zero rows too)."""
    return torch.where(norms > bound, bound / norms, torch.ones_like(norms))


def _clipped_mean(x: Tensor, scales: Tensor, kept: Tensor) -> Tensor:
    """Mean of the kept rows of ``x`` ``(n, d)``, each scaled by its clip factor: ``(d,)``."""
    return convex_mean(x[kept] * scales[kept, None])


def _to_numpy(x: Tensor) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.ascontiguousarray(x.detach().to(device="cpu", dtype=torch.float64).numpy())


def _fp64(updates: Tensor) -> Tensor:
    return updates.to(torch.float64)


def _work(updates: Tensor) -> Tensor:
    """The updates in the dtype the ``(n, d)`` work is done in: their own, float32 for
    half precision (no float64 copy of a large stack)."""
    return updates if updates.dtype in (torch.float32, torch.float64) else updates.float()


# ---------------------------------------------------------------------------------------
# FLAME


def cosine_distances(updates: Tensor) -> Tensor:
    """Pairwise cosine distances ``1 - cos(x_i, x_j)`` of the rows of ``(n, d)``, in float64.

    Each row is divided by its largest absolute entry before it is normalised, so rows near
    the dtype's maximum give the right direction. A zero row has distance 1 to every other
    row (no direction); the diagonal is 0. Rounding can only push a distance slightly
    outside ``[0, 2]``; it is brought back. The rows are normalised in their dtype (float32
    for half precision), the ``(n, n)`` result is float64.

    Returns
    -------
    Tensor
        ``(n, n)`` float64, on the device of ``updates``.
    """
    x = _work(updates)
    peak = x.abs().amax(dim=1, keepdim=True)  # (n, 1)
    x = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    unit = x / torch.where(norms > 0, norms, torch.ones_like(norms))  # zero rows stay zero
    dist = (1.0 - _fp64(unit @ unit.T)).clamp_(0.0, 2.0)
    dist = 0.5 * (dist + dist.T)
    dist.fill_diagonal_(0.0)
    return dist


def _hdbscan_labels(dist: Tensor, min_cluster_size: int) -> Tensor:
    # imported on first use: sklearn.cluster adds seconds to `import aggregation`, which
    # every client process pays
    from sklearn.cluster import HDBSCAN

    model = HDBSCAN(metric="precomputed", min_cluster_size=min_cluster_size, min_samples=1,
                    allow_single_cluster=True, copy=True)
    labels = model.fit(_to_numpy(dist)).labels_
    return torch.as_tensor(np.asarray(labels, dtype=np.int64))


def _largest_cluster(labels: Tensor) -> Tensor:
    """Bool mask of the largest cluster (label ``>= 0``; ties to the smallest label)."""
    clustered = labels[labels >= 0]
    if clustered.numel() == 0:
        return torch.zeros_like(labels, dtype=torch.bool)
    counts = torch.bincount(clustered)
    return labels == int(torch.argmax(counts))  # argmax returns the first maximum


@register_rule(
    "flame", params={"lam": real(0.0)}, equivariances=SCALE,
    properties=frozenset({"permutation_invariant"}),
    why_not_dp="FLAME's noise is scaled to this round's median norm, which the clients "
               "choose, and which updates survive its clustering depends on every client: "
               "there is no sensitivity bound C/m, so its noise is no DP guarantee")
def flame(updates: Tensor, weights: Tensor | None = None, *, generator: torch.Generator,
          lam: float = 0.001) -> AggregationResult:
    r"""FLAME [Nguyen et al., USENIX Security 2022]: cluster, clip to the median norm, noise.

    1. Clustering: HDBSCAN (scikit-learn's ``HDBSCAN``, ``min_cluster_size = n // 2 + 1``,
       ``min_samples = 1``, a single cluster allowed) on the pairwise cosine distances
       ``c_ij = 1 - cos(x_i, x_j)`` (:func:`cosine_distances`). With more than half of the
       clients needed for a cluster there is at most one: its members are admitted, the
       others (HDBSCAN's noise) removed. A backdoor pulls its updates in a direction of
       their own, so a group of them falls outside the honest majority's cluster.
    2. Clipping to the median norm: with ``e_i = ||x_i||`` and ``S = median_i e_i`` over
       all ``n`` clients (the paper's ``S_t``), every admitted update is scaled by
       ``min(1, S / e_i)``.
    3. Adaptive noise: ``sigma = lam * S``.

    .. math:: y = \frac{1}{|K|} \sum_{i \in K} x_i \min\!\left(1, \frac{S}{e_i}\right)
              + \mathcal{N}(0, \sigma^2 I_d), \qquad \sigma = \lambda S

    The paper clusters and clips the local models around the global model; an update is
    that difference, so the origin here is the global model the clients received. The
    noise is drawn from ``generator`` on its device, in float64, then cast to the
    updates' dtype. The clustering runs in scikit-learn on a CPU copy of the ``(n, n)``
    distance matrix.

    Parameters
    ----------
    updates
        ``(n, d)``, ``n >= 2``.
    weights
        Ignored (validated by the rule object; no weighted form).
    generator
        Source of the noise.
    lam
        Noise level ``lambda >= 0`` (the paper: 0.001 for image classification, 0.01 for
        word prediction); ``0`` adds no noise.

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` the admitted clients (the cluster), sorted;
        ``info``: ``"labels"`` ``(n,)`` int64 HDBSCAN's labels (``-1`` removed),
        ``"norms"`` ``(n,)`` the ``e_i``, ``"clip_scales"`` ``(n,)``, ``"median_norm"``
        ``S`` and ``"noise_std"`` ``sigma`` (0-d).

    Raises
    ------
    ValueError
        Bad input, ``lam`` negative, or (``PreconditionError``) ``n < 2`` or no cluster of
        ``n // 2 + 1`` clients: the round is skipped.

    Examples
    --------
    >>> from aggregation.registry import make_generator
    >>> honest = torch.tensor([[2.0, 0.1], [2.0, 0.2], [1.0, 0.1], [1.0, 0.05]])
    >>> backdoor = torch.tensor([[0.0, 3.0]])
    >>> res = flame(torch.cat([honest, backdoor]), generator=make_generator(0), lam=0.0)
    >>> res.kept.tolist(), round(float(res.info["median_norm"]), 4)
    ([0, 1, 2, 3], 2.0025)
    >>> res.update  # [2.0, 0.2] clipped to norm 2.0025
    tensor([1.4981, 0.1123])
    """
    updates, _ = check_inputs("flame", updates, None)
    lam = check_real("flame", "lam", lam, minimum=0.0)
    n, d = updates.shape
    if n < 2:
        raise PreconditionError(
            f"flame needs n >= 2 clients to cluster, got n={n}: sample more clients"
        )
    labels = _hdbscan_labels(cosine_distances(updates), n // 2 + 1).to(updates.device)
    admitted = _largest_cluster(labels)
    if not bool(admitted.any()):
        raise PreconditionError(
            f"flame: HDBSCAN found no cluster of n // 2 + 1 = {n // 2 + 1} of the n={n} "
            "clients (every update is an outlier to the others): the round is skipped"
        )
    kept = admitted.nonzero().flatten()
    x = _work(updates)
    norms = row_norms(x)  # (n,); Inf only where the true norm overflows: clipped to 0
    bound = coordinate_median(norms[:, None])[0]
    scales = _clip_scales(norms, bound)
    update = _clipped_mean(x, scales, kept)
    sigma = lam * bound
    if lam > 0:
        noise = torch.randn(d, generator=generator, device=generator.device,
                            dtype=torch.float64)
        update = update + sigma * noise.to(device=updates.device, dtype=update.dtype)
    return AggregationResult(
        update=finite_update("flame", update.to(updates.dtype)),
        kept=kept,
        info={"labels": labels, "norms": norms.to(updates.dtype),
              "clip_scales": scales.to(updates.dtype),
              "median_norm": bound.to(updates.dtype), "noise_std": sigma.to(updates.dtype)},
    )


# ---------------------------------------------------------------------------------------
# DnC


def dnc_scores(sample: Tensor) -> Tensor:
    """DnC's outlier scores of the rows of ``(n, b)``: ``((x_i - mu)^T v)^2``.

    ``v`` is the top right singular vector of the centred matrix ``C = X - mu``. Computed
    from the ``(n, n)`` Gram matrix ``C C^T = U diag(s^2) U^T``: the score of row ``i`` is
    ``s_1^2 u_{1i}^2``, which needs no ``(b, b)`` matrix and no sign convention. The
    sample is first divided by its largest absolute value (the scores are then those of
    the rescaled sample; the ranking is the same), so rows near the dtype's maximum
    neither overflow the squares nor the centring. Computed in float64.

    Returns
    -------
    Tensor
        ``(n,)`` float64, ``>= 0`` up to rounding.
    """
    x = _fp64(sample)
    peak = x.abs().max()
    if bool(peak > 0):
        x = x / peak
    centred = x - convex_mean(x)  # (n, b)
    values, vectors = torch.linalg.eigh(centred @ centred.T)  # ascending eigenvalues
    scores: Tensor = values[-1].clamp(min=0.0) * vectors[:, -1].square()
    return scores


@register_rule(
    "dnc", params={"f": integer(0), "c": real(0.0, strict=True), "iters": integer(1),
                   "sub_dim": integer(1)},
    equivariances=TS, properties=ALL,
    why_not_dp="DnC removes the clients that deviate most along the top singular "
               "direction of all updates, so one client changes who is averaged")
def dnc(updates: Tensor, weights: Tensor | None = None, *, generator: torch.Generator,
        f: int, c: float = 1.0, iters: int = 5, sub_dim: int = 10000) -> AggregationResult:
    r"""Divide-and-Conquer [Shejwalkar & Houmansadr, NDSS 2021]: SVD outlier removal.

    ``iters`` times: draw ``b = sub_dim`` coordinates uniformly without replacement (all
    ``d`` when ``b >= d``), centre the sampled updates on their mean, score each client by
    its squared projection on the top right singular vector ``v``
    (:func:`dnc_scores`), and mark the ``n - floor(c f)`` lowest scores good. The
    aggregate is the mean of the clients marked good in every iteration:

    .. math:: s_i = \left((x_i^{(r)} - \mu^{(r)})^\top v\right)^2, \qquad
              K = \bigcap_{t=1}^{\text{iters}} \{ i : s_i^{(t)} \text{ among the }
              n - \lfloor c f \rfloor \text{ smallest} \}, \qquad
              y = \frac{1}{|K|} \sum_{i \in K} x_i

    Built against min-max and min-sum, whose updates all deviate along one direction
    that dominates the centred updates' top singular vector. Ties in the score are broken
    by client index. Translation and scale equivariant (the scores are translation
    invariant and scale by ``c^2``); the coordinate sample is drawn from ``generator`` on
    its device.

    Parameters
    ----------
    updates
        ``(n, d)``, ``n > floor(c f)``.
    weights
        Ignored (validated by the rule object; no weighted form).
    generator
        Source of the coordinate samples.
    f
        Number of Byzantine clients expected.
    c
        Filtering fraction ``c > 0``: ``floor(c f)`` clients are removed per iteration
        (the paper: 1).
    iters
        Number of iterations ``>= 1`` (their removals add up).
    sub_dim
        Coordinates sampled per iteration ``b >= 1`` (the paper: 10000).

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` the clients good in every iteration, sorted;
        ``info``: ``"scores"`` ``(iters, n)`` float64 (see :func:`dnc_scores`),
        ``"times_removed"`` ``(n,)`` int64.

    Raises
    ------
    ValueError
        Bad input, hyperparameters out of range, or (``PreconditionError``, the round is
        skipped) ``n <= floor(c f)``, or every client removed in some iteration.

    Examples
    --------
    >>> from aggregation.registry import make_generator
    >>> x = torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.9, -0.1], [1.0, 0.1], [9.0, 9.0]])
    >>> res = dnc(x, generator=make_generator(0), f=1)
    >>> res.kept.tolist()
    [0, 1, 2, 3]
    >>> res.update
    tensor([1.0000, 0.0250])
    """
    updates, _ = check_inputs("dnc", updates, None)
    f = check_int("dnc", "f", f, minimum=0)
    c = check_real("dnc", "c", c, minimum=0.0, strict=True)
    iters = check_int("dnc", "iters", iters, minimum=1)
    sub_dim = check_int("dnc", "sub_dim", sub_dim, minimum=1)
    n, d = updates.shape
    removed = math.floor(c * f)
    if n <= removed:
        raise PreconditionError(
            f"dnc needs n > floor(c f), got n={n}, f={f}, c={c:g} (removes {removed} per "
            "iteration): lower f or c, or sample more clients"
        )
    good = torch.ones(n, dtype=torch.bool, device=updates.device)
    times_removed = torch.zeros(n, dtype=torch.int64, device=updates.device)
    all_scores = []
    for _ in range(iters):
        idx = _coordinates(d, sub_dim, generator, updates.device)
        scores = dnc_scores(updates[:, idx])  # (n,)
        order = torch.sort(scores, stable=True).indices
        outliers = torch.zeros(n, dtype=torch.bool, device=updates.device)
        outliers[order[n - removed:]] = True
        good &= ~outliers
        times_removed += outliers
        all_scores.append(scores)
    if not bool(good.any()):
        raise PreconditionError(
            f"dnc removed every client: each of the {iters} iterations removed {removed} of "
            f"n={n}, and together they covered all: lower iters or c"
        )
    kept = good.nonzero().flatten()
    return AggregationResult(
        update=finite_update("dnc", convex_mean(updates[kept])),
        kept=kept,
        info={"scores": torch.stack(all_scores), "times_removed": times_removed},
    )


# ---------------------------------------------------------------------------------------
# SignGuard


def sign_features(sample: Tensor) -> Tensor:
    """SignGuard's features of the rows of ``(n, b)``: fractions of positive, zero and
    negative entries, each column divided by its largest value over the clients (a
    column that is zero for every client stays zero), as the paper's code does.

    Returns
    -------
    Tensor
        ``(n, 3)`` float64.
    """
    b = sample.shape[1]
    fractions = torch.stack([(sample > 0).sum(dim=1), (sample == 0).sum(dim=1),
                             (sample < 0).sum(dim=1)], dim=1).to(torch.float64) / b
    top = fractions.amax(dim=0)  # (3,)
    return fractions / torch.where(top > 0, top, torch.ones_like(top))


def _mean_shift_labels(features: Tensor) -> tuple[Tensor, float]:
    """Mean-shift cluster labels of ``(n, 3)`` features (``-1``: in no cluster), bandwidth.

    The bandwidth is scikit-learn's ``estimate_bandwidth`` with ``quantile=0.5`` (the
    paper's). It is 0 only when at least half the clients share their features exactly;
    mean shift then degenerates to its limit, one cluster per distinct feature vector.
    """
    # imported on first use: see _hdbscan_labels
    from sklearn.cluster import MeanShift, estimate_bandwidth

    points = _to_numpy(features)
    bandwidth = float(estimate_bandwidth(points, quantile=0.5))
    if bandwidth > 0:
        model = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False)
        labels = torch.as_tensor(np.asarray(model.fit(points).labels_, dtype=np.int64))
    else:
        labels = torch.unique(features.cpu(), dim=0, return_inverse=True)[1].to(torch.int64)
    return labels, bandwidth


def _bounds(params: Mapping[str, Any]) -> None:
    lower, upper = params["lower"], params["upper"]
    if not lower <= 1.0 <= upper:
        raise ValueError(
            f"signguard needs lower <= 1 <= upper (a client at the median norm must pass), "
            f"got lower={lower:g}, upper={upper:g}"
        )


def _fraction(component: str, param: str, value: Any) -> float:
    x = check_real(component, param, value, minimum=0.0, strict=True)
    if x > 1.0:
        raise ValueError(f"{component}: {param} must be <= 1 (a fraction), got {param}={value}")
    return x


@register_rule(
    "signguard", params={"lower": real(0.0), "upper": real(1.0),
                         "coord_fraction": _fraction}, validate=_bounds,
    equivariances=SCALE, properties=frozenset({"permutation_invariant", "unanimous"}),
    why_not_dp="SignGuard's norm thresholds and clipping bound are relative to this "
               "round's median norm and its clustering depends on every client: no "
               "sensitivity bound C/m")
def signguard(updates: Tensor, weights: Tensor | None = None, *, generator: torch.Generator,
              lower: float = 0.1, upper: float = 3.0,
              coord_fraction: float = 0.1) -> AggregationResult:
    r"""SignGuard [Xu et al., ICDCS 2022]: norm thresholds and sign-statistics clustering.

    1. Norm filter: with ``e_i = ||x_i||`` and ``M = median_i e_i``, keep
       ``S_1 = {i : lower M <= e_i <= upper M}`` (the paper: 0.1 and 3; its code uses
       strict inequalities, which differ only at equality).
    2. Sign clustering: on ``b = ceil(coord_fraction d)`` coordinates drawn uniformly
       without replacement, each client's fractions of positive, zero and negative
       entries, each normalised by its maximum over the clients
       (:func:`sign_features`), are clustered by scikit-learn's ``MeanShift`` (bandwidth
       from ``estimate_bandwidth(quantile=0.5)``, bin seeding, orphans in no cluster);
       ``S_2`` is the largest cluster (ties: the first in scikit-learn's order).
    3. The aggregate is the mean of the kept updates ``K = S_1 \cap S_2``, each clipped to
       the median norm:

    .. math:: y = \frac{1}{|K|} \sum_{i \in K} x_i \min\!\left(1, \frac{M}{e_i}\right)

    Sign flipping and scaled updates change the sign statistics or the norm; both are
    caught. The paper draws a random contiguous block of coordinates; any uniform sample
    serves, and a contiguous block would see one layer only. The clustering runs on a
    CPU copy of the ``(n, 3)`` features; the coordinate sample is drawn from
    ``generator`` on its device.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        Ignored (validated by the rule object; no weighted form).
    generator
        Source of the coordinate sample.
    lower, upper
        Norm thresholds relative to the median norm, ``0 <= lower <= 1 <= upper``.
    coord_fraction
        Fraction of the coordinates whose signs are counted, in ``(0, 1]`` (the paper:
        0.1).

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` ``K``, sorted; ``info``: ``"labels"`` ``(n,)``
        int64 cluster labels (``-1``: no cluster), ``"norm_ok"`` ``(n,)`` bool (``S_1``),
        ``"features"`` ``(n, 3)`` float64, ``"norms"`` ``(n,)``, ``"median_norm"`` and
        ``"bandwidth"`` (0-d).

    Raises
    ------
    ValueError
        Bad input, hyperparameters out of range, or (``PreconditionError``, the round is
        skipped) no client both within the norm thresholds and in the largest cluster.

    Examples
    --------
    >>> from aggregation.registry import make_generator
    >>> honest = torch.tensor([[1.0, 2.0, -1.0, 0.5], [1.2, 1.8, -0.9, 0.4],
    ...                        [0.8, 2.1, -1.1, 0.6], [1.1, 1.9, -1.0, 0.5]])
    >>> flipped = -honest[:1]
    >>> res = signguard(torch.cat([honest, flipped]), generator=make_generator(0),
    ...                 coord_fraction=1.0)
    >>> res.kept.tolist()
    [0, 1, 2, 3]
    """
    updates, _ = check_inputs("signguard", updates, None)
    lower = check_real("signguard", "lower", lower, minimum=0.0)
    upper = check_real("signguard", "upper", upper, minimum=1.0)
    _bounds({"lower": lower, "upper": upper})
    coord_fraction = _fraction("signguard", "coord_fraction", coord_fraction)
    n, d = updates.shape
    x = _work(updates)
    norms = row_norms(x)  # (n,); Inf only where the true norm overflows: above upper M
    median_norm = coordinate_median(norms[:, None])[0]
    norm_ok = (norms >= lower * median_norm) & (norms <= upper * median_norm)
    idx = _coordinates(d, math.ceil(coord_fraction * d), generator, updates.device)
    features = sign_features(updates[:, idx])
    labels, bandwidth = _mean_shift_labels(features)
    labels = labels.to(updates.device)
    good = norm_ok & _largest_cluster(labels)
    if not bool(good.any()):
        raise PreconditionError(
            f"signguard kept no client: {int(norm_ok.sum())} of n={n} are within "
            f"[{lower:g}, {upper:g}] x the median norm, none of them in the largest sign "
            "cluster: the round is skipped"
        )
    kept = good.nonzero().flatten()
    update = _clipped_mean(x, _clip_scales(norms, median_norm), kept)
    return AggregationResult(
        update=finite_update("signguard", update.to(updates.dtype)),
        kept=kept,
        info={"labels": labels, "norm_ok": norm_ok, "features": features,
              "norms": norms.to(updates.dtype), "median_norm": median_norm.to(updates.dtype),
              "bandwidth": torch.tensor(bandwidth, dtype=torch.float64,
                                        device=updates.device)},
    )
