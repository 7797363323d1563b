"""All parties of one secure aggregation in this process: tests, the cost table, examples.

:func:`run_local` drives a :class:`~secagg.protocol.ServerSession` and one client state per
node through the four stages, as the round component does over a transport, and lets the
caller drop nodes or alter messages at any stage.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .crypto import RandomBytes
from .protocol import STAGES, Msg, SecAggParams, SecAggResult, ServerSession, client_step

__all__ = ["run_local"]

# drop(stage, node) -> True: the node does not answer that stage's request
DropFn = Callable[[str, int], bool]
# tamper(stage, node, request) -> the request the node receives instead
TamperFn = Callable[[str, int, Msg], Msg]


def run_local(
    params: SecAggParams,
    inputs: Mapping[int, tuple[NDArray[np.floating], int]],
    *,
    session: str = "1",
    graph_seed: int = 0,
    min_survivors: int = 2,
    drop: DropFn | None = None,
    tamper: TamperFn | None = None,
    random_bytes: RandomBytes = os.urandom,
    noise_seed: int | None = None,
    on_stage: Callable[[str, Mapping[int, Msg], Mapping[int, Msg]], None] | None = None,
    times: dict[str, dict[str, float]] | None = None,
) -> SecAggResult:
    """Securely aggregate ``inputs`` (``node -> (update (d,), integer weight)``).

    A client raising (e.g. on a tampered message) propagates: tests see it. With distributed
    DP, node ``i``'s noise comes from ``numpy.random.SeedSequence([noise_seed, i])``.
    ``on_stage(stage, requests, replies)`` sees every exchange (byte counts in the bench).
    ``times``, if given, receives per stage the seconds of the slowest client
    (``"client-max"``), of all clients (``"client-total"``) and of the server (``"server"``,
    the step after the stage's replies; the first request is counted in the first stage).
    """
    dims = {np.asarray(u).shape for u, _ in inputs.values()}
    if len(dims) != 1:
        raise ValueError(f"all updates must have one shape, got {sorted(dims)}")
    (d,) = dims.pop()
    t0 = time.perf_counter()
    server = ServerSession(params, list(inputs), session=session, graph_seed=graph_seed,
                           dim=d, min_survivors=min_survivors)
    states: dict[int, dict[str, Any] | None] = {n: None for n in inputs}
    requests = server.advertise()
    setup = time.perf_counter() - t0
    steps: tuple[Callable[[dict[int, Msg | str]], dict[int, Msg] | SecAggResult], ...] = (
        server.share_keys, server.masked_input, server.unmask, server.result)
    for stage, advance in zip(STAGES, steps, strict=True):
        replies: dict[int, Msg | str] = {}
        client_s: list[float] = []
        for node, req in requests.items():
            if drop is not None and drop(stage, node):
                continue
            if tamper is not None:
                req = tamper(stage, node, req)
            update, weight = inputs[node]
            t0 = time.perf_counter()
            reply, states[node] = client_step(
                req, states[node], me=node, random_bytes=random_bytes,
                noise_seed=None if noise_seed is None else _node_seed(noise_seed, node),
                train=functools.partial(_given, np.asarray(update), weight))
            client_s.append(time.perf_counter() - t0)
            replies[node] = reply
        if on_stage is not None:
            on_stage(stage, requests, {n: r for n, r in replies.items() if isinstance(r, Msg)})
        t0 = time.perf_counter()
        out = advance(replies)
        if times is not None:
            times[stage] = {"client-max": max(client_s, default=0.0),
                            "client-total": sum(client_s),
                            "server": time.perf_counter() - t0 + setup}
            setup = 0.0
        if isinstance(out, SecAggResult):
            return out
        requests = out
    raise AssertionError("unreachable: result() ends the loop")


def _node_seed(seed: int, node: int) -> int:
    return int(np.random.SeedSequence([seed, node]).generate_state(1, np.uint64)[0])


def _given(update: NDArray[np.floating], weight: int) -> tuple[NDArray[np.floating], int]:
    return update, weight
