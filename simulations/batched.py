"""The batched engine mode: all of a round's sampled clients trained as one computation.

With ``engine = "batched"`` the in-process engine's transport
(:class:`simulations.engine.InProcessTransport`) hands a round's train payloads to
:func:`train_batched` instead of sending one message to the ClientApp per node, and
passes the trained tensors back as the replies (no Flower message either way). Each
client is prepared exactly as ``client.app.handle_train`` prepares it (its data, its role,
data poisoning with the same generator, its batch-order source), then all clients train
together from the global model (:func:`client.functional.local_train_stacked`: one
``vmap`` over the clients per step; with PGD adversarial training its inner maximisation
batched too, :func:`client.functional.pgd_perturb`), then each client's update goes
through what ``handle_train`` does after training (update poisoning and boost for an
attacker, local DP for an honest client, each with the same generator).

Clients whose trained parameters are their replies (no attack active this round, no local
DP: at scale, nearly all) are answered together, as one :class:`TrainedBlock`: the stacked
parameters and the reply metrics as columns, which the transport hands to the server as a
:class:`server.rounds.ReplyBlock` that it checks and stacks with one tensor operation per
entry. The others get the reply ``handle_train`` would send, each its own. The partitions
of a round are read from the dataset with one indexing (``train_data_concat``), and with
``batch-order = "hashed"`` every client's batch order comes from the same few tensor
operations (:mod:`client.order`): what remains per client is bookkeeping.

The stacked parameters exist for one round only; no per-client model is kept.

What is not batched falls back to the ClientApp, one client at a time, and the log says
so once per round, naming the feature: DP-SGD (Opacus' per-sample clipping and Poisson
sampling), models with dropout or with buffers (these for every client), and the clients of
an attack that keeps state on its node (Neurotoxin). A model whose forward pass ``vmap``
cannot run (a random operation such as dropout called as a function, a branch on a
tensor's value) fails the batched step: its clients then go to the ClientApp too, and the
log gives the error. A tied parameter (one tensor under two names) is trained once and
replied under each name.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from aggregation.registry import derive_seed, make_generator
from client.adversarial import outside_box
from client.app import PGD_BOX, parse_run_config, pgd_options, train_settings
from client.functional import (
    Perturb,
    StackedData,
    local_train_stacked,
    pgd_perturb,
    unsupported_features,
)
from client.malicious import DATA_ATTACKS, MaliciousRole
from client.order import BatchSource
from client.steps import (
    ClientData,
    client_role,
    finish_state,
    prepare_client,
    reply_metrics,
    train_generator,
)
from client.task import ClientTask, load_task
from client.train import TrainSettings, resolve_device
from runconfig.config import RunConfig, Scalar
from server.rounds import StackedArrays

__all__ = ["NODE_STATE_ATTACKS", "Outcome", "TrainJob", "TrainResult", "fallback_features", "train_batched"]

log = logging.getLogger("fedshield.engine")

NODE_STATE_ATTACKS = frozenset({"neurotoxin"})
"""Client-side attacks that keep state on their node between rounds (Neurotoxin keeps the
last global model it saw): their clients go to the ClientApp, which holds that state."""


class TrainJob(NamedTuple):
    """One train message: what ``handle_train`` reads from the message and the context.

    (A named tuple: a round makes one per client, a thousand of them.)"""

    run_config: Mapping[str, Scalar]
    node_config: Mapping[str, Scalar]
    global_state: Mapping[str, Tensor]
    server_round: int


@dataclass(frozen=True)
class TrainResult:
    """What ``handle_train`` replies: the new weights (``arrays``) and the ``metrics``: the
    reply of a client whose update was changed after training (poisoning, local DP); the
    others are rows of a :class:`TrainedBlock`."""

    state: Mapping[str, Tensor]
    metrics: dict[str, float | int]


@dataclass(frozen=True)
class TrainedBlock:
    """Clients whose trained parameters are their replies, as they are: the rows of
    ``stack``, and their reply metrics as columns over those rows (what
    :func:`client.steps.reply_metrics` gives each, in its key order)."""

    stack: StackedArrays
    metrics: dict[str, list[float | int]]


Outcome = TrainResult | tuple[TrainedBlock, int] | Exception | None
"""A job's result: its reply (:class:`TrainResult`), row ``j`` of a :class:`TrainedBlock`,
the exception its ClientApp would have raised, or ``None``: train this client with the
ClientApp (a feature that is not batched)."""


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
    # a round's jobs share one payload and equal run configs: compared, not hashed (a
    # thousand sorted configs cost more than the comparisons)
    groups: list[tuple[TrainJob, list[int]]] = []
    for i, job in enumerate(jobs):
        for head, members in groups:
            if (job.server_round == head.server_round and job.global_state is head.global_state
                    and (job.run_config is head.run_config
                         or job.run_config == head.run_config)):
                members.append(i)
                break
        else:
            groups.append((job, [i]))
    out: list[Outcome] = [None] * len(jobs)
    for _, members in groups:
        group = [jobs[i] for i in members]
        for i, res in zip(members, _train_group(group), strict=True):
            out[i] = res
    return out


class _Ready(NamedTuple):
    """A client about to train: its job's index (``job``), partition, role and batch-order
    source, and its data (``None``: its rows of the group's concatenated data)."""

    job: int
    pid: int
    role: MaliciousRole
    generator: BatchSource
    data: tuple[Tensor, Tensor] | None = None


def _train_group(jobs: Sequence[TrainJob]) -> list[Outcome]:
    first = jobs[0]
    r = first.server_round
    try:
        cfg, settings, task, model = _setup(tuple(sorted(first.run_config.items())))
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
    ready, data = _prepare_all(cfg, task, jobs, out)
    if cfg.adversarial_training:
        ready, data = _inside_pgd_box(ready, data, out)
    if not ready:
        return out
    model.to(device).train()
    try:
        trained, losses = local_train_stacked(
            model, _expanded(model, len(ready), device), data, settings,
            generators=[c.generator for c in ready], device=device,
            perturb=_adversarial(cfg, [c.pid for c in ready], r),
        )
    except Exception as exc:  # what vmap cannot run, the ClientApp can
        # e.g. a random operation or a data-dependent branch in the model's forward pass,
        # which vmap refuses and unsupported_features cannot see; a client whose own data
        # is at fault gets the ClientApp's error from it
        reason = " ".join(str(exc).split())
        log.warning("round %d: batched engine: training %d clients as one computation "
                    "failed (%s: %s); they are trained one by one by the ClientApp", r,
                    len(ready), type(exc).__name__,
                    reason if len(reason) <= 300 else reason[:297] + "...")
        return out  # the ready clients' outcomes are still None: the ClientApp's
    # every entry of the state, stacked: trained (a tied parameter's every name: the one
    # tensor), or the global one for all (a buffer)
    source = _parameter_names(model)
    stack = StackedArrays({
        k: (trained[source[k]].to("cpu") if k in source
            else v.unsqueeze(0).expand(len(ready), *v.shape))
        for k, v in global_state.items()
    })
    loss = losses.to("cpu").tolist()
    offsets = [0, *itertools.accumulate(data.sizes)]
    alone: list[tuple[int, TrainResult]] = []  # changed after training: their own reply
    for j, c in enumerate(ready):
        if not (c.role.active(r) or cfg.local_dp):
            continue
        x, y = (c.data if c.data is not None else
                (data.x[offsets[j]:offsets[j + 1]], data.y[offsets[j]:offsets[j + 1]]))
        try:
            alone.append((c.job, _finish(
                cfg, jobs[c.job], ClientData(c.pid, c.role, x, y, c.generator), global_state,
                {k: v[j] for k, v in stack.arrays.items()}, loss[j])))
        except Exception as exc:
            out[c.job] = exc
    seconds = (time.perf_counter() - t0) / len(ready)  # each client's share of the batch
    for i, res in alone:
        res.metrics["train-seconds"] = seconds
        out[i] = res
    if len(alone) + sum(isinstance(out[c.job], Exception) for c in ready) == len(ready):
        return out
    # the others' replies are their rows: honest (or not attacking this round) without
    # local DP, so each reports its true number of examples (reply_metrics' keys, in order)
    block = TrainedBlock(stack, {
        "num-examples": list(data.sizes),
        "train-loss": loss,
        "train-seconds": [seconds] * len(ready),
        "partition-id": [c.pid for c in ready],
        "num-partitions": [int(jobs[c.job].node_config.get("num-partitions", -1))
                           for c in ready],
    })
    for j, c in enumerate(ready):
        if out[c.job] is None:
            out[c.job] = (block, j)
    return out


def _data_error(task: ClientTask, job: TrainJob) -> Exception | None:
    """What ``task.train_data`` raises for the job's node config, or ``None``."""
    try:
        task.train_data(job.node_config)
    except Exception as exc:
        return exc
    return None


def _parameter_names(model: nn.Module) -> dict[str, str]:
    """Every name of a parameter in the model's state, mapped to the one name
    ``named_parameters()`` gives it: tied parameters (one tensor under two names, e.g. an
    embedding shared with the output layer) are trained once and replied under each name."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name)
            for name, p in model.named_parameters(remove_duplicate=False)}


def _expanded(model: nn.Module, k: int, device: torch.device) -> dict[str, Tensor]:
    """The model's parameters as K clients' starting point: expanded views, no copies
    (:func:`client.functional.local_train_stacked` writes new tensors at its first step)."""
    return {name: p.detach().to(device).unsqueeze(0).expand(k, *p.shape)
            for name, p in model.named_parameters()}


def _prepare_all(
    cfg: RunConfig, task: ClientTask, jobs: Sequence[TrainJob], out: list[Outcome]
) -> tuple[list[_Ready], StackedData]:
    """Every job's client before training, as ``handle_train`` prepares it; a client that
    cannot train gets its exception in ``out``, one not batched stays ``None`` there.

    A client that is not an active data attacker trains on its partition as it is: those
    are read from the dataset together (``train_data_concat`` when the task has it); a data
    attacker's data is poisoned alone (:func:`client.steps.prepare_client`).
    """
    r = jobs[0].server_round
    ready: list[_Ready] = []
    plain: list[tuple[int, MaliciousRole]] = []
    one_by_one: set[str] = set()
    honest = MaliciousRole()
    if cfg.num_malicious == 0:  # every client honest: nothing to decide per client
        plain = [(i, honest) for i in range(len(jobs))]
    for i, job in enumerate(jobs if cfg.num_malicious else ()):
        try:
            role = client_role(cfg, job.node_config)
            if role.attack in NODE_STATE_ATTACKS:
                one_by_one.add(f"attack {role.attack!r} (keeps state on its node)")
            elif role.active(r) and role.attack in DATA_ATTACKS:
                poisoned = _prepare(cfg, task, job)
                ready.append(_Ready(i, poisoned.pid, poisoned.role, poisoned.generator,
                                    (poisoned.x, poisoned.y)))
            else:
                plain.append((i, role))
        except Exception as exc:  # the ClientApp reads the data first: its refusal first
            out[i] = _data_error(task, job) or exc
    if one_by_one:
        skipped = len(jobs) - len(ready) - len(plain) - sum(isinstance(o, Exception) for o in out)
        _log_fallback(r, skipped, len(jobs), sorted(one_by_one))
    concat = getattr(task, "train_data_concat", None)
    together = None
    if concat is not None and plain:
        try:
            together = concat([jobs[i].node_config for i, _ in plain])
        except Exception:  # one of them is refused: each asks alone, to get its own error
            together = None
    pieces: dict[int, tuple[Tensor, Tensor]] = {}
    if together is None:
        for i, _ in plain:
            try:
                pieces[i] = task.train_data(jobs[i].node_config)
            except Exception as exc:
                out[i] = exc
    sizes = together[2] if together is not None else None
    for j, (i, role) in enumerate(plain):
        if out[i] is not None:
            continue
        n = sizes[j] if sizes is not None else int(pieces[i][0].shape[0])
        if n == 0:
            out[i] = ValueError("cannot train on an empty partition: give this client some data")
            continue
        if sizes is None and pieces[i][0].shape[0] != pieces[i][1].shape[0]:
            out[i] = ValueError(f"x has {pieces[i][0].shape[0]} rows but y has "
                                f"{pieces[i][1].shape[0]}")
            continue
        pid = int(jobs[i].node_config.get("partition-id", -1))
        ready.append(_Ready(i, pid, role, train_generator(cfg, pid, r), pieces.get(i)))
    ready.sort(key=lambda c: c.job)
    if together is not None and all(c.data is None for c in ready):  # the common case
        x, y, _ = together
        return ready, StackedData(x, y, tuple(n for n in together[2] if n > 0))
    offsets = [0, *itertools.accumulate(together[2])] if together is not None else []
    place = {i: j for j, (i, _) in enumerate(plain)}
    parts = []
    for c in ready:
        if c.data is None:
            assert together is not None
            lo, hi = offsets[place[c.job]], offsets[place[c.job] + 1]
            parts.append((together[0][lo:hi], together[1][lo:hi]))
        else:
            parts.append(c.data)
    ready = [_Ready(c.job, c.pid, c.role, c.generator, parts[j]) for j, c in enumerate(ready)]
    if not ready:
        return ready, StackedData(torch.zeros(0), torch.zeros(0), ())
    return ready, StackedData(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]),
                              tuple(int(x.shape[0]) for x, _ in parts))


def _inside_pgd_box(
    ready: list[_Ready], data: StackedData, out: list[Outcome]
) -> tuple[list[_Ready], StackedData]:
    """The clients whose inputs lie in PGD's clamp box, and their data; each other client
    gets the refusal in ``out`` that ``client.adversarial.pgd`` raises in its ClientApp.

    One client's data outside the box must fail that client alone, as in the per-client
    engine, not every client that shares its batched step (:func:`pgd_perturb` checks a
    step's inputs together). The message gives the client's whole data's range; the
    ClientApp's gives the range of its first batch outside the box.
    """
    if not ready:
        return ready, data
    lo, hi = PGD_BOX
    sizes = torch.tensor(data.sizes)
    flat = data.x.reshape(data.x.shape[0], -1)
    client = torch.repeat_interleave(torch.arange(len(ready)), sizes)
    inf = torch.full((len(ready),), float("inf"), dtype=torch.float64)  # any input dtype
    low = inf.scatter_reduce(0, client, flat.amin(1).double(), "amin")
    high = (-inf).scatter_reduce(0, client, flat.amax(1).double(), "amax")
    outside = (low < lo) | (high > hi)
    if not bool(outside.any()):
        return ready, data
    for j in outside.nonzero().flatten().tolist():
        out[ready[j].job] = outside_box(float(low[j]), float(high[j]), PGD_BOX)
    keep = ~outside
    rows = torch.repeat_interleave(keep, sizes)
    kept = [c for c, k in zip(ready, keep.tolist(), strict=True) if k]
    return kept, StackedData(data.x[rows], data.y[rows],
                             tuple(n for n, k in zip(data.sizes, keep.tolist(), strict=True) if k))


@functools.lru_cache(maxsize=4)
def _setup(run_config: tuple[tuple[str, Scalar], ...]
           ) -> tuple[RunConfig, TrainSettings, ClientTask, nn.Module]:
    """The run config parsed, its training settings, its task and a model of the task's
    architecture: made once per run config (every round of a run asks again). The model's
    state is the round's global model, loaded in full (``strict``) before each use."""
    flat = dict(run_config)
    cfg = parse_run_config(flat)
    task = load_task(flat)
    return cfg, train_settings(cfg), task, task.build_model()


def _adversarial(cfg: RunConfig, pids: Sequence[int], server_round: int) -> Perturb | None:
    """PGD adversarial training's inner maximisation, with ``handle_train``'s settings and
    per-client generators; ``None`` without adversarial training."""
    if not cfg.adversarial_training:
        return None
    eps, alpha, steps = pgd_options(cfg)
    return pgd_perturb(
        eps, alpha, steps,
        [make_generator(derive_seed(cfg.seed, "pgd", pid, "round", server_round)) for pid in pids],
        clamp=PGD_BOX,
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
