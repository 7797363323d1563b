"""Shared input validation, hyperparameter checks and the kernels every rule runs on.

The kernels are written for the memory bandwidth: an ``(n, d)`` stack is read in blocks of
columns and never copied whole. :func:`sorted_column_map` (median, trimmed mean, Bulyan)
sorts each column's ``n`` values in a small transposed block; :func:`pairwise_sq_distances`
(Krum, Multi-Krum, Bulyan, NNM) is one symmetric matrix product accumulated over column
pieces.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "check_inputs",
    "check_int",
    "check_real",
    "checked",
    "convex_mean",
    "coordinate_median",
    "finite_update",
    "krum_scores",
    "lex_order",
    "pairwise_sq_distances",
    "row_norms",
    "sorted_column_map",
]

# The (updates, weights) pair that the enclosing call has already validated; see checked().
_CHECKED: ContextVar[tuple[Tensor, Tensor | None] | None] = ContextVar(
    "aggregation_checked_inputs", default=None
)


@contextmanager
def checked(updates: Tensor, weights: Tensor | None) -> Iterator[None]:
    """Within the block, :func:`check_inputs` passes these very tensors without re-checking.

    A rule object, a composition or a detection wrapper validates its input once and then
    calls the registered function, which validates again when called directly; inside this
    block the second check is skipped for the *same* tensor objects (compared by identity),
    so every call validates each input once. Any other tensor (the output of a
    pre-aggregation step, say) is still checked. Scoped to the block and to the current
    thread or task: nothing is remembered across calls.

    A caller whose inputs are valid by construction may vouch for them the same way: the
    server's round loop does for the update stack it built from checked replies (finite,
    float64), so that a rule does not scan the ``(n, d)`` stack once more.

    Parameters
    ----------
    updates, weights
        As returned by :func:`check_inputs`.
    """
    token = _CHECKED.set((updates, weights))
    try:
        yield
    finally:
        _CHECKED.reset(token)


def check_inputs(rule: str, updates: object,
                 weights: object | None) -> tuple[Tensor, Tensor | None]:
    """Validate an ``(n, d)`` update stack and optional ``(n,)`` weights.

    Inside :func:`checked` for these very tensors, returns them without checking again.

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
    done = _CHECKED.get()
    if done is not None and updates is done[0] and (weights is None or weights is done[1]):
        return done[0], None if weights is None else done[1]
    return _validate(rule, updates, weights)


def _validate(rule: str, updates: object,
              weights: object | None) -> tuple[Tensor, Tensor | None]:
    """The checks of :func:`check_inputs`, always run."""
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


# sorted_column_map copies and sorts pieces of _SORT_ELEMENTS entries (1 MiB of float32,
# in a core's cache while it is sorted) and hands fn blocks of _MAP_ELEMENTS entries (so
# that fn's torch operations are few and large, and torch's own threads share them).
_SORT_ELEMENTS = 1 << 18
_MAP_ELEMENTS = 1 << 22
# stacks smaller than this (8 MiB of float32) are sorted on the calling thread alone
_THREADED_ELEMENTS = 1 << 21
# Up to this many rows, a sorting network on whole rows beats sorting every column (it has
# few comparators, each a vectorised minimum and maximum over contiguous memory).
_NETWORK_MAX_ROWS = 24
# The Gram matrix product runs as this many GEMMs over column chunks: large enough to run
# at the GEMM's full speed, while the centred chunk costs only 1 / _GRAM_CHUNKS of the stack.
_GRAM_CHUNKS = 4
# On CPU (float32 / float64) the columns are cut into _GRAM_GROUPS contiguous groups, each
# summed by one thread over pieces of about _GRAM_PIECE_ELEMENTS entries (4 MiB of float32,
# in cache between the centring and the product); the groups, and so the order of every
# sum, do not depend on the number of threads.
_GRAM_GROUPS = 8
_GRAM_PIECE_ELEMENTS = 1 << 20
# dtypes that numpy sorts (with its SIMD sort on x86 for float32 / float64)
_NUMPY_SORTS = (torch.float16, torch.float32, torch.float64)


