"""Pre-aggregation steps: functions from ``(n, d)`` updates to ``(n', d)`` rows.

A step runs before an aggregation rule (see :func:`aggregation.compose`). Each returns a
:class:`~aggregation.PreAggResult` whose ``members`` ``(n', n)`` records which original
clients stand behind each new row, so that the rule's ``kept`` maps back to clients.
A step is registered by the :func:`~aggregation.catalog.register_pre` line above its
function.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_inputs, check_int, check_real, pairwise_sq_distances, row_norms
from ._types import PreAggResult, PreconditionError
from .catalog import ALL, TS, integer, real, register_pre

__all__ = ["bucketing", "nnm", "norm_clip"]


def _identity_members(updates: Tensor) -> Tensor:
    n = updates.shape[0]
    return torch.eye(n, dtype=torch.bool, device=updates.device)


@register_pre("norm_clip", params={"max_norm": real(0.0, strict=True)}, equivariances=frozenset(),
              preserves=frozenset({"permutation_invariant"}), dp_compatible=True,
              rowwise=True)  # row i stays client i's update, so histories keyed by client hold
def norm_clip(updates: Tensor, weights: Tensor | None = None, *,
              max_norm: float) -> PreAggResult:
    r"""Clip every update to Euclidean norm at most ``max_norm`` [Abadi et al., 2016].

    .. math:: x_i \leftarrow x_i \min\!\left(1, \frac{C}{\|x_i\|}\right)

    Bounds each client's influence on a mean to ``C / n``; the sensitivity that central DP
    noise is calibrated to.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        ``(n,)`` or ``None``, passed through unchanged.
    max_norm
        ``C > 0``.

    Returns
    -------
    PreAggResult
        ``updates`` ``(n, d)``; ``weights`` unchanged; ``members`` the identity ``(n, n)``.

    Raises
    ------
    ValueError
        Bad input or ``max_norm <= 0``.

    Examples
    --------
    >>> norm_clip(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), max_norm=1.0).updates
    tensor([[0.6000, 0.8000],
            [0.3000, 0.4000]])
    """
    updates, weights = check_inputs("norm_clip", updates, weights)
    c = check_real("norm_clip", "max_norm", max_norm, minimum=0.0, strict=True)
    scale = (c / row_norms(updates)).clamp(max=1.0)  # (n,); a zero norm gives Inf -> 1
    return PreAggResult(updates=updates * scale[:, None], weights=weights,
                        members=_identity_members(updates))


@register_pre("bucketing", params={"s": integer(1)}, equivariances=TS,
              preserves=frozenset({"unanimous", "within_bounds"}),
              why_not_dp="bucketing averages several clients into each row, so one client "
                         "affects more than its own clipped update")
def bucketing(updates: Tensor, weights: Tensor | None = None, *, s: int = 2,
              generator: torch.Generator | None) -> PreAggResult:
    r"""Random bucketing [Karimireddy, He & Jaggi, ICLR 2022].

    Draw a uniform random permutation ``pi`` of the ``n`` clients (from ``generator``),
    cut it into ``n' = ceil(n / s)`` consecutive buckets ``B_j`` of ``s`` clients (the last
    may be smaller) and replace the stack by the bucket means

    .. math:: y_j = \frac{\sum_{i \in B_j} w_i x_i}{\sum_{i \in B_j} w_i}, \qquad
              w'_j = \sum_{i \in B_j} w_i

    with ``w_i = 1`` when ``weights`` is ``None`` (so ``w'_j`` is the bucket size; a
    bucket whose weights are all zero gets its plain mean and weight 0). Averaging reduces
    the heterogeneity of honest rows by about ``s`` while at most ``f`` buckets contain a
    Byzantine client; a robust rule for ``f`` Byzantine then runs on the ``n'`` rows, so
    it needs ``n' = ceil(n / s)`` to meet its own precondition. Weighting inside a bucket
    does not weaken this: a bucket with a Byzantine member counts as Byzantine anyway.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        ``(n,)`` or ``None``.
    s
        Bucket size ``s >= 1`` (``s = 1`` only permutes); default 2.
    generator
        Required: the source of the permutation (randomness is an argument; the global
        RNG is never used). On any device; the permutation is moved to the updates.

    Returns
    -------
    PreAggResult
        ``updates`` ``(n', d)``; ``weights`` ``(n',)``; ``members`` ``(n', n)`` bucket
        membership (every client in exactly one bucket).

    Raises
    ------
    ValueError
        Bad input, ``s < 1``, or no generator.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> r = bucketing(torch.arange(5.0)[:, None], s=2, generator=g)
    >>> r.updates.shape, r.members.sum(dim=1).tolist()
    (torch.Size([3, 1]), [2, 2, 1])
    """
    updates, weights = check_inputs("bucketing", updates, weights)
    s = check_int("bucketing", "s", s, minimum=1)
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            "bucketing needs a torch.Generator for its random permutation, got "
            f"{type(generator).__name__}: pass generator=aggregation.make_generator("
            "aggregation.derive_seed(seed, 'round', r)); the global RNG is never used"
        )
    n, d = updates.shape
    buckets = math.ceil(n / s)
    pad = buckets * s - n
    perm = torch.randperm(n, generator=generator, device=generator.device).to(updates.device)
    w = updates.new_ones(n) if weights is None else weights
    w_perm = torch.cat([w[perm], w.new_zeros(pad)]).view(buckets, s)  # (n', s)
    x_perm = torch.cat([updates[perm], updates.new_zeros(pad, d)]).view(buckets, s, d)
    real = torch.cat([w.new_ones(n), w.new_zeros(pad)]).view(buckets, s)  # 0 = padding
    w_sum = w_perm.sum(dim=1)  # (n',)
    # convex weights within each bucket: weights first, then the sum, so no overflow
    p = real / real.sum(dim=1, keepdim=True)  # (n', s) uniform
    if weights is not None:
        safe = torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))
        p = torch.where((w_sum > 0)[:, None], w_perm / safe[:, None], p)
    rows = torch.einsum("bs,bsd->bd", p, x_perm)  # (n', d)
    members = torch.zeros(buckets, n, dtype=torch.bool, device=updates.device)
    members[torch.arange(n, device=updates.device) // s, perm] = True
    return PreAggResult(updates=rows, weights=w_sum, members=members)


@register_pre("nnm", params={"f": integer(0)}, equivariances=TS, preserves=ALL,
              why_not_dp="nearest-neighbour mixing puts one client into several rows, so it "
                         "affects more than its own clipped update")
def nnm(updates: Tensor, weights: Tensor | None = None, *, f: int) -> PreAggResult:
    r"""Nearest-neighbour mixing, NNM [Allouah et al., AISTATS 2023].

    Replace every update by the average of its ``n - f`` nearest neighbours, itself
    included:

    .. math:: y_i = \frac{1}{n - f} \sum_{j \in N_i} x_j, \qquad
              N_i = \{i\} \cup \text{the } n - f - 1 \text{ updates nearest to } x_i

    Composed with a robust rule for ``f`` Byzantine clients it turns that rule into one
    with an order-optimal heterogeneity error. Row ``i`` still stands for client ``i``
    (``members`` is the identity) and keeps its weight.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        ``(n,)`` or ``None``, passed through unchanged (mixing is uniform, as in the paper).
    f
        Number of Byzantine clients, ``n > 2f``.

    Returns
    -------
    PreAggResult
        ``updates`` ``(n, d)``; ``weights`` unchanged; ``members`` the identity ``(n, n)``.

    Raises
    ------
    ValueError
        Bad input or ``n <= 2f``.

    Examples
    --------
    >>> nnm(torch.tensor([[0.0], [1.0], [2.0], [10.0]]), f=1).updates.flatten().tolist()
    [1.0, 1.0, 1.0, 4.333333492279053]
    """
    updates, weights = check_inputs("nnm", updates, weights)
    f = check_int("nnm", "f", f, minimum=0)
    n = updates.shape[0]
    if n <= 2 * f:
        raise PreconditionError(f"nnm needs n > 2f, got n={n}, f={f}: lower f or sample more clients")
    dist = pairwise_sq_distances(updates, f)
    dist.fill_diagonal_(-1.0)  # each row is its own nearest neighbour, even among duplicates
    nearest = dist.topk(n - f, dim=1, largest=False).indices  # (n, n - f)
    mixing = updates.new_zeros(n, n)
    mixing.scatter_(1, nearest, 1.0 / (n - f))
    return PreAggResult(updates=mixing @ updates, weights=weights,
                        members=_identity_members(updates))
