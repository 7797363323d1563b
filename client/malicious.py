"""Which clients are malicious, and what a malicious client does with its own resources.

A malicious client in ``client/`` knows only its own data and its own update (it is not
omniscient). Attacks that need the honest clients' updates (ALIE, IPM, min-max, ...) are
run by the simulation adversary in ``simulations/``; a client whose attack is one of those
trains honestly and the adversary replaces its update on the server side.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from aggregation.registry import derive_seed, make_generator

from .poisoning import DATA_ATTACKS

__all__ = [
    "BACKDOORS",
    "DATA_ATTACKS",
    "MaliciousRole",
    "backdoor_trigger",
    "data_attack_params",
    "finish_backdoor_update",
    "is_client_side_attack",
    "malicious_partitions",
    "poison_data",
    "reported_examples",
]

log = logging.getLogger("fedshield.client")

BACKDOORS: tuple[str, ...] = ("backdoor", "dba", "neurotoxin")
"""The data attacks that plant a trigger backdoor: the adversary measures their success
rate on the triggered test set, and :func:`finish_backdoor_update` shapes their update."""


@functools.lru_cache(maxsize=64)
def malicious_partitions(num_partitions: int, num_malicious: int, seed: int) -> frozenset[int]:
    """The partition ids that are malicious: a seeded uniform choice of ``num_malicious``.

    Every process (server, each client, the simulation engine) computes the same set from
    the run config, so ground truth needs no extra channel; within a process it is computed
    once per run (cached) and every caller reads that one set.

    Raises
    ------
    ValueError
        If ``num_malicious`` is negative or exceeds ``num_partitions``.

    Examples
    --------
    >>> sorted(malicious_partitions(10, 3, seed=0)) == sorted(malicious_partitions(10, 3, 0))
    True
    """
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    if not 0 <= num_malicious <= num_partitions:
        raise ValueError(
            f"num-malicious must be in [0, {num_partitions}] (the number of partitions), "
            f"got {num_malicious}"
        )
    gen = make_generator(derive_seed(seed, "malicious-partitions"))
    perm = torch.randperm(num_partitions, generator=gen)
    return frozenset(int(i) for i in perm[:num_malicious])


def is_client_side_attack(name: str) -> bool:
    """Whether ``name`` is an attack a client carries out on its own (data or update)."""
    from . import poisoning

    return name in poisoning.UPDATE_POISONINGS or name in DATA_ATTACKS


@dataclass(frozen=True)
class MaliciousRole:
    """What one client does this round: honest, or a named client-side attack.

    Parameters
    ----------
    attack
        Attack name; ``""`` for an honest client.
    params
        The attack's hyperparameters.
    start_round
        First round in which the attack is active (earlier rounds are honest).
    """

    attack: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    start_round: int = 1

    def active(self, server_round: int) -> bool:
        """True when the client attacks in ``server_round``."""
        return bool(self.attack) and server_round >= self.start_round

    def poison_update(
        self, update: Tensor, server_round: int, *, generator: torch.Generator
    ) -> Tensor:
        """Return the update to send: ``update`` itself unless an update attack is active."""
        from . import poisoning

        if not self.active(server_round) or self.attack not in poisoning.UPDATE_POISONINGS:
            return update
        attack = poisoning.get_update_poisoning(self.attack, **dict(self.params))
        return attack(update, generator=generator)


def data_attack_params(attack: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of the data attack ``attack``: its defaults overridden by ``params``.

    Raises
    ------
    KeyError
        Unknown data attack (the message lists the valid ones and a close match).
    TypeError
        A parameter the attack does not take.
    """
    return dict(DATA_ATTACKS.build(attack, **params).params)


def backdoor_trigger(params: Mapping[str, Any]) -> Any:
    """The global BadNets trigger described by a backdoor's attack params (pixel value 1.0).

    The value is the top of the [0, 1] input range that fedshield's datasets use.
    """
    from .poisoning import Trigger

    size = int(params.get("size", 2))
    pattern = str(params.get("pattern", "square"))
    if pattern == "square":
        return Trigger.square(size, value=1.0)
    if pattern == "checker":
        return Trigger.checker(size, value=1.0)
    raise ValueError(f"trigger pattern must be 'square' or 'checker', got {pattern!r}")


def poison_data(
    role: MaliciousRole,
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    attacker_rank: int,
    num_attackers: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Apply a data attack (label flip, a backdoor) to this client's own ``(x, y)``.

    ``attacker_rank`` is this client's index among the attackers (DBA gives attacker ``i``
    part ``i mod K`` of the trigger). Returns the data unchanged for other attacks.
    """
    from . import poisoning

    if role.attack == "label_flip":
        p = data_attack_params("label_flip", role.params)
        return x, poisoning.label_flip(
            y, num_classes, mode=p["mode"], target=int(p["target"]), generator=generator
        )
    if role.attack in BACKDOORS:  # all with the global trigger, DBA with its part of it
        p = data_attack_params(role.attack, role.params)
        trigger = backdoor_trigger(p)
        if role.attack == "dba":
            trigger = poisoning.distributed_triggers(
                trigger, num_attackers, num_parts=int(p["parts"])
            )[attacker_rank]
        x2, y2, _ = poisoning.backdoor_poison(
            x, y, trigger=trigger, target=int(p["target"]), fraction=float(p["fraction"]),
            generator=generator,
        )
        return x2, y2
    return x, y


def reported_examples(role: MaliciousRole, true_count: int, server_round: int) -> int:
    """The example count the client reports: inflated under ``inflate_examples``."""
    from . import poisoning

    if role.attack == "inflate_examples" and role.active(server_round):
        p = data_attack_params("inflate_examples", role.params)
        return poisoning.inflate_examples(true_count, float(p["factor"]))
    return true_count


def finish_backdoor_update(role: MaliciousRole, update: Tensor, server_round: int, *,
                           benign: Tensor | None) -> Tensor:
    """A backdoor attacker's last step on its ``(d,)`` update: Neurotoxin's projection
    (``neurotoxin`` only, :func:`client.poisoning.neurotoxin`), then model replacement,
    ``boost`` times the update scaled at most to the norm ``max_norm``
    (:func:`client.poisoning.model_replacement`).

    Parameters
    ----------
    role
        This client's role; other attacks, and rounds before the attack starts, get
        ``update`` back unchanged.
    update
        ``(d,)`` the update trained on the poisoned data.
    server_round
        The round, for the role's start and the log.
    benign
        ``(d,)`` Neurotoxin's benign direction, the global model's change since this client
        last saw it; ``None`` when it has no earlier global model (then the plain backdoor
        update is sent, and the log says so).

    Returns
    -------
    Tensor
        ``(d,)``, dtype and device of ``update``; with ``boost=1`` and ``max_norm=None``
        (and no projection) exactly ``update * 1.0``.

    Raises
    ------
    ValueError
        If the update is not finite, or ``benign`` has another shape.
    """
    from . import poisoning

    if role.attack not in BACKDOORS or not role.active(server_round):
        return update
    p = data_attack_params(role.attack, role.params)
    if role.attack == "neurotoxin":
        if benign is None:
            log.info("round %d: neurotoxin has no earlier global model on this client (its "
                     "first round), so it sends the plain backdoor update", server_round)
        update = poisoning.neurotoxin(update, benign, top_k=float(p["top_k"]))
    max_norm = None if p["max_norm"] is None else float(p["max_norm"])
    return poisoning.model_replacement(update, scale=float(p["boost"]), max_norm=max_norm)
