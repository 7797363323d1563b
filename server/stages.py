"""The round as stages, and the interface of the components that act at them.

A round runs these stages in order (:func:`server.loop.run_rounds`)::

    configure   once, before round 1: components adjust the :class:`Plan`
    exclude     nodes a component keeps out of sampling (quarantine)
    sample      wait (bounded) for nodes, draw the round's sample (seeded)
    admit       a component may skip the round or stop the run (privacy budget)
    exchange    send the model, receive replies; one component may own it (SecAgg)
    validate    decode and check replies; stack the updates (n, d) as float64
    server      a component may compute a server-side update (d,) (FLTrust)
    transform   components change the stacked updates (the simulation adversary)
    aggregate   the rule, or the one component that owns aggregation (central DP)
    post        components change the aggregate (d,)
    evaluate    central evaluation of the new model; components add metrics
    revise      a component may replace the new global model (rollback)
    record      components add to the round's row and report (DP booking, detection)
    publish     the finished row and report go out (metrics files, logs, progress)
    checkpoint  the model, the rule's state and every component's state

A :class:`Component` overrides the methods of the stages it acts at (the others are
no-ops) and keeps its state explicit: :meth:`Component.init_state` makes it, every stage
method takes it and returns the new one, and the loop checkpoints and restores it the same
way for every component. A state is made of tensors, numbers, strings, ``None``, lists and
dicts of these (what ``torch.load(weights_only=True)`` reads back).

No Flower here: a :class:`Transport` is what the loop needs from the grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from aggregation import AggregationResult

from .rounds import ClientReply, Payload, Rejection, Reply, ReplyBlock

__all__ = [
    "STAGES",
    "Component",
    "Payload",
    "Plan",
    "Reply",
    "Round",
    "Transport",
    "Verdict",
]

State = Any

STAGES = (
    "configure", "exclude", "admit", "exchange", "server_update", "transform", "aggregate",
    "post_aggregate", "evaluate", "revise", "record", "publish",
)


@dataclass(frozen=True)
class Plan:
    """How rounds sample and when they aggregate; components may change it before round 1.

    Attributes
    ----------
    sampling
        ``"fixed"`` (a seeded sample of ``clients_per_round``), ``"poisson"`` (each node
        independently with ``q = m / N``) or ``"all"``.
    clients_per_round
        ``m``; ``0`` means every connected node.
    min_clients
        Fewer valid replies than this and the round is skipped, model unchanged.
    node_wait_timeout
        Seconds to wait for ``max(min_clients, clients_per_round)`` nodes.
    round_timeout
        Seconds to wait for the replies of one exchange.
    """

    sampling: str
    clients_per_round: int
    min_clients: int
    node_wait_timeout: float
    round_timeout: float

    def __post_init__(self) -> None:
        if self.sampling not in ("fixed", "poisson", "all"):
            raise ValueError(f"sampling must be fixed, poisson or all, got {self.sampling!r}")
        if self.sampling == "poisson" and self.clients_per_round < 1:
            raise ValueError("poisson sampling needs clients-per-round >= 1 (the expected m)")


@dataclass(frozen=True)
class Verdict:
    """A component's decision at the ``admit`` stage: skip this round, or stop the run."""

    action: str  # "skip" or "stop"
    reason: str

    def __post_init__(self) -> None:
        if self.action not in ("skip", "stop"):
            raise ValueError(f"verdict action must be skip or stop, got {self.action!r}")


class Transport(Protocol):
    """What the round loop needs from a Flower grid (see :mod:`server.transport`)."""

    def node_ids(self) -> list[int]:
        """The nodes connected now."""
        ...

    def send(
        self, message_type: str, payloads: Mapping[int, Payload], *, timeout: float
    ) -> Sequence[Reply | ReplyBlock]:
        """Send ``payloads[node]`` to each node; return the replies that came back in time,
        in the order of ``payloads``. Replies trained together may come as one
        :class:`~server.rounds.ReplyBlock` (the batched engine);
        :func:`~server.rounds.expand_replies` makes them one :class:`Reply` each."""
        ...


