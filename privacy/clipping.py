"""Per-row L2 clipping of an ``(n, d)`` stack: the step that bounds each row's sensitivity.

One implementation for every mechanism: central DP clips each client's update, local DP
the client's own update (one row), DP-SGD each example's gradient (one row per example).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_positive

__all__ = ["check_updates", "clip_updates"]


def check_updates(what: str, updates: object) -> Tensor:
    """``updates`` if it is a finite floating-point ``(n, d)`` tensor with ``d >= 1``.

    ``n = 0`` is allowed (a DP round with no replies still releases noise).

    Raises
    ------
    ValueError
        Naming ``what`` and the problem (type, dtype, shape, or the rows with NaN / Inf).

    Examples
    --------
    >>> check_updates("clip", torch.zeros(0, 3)).shape
    torch.Size([0, 3])
    """
    if not isinstance(updates, Tensor):
        raise ValueError(
            f"{what}: updates must be a torch.Tensor of shape (n, d), "
            f"got {type(updates).__name__}"
        )
    if not updates.is_floating_point() or updates.dim() != 2 or updates.shape[1] < 1:
        raise ValueError(
            f"{what}: updates must be a floating-point (n, d) tensor with d >= 1, got "
            f"dtype {updates.dtype} and shape {tuple(updates.shape)}"
        )
    if not bool(torch.isfinite(updates).all()):
        bad = (~torch.isfinite(updates)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"{what}: updates contain NaN or Inf in rows {bad[:10]}: reject those clients "
            "before the DP step (a per-client decision keeps the guarantee)"
        )
    return updates


def clip_updates(updates: Tensor, clipping_norm: float) -> tuple[Tensor, Tensor, Tensor]:
    """Clip each row to L2 norm at most ``C`` [McMahan et al., 2018; Abadi et al., 2016].

    ``clipped_i = x_i * min(1, C / ||x_i||_2)``.

    Norms are computed in float64, and the scale of clipped rows carries a relative safety
    margin ``tol = 4 eps(dtype) + d eps(float64)`` (about ``5e-7`` in float32) that absorbs
    the rounding of the norm and of the product, so that the exact norm of every stored row
    is ``<= C``. (A float32 norm of a ``d = 1e6`` vector can be off by ``1e-5`` relative.)
    Rows with ``||x_i|| <= C (1 - tol)`` are returned unchanged.

    Parameters
    ----------
    updates
        ``(n, d)`` floating-point, finite; ``n = 0`` is allowed.
    clipping_norm
        ``C > 0``.

    Returns
    -------
    clipped
        ``(n, d)``, same dtype and device.
    norms
        ``(n,)`` L2 norms of the input rows, same dtype and device.
    was_clipped
        ``(n,)`` bool, True where the row was scaled down (``||x_i|| > C (1 - tol)``).

    Raises
    ------
    ValueError
        If ``updates`` is not a finite ``(n, d)`` float tensor or ``C <= 0``.

    References
    ----------
    McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent Language
    Models". ICLR 2018. Abadi et al. "Deep Learning with Differential Privacy". CCS 2016.

    Examples
    --------
    >>> x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    >>> clipped, norms, was = clip_updates(x, 1.0)
    >>> torch.allclose(clipped[0], torch.tensor([0.6, 0.8])), was.tolist()
    (True, [True, False])
    """
    updates = check_updates("clip_updates", updates)
    c = check_positive("clipping_norm", clipping_norm)
    d = updates.shape[1]
    tol = 4 * torch.finfo(updates.dtype).eps + d * torch.finfo(torch.float64).eps
    bound = c * (1.0 - tol)
    norms64 = torch.linalg.vector_norm(updates, dim=1, dtype=torch.float64)  # (n,)
    was_clipped = norms64 > bound
    scale = torch.where(was_clipped, bound / norms64.clamp_min(bound), torch.ones_like(norms64))
    clipped = updates * scale.to(updates.dtype).unsqueeze(1)
    return clipped, norms64.to(updates.dtype), was_clipped
