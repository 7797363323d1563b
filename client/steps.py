"""What a client does around its training, written once for the ClientApp and the batched
engine (:mod:`simulations.batched`).

Before training (:func:`prepare_client`): the node's role, data poisoning for an active
data attacker, and the generator of its batch order. After training (:func:`finish_state`):
update poisoning for an active attacker, local DP for an honest client, each from its own
seeded generator; then the reply's metrics (:func:`reply_metrics`). No Flower here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from aggregation.registry import derive_seed, make_generator
from runconfig.config import RunConfig, Scalar

from .local_dp import local_dp_update
from .malicious import (
    DATA_ATTACKS,
    MaliciousRole,
    finish_backdoor_update,
    malicious_partitions,
    poison_data,
    reported_examples,
)
from .order import BatchSource, HashedOrder, hashed_round_seed

__all__ = [
    "ClientData", "client_role", "finish_state", "prepare_client", "reply_metrics",
    "train_generator",
]


def client_role(cfg: RunConfig, node_config: Mapping[str, Scalar]) -> MaliciousRole:
    """This node's role: malicious when its partition id is in the run's malicious set."""
    if cfg.num_malicious == 0 or "partition-id" not in node_config:
        return MaliciousRole()
    pid = int(node_config["partition-id"])
    num = int(node_config["num-partitions"])
    if pid in malicious_partitions(num, cfg.num_malicious, cfg.seed):
        return MaliciousRole(cfg.attack.name, cfg.attack.params, cfg.attack_start_round)
    return MaliciousRole()


@dataclass(frozen=True)
class ClientData:
    """One client's round before training: its partition id, role, (possibly poisoned)
    data, and the generator its batch order is drawn from."""

    pid: int
    role: MaliciousRole
    x: Tensor
    y: Tensor
    generator: BatchSource


def prepare_client(
    cfg: RunConfig, node_config: Mapping[str, Scalar], server_round: int,
    x: Tensor, y: Tensor, *, num_classes: int,
) -> ClientData:
    """The role, data poisoning (an active data attacker) and the training generator."""
    pid = int(node_config.get("partition-id", -1))
    role = client_role(cfg, node_config)
    if role.active(server_round) and role.attack in DATA_ATTACKS:
        attackers = sorted(malicious_partitions(
            int(node_config["num-partitions"]), cfg.num_malicious, cfg.seed))
        x, y = poison_data(
            role, x, y,
            num_classes=num_classes,
            attacker_rank=attackers.index(pid),
            num_attackers=len(attackers),
            generator=make_generator(derive_seed(cfg.seed, "poison", pid, "round", server_round)),
        )
    return ClientData(pid, role, x, y, train_generator(cfg, pid, server_round))


def train_generator(cfg: RunConfig, pid: int, server_round: int) -> BatchSource:
    """Where partition ``pid``'s batch order in ``server_round`` comes from
    (``batch-order``): its generator, or its :class:`~client.order.HashedOrder`."""
    if cfg.batch_order == "hashed":
        return HashedOrder(hashed_round_seed(cfg.seed, server_round), pid)
    return make_generator(derive_seed(cfg.seed, "train", pid, "round", server_round))


def finish_state(
    cfg: RunConfig, client: ClientData, server_round: int,
    global_state: Mapping[str, Tensor], new_state: dict[str, Tensor], *,
    benign: Tensor | None = None,
) -> dict[str, Tensor]:
    """The state to send: ``new_state``, or for an active attacker ``global + poisoned
    update``, for an honest client with local DP ``global + noised update``.

    ``new_state`` is changed in place and returned; ``benign`` is Neurotoxin's global change
    since the node last saw the model (``None`` elsewhere).
    """
    attacking = client.role.active(server_round)
    if not attacking and not cfg.local_dp:
        return new_state
    keys = [k for k, v in new_state.items() if v.is_floating_point()]
    update = torch.cat([(new_state[k] - global_state[k]).reshape(-1) for k in keys])
    pid = client.pid
    if attacking:
        attack_gen = make_generator(derive_seed(cfg.seed, "attack", pid, "round", server_round))
        sent = client.role.poison_update(update, server_round, generator=attack_gen)
        sent = finish_backdoor_update(client.role, sent, server_round, benign=benign)
    else:  # an honest client noises its own update before it leaves the device
        p = dict(cfg.local_dp)
        sent = local_dp_update(
            update, float(p.pop("clipping_norm")), **p,
            generator=make_generator(derive_seed(cfg.seed, "local-dp", pid, "round", server_round)),
        )
    for k, part in zip(keys, torch.split(sent, [new_state[k].numel() for k in keys]), strict=True):
        new_state[k] = global_state[k] + part.reshape(new_state[k].shape)
    return new_state


def reply_metrics(
    client: ClientData, node_config: Mapping[str, Scalar], server_round: int,
    train_loss: float, train_seconds: float, extra: Mapping[str, float] | None = None,
) -> dict[str, float | int]:
    """The train reply's metrics (the server checks each against its range)."""
    return {
        "num-examples": reported_examples(client.role, int(client.x.shape[0]), server_round),
        "train-loss": float(train_loss),
        **(extra or {}),
        "train-seconds": train_seconds,
        "partition-id": client.pid,
        "num-partitions": int(node_config.get("num-partitions", -1)),
    }