@dataclass
class Round:
    """What one round has produced so far; the loop fills it stage by stage.

    Components read it; they change the round only through their return values.
    """

    number: int
    global_flat: Tensor  # (d,) float64: the model the clients start from
    nodes: tuple[int, ...] = ()  # connected and not excluded
    sampled: tuple[int, ...] = ()
    sample_note: str | None = None  # why nobody was sampled
    replies: tuple[ClientReply, ...] = ()
    accepted: tuple[ClientReply, ...] = ()
    rejections: list[Rejection] = field(default_factory=list)
    server_update: Tensor | None = None  # (d,)
    result: AggregationResult | None = None
    new_global: Tensor | None = None  # (d,); None while the round is skipped
    skipped_reason: str | None = None
    seconds: float = 0.0  # validation to aggregate
    update_norm: float | None = None  # of the applied aggregate
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Component:
    """A cross-cutting concern of the round; override the stages it acts at.

    Every method is a no-op here, so a component names only its own stages. ``name``
    keys its state in checkpoints and must be unique in a run.
    """

    name: str = "component"
    owns_exchange: bool = False  # True: exchange() replaces the default train exchange
    owns_aggregation: bool = False  # True: aggregate() replaces the rule
    # A failure of a component's stage skips the round (or, after aggregation, only drops
    # its metrics); a critical component's failure to record ends the run instead, since
    # going on would be unsafe (central DP booking a released round).
    critical: bool = False

    def init_state(self) -> State:
        """The state before round 1."""
        return None

    def configure(self, plan: Plan) -> Plan:
        """Once, before round 1: the plan this component needs."""
        return plan

    def exclude(self, rnd: int, state: State) -> tuple[set[int], State]:
        """Node ids to keep out of this round's sample (quarantine)."""
        return set(), state

    def admit(self, rnd: Round, state: State) -> tuple[Verdict | None, State]:
        """After sampling: ``None`` to go on, or a :class:`Verdict`."""
        return None, state

    def exchange(
        self, rnd: Round, transport: Transport, payload: Payload, timeout: float, state: State
    ) -> tuple[Sequence[Reply | ReplyBlock], State]:
        """Own the round's exchanges (only if ``owns_exchange``); return the train replies."""
        raise NotImplementedError(f"{self.name} does not own the exchange")

    def server_update(
        self, rnd: Round, model: nn.Module, state: State
    ) -> tuple[Tensor | None, State]:
        """A ``(d,)`` update the server computes itself (``model`` holds the global model)."""
        return None, state

    def transform(
        self, rnd: Round, updates: Tensor, weights: Tensor, state: State
    ) -> tuple[Tensor, Tensor, State]:
        """Change the ``(n, d)`` updates and ``(n,)`` weights before aggregation."""
        return updates, weights, state

    def aggregate(
        self, rnd: Round, updates: Tensor, weights: Tensor, generator: torch.Generator,
        state: State,
    ) -> tuple[AggregationResult, State]:
        """Aggregate in place of the rule (only if ``owns_aggregation``)."""
        raise NotImplementedError(f"{self.name} does not own aggregation")

    def post_aggregate(self, rnd: Round, update: Tensor, state: State) -> tuple[Tensor, State]:
        """Change the ``(d,)`` aggregate before it is applied."""
        return update, state

    def evaluate(self, rnd: int, model: nn.Module, state: State) -> dict[str, float]:
        """Extra metrics of the global model (it may be evaluated more than once a round)."""
        return {}

    def revise(self, rnd: Round, state: State) -> tuple[Tensor | None, State]:
        """After evaluation: a ``(d,)`` global model to use instead of the new one, or ``None``."""
        return None, state

    def record(
        self, rnd: Round, row: Mapping[str, Any], report: Mapping[str, Any], state: State
    ) -> tuple[dict[str, Any], dict[str, Any], State]:
        """Fields to add to the round's metrics row and to its audit report."""
        return {}, {}, state

    def publish(
        self, rnd: int, row: Mapping[str, Any], report: Mapping[str, Any] | None, state: State
    ) -> State:
        """The round's finished metrics row and audit report (``None`` for round 0)."""
        return state


def stages_of(component: Component) -> list[str]:
    """The stages ``component`` acts at: the methods it overrides, in its class or set on
    the instance."""
    return [
        s for s in STAGES
        if getattr(getattr(component, s), "__func__", None) is not getattr(Component, s)
    ]
