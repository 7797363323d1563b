"""Small round components that show each extension point of :mod:`server.stages`.

They are the examples of ``docs/architecture.md``; the real features (secure aggregation,
quarantine, rollback, FLTrust) are built the same way.

- :class:`TwoExchanges` owns the exchange: a ``query`` to every sampled node, then ``train``
  to the nodes that answered (secure aggregation needs several exchanges per round).
- :class:`Quarantine` keeps nodes out of sampling.
- :class:`Rollback` replaces the new global model after evaluation when the loss got worse.
- :class:`ServerStep` computes a server-side update from data the server holds and uses it
  in place of the clients' updates (FLTrust needs such an update every round).
- :class:`RoundCounter` only keeps state, to show that checkpoints restore it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from server.rounds import Payload, Reply
from server.stages import Component, Round, Transport


class TwoExchanges(Component):
    """Two exchanges per round: ``query`` (who is ready?), then ``train`` to those ready."""

    name = "two-exchanges"
    owns_exchange = True

    def init_state(self) -> dict[str, int]:
        return {"exchanges": 0}

    def exchange(
        self, rnd: Round, transport: Transport, payload: Payload, timeout: float,
        state: dict[str, int],
    ) -> tuple[list[Reply], dict[str, int]]:
        ask = Payload(configs={"config": {"server-round": rnd.number}})
        ready = [r.node_id for r in transport.send("query", {n: ask for n in rnd.sampled},
                                                   timeout=timeout) if r.error is None]
        replies = transport.send("train", {n: payload for n in ready}, timeout=timeout)
        return replies, {"exchanges": state["exchanges"] + 2}


class Quarantine(Component):
    """Keeps the given node ids out of every round's sample."""

    name = "quarantine"

    def __init__(self, nodes: set[int]) -> None:
        self.nodes = set(nodes)

    def exclude(self, rnd: int, state: Any) -> tuple[set[int], Any]:
        return set(self.nodes), state


class Rollback(Component):
    """Keeps the previous global model when a round raised the test loss by more than
    ``tolerance``; state: the loss of the model in use."""

    name = "rollback"

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance

    def init_state(self) -> dict[str, float | None]:
        return {"loss": None}

    def publish(
        self, rnd: int, row: Mapping[str, Any], report: Mapping[str, Any] | None,
        state: dict[str, Any],
    ) -> dict[str, Any]:
        return {"loss": row["loss"]} if rnd == 0 else state  # the initial model's loss

    def revise(self, rnd: Round, state: dict[str, Any]) -> tuple[Tensor | None, dict[str, Any]]:
        loss = rnd.metrics["loss"]
        if state["loss"] is not None and loss > state["loss"] + self.tolerance:
            return rnd.global_flat, state  # back to the model the round started from
        return None, {"loss": loss}


class ServerStep(Component):
    """One full-batch SGD step on the server's own data, used as every client's update."""

    name = "server-step"

    def __init__(self, x: Tensor, y: Tensor, lr: float) -> None:
        self.x, self.y, self.lr = x, y, lr

    def server_update(
        self, rnd: Round, model: nn.Module, state: Any
    ) -> tuple[Tensor | None, Any]:
        return server_step_update(model, self.x, self.y, self.lr), state

    def transform(
        self, rnd: Round, updates: Tensor, weights: Tensor, state: Any
    ) -> tuple[Tensor, Tensor, Any]:
        assert rnd.server_update is not None
        return rnd.server_update.to(updates).expand_as(updates).clone(), weights, state


def server_step_update(model: nn.Module, x: Tensor, y: Tensor, lr: float) -> Tensor:
    """``(d,)``: the floating state entries after one SGD step minus before, in state order."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            assert p.grad is not None
            p -= lr * p.grad
    after = model.state_dict()
    return torch.cat([
        (after[k].double() - before[k].double()).reshape(-1)
        for k, v in before.items() if v.is_floating_point()
    ])


class RoundCounter(Component):
    """Counts the rounds it has recorded; its state goes through checkpoints."""

    name = "counter"

    def init_state(self) -> dict[str, int]:
        return {"rounds": 0}

    def record(
        self, rnd: Round, row: Mapping[str, Any], report: Mapping[str, Any],
        state: dict[str, int],
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
        count = state["rounds"] + 1
        return {"counted-rounds": count}, {}, {"rounds": count}
