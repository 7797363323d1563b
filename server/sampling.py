"""Which nodes take part in a round: a bounded wait for nodes, then a seeded draw."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from .stages import Plan

__all__ = ["draw_sample", "wait_for_nodes"]

log = logging.getLogger("fedshield.server")


def wait_for_nodes(
    list_nodes: Callable[[], list[int]], wanted: int, *, timeout: float, rnd: int,
    excluded: set[int], poll_interval: float = 0.5,
) -> list[int]:
    """The sorted usable nodes (connected, not excluded), waiting at most ``timeout`` s for
    ``wanted`` of them; never waits forever."""
    deadline = time.monotonic() + timeout
    while True:
        out = sorted(n for n in list_nodes() if n not in excluded)
        if len(out) >= wanted or time.monotonic() >= deadline:
            return out
        log.info("round %d: %d usable nodes, waiting for %d", rnd, len(out), wanted)
        time.sleep(poll_interval)


def draw_sample(nodes: Sequence[int], plan: Plan, generator: torch.Generator) -> list[int]:
    """The round's sample of ``nodes`` (sorted) under ``plan``.

    ``"all"`` (or ``clients_per_round = 0``) takes every node; ``"poisson"`` each node
    independently with ``q = m / N`` (what amplification by sampling assumes); ``"fixed"``
    a uniform sample of ``min(m, N)`` nodes.
    """
    nodes = list(nodes)
    if plan.sampling == "all" or plan.clients_per_round == 0:
        return nodes
    if plan.sampling == "poisson":
        from .dp import poisson_sample

        if not nodes:
            return []
        q = min(1.0, plan.clients_per_round / len(nodes))
        return [nodes[i] for i in poisson_sample(len(nodes), q, generator=generator)]
    m = min(plan.clients_per_round, len(nodes))
    idx = torch.randperm(len(nodes), generator=generator)[:m].sort().values
    return [nodes[int(i)] for i in idx]
