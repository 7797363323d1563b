"""The fedshield ``ClientApp``: local training, device-aware, with optional malicious role.

This is one of the few files that import Flower. The training itself is in ``train.py``;
what a malicious client does is in ``malicious.py`` and ``poisoning.py``.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from aggregation.registry import derive_seed, make_generator
from privacy.accounting import DEFAULT_ACCOUNTANT
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
from .secagg import secagg_reply, update_and_weight
from .task import load_task
from .train import TrainSettings, local_train, resolve_device

__all__ = [
    "app", "client_role", "handle_evaluate", "handle_train", "parse_run_config", "train_settings",
]

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _parse(items: tuple[tuple[str, Scalar], ...]) -> RunConfig:
    return RunConfig.from_flat(dict(items))


def parse_run_config(run_config: Mapping[str, Scalar]) -> RunConfig:
    """The node's run config, parsed once per process (every message carries the same one)."""
    return _parse(tuple(sorted(run_config.items())))


def train_settings(cfg: RunConfig) -> TrainSettings:
    """Local training's hyperparameters from the run config."""
    return TrainSettings(
        epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.learning_rate,
        optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
    )


def client_role(cfg: RunConfig, node_config: Mapping[str, Scalar]) -> MaliciousRole:
    """This node's role: malicious when its partition id is in the run's malicious set."""
    if cfg.num_malicious == 0 or "partition-id" not in node_config:
        return MaliciousRole()
    pid = int(node_config["partition-id"])
    num = int(node_config["num-partitions"])
    if pid in malicious_partitions(num, cfg.num_malicious, cfg.seed):
        return MaliciousRole(cfg.attack.name, cfg.attack.params, cfg.attack_start_round)
    return MaliciousRole()


def _load_weights(model: nn.Module, record: ArrayRecord) -> None:
    state = record.to_torch_state_dict()
    model.load_state_dict(state, strict=True)


def _state_on_cpu(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _partition_id(node_config: Mapping[str, Scalar]) -> int:
    return int(node_config.get("partition-id", -1))


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's data and reply with the new weights."""
    cfg = parse_run_config(context.run_config)
    settings = train_settings(cfg)
    server_round = int(msg.content["config"]["server-round"])
    task = load_task(context.run_config)
    model = task.build_model()
    _load_weights(model, msg.content["arrays"])
    global_state = _state_on_cpu(model)
    x, y = task.train_data(context.node_config)
    # train-seconds: from here to the weights to send (data poisoning, training, the update's
    # attack or local DP); the server's profile counts the rest as transfer
    t0 = time.perf_counter()
    pid = _partition_id(context.node_config)
    role = client_role(cfg, context.node_config)
    device = resolve_device(cfg.device)
    attacking = role.active(server_round)
    if attacking and role.attack in DATA_ATTACKS:
        attackers = sorted(
            malicious_partitions(
                int(context.node_config["num-partitions"]), cfg.num_malicious, cfg.seed
            )
        )
        x, y = poison_data(
            role, x, y,
            num_classes=task.num_classes,
            attacker_rank=attackers.index(pid),
            num_attackers=len(attackers),
            generator=make_generator(derive_seed(cfg.seed, "poison", pid, "round", server_round)),
        )
    gen = make_generator(derive_seed(cfg.seed, "train", pid, "round", server_round))
    loss_fn = None
    if cfg.adversarial_training:
        loss_fn = _pgd_loss(cfg.adversarial_training, make_generator(
            derive_seed(cfg.seed, "pgd", pid, "round", server_round)))
    extra: dict[str, float] = {}
    if cfg.dp_sgd:
        train_loss, extra["dp-epsilon"] = _train_dp_sgd(
            model, x, y, cfg, settings, context, device=device, generator=gen, loss_fn=loss_fn
        )
    else:
        train_loss = local_train(
            model, x, y, settings, device=device, generator=gen, loss_fn=loss_fn
        )["train-loss"]
    new_state = _state_on_cpu(model)
    keys = [k for k, v in new_state.items() if v.is_floating_point()]
    update = torch.cat([(new_state[k] - global_state[k]).reshape(-1) for k in keys])
    benign = None  # Neurotoxin's: the global model's change since this node last saw it
    if role.attack == "neurotoxin":  # kept every round, before the attack starts too
        flat_global = torch.cat([global_state[k].reshape(-1) for k in keys])
        if "neurotoxin" in context.state.array_records:
            seen = context.state.array_records["neurotoxin"].to_torch_state_dict()["global"]
            benign = flat_global - seen
        context.state["neurotoxin"] = ArrayRecord({"global": flat_global})
    sent = update
    if attacking:
        attack_gen = make_generator(derive_seed(cfg.seed, "attack", pid, "round", server_round))
        sent = role.poison_update(sent, server_round, generator=attack_gen)
        sent = finish_backdoor_update(role, sent, server_round, benign=benign)
    elif cfg.local_dp:  # an honest client noises its own update before it leaves the device
        p = dict(cfg.local_dp)
        sent = local_dp_update(
            sent, float(p.pop("clipping_norm")), **p,
            generator=make_generator(derive_seed(cfg.seed, "local-dp", pid, "round", server_round)),
        )
    if sent is not update or attacking:  # an attacker's reply is always global + sent
        for k, part in zip(keys, torch.split(sent, [new_state[k].numel() for k in keys]), strict=True):
            new_state[k] = global_state[k] + part.reshape(new_state[k].shape)
    metrics: dict[str, float | int] = {
        "num-examples": reported_examples(role, int(x.shape[0]), server_round),
        "train-loss": float(train_loss),
        **extra,
        "train-seconds": time.perf_counter() - t0,
        "partition-id": pid,
        "num-partitions": int(context.node_config.get("num-partitions", -1)),
    }
    content = RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def _pgd_loss(params: Mapping[str, Any], generator: torch.Generator) -> Any:
    from .adversarial import pgd_adversarial_loss

    eps = float(params.get("eps", 0.1))
    alpha = float(params.get("alpha", eps / 4))
    steps = int(params.get("steps", 5))

    def loss(model: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        return pgd_adversarial_loss(
            model, xb, yb, eps=eps, alpha=alpha, steps=steps, generator=generator
        )

    return loss


def _train_dp_sgd(
    model: nn.Module, x: Tensor, y: Tensor, cfg: RunConfig, settings: TrainSettings,
    context: Context, *,
    device: torch.device, generator: torch.Generator, loss_fn: Any,
) -> tuple[float, float]:
    """Sample-level DP-SGD (Opacus); the accountant history persists in ``context.state``."""
    from privacy import history_from_json

    from .dp_sgd import dp_sgd_train

    p = dict(cfg.dp_sgd)
    history = (
        history_from_json(str(context.state["dp-sgd"]["history"]))
        if "dp-sgd" in context.state else []
    )
    model.to(device)
    optimizer = settings.make_optimizer(model.parameters())
    res = dp_sgd_train(
        model, optimizer, x, y,
        batch_size=settings.batch_size,
        max_grad_norm=float(p.get("max_grad_norm", 1.0)),
        epochs=settings.epochs,
        delta=float(p.get("delta", 1e-5)),
        generator=generator,
        noise_multiplier=None if "noise_multiplier" not in p else float(p["noise_multiplier"]),
        target_epsilon=None if "target_epsilon" not in p else float(p["target_epsilon"]),
        planned_rounds=cfg.num_rounds,
        max_epsilon=None if "max_epsilon" not in p else float(p["max_epsilon"]),
        accountant=p.get("accountant", DEFAULT_ACCOUNTANT),
        history=history,
        loss_fn=loss_fn,
    )
    context.state["dp-sgd"] = ConfigRecord({"history": res.history_json()})
    return float(res.train_loss), float(res.epsilon)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's data (federated evaluation)."""
    cfg = parse_run_config(context.run_config)
    task = load_task(context.run_config)
    model = task.build_model()
    _load_weights(model, msg.content["arrays"])
    x, y = task.train_data(context.node_config)
    device = resolve_device(cfg.device)
    model.to(device).eval()
    with torch.no_grad():
        logits = torch.cat([model(xb.to(device)).cpu() for xb in torch.split(x, 1024)])
    loss = float(nn.functional.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).float().mean())
    metrics = {"num-examples": int(x.shape[0]), "eval-loss": loss, "eval-accuracy": acc}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train()
def _train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context)


