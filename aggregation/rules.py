"""Aggregation rules as small functions over an ``(n, d)`` stack of client updates.

Every function takes ``updates`` ``(n, d)`` (one client per row) and ``weights``
``(n,)`` or ``None``, then keyword hyperparameters in the papers' vocabulary (``f`` Byzantine
clients, ...), and returns an :class:`~aggregation.AggregationResult`. Rules without a
weighted form refuse weights (the registry's rule objects pass ``None`` to them unless
constructed with ``use_weights=True``). Inputs are validated once per call by one shared helper
(a rule object validates, then its function skips the check for the same tensors); every
precondition raises ``ValueError`` naming the rule, the values and the fix. The kernels
(:mod:`aggregation._checks`) read the stack in column blocks and compute in the updates'
own dtype (half precision: distances in float32).

A rule is registered by the :func:`~aggregation.catalog.register_rule` line above its
function: the name configs use, a check per hyperparameter, how it treats weights and
state, the guarantees it declares and whether central DP covers it. Adding a rule is
writing the function and that line; nothing else needs editing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import (
    check_inputs,
    check_int,
    check_real,
    convex_mean,
    coordinate_median,
    finite_update,
    krum_scores,
    lex_order,
    pairwise_sq_distances,
    row_norms,
    sorted_column_map,
)
from ._types import AggregationResult, PreconditionError
from .catalog import ALL, TS, integer, optional, real, register_rule

__all__ = [
    "bulyan",
    "centered_clipping",
    "coordinate_median",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "trimmed_mean",
]


def _no_weights(rule: str, weights: Tensor | None) -> None:
    if weights is not None:
        raise ValueError(
            f"{rule} has no weighted form: pass weights=None (the registered rule object "
            "ignores weights for you)"
        )


def _all_kept(updates: Tensor) -> Tensor:
    return torch.arange(updates.shape[0], device=updates.device)


def _positive(weights: Tensor) -> Tensor:
    return (weights > 0).nonzero().flatten()


@register_rule("mean", params={"max_weight_ratio": optional(real(1.0))}, use_weights=True,
               equivariances=TS, properties=ALL, dp_compatible=True)
def mean(updates: Tensor, weights: Tensor | None = None, *,
         max_weight_ratio: float | None = None) -> AggregationResult:
    r"""Weighted mean of the updates, FedAvg [McMahan et al., 2017].

    .. math:: \bar{x} = \sum_i w_i x_i \big/ \sum_i w_i, \qquad
              w_i \leftarrow \min(w_i,\ r \cdot \mathrm{median}_j w_j)

    The cap applies only when ``max_weight_ratio`` ``r`` is given. Client-reported example
    counts are attacker-controlled: one client claiming a billion examples owns a plain
    weighted mean. The cap bounds any client's weight to ``r`` times the median weight.
    Without weights, the plain average. No robustness: one update of any size moves the
    result arbitrarily.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        ``(n,)`` non-negative (e.g. example counts), or ``None`` for equal weights.
    max_weight_ratio
        ``r >= 1``, or ``None`` for no cap.

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` the clients with positive (capped) weight;
        ``info["weights"]`` ``(n,)`` the normalised weights used.

    Raises
    ------
    ValueError
        Bad input, ``max_weight_ratio < 1``, or a median weight of zero with a cap.

    Examples
    --------
    >>> x = torch.tensor([[0.0], [1.0], [2.0]])
    >>> mean(x).update
    tensor([1.])
    >>> mean(x, torch.tensor([1.0, 1.0, 100.0]), max_weight_ratio=2.0).update  # w -> 1, 1, 2
    tensor([1.2500])
    """
    updates, weights = check_inputs("mean", updates, weights)
    n = updates.shape[0]
    if max_weight_ratio is not None:
        ratio = check_real("mean", "max_weight_ratio", max_weight_ratio, minimum=1.0)
        w = weights if weights is not None else updates.new_ones(n)
        med = coordinate_median(w[:, None])[0]
        if not bool(med > 0):
            raise ValueError(
                f"mean with max_weight_ratio needs a positive median weight, got median "
                f"{float(med):g} of {n} weights: at least half the clients report weight 0; "
                "drop the cap or the zero-weight clients"
            )
        weights = torch.minimum(w, ratio * med)
    p = updates.new_full((n,), 1.0 / n) if weights is None else weights / weights.sum()
    return AggregationResult(update=finite_update("mean", convex_mean(updates, p)),
                             kept=_positive(p), info={"weights": p})


@register_rule("median", equivariances=TS, properties=ALL,
               why_not_dp="the coordinate-wise median's sensitivity depends on the other "
                          "clients' values and is not bounded by C/m")
def median(updates: Tensor, weights: Tensor | None = None) -> AggregationResult:
    r"""Coordinate-wise median [Yin et al., 2018].

    .. math:: y_k = \mathrm{median}(x_{1k}, \dots, x_{nk})

    For even ``n`` the average of the two middle values (numpy's convention). Each
    coordinate stays within the range of the honest values whenever ``f < n / 2``.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        Must be ``None`` (no weighted form).

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` all ``n`` clients (trimming is per coordinate).

    Raises
    ------
    ValueError
        Bad input or weights given.

    Examples
    --------
    >>> median(torch.tensor([[0.0], [1.0], [5.0], [100.0]])).update
    tensor([3.])
    """
    updates, weights = check_inputs("median", updates, weights)
    _no_weights("median", weights)
    return AggregationResult(update=finite_update("median", coordinate_median(updates)),
                             kept=_all_kept(updates))


@register_rule("trimmed_mean", params={"f": integer(0)}, equivariances=TS, properties=ALL,
               why_not_dp="which values are trimmed depends on the other clients, so one "
                          "client moves the result by more than C/m")
def trimmed_mean(updates: Tensor, weights: Tensor | None = None, *, f: int) -> AggregationResult:
    r"""Coordinate-wise trimmed mean [Yin et al., 2018].

    .. math:: y_k = \frac{1}{n - 2f} \sum_{i=f+1}^{n-f} x_{(i)k}

    where ``x_(1)k <= ... <= x_(n)k`` are the sorted values of coordinate ``k``: the ``f``
    smallest and ``f`` largest values of each coordinate are removed. With at most ``f``
    Byzantine clients every coordinate stays within the range of the honest values.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        Must be ``None`` (no weighted form).
    f
        Values removed per side, ``n > 2f``.

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` all ``n`` clients (trimming is per coordinate).

    Raises
    ------
    ValueError
        Bad input, weights given, or ``n <= 2f``.

    Examples
    --------
    >>> trimmed_mean(torch.tensor([[-100.0], [1.0], [2.0], [3.0], [100.0]]), f=1).update
    tensor([2.])
    """
    updates, weights = check_inputs("trimmed_mean", updates, weights)
    _no_weights("trimmed_mean", weights)
    f = check_int("trimmed_mean", "f", f, minimum=0)
    n = updates.shape[0]
    if n <= 2 * f:
        raise PreconditionError(
            f"trimmed_mean needs n > 2f, got n={n}, f={f}: lower f or sample more clients"
        )
    if f == 0:
        update = convex_mean(updates)
    else:
        p = updates.new_full((n - 2 * f,), 1.0 / (n - 2 * f))
        update = sorted_column_map(updates, lambda s: s[:, f:n - f] @ p,  # (w, n - 2f) @ p
                                   ranks=range(f, n - f))
    return AggregationResult(update=finite_update("trimmed_mean", update),
                             kept=_all_kept(updates))


def _check_krum_n(rule: str, n: int, f: int) -> None:
    if n < 2 * f + 3:
        raise PreconditionError(
            f"{rule} needs n >= 2f + 3, got n={n}, f={f}: lower f or sample more clients"
        )


@register_rule("krum", params={"f": integer(0)}, equivariances=TS, properties=ALL,
               why_not_dp="Krum selects one client's update: one client can change the "
                          "selection, moving the output by up to 2C, not C/m")
def krum(updates: Tensor, weights: Tensor | None = None, *, f: int) -> AggregationResult:
    r"""Krum [Blanchard et al., 2017]: the update closest to its ``n - f - 2`` neighbours.

    .. math:: s(i) = \sum_{j \in N_i} \|x_i - x_j\|^2, \qquad y = x_{i^*},\
              i^* = \arg\min_i s(i)

    where ``N_i`` holds the ``n - f - 2`` updates nearest to ``x_i`` (excluding itself).
    Exact ties in the score (e.g. mutual nearest neighbours when ``n - f - 2 = 1``) are
    broken by the total squared distance to all others, then by index, so the choice does
    not depend on the order of the clients. Distances: see
    :func:`aggregation._checks.pairwise_sq_distances` (median-centred Gram matrix).

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        Must be ``None`` (Krum selects, it does not weight).
    f
        Number of Byzantine clients tolerated, ``n >= 2f + 3``.

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)`` a copy of the selected row; ``kept`` ``(1,)`` its index;
        ``info["scores"]`` ``(n,)``.

    Raises
    ------
    ValueError
        Bad input, weights given, or ``n < 2f + 3``.

    Examples
    --------
    >>> x = torch.tensor([[0.0], [0.1], [0.25], [0.3], [50.0]])
    >>> r = krum(x, f=1)
    >>> r.kept.tolist(), r.update.tolist()
    ([2], [0.25])
    """
    updates, weights = check_inputs("krum", updates, weights)
    _no_weights("krum", weights)
    f = check_int("krum", "f", f, minimum=0)
    n = updates.shape[0]
    _check_krum_n("krum", n, f)
    dist = pairwise_sq_distances(updates, f)
    scores = krum_scores(dist, n - f - 2)
    best = lex_order(scores, dist.sum(dim=1))[:1]
    return AggregationResult(
        update=updates[best[0]].clone(),
        kept=best,
        info={"scores": scores.to(updates.dtype)},
    )


@register_rule("multi_krum", params={"f": integer(0), "m": optional(integer(1))},
               use_weights=False, equivariances=TS, properties=ALL,
               why_not_dp="Multi-Krum's selection depends on every client, so one client "
                          "can change which updates are averaged")
def multi_krum(updates: Tensor, weights: Tensor | None = None, *, f: int,
               m: int | None = None) -> AggregationResult:
    r"""Multi-Krum [Blanchard et al., 2017]: average of the ``m`` best-scored updates.

    .. math:: y = \frac{\sum_{i \in S} w_i x_i}{\sum_{i \in S} w_i}, \qquad
              S = \text{the } m \text{ indices of lowest Krum score } s(i)

    with ``s(i)`` as in :func:`krum` (scores computed once, ties broken the same way).
    ``w_i = 1`` when ``weights`` is ``None``. ``m = 1`` is Krum; ``m = n - f`` (default)
    averages every update not ruled out.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        ``(n,)`` or ``None``: weights of the average over the selected updates.
    f
        Number of Byzantine clients tolerated, ``n >= 2f + 3``.
    m
        Number of updates averaged, ``1 <= m <= n - f``; ``None`` means ``n - f``.

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` ``(m,)`` the selected indices, sorted;
        ``info["scores"]`` ``(n,)``.

    Raises
    ------
    ValueError
        Bad input, ``n < 2f + 3``, ``m`` out of range, or all selected weights zero.

    Examples
    --------
    >>> x = torch.tensor([[0.0], [0.1], [0.2], [0.35], [50.0]])
    >>> r = multi_krum(x, f=1, m=3)
    >>> r.kept.tolist(), round(float(r.update), 4)
    ([0, 1, 2], 0.1)
    """
    updates, weights = check_inputs("multi_krum", updates, weights)
    f = check_int("multi_krum", "f", f, minimum=0)
    n = updates.shape[0]
    _check_krum_n("multi_krum", n, f)
    m_ = n - f if m is None else check_int("multi_krum", "m", m, minimum=1)
    if not 1 <= m_ <= n - f:
        raise PreconditionError(
            f"multi_krum needs 1 <= m <= n - f, got m={m_}, n={n}, f={f}: "
            f"use m <= {n - f} or leave m unset for n - f"
        )
    dist = pairwise_sq_distances(updates, f)
    scores = krum_scores(dist, n - f - 2)
    chosen = lex_order(scores, dist.sum(dim=1))[:m_].sort().values
    w = updates.new_ones(m_) if weights is None else weights[chosen]
    if not bool(w.sum() > 0):
        raise ValueError(
            f"multi_krum: the {m_} selected clients {chosen.tolist()} all have weight 0: "
            "nothing to average; check the reported weights"
        )
    # the selection's convex weights, 0 elsewhere: one pass over the stack, no (m, d) copy
    p = updates.new_zeros(n).index_copy_(0, chosen, w / w.sum())
    update = convex_mean(updates, p)
    return AggregationResult(update=finite_update("multi_krum", update), kept=chosen,
                             info={"scores": scores.to(updates.dtype)})


def _closest_to_median_mean(s: Tensor, beta: int, p: Tensor) -> Tensor:
    """Mean of the ``beta`` values of each row of ``s`` closest to the row's median.

    ``s`` ``(w, theta)`` has ascending rows, so the ``beta`` values nearest the median are
    a window ``s[:, j:j + beta]``. Sliding it up by one swaps ``s[j]`` for ``s[j + beta]``
    and pays off exactly when ``s[j]`` is the farther of the two; that holds for the first
    windows and then never again, so the start ``j`` is the number of windows for which it
    holds. When the two are equally far the lower value is kept, as the brute-force
    reference does. ``p`` ``(beta,)`` are the uniform convex weights. Returns ``(w,)``.
    """
    theta = s.shape[1]
    half = theta // 2
    med = s[:, half] if theta % 2 == 1 else s[:, half - 1] / 2 + s[:, half] / 2  # (w,)
    outgoing = (s[:, :theta - beta] - med[:, None]).abs()  # (w, 2f)
    incoming = (s[:, beta:] - med[:, None]).abs()  # (w, 2f)
    start = (outgoing > incoming).sum(dim=1)  # (w,)
    window = start[:, None] + torch.arange(beta, device=s.device)  # (w, beta)
    return s.gather(1, window) @ p


@register_rule("bulyan", params={"f": integer(0)}, equivariances=TS, properties=ALL,
               why_not_dp="Bulyan's selection and trimming depend on every client")
def bulyan(updates: Tensor, weights: Tensor | None = None, *, f: int) -> AggregationResult:
    r"""Bulyan [El Mhamdi et al., 2018]: iterated Krum, then a coordinate-wise trimmed phase.

    1. Selection: starting from ``R = {1..n}``, repeat ``theta = n - 2f`` times: pick
       ``i* = argmin_{i in R} s_R(i)`` (Krum within the remaining set ``R``), move it to
       ``S``. The Krum neighbourhood has ``k = max(|R| - f - 2, f)`` members: Krum's own
       ``|R| - f - 2`` except at the last pick (``|R| = 2f + 1``, below Krum's
       ``2f + 3``), where ``f`` is the size that still gives a Byzantine candidate an
       honest neighbour (at most ``f - 1`` others are Byzantine) while every honest
       candidate has ``|R| - f - 1 >= k`` honest others. So every pick, like Krum's, lies
       within ``sqrt(n - f - 2)`` honest diameters of an honest update. (A neighbourhood
       shrunk to 1 would let two colluding identical Byzantine updates score 0.)
       Distances are computed once, and each row's sorted once.
    2. Aggregation: for every coordinate ``k``, keep the ``beta = theta - 2f`` values of
       ``{x_ik : i in S}`` closest to their median and average them:

    .. math:: y_k = \frac{1}{\beta} \sum_{i \in B_k} x_{ik}, \quad
              B_k = \arg\min_{|B| = \beta} \sum_{i \in B} |x_{ik} - \mathrm{med}_{j \in S}
              x_{jk}|

    (when two values are equally far from the median on either side, the lower one is
    kept). The selected updates are not copied: each column is sorted in a small block.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        Must be ``None`` (no weighted form).
    f
        Number of Byzantine clients tolerated, ``n >= 4f + 3``.

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` ``(theta,)`` the selected set ``S``, sorted;
        ``info["selection_order"]`` ``(theta,)`` the order of selection;
        ``info["scores"]`` ``(n,)`` Krum scores over all ``n`` (the first selection).

    Raises
    ------
    ValueError
        Bad input, weights given, or ``n < 4f + 3``.

    Examples
    --------
    >>> x = torch.tensor([[0.0], [0.1], [0.25], [0.3], [0.45], [0.6], [90.0]])
    >>> r = bulyan(x, f=1)
    >>> r.kept.tolist(), round(float(r.update), 4)
    ([1, 2, 3, 4, 5], 0.3333)
    """
    updates, weights = check_inputs("bulyan", updates, weights)
    _no_weights("bulyan", weights)
    f = check_int("bulyan", "f", f, minimum=0)
    n = updates.shape[0]
    if n < 4 * f + 3:
        raise PreconditionError(
            f"bulyan needs n >= 4f + 3, got n={n}, f={f}: lower f or sample more clients"
        )
    theta = n - 2 * f
    beta = theta - 2 * f
    dist = pairwise_sq_distances(updates, f)
    first_scores = krum_scores(dist, n - f - 2)
    # each row's distances to the others, ascending, sorted once: a Krum score within the
    # remaining set is then the sum of a row's first k entries that are still remaining
    others = dist.clone().fill_diagonal_(math.inf)
    nearest, neighbour = others.sort(dim=1)  # (n, n)
    rows = torch.arange(n, device=updates.device)
    rank = torch.empty_like(neighbour)
    rank.scatter_(1, neighbour, rows.expand(n, n).contiguous())  # rank[i, neighbour[i, j]] = j
    alive = neighbour != rows[:, None]  # (n, n) remaining others, in each row's order
    remaining = torch.ones(n, dtype=torch.bool, device=updates.device)
    order: list[int] = []
    for t in range(theta):
        n_t = n - t
        k = max(n_t - f - 2, f)  # <= n_t - 1 since n_t >= 2f + 1
        gone = ~remaining
        within = torch.where(alive, nearest, 0.0)  # (n, n)
        scores = torch.where(alive.cumsum(dim=1, dtype=torch.int32) <= k, within, 0.0).sum(dim=1)
        totals = within.sum(dim=1)
        pick = int(lex_order(scores.masked_fill(gone, math.inf),
                             totals.masked_fill(gone, math.inf))[0])
        alive[rows, rank[:, pick]] = False
        remaining[pick] = False
        order.append(pick)
    chosen = torch.tensor(order, dtype=torch.long, device=updates.device)
    p = updates.new_full((beta,), 1.0 / beta)
    update = sorted_column_map(updates, lambda s: _closest_to_median_mean(s, beta, p),
                               rows=chosen)
    return AggregationResult(
        update=finite_update("bulyan", update),
        kept=chosen.sort().values,
        info={"selection_order": chosen, "scores": first_scores.to(updates.dtype)},
    )


@register_rule("geometric_median",
               params={"nu": real(0.0, strict=True), "iters": integer(1), "tol": real(0.0)},
               use_weights=False, equivariances=frozenset({"translation"}), properties=ALL,
               why_not_dp="the geometric median's sensitivity has no C/m bound")
def geometric_median(updates: Tensor, weights: Tensor | None = None, *, nu: float = 1e-6,
                     iters: int = 100, tol: float = 1e-6) -> AggregationResult:
    r"""Geometric median by smoothed Weiszfeld, RFA [Pillutla et al., 2022].

    Approximates :math:`\arg\min_z \sum_i \alpha_i \|z - x_i\|` with
    ``alpha = weights / sum(weights)`` (uniform when ``None``), iterating

    .. math:: \beta_i = \frac{\alpha_i}{\max(\nu, \|z_t - x_i\|)}, \qquad
              z_{t+1} = \frac{\sum_i \beta_i x_i}{\sum_i \beta_i}

    until ``||z_{t+1} - z_t|| <= tol * H_t`` with ``H_t = 1 / sum_i beta_i`` (the
    ``alpha``-weighted harmonic mean of the distances: a scale that outliers barely move and
    that follows translations and scalings of the updates), or ``iters`` steps. RFA starts
    from the weighted mean; we start from the coordinate-wise median, which does not change
    the minimiser but stays finite and near the honest updates when a Byzantine update sits
    near the dtype's maximum (the mean can overflow). Every iterate is a convex combination
    of the updates, so the result stays within their per-coordinate range. Breakdown
    point 1/2.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        ``(n,)`` or ``None``.
    nu
        Smoothing ``nu > 0`` (absolute, in the units of the updates).
    iters
        Maximum number of Weiszfeld steps, ``>= 1``.
    tol
        Relative stopping tolerance, ``>= 0``.

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` clients with positive weight;
        ``info["weights"]`` ``(n,)`` final normalised Weiszfeld weights (small for
        outliers); ``info["iterations"]`` scalar int64.

    Raises
    ------
    ValueError
        Bad input or hyperparameters out of range.

    Examples
    --------
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1000.0, 1000.0]])
    >>> geometric_median(x).update.norm() < 1.0
    tensor(True)
    """
    updates, weights = check_inputs("geometric_median", updates, weights)
    nu = check_real("geometric_median", "nu", nu, minimum=0.0, strict=True)
    iters = check_int("geometric_median", "iters", iters, minimum=1)
    tol = check_real("geometric_median", "tol", tol, minimum=0.0)
    n = updates.shape[0]
    alpha = updates.new_full((n,), 1.0 / n) if weights is None else weights / weights.sum()
    z = coordinate_median(updates)  # (d,)
    beta = alpha
    steps = 0
    while steps < iters:
        steps += 1
        inverse = alpha / row_norms(updates - z).clamp(min=nu)  # (n,), 0 for Inf distances
        total = inverse.sum()
        beta = inverse / total
        z_next = convex_mean(updates, beta)
        moved = row_norms((z_next - z)[None])[0]
        z = z_next
        if bool(moved * total <= tol):
            break
    return AggregationResult(
        update=finite_update("geometric_median", z),
        kept=_positive(alpha),
        info={"weights": beta, "iterations": torch.tensor(steps, device=updates.device)},
    )


def _zeros(d: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The first centre of centered clipping: ``(d,)`` zeros."""
    return torch.zeros(d, dtype=dtype, device=device)


