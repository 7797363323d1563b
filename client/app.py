"""The fedshield ``ClientApp``: local training, device-aware, with optional malicious role.

This is one of the few files that import Flower. The training itself is in ``train.py``,
what a client does before and after it in ``steps.py`` (shared with the batched engine);
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
from runconfig.config import RunConfig, Scalar

from .secagg import secagg_reply, update_and_weight
from .steps import client_role, finish_state, prepare_client, reply_metrics
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
    client = prepare_client(cfg, context.node_config, server_round, x, y,
                            num_classes=task.num_classes)
    device = resolve_device(cfg.device)
    loss_fn = None
    if cfg.adversarial_training:
        loss_fn = _pgd_loss(pgd_options(cfg), make_generator(
            derive_seed(cfg.seed, "pgd", client.pid, "round", server_round)))
    extra: dict[str, float] = {}
    if cfg.dp_sgd:
        # RunConfig refuses dp-sgd with batch-order='hashed': Poisson sampling needs a generator
        assert isinstance(client.generator, torch.Generator)
        train_loss, extra["dp-epsilon"] = _train_dp_sgd(
            model, client.x, client.y, cfg, settings, context, device=device,
            generator=client.generator, loss_fn=loss_fn,
        )
    else:
        train_loss = local_train(
            model, client.x, client.y, settings, device=device, generator=client.generator,
            loss_fn=loss_fn,
        )["train-loss"]
    new_state = _state_on_cpu(model)
    benign = None  # Neurotoxin's: the global model's change since this node last saw it
    if client.role.attack == "neurotoxin":  # kept every round, before the attack starts too
        keys = [k for k, v in global_state.items() if v.is_floating_point()]
        flat_global = torch.cat([global_state[k].reshape(-1) for k in keys])
        if "neurotoxin" in context.state.array_records:
            seen = context.state.array_records["neurotoxin"].to_torch_state_dict()["global"]
            benign = flat_global - seen
        context.state["neurotoxin"] = ArrayRecord({"global": flat_global})
    new_state = finish_state(cfg, client, server_round, global_state, new_state, benign=benign)
    metrics = reply_metrics(client, context.node_config, server_round, train_loss,
                            time.perf_counter() - t0, extra)
    content = RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


PGD_BOX = (0.0, 1.0)
"""The box PGD adversarial training projects its inputs on: the [0, 1] of fedshield's
datasets (the client refuses training inputs outside it)."""


def pgd_options(cfg: RunConfig) -> tuple[float, float, int]:
    """``adversarial-training``'s ``(eps, alpha, steps)`` with their defaults (``eps=0.1``,
    ``alpha=eps/4``, ``steps=5``), checked.

    Raises
    ------
    ValueError
        ``eps`` not a finite number ``>= 0``, ``alpha`` not ``> 0`` (with ``eps=0`` give
        ``alpha``), ``steps`` not an int ``>= 1``.
    """
    from privacy.checks import check_int, check_nonnegative, check_positive

    p = cfg.adversarial_training
    eps = check_nonnegative("adversarial-training eps", p.get("eps", 0.1))
    alpha = check_positive("adversarial-training alpha (default eps/4)",
                           p.get("alpha", eps / 4))
    steps = check_int("adversarial-training steps", p.get("steps", 5), 1)
    return eps, alpha, steps


def dp_sgd_options(cfg: RunConfig) -> dict[str, Any]:
    """``dp-sgd``'s settings as :func:`client.dp_sgd.dp_sgd_train` takes them, with their
    defaults (``max_grad_norm=1.0``, ``delta=1e-5``, the default accountant), checked.

    Raises
    ------
    ValueError
        A value out of range (the norm, noise and epsilons finite and ``> 0``, ``delta``
        in ``(0, 1)``) or an unknown accountant.
    """
    from privacy.accounting import DEFAULT_ACCOUNTANT, check_accountant
    from privacy.checks import check_delta, check_positive

    p = dict(cfg.dp_sgd)

    def optional(key: str) -> float | None:
        return None if key not in p else check_positive(f"dp-sgd {key}", p[key])

    return {
        "max_grad_norm": check_positive("dp-sgd max_grad_norm", p.get("max_grad_norm", 1.0)),
        "delta": check_delta(p.get("delta", 1e-5)),
        "noise_multiplier": optional("noise_multiplier"),
        "target_epsilon": optional("target_epsilon"),
        "max_epsilon": optional("max_epsilon"),
        "accountant": check_accountant(p.get("accountant", DEFAULT_ACCOUNTANT)),
    }


def _pgd_loss(options: tuple[float, float, int], generator: torch.Generator) -> Any:
    from .adversarial import pgd_adversarial_loss

    eps, alpha, steps = options

    def loss(model: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        return pgd_adversarial_loss(
            model, xb, yb, eps=eps, alpha=alpha, steps=steps, generator=generator,
            clamp=PGD_BOX,
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

    options = dp_sgd_options(cfg)
    history = (
        history_from_json(str(context.state["dp-sgd"]["history"]))
        if "dp-sgd" in context.state else []
    )
    model.to(device)
    optimizer = settings.make_optimizer(model.parameters())
    res = dp_sgd_train(
        model, optimizer, x, y,
        batch_size=settings.batch_size,
        epochs=settings.epochs,
        generator=generator,
        planned_rounds=cfg.num_rounds,
        history=history,
        **options,
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