def handle_query(msg: Message, context: Context) -> Message:
    """Secure aggregation's stages (``client/secagg.py``); the protocol's state between the
    messages of one round lives in ``context.state["secagg"]``."""
    if "secagg" not in msg.content.config_records:
        raise ValueError("a fedshield client answers only secure aggregation queries (a "
                         "'secagg' config record naming the stage)")

    def train() -> tuple[Any, int]:  # masked-input: train as a plain round would
        trained = handle_train(msg, context).content
        return update_and_weight(msg.content["arrays"].to_torch_state_dict(),
                                 trained["arrays"].to_torch_state_dict(),
                                 trained["metrics"]["num-examples"])

    records = msg.content.array_records
    blobs = {k: t.numpy().tobytes() for k, t in records["secagg-blobs"].to_torch_state_dict().items()
             } if "secagg-blobs" in records else {}
    saved = str(context.state["secagg"]["state"]) if "secagg" in context.state else None
    # distributed DP noise (docs/secagg.md): from this node's CSPRNG by default, so the
    # server cannot regenerate and subtract it; noise_seed='run' derives it from the run
    # seed, round and node instead (reproducible, no protection against the server)
    cfg = parse_run_config(context.run_config)
    if cfg.secagg.get("noise_seed", "secret") == "run":
        noise_seed = derive_seed(cfg.seed, "secagg-dp", _partition_id(context.node_config),
                                 int(context.node_id), "round",
                                 int(msg.content["config"]["server-round"]))
    else:
        noise_seed = int.from_bytes(os.urandom(8), "little")
    config, out_blobs, vector, new_state = secagg_reply(
        dict(msg.content.config_records["secagg"]), blobs, saved,
        me=int(context.node_id), train=train, noise_seed=noise_seed)
    context.state["secagg"] = ConfigRecord({"state": new_state})
    content: dict[str, Any] = {
        "secagg": ConfigRecord(config),
        "secagg-blobs": ArrayRecord({k: torch.frombuffer(bytearray(v), dtype=torch.uint8)
                                     for k, v in out_blobs.items()}),
    }
    if vector is not None:
        content["secagg-vector"] = ArrayRecord({"masked": vector})
    return Message(content=RecordDict(content), reply_to=msg)


@app.query()
def _query(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)
