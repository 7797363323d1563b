"""Result types and the protocols every aggregator and pre-aggregation step satisfies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["AggregationResult", "Aggregator", "PreAggResult", "PreAggregator"]


@dataclass(frozen=True)
class AggregationResult:
    """What an aggregation rule returns.

    Attributes
    ----------
    update
        ``(d,)`` aggregated update, same dtype and device as the input updates.
    kept
        ``(k,)`` int64, sorted, unique indices into the original ``n`` clients whose
        updates the rule accepted (all of them for coordinate-wise rules, the selected ones
        for Krum-type rules), on the device of the updates.
    state
        New state for a stateful rule (``centered_clipping``: the new centre, ``(d,)``;
        ``foolsgold``, ``fldetector``: a dict of tensors holding per-client histories);
        ``None`` for stateless rules. Pass it back as ``state=`` in the next round.
    info
        Diagnostics as tensors, e.g. ``{"scores": (n,)}`` for Krum.
    """

    update: Tensor
    kept: Tensor
    state: object | None = None
    info: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PreAggResult:
    """What a pre-aggregation step returns.

    Attributes
    ----------
    updates
        ``(n', d)`` transformed updates, same dtype and device as the input.
    weights
        ``(n',)`` weights of the new rows, or ``None`` when the input had none and the step
        keeps one row per client.
    members
        ``(n', n)`` bool: ``members[j, i]`` is True when original client ``i`` stands behind
        row ``j``. Used by :func:`aggregation.compose` to map ``kept`` back to clients.
    """

    updates: Tensor
    weights: Tensor | None
    members: Tensor


@runtime_checkable
class Aggregator(Protocol):
    """An aggregation rule: ``(n, d)`` updates (and ``(n,)`` weights) to one ``(d,)`` update."""

    @property
    def name(self) -> str:
        """Registered name of the rule."""
        ...

    @property
    def stateful(self) -> bool:
        """Whether the rule carries state from round to round."""
        ...

    def init_state(self, d: int, *, dtype: torch.dtype,
                   device: torch.device | str) -> object | None:
        """Initial state for ``d`` parameters (``None`` for stateless rules)."""
        ...

    def __call__(self, updates: Tensor, weights: Tensor | None = None, *,
                 state: object | None = None,
                 generator: torch.Generator | None = None,
                 clients: Tensor | None = None,
                 reference: Tensor | None = None) -> AggregationResult:
        """Aggregate ``updates`` ``(n, d)`` into an :class:`AggregationResult`.

        The keywords after ``state`` are the round's context; a rule uses those it needs
        (and refuses a call without them) and ignores the others:

        ``generator``
            Randomness (``torch.Generator``), for rules and steps that draw.
        ``clients``
            ``(n,)`` int64 stable, unique client identities, one per row, for rules that
            key a history by client.
        ``reference``
            ``(d,)`` the server's update on its root dataset (same dtype and device as the
            updates), for rules that score clients against it.
        """
        ...


@runtime_checkable
class PreAggregator(Protocol):
    """A step applied to the ``(n, d)`` stack before an aggregation rule."""

    @property
    def name(self) -> str:
        """Registered name of the step."""
        ...

    def __call__(self, updates: Tensor, weights: Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> PreAggResult:
        """Transform ``updates`` ``(n, d)`` into ``(n', d)`` rows."""
        ...


class PreconditionError(ValueError):
    """A rule's precondition on the number of clients fails for this round's ``n``.

    The rule is sound but this round has too few clients for it (``krum`` with
    ``n < 2f + 3``, ...): a server skips the round. Any other ``ValueError`` is a bug or
    bad input and must not be mistaken for this.
    """