@functools.cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort on ``n`` wires: comparators ``(a, b)``, ``a < b``.

    After every comparator puts the smaller of wires ``a`` and ``b`` on ``a``, the wires
    are sorted. Built for the next power of two and pruned to the ``n`` real wires (the
    missing ones act as ``+inf``, which no comparator moves down).
    """
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


@functools.cache
def selection_network(n: int, ranks: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """The comparators of :func:`sorting_network` that the wires ``ranks`` depend on.

    Working back from the last comparator, a comparator is kept when it writes a wire
    that a kept comparator (or the output) still reads. Each comes as ``(a, b, out)``:
    ``out`` is 0 when both its outputs are read later, 1 when only the minimum (wire ``a``)
    is, 2 when only the maximum (wire ``b``) is. After the kept comparators, wire ``r``
    holds the rank-``r`` value (0-based, ascending) of every ``r`` in ``ranks``, exactly
    as after the full network; the other wires hold anything. For the median of 21 rows
    this is 91 comparators (20 of them one-sided) instead of 112.
    """
    needed = set(ranks)
    kept: list[tuple[int, int, int]] = []
    for lo, hi in reversed(sorting_network(n)):
        if lo in needed or hi in needed:
            kept.append((lo, hi, 0 if lo in needed and hi in needed else
                         1 if lo in needed else 2))
            needed |= {lo, hi}
    return tuple(reversed(kept))


def sorted_column_map(x: Tensor, fn: Callable[[Tensor], Tensor], *,
                      rows: Tensor | None = None,
                      ranks: Sequence[int] | None = None) -> Tensor:
    """``fn`` applied to the sorted values of every column of ``x``, block by block.

    The columns of ``x`` ``(n, d)`` (or of ``x[rows]``) are cut into blocks of ``w``
    columns whose values are sorted column by column and handed to ``fn`` as ``(w, n)``
    (row ``j`` = column ``j`` of the block, ascending), which maps them to ``(w,)``.
    Nothing of size ``(n, d)`` is allocated: memory beyond ``x`` and the ``(d,)`` result
    is one block (at most 16 MiB of float32, and at most an eighth of ``x``). How a block is sorted depends only on speed,
    never on the result (the sorted values are the same):

    - CPU, float16/32/64, ``n <= 24``: a sorting network (:func:`sorting_network`) on the
      block's ``n`` rows, each comparator a numpy minimum and maximum over contiguous
      memory; with ``ranks``, only the comparators those ranks depend on
      (:func:`selection_network`);
    - CPU, float16/32/64, more rows: each piece is copied transposed (each column's ``n``
      values contiguous) and sorted by numpy, whose vectorised sort is an order of
      magnitude faster than torch's CPU sort on short rows;
    - otherwise ``torch.sort`` on the transposed block.

    On CPU the pieces (about 1 MiB each, so they stay in cache) of stacks over 8 MiB are
    sorted by the calling thread and ``torch.get_num_threads() - 1`` helper threads, each
    taking the next piece when it is free (numpy sorts and copies without the GIL);
    ``fn`` runs on the calling thread, where torch's own threads share it.

    Parameters
    ----------
    x
        ``(n, d)``.
    fn
        Maps a sorted ``(w, n)`` block (rows ascending; possibly a transposed view) to
        ``(w,)`` in ``x``'s dtype.
    rows
        ``(k,)`` int64 indices: use the columns of ``x[rows]`` (without copying ``x[rows]``).
    ranks
        The only columns of the sorted block that ``fn`` reads (0-based ranks, ascending
        values), or ``None`` for all. The other columns may then hold anything.

    Returns
    -------
    Tensor
        ``(d,)``, dtype and device of ``x``.
    """
    src = x.detach()
    n = src.shape[0] if rows is None else int(rows.numel())
    d = src.shape[1]
    piece = max(1, _SORT_ELEMENTS // max(n, 1))
    # a block is at most 16 MiB of float32 and at most an eighth of the stack
    width = max(1, min(d, _MAP_ELEMENTS // max(n, 1), max(piece, -(-d // 8))))
    out = src.new_empty(d)
    if not (src.device.type == "cpu" and src.dtype in _NUMPY_SORTS):
        buf = src.new_empty(width, n)
        picked = None if rows is None else rows.to(src.device)
        for s in range(0, d, width):
            w = min(width, d - s)
            values = src[:, s:s + w] if picked is None else src[picked, s:s + w]
            block = torch.sort(buf[:w].copy_(values.T), dim=1).values
            out[s:s + w] = fn(block)
        return out
    outputs = None if ranks is None else tuple(sorted(set(ranks)))
    if outputs is not None and not all(0 <= r < n for r in outputs):
        raise ValueError(f"sorted_column_map: ranks must lie in [0, n) = [0, {n}), "
                         f"got {list(outputs)}")
    if n > _NETWORK_MAX_ROWS:
        network = None
    elif outputs is None:
        network = tuple((lo, hi, 0) for lo, hi in sorting_network(n))
    else:
        network = selection_network(n, outputs)
    # the network sorts rows in place: an (n, width) block, handed to fn transposed
    buf = src.new_empty(width, n) if network is None else src.new_empty(n, width)
    picked_np = None if rows is None else rows.cpu().numpy()
    src_np, buf_np = src.numpy(), buf.numpy()

    def sort_piece(s: int, a: int, w: int) -> None:  # columns s + a:s + b, block a:b
        b = min(a + piece, w)
        values = src_np[:, s + a:s + b]
        if picked_np is not None:
            values = values[picked_np]
        if network is None:
            np.copyto(buf_np[a:b], values.T)
            buf_np[a:b].sort(axis=1)
            return
        target = buf_np[:, a:b]
        np.copyto(target, values)
        wires = list(target)
        spare = np.empty_like(wires[0])
        for lo, hi, only in network:
            if only == 1:
                np.minimum(wires[lo], wires[hi], out=wires[lo])
            elif only == 2:
                np.maximum(wires[lo], wires[hi], out=wires[hi])
            else:
                np.minimum(wires[lo], wires[hi], out=spare)
                np.maximum(wires[lo], wires[hi], out=wires[hi])
                wires[lo], spare = spare, wires[lo]
        # the swaps left the sorted wires in other rows' (and the spare's) memory
        if outputs is None:
            np.copyto(target, np.stack(wires))
        else:
            target[list(outputs)] = np.stack([wires[r] for r in outputs])

    # small stacks stay on this thread: handing pieces over would cost more than it saves
    helpers = 0 if n * d < _THREADED_ELEMENTS else min(torch.get_num_threads(),
                                                       -(-width // piece)) - 1
    pool = ThreadPoolExecutor(helpers) if helpers > 0 else None
    try:
        for s in range(0, d, width):
            w = min(width, d - s)
            pending = iter(range(0, w, piece))
            lock = threading.Lock()

            def drain(s: int = s, w: int = w, pending: Iterator[int] = pending,
                      lock: threading.Lock = lock) -> None:
                # pieces go to whichever thread is free: a thread slowed by other work on
                # its core takes fewer of them
                while True:
                    with lock:
                        a = next(pending, None)
                    if a is None:
                        return
                    sort_piece(s, a, w)

            jobs = [] if pool is None else [pool.submit(drain) for _ in range(helpers)]
            drain()  # the calling thread sorts pieces too
            for job in jobs:
                job.result()
            out[s:s + w] = fn(buf[:w] if network is None else buf[:, :w].T)
    finally:
        if pool is not None:
            pool.shutdown()
    return out


def coordinate_median(x: Tensor) -> Tensor:
    """Coordinate-wise median of ``(n, d)`` along the rows, numpy's convention.

    For even ``n`` the result is the average of the two middle values (``torch.median``
    returns the lower one instead), computed as ``a / 2 + b / 2``: the same rounding as
    ``(a + b) / 2`` but no overflow. Selected from each column's sorted values by
    :func:`sorted_column_map`; the values equal ``torch.median`` / ``torch.kthvalue``'s.

    Returns
    -------
    Tensor
        ``(d,)``.
    """
    n = x.shape[0]
    if n % 2 == 1:
        return sorted_column_map(x, lambda s: s[:, n // 2], ranks=(n // 2,))
    return sorted_column_map(x, lambda s: s[:, n // 2 - 1] / 2 + s[:, n // 2] / 2,
                             ranks=(n // 2 - 1, n // 2))


def _distance_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _centred_gram_chunks(x: Tensor, centre: Tensor, dtype: torch.dtype) -> Tensor:
    """``(x - centre) (x - centre)^T`` ``(n, n)`` in float64 (MPS: ``dtype``) by torch.

    A few GEMMs over column chunks, each chunk centred (and converted to ``dtype``) in one
    reused buffer; the chunks' products summed in float64.
    """
    n, d = x.shape
    width = -(-d // _GRAM_CHUNKS)
    buf = torch.empty(n, width, dtype=dtype, device=x.device)
    # the chunks' products are summed in float64 (in float32 on Apple's MPS, which has none)
    total = dtype if x.device.type == "mps" else torch.float64
    gram = torch.zeros(n, n, dtype=total, device=x.device)
    for s in range(0, d, width):
        w = min(width, d - s)
        c = buf[:, :w]  # (n, w)
        if x.dtype == dtype:
            torch.sub(x[:, s:s + w], centre[s:s + w], out=c)
        else:
            c.copy_(x[:, s:s + w]).sub_(centre[s:s + w])
        gram += (c @ c.T).to(total)
    return gram


@functools.cache
def _blas_controller() -> object:
    from threadpoolctl import ThreadpoolController  # scikit-learn's dependency

    return ThreadpoolController()


def _centred_gram_cpu(x: Tensor, centre: Tensor) -> Tensor:
    """``(x - centre) (x - centre)^T`` ``(n, n)`` in float64 for float32 / float64 on CPU.

    numpy computes ``c @ c.T`` of a centred piece ``c`` as a symmetric rank-k update (BLAS
    ``syrk``: half the multiplications of a general product, which torch's CPU matmul
    does), single-threaded, while this function's own threads (up to
    ``torch.get_num_threads()``) take the column groups: each group sums its pieces'
    products in float64 in column order, and the groups are summed in order, so the result
    is the same for any number of threads.
    """
    xs, z = x.numpy(), centre.numpy()
    n, d = xs.shape
    piece = max(1, _GRAM_PIECE_ELEMENTS // n)
    bounds = sorted({d * k // _GRAM_GROUPS for k in range(_GRAM_GROUPS + 1)})
    groups = list(zip(bounds[:-1], bounds[1:], strict=True))
    sums = [np.zeros((n, n), dtype=np.float64) for _ in groups]

    def run_group(g: int) -> None:
        lo, hi = groups[g]
        buf = np.empty((n, min(piece, hi - lo)), dtype=xs.dtype)
        for s in range(lo, hi, piece):
            c = buf[:, :min(piece, hi - s)]  # (n, w)
            np.subtract(xs[:, s:s + c.shape[1]], z[s:s + c.shape[1]], out=c)
            sums[g] += c @ c.T  # same operand twice: numpy calls syrk

    workers = 1 if n * d < _THREADED_ELEMENTS else min(torch.get_num_threads(), len(groups))
    with _blas_controller().limit(limits=1, user_api="blas"):  # type: ignore[attr-defined]
        if workers == 1:
            for g in range(len(groups)):
                run_group(g)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run_group, range(len(groups))))
    gram = sums[0]
    for part in sums[1:]:
        gram += part
    return torch.from_numpy(gram)


def pairwise_sq_distances(updates: Tensor, f: int | None = None) -> Tensor:
    """Squared Euclidean distances ``D[i, j] = ||x_i - x_j||^2`` of an ``(n, d)`` stack.

    Computed as ``G_ii + G_jj - 2 G_ij`` with the Gram matrix ``G = C C^T`` of the rows
    *centred on a coordinate-wise median*, ``C = X - z``: one matrix product, accumulated
    over column pieces of ``C`` (so ``C`` is never held whole); the pieces' ``(n, n)``
    products are summed in float64. On CPU, float32 and float64 pieces of about 4 MiB are
    multiplied by numpy's BLAS ``syrk`` (a symmetric product: half the multiplications of
    torch's GEMM; in float64, 4x faster than torch's on the AMD EPYC measured), in threads over fixed
    column groups (:func:`_centred_gram_cpu`: the same bits for any thread count);
    elsewhere torch multiplies a few large chunks (:func:`_centred_gram_chunks`). Why centred: the expansion cancels catastrophically
    when ``||x_i||`` is much larger than ``||x_i - x_j||`` (full model weights, or a common
    drift shared by every update); centring removes the common part, so the rounding error
    scales with the spread of the updates, not their norm. The centre ``z`` changes only
    the rounding, never the exact distances; it must lie among the honest updates, which is
    why it is a median (a few huge Byzantine rows would drag a mean far from the honest
    cluster and bring the cancellation back for honest pairs). With ``f`` given, ``z`` is
    the coordinate-wise median of the first ``min(n, 2f + 1)`` rows: at most ``f`` of them
    are Byzantine, so every coordinate of ``z`` lies within the honest values' range, the
    same guarantee the median of all ``n`` rows gives, for a sort of ``2f + 1`` values per
    coordinate instead of ``n``. Without ``f``, the (lower) median of all ``n`` rows.
    ``G_ii`` is read off the Gram matrix itself so that ``D_ii == 0`` exactly; ``D`` is
    symmetrised, and negatives (only rounding can produce them, the true value is
    ``>= 0``) are set to zero. A distance whose square overflows is Inf; a NaN (Inf - Inf,
    between two rows that both overflow) is set to Inf, which can only make such rows look
    farther apart. Half-precision inputs are centred and multiplied in float32, chunk by
    chunk; float32 and float64 in their own dtype.

    Parameters
    ----------
    updates
        ``(n, d)`` floating tensor.
    f
        The number of Byzantine rows the caller tolerates, or ``None``.

    Returns
    -------
    Tensor
        ``(n, n)`` in float32 or float64, on the device of ``updates``.
    """
    x = updates.detach()
    n, d = x.shape
    dtype = _distance_dtype(x.dtype)
    voters = x if f is None or 2 * f + 1 >= n else x[:2 * f + 1]  # (k, d), a view
    lower = (voters.shape[0] - 1) // 2
    centre = sorted_column_map(voters, lambda s: s[:, lower],
                               ranks=(lower,)).to(dtype)  # (d,) lower median
    if x.device.type == "cpu" and x.dtype == dtype:
        gram = _centred_gram_cpu(x, centre)
    else:
        gram = _centred_gram_chunks(x, centre, dtype)
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * gram).to(dtype)
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
