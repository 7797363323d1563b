"""The batched engine mode: all of a round's sampled clients trained as one computation.

With ``engine = "batched"`` the in-process engine's transport
(:class:`simulations.engine.InProcessTransport`) hands a round's train payloads to
:func:`train_batched` instead of sending one message to the ClientApp per node, and
passes the trained tensors back as the replies (no Flower message either way). Each client is prepared exactly as ``client.app.handle_train`` prepares it
(its data, its role, data poisoning with the same generator, its batch-order generator),
then all clients train together from stacked parameters (with PGD adversarial
training, its inner maximisation batched too, :func:`client.functional.pgd_perturb`)
(:func:`client.functional.local_train_stacked`: one ``vmap`` over the clients per step),
then each client's update goes through what ``handle_train`` does after training (update
poisoning and boost for an attacker, local DP for an honest client, each with the same
generator). The engine wraps each result in the reply ``handle_train`` would send.

The stacked parameters exist for one round only; no per-client model is kept.

What is not batched falls back to the ClientApp, one client at a time, and the log says
so once per round, naming the feature: DP-SGD (Opacus' per-sample clipping and Poisson
sampling), models with dropout or with buffers (these for every client), and the clients of an attack that keeps state on its node (Neurotoxin).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aggregation.registry import derive_seed, make_generator
from client.app import client_role, parse_run_config, train_settings
from client.functional import (
    Perturb,
    local_train_stacked,
    pgd_perturb,
    stack_parameters,
    unsupported_features,
)
from client.local_dp import local_dp_update
from client.malicious import (
    DATA_ATTACKS,
    MaliciousRole,
    finish_backdoor_update,
    malicious_partitions,
    poison_data,
    reported_examples,
)
from client.task import ClientTask, load_task
from client.train import resolve_device
from runconfig.config import RunConfig, Scalar

__all__ = ["NODE_STATE_ATTACKS", "Outcome", "TrainJob", "TrainResult", "fallback_features", "train_batched"]

log = logging.getLogger("fedshield.engine")

NODE_STATE_ATTACKS = frozenset({"neurotoxin"})
"""Client-side attacks that keep state on their node between rounds (Neurotoxin keeps the
last global model it saw): their clients go to the ClientApp, which holds that state."""


@dataclass(frozen=True)
class TrainJob:
    """One train message: what ``handle_train`` reads from the message and the context."""

    run_config: Mapping[str, Scalar]
    node_config: Mapping[str, Scalar]
    global_state: Mapping[str, Tensor]
    server_round: int


@dataclass(frozen=True)
class TrainResult:
    """What ``handle_train`` replies: the new weights (``arrays``) and the ``metrics``."""

    state: dict[str, Tensor]
    metrics: dict[str, float | int]


Outcome = TrainResult | Exception | None
"""A job's result, the exception its ClientApp would have raised, or ``None``: train this
client with the ClientApp (a feature that is not batched)."""


def fallback_features(cfg: RunConfig, model: nn.Module) -> list[str]:
    """The settings of ``cfg`` and ``model`` that the batched training does not cover."""
    out = []
    if cfg.dp_sgd:
        out.append("dp-sgd")
    return out + [f"model with {f}" for f in unsupported_features(model)]


def train_batched(jobs: Sequence[TrainJob]) -> list[Outcome]:
    """Train the clients of ``jobs`` together; one outcome per job, in order.

    Jobs are grouped by round, global model and run config (a round's jobs form one
    group) and each group is trained as one stacked computation.
    """
    groups: dict[tuple[int, int, tuple[tuple[str, Scalar], ...]], list[int]] = {}
    for i, job in enumerate(jobs):
        key = (job.server_round, id(job.global_state), tuple(sorted(job.run_config.items())))
        groups.setdefault(key, []).append(i)
    out: list[Outcome] = [None] * len(jobs)
    for members in groups.values():
        group = [jobs[i] for i in members]
        for i, res in zip(members, _train_group(group), strict=True):
            out[i] = res
    return out


@dataclass(frozen=True)
class _Client:
    pid: int
    role: MaliciousRole
    x: Tensor
    y: Tensor
    generator: torch.Generator


def _train_group(jobs: Sequence[TrainJob]) -> list[Outcome]:
    first = jobs[0]
    r = first.server_round
    try:
        cfg = parse_run_config(first.run_config)
        settings = train_settings(cfg)
        task = load_task(first.run_config)
        model = task.build_model()
        model.load_state_dict(first.global_state, strict=True)
        device = resolve_device(cfg.device)
    except Exception as exc:  # every client of the group would raise the same
        return [exc] * len(jobs)
    features = fallback_features(cfg, model)
    if features:
        _log_fallback(r, len(jobs), len(jobs), features)
        return [None] * len(jobs)
    t0 = time.perf_counter()
    global_state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    out: list[Outcome] = [None] * len(jobs)
    ready: list[tuple[int, _Client]] = []
    one_by_one: set[str] = set()
    for i, job in enumerate(jobs):
        try:
            client = _prepare(cfg, task, job)
        except Exception as exc:
            out[i] = exc
            continue
        if client.role.attack in NODE_STATE_ATTACKS:
            one_by_one.add(f"attack {client.role.attack!r} (keeps state on its node)")
        else:
            ready.append((i, client))
    if one_by_one:
        _log_fallback(r, len(jobs) - len(ready) - sum(isinstance(o, Exception) for o in out),
                      len(jobs), sorted(one_by_one))
    if not ready:
        return out
    model.to(device).train()
    try:
        trained, losses = local_train_stacked(
            model, stack_parameters(model, len(ready), device=device),
            [(c.x, c.y) for _, c in ready], settings,
            generators=[c.generator for _, c in ready], device=device,
            perturb=_adversarial(cfg, [c.pid for _, c in ready], r),
        )
    except Exception as exc:
        for i, _ in ready:
            out[i] = exc
        return out
    trained_cpu = {k: v.to("cpu") for k, v in trained.items()}
    losses_cpu = losses.to("cpu")
    results: list[tuple[int, TrainResult]] = []
    for j, (i, c) in enumerate(ready):
        try:
            results.append((i, _finish(cfg, jobs[i], c, global_state,
                                       {k: v[j] for k, v in trained_cpu.items()},
                                       float(losses_cpu[j]))))
        except Exception as exc:
            out[i] = exc
    seconds = (time.perf_counter() - t0) / len(ready)  # each client's share of the batch
    for i, res in results:
        res.metrics["train-seconds"] = seconds
        out[i] = res
    return out


def _adversarial(cfg: RunConfig, pids: Sequence[int], server_round: int) -> Perturb | None:
    """PGD adversarial training's inner maximisation, with ``handle_train``'s settings and
    per-client generators; ``None`` without adversarial training."""
    if not cfg.adversarial_training:
        return None
    p = cfg.adversarial_training
    eps = float(p.get("eps", 0.1))
    return pgd_perturb(
        eps, float(p.get("alpha", eps / 4)), int(p.get("steps", 5)),
        [make_generator(derive_seed(cfg.seed, "pgd", pid, "round", server_round)) for pid in pids],
    )


def _log_fallback(server_round: int, count: int, total: int, features: Sequence[str]) -> None:
    log.info("round %d: batched engine: %d of %d clients trained one by one by the ClientApp "
             "(not batched: %s)", server_round, count, total, ", ".join(features))


def _prepare(cfg: RunConfig, task: ClientTask, job: TrainJob) -> _Client:
    """``handle_train`` before training: data, role, data poisoning, batch-order generator."""
    node_config, r = job.node_config, job.server_round
    x, y = task.train_data(node_config)
    pid = int(node_config.get("partition-id", -1))
    role = client_role(cfg, node_config)
    if role.active(r) and role.attack in DATA_ATTACKS:
        attackers = sorted(malicious_partitions(
            int(node_config["num-partitions"]), cfg.num_malicious, cfg.seed))
        x, y = poison_data(
            role, x, y,
            num_classes=task.num_classes,
            attacker_rank=attackers.index(pid),
            num_attackers=len(attackers),
            generator=make_generator(derive_seed(cfg.seed, "poison", pid, "round", r)),
        )
    if x.shape[0] == 0:
        raise ValueError("cannot train on an empty partition: give this client some data")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    gen = make_generator(derive_seed(cfg.seed, "train", pid, "round", r))
    return _Client(pid, role, x, y, gen)


def _finish(
    cfg: RunConfig, job: TrainJob, c: _Client, global_state: Mapping[str, Tensor],
    trained: Mapping[str, Tensor], train_loss: float,
) -> TrainResult:
    """``handle_train`` after training: update poisoning or local DP, then the reply."""
    r = job.server_round
    new_state = {k: trained[k] if k in trained else v.clone() for k, v in global_state.items()}
    attacking = c.role.active(r)
    if attacking or cfg.local_dp:
        keys = [k for k, v in new_state.items() if v.is_floating_point()]
        update = torch.cat([(new_state[k] - global_state[k]).reshape(-1) for k in keys])
        if attacking:
            attack_gen = make_generator(derive_seed(cfg.seed, "attack", c.pid, "round", r))
            sent = c.role.poison_update(update, r, generator=attack_gen)
            sent = finish_backdoor_update(c.role, sent, r, benign=None)
        else:
            p = dict(cfg.local_dp)
            sent = local_dp_update(
                update, float(p.pop("clipping_norm")), **p,
                generator=make_generator(derive_seed(cfg.seed, "local-dp", c.pid, "round", r)),
            )
        parts = torch.split(sent, [new_state[k].numel() for k in keys])
        for k, part in zip(keys, parts, strict=True):
            new_state[k] = global_state[k] + part.reshape(new_state[k].shape)
    metrics: dict[str, float | int] = {
        "num-examples": reported_examples(c.role, int(c.x.shape[0]), r),
        "train-loss": train_loss,
        "partition-id": c.pid,
        "num-partitions": int(job.node_config.get("num-partitions", -1)),
    }
    return TrainResult(new_state, metrics)
