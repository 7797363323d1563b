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

from torch import Tensor, nn

from aggregation.registry import derive_seed, make_generator
from client.app import parse_run_config, train_settings
from client.functional import (
    Perturb,
    local_train_stacked,
    pgd_perturb,
    stack_parameters,
    unsupported_features,
)
from client.steps import ClientData, finish_state, prepare_client, reply_metrics
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
    ready: list[tuple[int, ClientData]] = []
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


def _prepare(cfg: RunConfig, task: ClientTask, job: TrainJob) -> ClientData:
    """``handle_train`` before training (:func:`client.steps.prepare_client`), and the
    refusals ``local_train`` would make."""
    x, y = task.train_data(job.node_config)
    client = prepare_client(cfg, job.node_config, job.server_round, x, y,
                            num_classes=task.num_classes)
    if client.x.shape[0] == 0:
        raise ValueError("cannot train on an empty partition: give this client some data")
    if client.x.shape[0] != client.y.shape[0]:
        raise ValueError(f"x has {client.x.shape[0]} rows but y has {client.y.shape[0]}")
    return client


def _finish(
    cfg: RunConfig, job: TrainJob, c: ClientData, global_state: Mapping[str, Tensor],
    trained: Mapping[str, Tensor], train_loss: float,
) -> TrainResult:
    """``handle_train`` after training (:mod:`client.steps`): update poisoning or local DP,
    then the reply (``train-seconds`` is set by the caller)."""
    new_state = {k: trained[k] if k in trained else v.clone() for k, v in global_state.items()}
    state = finish_state(cfg, c, job.server_round, global_state, new_state)
    metrics = reply_metrics(c, job.node_config, job.server_round, train_loss, 0.0)
    return TrainResult(state, metrics)
