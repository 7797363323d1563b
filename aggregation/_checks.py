"""Shared input validation, hyperparameter checks and the distance kernel."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "check_inputs",
    "check_int",
    "check_real",
    "convex_mean",
    "finite_update",
    "krum_scores",
    "lex_order",
    "pairwise_sq_distances",
    "row_norms",
]


def check_inputs(rule: str, updates: object,
                 weights: object | None) -> tuple[Tensor, Tensor | None]:
    """Validate an ``(n, d)`` update stack and optional ``(n,)`` weights.

    Parameters
    ----------
    rule
        Name used in error messages.
    updates
        Must be a floating-point 2-D tensor with ``n >= 1`` rows and ``d >= 1`` columns,
        all finite.
    weights
        ``None`` or a real tensor of shape ``(n,)``: finite, non-negative, not all zero.

    Returns
    -------
    tuple
        ``(updates, weights)`` with ``weights`` converted to the dtype and device of
        ``updates`` (or ``None``).

    Raises
    ------
    ValueError
        Naming what is wrong with the input.
    """
    if not isinstance(updates, Tensor):
        raise ValueError(
            f"{rule}: updates must be a torch.Tensor of shape (n, d), "
            f"got {type(updates).__name__}"
        )
    if not updates.is_floating_point():
        raise ValueError(
            f"{rule}: updates must be a floating-point tensor, got dtype {updates.dtype}: "
            "convert with .float()"
        )
    if updates.dim() != 2:
        raise ValueError(
            f"{rule}: updates must be 2-D (n, d), got shape {tuple(updates.shape)}: "
            "flatten each client's update into one row"
        )
    n, d = updates.shape
    if n < 1 or d < 1:
        raise ValueError(
            f"{rule}: updates must have n >= 1 clients and d >= 1 parameters, "
            f"got shape {tuple(updates.shape)}"
        )
    # Any NaN or Inf makes the sum non-finite, and a sum is ~20x cheaper than an (n, d)
    # isfinite mask; only a non-finite sum (or a finite overflow) pays for the exact check.
    if not bool(torch.isfinite(updates.sum())) and not bool(torch.isfinite(updates).all()):
        bad = (~torch.isfinite(updates)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"{rule}: updates contain NaN or Inf in rows {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}: drop or reject those clients first"
        )
    if weights is None:
        return updates, None
    if not isinstance(weights, Tensor):
        raise ValueError(
            f"{rule}: weights must be None or a torch.Tensor of shape (n,)=({n},), "
            f"got {type(weights).__name__}"
        )
    if weights.shape != (n,):
        raise ValueError(
            f"{rule}: weights must have shape (n,)=({n},), got {tuple(weights.shape)}"
        )
    if weights.dtype == torch.bool or weights.is_complex():
        raise ValueError(f"{rule}: weights must be real numbers, got dtype {weights.dtype}")
    w = weights.to(dtype=updates.dtype, device=updates.device)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{rule}: weights must be finite, got {weights.tolist()[:10]}")
    if bool((w < 0).any()):
        neg = (w < 0).nonzero().flatten().tolist()
        raise ValueError(f"{rule}: weights must be non-negative, negative at rows {neg[:10]}")
    if not bool((w > 0).any()):
        raise ValueError(f"{rule}: weights are all zero: at least one client needs weight > 0")
    return updates, w


def check_int(rule: str, param: str, value: object, *, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= minimum``.

    Raises
    ------
    TypeError
        If ``value`` is not an int.
    ValueError
        If ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{rule}: {param} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{rule}: {param} must be >= {minimum}, got {param}={value}")
    return value


def check_real(rule: str, param: str, value: object, *, minimum: float = -math.inf,
               strict: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real ``>= minimum`` (``>`` if strict).

    Raises
    ------
    TypeError
        If ``value`` is not a real number.
    ValueError
        If it is not finite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{rule}: {param} must be a number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{rule}: {param} must be finite, got {param}={value}")
    if x < minimum or (strict and x == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{rule}: {param} must be {op} {minimum:g}, got {param}={value}")
    return x


def finite_update(rule: str, update: Tensor) -> Tensor:
    """Return ``update`` if it is finite, else raise.

    Raises
    ------
    ValueError
        If the aggregate overflowed (only possible when updates sit near the dtype's
        maximum, beyond what the rule's robustness covers).
    """
    if not bool(torch.isfinite(update).all()):
        raise ValueError(
            f"{rule} produced a non-finite update (overflow: some updates are near the "
            f"largest {update.dtype} value): reject such clients, add norm_clip, or use a "
            "robust rule with a larger f"
        )
    return update


def convex_mean(x: Tensor, p: Tensor | None = None) -> Tensor:
    """``sum_i p_i x_i`` over the rows of ``(n, d)`` for ``p`` on the simplex (uniform if None).

    Computed as a convex combination (weights first, then the sum), so it never overflows
    for finite input, unlike ``x.sum(0) / n``, which a Byzantine update near the dtype's
    maximum can push to Inf.

    Returns
    -------
    Tensor
        ``(d,)``.
    """
    if p is None:
        p = x.new_full((x.shape[0],), 1.0 / x.shape[0])
    return torch.matmul(p, x)


def row_norms(v: Tensor) -> Tensor:
    """Euclidean norm of every row of ``(n, d)``, without overflow in the squares.

    ``torch.linalg.vector_norm`` squares the entries, so a row of entries ~1e20 has an Inf
    norm in float32. Rows whose plain norm is not finite are recomputed as
    ``m * ||v / m||`` with ``m = max |v_j|``; they are Inf only if the true norm is.

    Returns
    -------
    Tensor
        ``(n,)``.
    """
    norms: Tensor = torch.linalg.vector_norm(v, dim=1)
    if bool(torch.isfinite(norms).all()):
        return norms
    peak = v.abs().amax(dim=1)  # (n,)
    safe = torch.where(torch.isfinite(peak) & (peak > 0), peak, torch.ones_like(peak))
    scaled = peak * torch.linalg.vector_norm(v / safe[:, None], dim=1)
    return torch.where(torch.isfinite(peak), scaled, peak)


def _distance_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def pairwise_sq_distances(updates: Tensor) -> Tensor:
    """Squared Euclidean distances ``D[i, j] = ||x_i - x_j||^2`` of an ``(n, d)`` stack.

    Computed as ``G_ii + G_jj - 2 G_ij`` with the Gram matrix ``G = C C^T`` of the rows
    *centred on their coordinate-wise median*, ``C = X - median_i(X)``. Why: the expansion
    cancels catastrophically when ``||x_i||`` is much larger than ``||x_i - x_j||`` (full
    model weights, or a common drift shared by every update); centring removes the common
    part, so the rounding error scales with the spread of the updates, not their norm. The
    median (not the mean) is the centre because a few huge Byzantine rows would drag a mean
    far from the honest cluster and bring the cancellation back for honest pairs.
    ``G_ii`` is read off the Gram matrix itself so that ``D_ii == 0`` exactly; ``D`` is
    symmetrised, and negatives (only rounding can produce them, the true value is
    ``>= 0``) are set to zero. A distance whose square overflows is Inf; a NaN (Inf - Inf,
    between two rows that both overflow) is set to Inf, which can only make such rows look
    farther apart. Half-precision inputs are computed in float32.

    Parameters
    ----------
    updates
        ``(n, d)`` floating tensor.

    Returns
    -------
    Tensor
        ``(n, n)`` in float32 or float64, on the device of ``updates``.
    """
    x = updates.to(_distance_dtype(updates.dtype))
    c = x - x.median(dim=0).values  # (n, d)
    gram = c @ c.T  # (n, n)
    sq = gram.diagonal()
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    dist = 0.5 * (dist + dist.T)
    dist = torch.nan_to_num(dist, nan=math.inf, posinf=math.inf, neginf=math.inf)
    dist.fill_diagonal_(0.0)
    return dist.clamp_(min=0.0)


def krum_scores(dist: Tensor, k: int) -> Tensor:
    """Krum score of every row: the sum of its ``k`` smallest distances to *other* rows.

    Parameters
    ----------
    dist
        ``(n, n)`` squared distances.
    k
        Neighbourhood size, ``0 <= k <= n - 1``.

    Returns
    -------
    Tensor
        ``(n,)`` scores.
    """
    n = dist.shape[0]
    if k == 0:
        return dist.new_zeros(n)
    off = dist.clone()
    off.fill_diagonal_(math.inf)
    return off.topk(k, dim=1, largest=False).values.sum(dim=1)


def lex_order(primary: Tensor, secondary: Tensor) -> Tensor:
    """Indices sorting rows by ``primary``, ties by ``secondary``, then by index.

    The secondary key (each row's total distance to all others) makes Krum-type selection
    independent of the order of the clients when two rows tie exactly, which happens by
    construction whenever the score is a single distance (mutual nearest neighbours).

    Returns
    -------
    Tensor
        ``(n,)`` int64.
    """
    by_secondary = torch.sort(secondary, stable=True).indices
    by_primary = torch.sort(primary[by_secondary], stable=True).indices
    return by_secondary[by_primary]