@register_rule("centered_clipping", params={"tau": real(0.0, strict=True), "iters": integer(1)},
               use_weights=False, state=("center", _zeros),
               # translation equivariant only if the state is translated too
               equivariances=frozenset(), properties=frozenset({"permutation_invariant"}),
               why_not_dp="centered clipping is stateful and its sensitivity is not C/m")
def centered_clipping(updates: Tensor, weights: Tensor | None = None, *, center: Tensor,
                      tau: float, iters: int = 1) -> AggregationResult:
    r"""Centered clipping [Karimireddy, He & Jaggi, 2021].

    Starting from ``v_0 = center`` (the previous round's aggregate; zeros at the start),
    ``iters`` = ``L`` times:

    .. math:: v_{l+1} = v_l + \sum_i p_i\, (x_i - v_l)
              \min\!\left(1, \frac{\tau}{\|x_i - v_l\|}\right)

    with ``p = weights / sum(weights)`` (uniform when ``None``). Each step moves ``v`` by at
    most ``tau``, so a Byzantine update of any norm shifts the result by at most
    ``p_i * tau`` per step. Not translation equivariant unless ``center`` is translated
    with the updates; not scale equivariant (``tau`` is absolute).

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        ``(n,)`` or ``None``.
    center
        ``(d,)`` the state: the centre from the previous round.
    tau
        Clipping radius ``tau > 0``.
    iters
        Number of clipping iterations ``L >= 1``.

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)`` equal to the new centre; ``state`` the new centre (a separate
        tensor); ``kept`` clients with positive weight; ``info["clip_scales"]`` ``(n,)`` the
        factors ``min(1, tau / ||x_i - v||)`` of the last iteration.

    Raises
    ------
    ValueError
        Bad input, bad centre, or hyperparameters out of range.

    Examples
    --------
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1e6, 0.0]])
    >>> r = centered_clipping(x, center=torch.zeros(2), tau=1.0)
    >>> r.update
    tensor([0.6667, 0.3333])
    """
    updates, weights = check_inputs("centered_clipping", updates, weights)
    tau = check_real("centered_clipping", "tau", tau, minimum=0.0, strict=True)
    iters = check_int("centered_clipping", "iters", iters, minimum=1)
    n, d = updates.shape
    if not isinstance(center, Tensor) or center.shape != (d,):
        got = tuple(center.shape) if isinstance(center, Tensor) else type(center).__name__
        raise ValueError(
            f"centered_clipping: state (the centre) must be a tensor of shape (d,)=({d},), "
            f"got {got}: pass result.state from the previous round of the same model, or "
            "state=None to start from zeros"
        )
    v = center.to(dtype=updates.dtype, device=updates.device)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("centered_clipping: state (the centre) contains NaN or Inf")
    p = updates.new_full((n,), 1.0 / n) if weights is None else weights / weights.sum()
    scale = updates.new_ones(n)
    for _ in range(iters):
        diff = updates - v  # (n, d)
        scale = (tau / row_norms(diff)).clamp(max=1.0)  # (n,); a zero norm gives Inf -> 1
        v = v + (p * scale) @ diff
    return AggregationResult(
        update=finite_update("centered_clipping", v),
        kept=_positive(p),
        state=v.clone(),
        info={"clip_scales": scale},
    )
