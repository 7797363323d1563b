"""FLTrust: trust scores against a server-side reference update [Cao et al., NDSS 2021].

Robust statistics bound the aggregate by the spread of the clients' own updates, so a
majority of attackers, or attackers that hide inside the honest spread, win. FLTrust
anchors the aggregate to something the clients do not control: the server trains the global
model on a small clean *root dataset* each round, and that *reference* update ``g_0``
decides how much each client's update counts. The rule here is the maths over an ``(n, d)``
stack and the ``(d,)`` reference; the server-side training that makes the reference is the
round component ``server.fltrust.RootUpdate`` (run config key ``root-dataset``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_inputs, convex_mean, finite_update, row_norms
from ._types import AggregationResult
from .catalog import check_reference, register_rule

__all__ = ["fltrust"]

_PERMUTATION = frozenset({"permutation_invariant"})


def _directions(x: Tensor) -> Tensor:
    """Unit rows of ``(n, d)``, without overflow in the squares.

    Each row is divided by its largest absolute entry before it is normalised, so rows
    near the dtype's maximum keep their direction; a zero row stays zero (no direction).
    """
    peak = x.abs().amax(dim=1, keepdim=True)  # (n, 1)
    scaled = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    inner = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)  # (n, 1), in [1, sqrt(d)]
    return scaled / torch.where(inner > 0, inner, torch.ones_like(inner))


@register_rule("fltrust", equivariances=frozenset(), properties=_PERMUTATION,
               why_not_dp="each update is rescaled to the norm of the server's own update "
                          "and weighted by its trust score, which depends on the other "
                          "clients, so one client moves the result by more than C/m")
def fltrust(updates: Tensor, weights: Tensor | None = None, *,
            reference: Tensor) -> AggregationResult:
    r"""FLTrust: cosine trust scores against a server-side update [Cao et al., NDSS 2021].

    .. math:: TS_i = \mathrm{ReLU}\big(\cos(g_i, g_0)\big), \qquad
              \bar{g}_i = \frac{\lVert g_0 \rVert}{\lVert g_i \rVert}\, g_i, \qquad
              g = \frac{\sum_i TS_i\, \bar{g}_i}{\sum_j TS_j}

    ``g_0`` is the *reference*: the server's own update, from training the global model on
    a small clean root dataset this round. An update pointing away from it (cosine
    ``<= 0``) gets no weight, whatever its size; every update is rescaled to the reference's
    norm, so scaling an update up or down changes nothing. A zero update has no direction
    and gets trust 0. If no update has positive trust (or the reference is zero), the
    result is the zero update: ``kept`` is empty and ``info["all_distrusted"]`` is 1, so
    the round is visibly a no-op rather than silently one. No precondition on ``f``: the
    guarantee rests on the root dataset being clean and representative, not on a majority.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        Ignored (validated by the rule object; client-reported counts carry no trust here).
    reference
        ``(d,)`` the server's update ``g_0``: finite, in the updates' dtype and on their
        device (the server computes it in float64 on its device, like the stack).

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``, same dtype and device as ``updates``, of norm ``||g_0||`` or
        less; ``kept`` the clients with ``TS_i > 0``; ``info``: ``"cosine"`` ``(n,)``
        ``cos(g_i, g_0)`` (0 for a zero update), ``"trust"`` ``(n,)`` ``TS_i``,
        ``"weights"`` ``(n,)`` ``TS_i / sum_j TS_j`` (zeros if all distrusted), and the
        0-d ``"reference_norm"`` ``||g_0||``, ``"trusted"`` (number of clients with
        ``TS_i > 0``) and ``"all_distrusted"`` (1 when that number is 0, else 0).

    Raises
    ------
    ValueError
        Bad input, or a reference that is missing, not a ``(d,)`` tensor of the updates'
        dtype and device, or not finite.

    Examples
    --------
    >>> x = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-5.0, 0.0]])
    >>> res = fltrust(x, reference=torch.tensor([1.0, 0.0]))
    >>> res.info["trust"]  # the opposite update gets none
    tensor([1.0000, 0.7071, 0.0000])
    >>> res.kept.tolist()
    [0, 1]
    >>> res.update  # ([1, 0] + 0.7071 [0.7071, 0.7071]) / 1.7071
    tensor([0.8787, 0.2929])
    """
    updates, _ = check_inputs("fltrust", updates, None)
    ref = check_reference("fltrust", reference, updates)
    # half precision: the (n, d) work in float32
    x = updates if updates.dtype in (torch.float32, torch.float64) else updates.float()
    r = ref.to(x.dtype)  # (d,)
    unit = _directions(x)  # (n, d)
    ref_unit = _directions(r[None, :])[0]  # (d,)
    ref_norm = row_norms(r[None, :])[0]  # 0-d
    cosine = unit @ ref_unit  # (n,); 0 for a zero update or a zero reference
    trust = torch.relu(cosine)
    total = trust.sum()
    trusted = trust > 0
    if bool(total > 0):
        p = trust / total
        # ||g_0|| * sum_i p_i g_i / ||g_i||: the rescaled updates' convex combination
        update = ref_norm * convex_mean(unit, p)
    else:
        p = torch.zeros_like(trust)
        update = torch.zeros_like(r)
    out = updates.dtype
    return AggregationResult(
        update=finite_update("fltrust", update.to(out)),
        kept=trusted.nonzero().flatten(),
        info={
            "cosine": cosine.to(out),
            "trust": trust.to(out),
            "weights": p.to(out),
            "reference_norm": ref_norm.to(out),
            "trusted": trusted.sum(),
            "all_distrusted": (~trusted.any()).to(out),
        },
    )
