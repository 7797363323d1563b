"""Assemble a run from its config: task, model, rule, components, checkpoint; then run it.

:func:`run_federation` is the whole server behind any transport: ``flwr run .`` and a
deployment reach it through :mod:`server.app`, the in-process engine directly.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

import aggregation
from aggregation import Aggregator
from runconfig import Spec, resolve_object
from runconfig.config import RunConfig, Scalar

from .checkpoint import (
    Checkpoint,
    check_like,
    load_checkpoint,
    refuse_used_out_dir,
    remove_temporaries,
    save_checkpoint,
)
from .fltrust import RootUpdate, check_root_dataset, needs_reference
from .loop import Federation, RunState, run_rounds
from .metrics_log import MetricsLog
from .privacy import CentralDP
from .provenance import write_provenance
from .rounds import ModelSpec
from .secagg import SecureAggregation
from .stages import Component, Plan, Transport

__all__ = [
    "ServerTask", "build_aggregator", "build_rule", "check_defense_runs", "evaluate_model",
    "run_federation",
]

log = logging.getLogger("fedshield.server")


@runtime_checkable
class ServerTask(Protocol):
    """What the server needs from the task: a model and the held-out test split.

    A run with ``root-dataset`` (FLTrust) also needs :class:`server.fltrust.RootTask`'s
    ``root_data()`` and ``train_on()``; a task without them is refused before round 1.
    """

    def build_model(self) -> nn.Module: ...

    def test_data(self) -> tuple[Tensor, Tensor]: ...


def build_aggregator(rule: Spec, pre: Sequence[Spec], *, default_f: int) -> Aggregator:
    """The rule with its pre-aggregation steps; rules and steps taking ``f`` default to it.

    ``default_f`` is the number of Byzantine clients the defense assumes (the run config's
    ``num-malicious`` unless ``f`` is given explicitly in the spec's parameters).
    """
    def with_f(factory: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(params)
        if "f" not in out and "f" in inspect.signature(factory).parameters:
            out["f"] = default_f
        return out

    agg = aggregation.get(rule.name, **with_f(aggregation.RULES.get(rule.name), rule.params))
    steps = [
        aggregation.get_pre(s.name, **with_f(aggregation.PRE_AGGREGATORS.get(s.name), s.params))
        for s in pre
    ]
    return aggregation.compose(agg, steps) if steps else agg


def build_rule(cfg: RunConfig) -> Aggregator:
    """The run's defense: its rule and pre-aggregation steps, ``f`` = ``num-malicious``."""
    return build_aggregator(cfg.rule, cfg.pre_aggregation, default_f=cfg.num_malicious)


def server_device(name: str) -> torch.device:
    """The device the server aggregates and evaluates on (``"auto"``: CUDA when present).

    Raises
    ------
    ValueError
        An unknown device name, or CUDA asked for on a machine without it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"server-device={name!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"server-device={name!r} but CUDA is not available here; use 'auto' "
                         "or 'cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"server-device={name!r}: fedshield runs on 'cpu' or 'cuda' devices")
    return device


def check_defense_runs(cfg: RunConfig, rule: Aggregator, n: int) -> None:
    """Refuse, before round 1, a defense that cannot run with ``n`` clients per round.

    The rule (with its pre-aggregation steps) is run once on random ``(n, 8)`` updates:
    a precondition it fails there (e.g. Krum after bucketing leaves too few buckets) would
    fail every round. Bucketing with ``s >= n / 2`` leaves at most two buckets, which turns
    a median or trimmed mean into the mean: refused too.

    Raises
    ------
    ValueError
        Naming the defense, ``n`` and the fix.
    """
    from aggregation.registry import make_generator

    for step in cfg.pre_aggregation:
        s = step.params.get("s", 2)
        if step.name == "bucketing" and isinstance(s, int) and s > 1 and 2 * s >= n:
            raise ValueError(
                f"bucketing(s={s}) with n={n} clients per round leaves {-(-n // s)} buckets: "
                f"{cfg.rule.name} of two buckets is their mean, so the defense does nothing; "
                f"use s < n/2 (s <= {(n - 1) // 2}) or sample more clients"
            )
    gen = make_generator(0)
    updates = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    state = rule.init_state(8, dtype=torch.float64, device="cpu") if rule.stateful else None
    try:
        # the round context every rule may take: ids keyed histories use, the root update
        reference = torch.randn(8, generator=gen, dtype=torch.float64)
        rule(updates, torch.ones(n, dtype=torch.float64), state=state, generator=gen,
             clients=torch.arange(n, dtype=torch.int64), reference=reference)
    except (ValueError, TypeError) as exc:  # PreconditionError is a ValueError
        raise ValueError(
            f"the defense {rule.name} cannot run with n={n} clients per round: {exc}"
        ) from exc


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``."""
    model.to(device).eval()
    with torch.no_grad():
        logits = torch.cat([model(xb.to(device)).float().cpu() for xb in torch.split(x, 2048)])
    loss = float(nn.functional.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).float().mean())
    return {"accuracy": acc, "loss": loss}


# keys that may change between a run and its resumption
RESUMABLE_CHANGES = frozenset({"num-server-rounds", "resume", "out-dir"})


LATER_KEYS: dict[str, Scalar] = {"batch-order": "generator"}
"""Run-config keys added after checkpoints were written, with the value every earlier run
had: a checkpoint without one resumes as if it had that value."""


def check_resumable(
    run_config: Mapping[str, Scalar], saved: Mapping[str, Scalar] | None, where: Path | None
) -> None:
    """Refuse to resume a checkpoint with a different config, or with client DP-SGD.

    Raises
    ------
    ValueError
        Naming the keys that differ, or why DP-SGD cannot be resumed.
    """
    if saved is None:
        raise ValueError(f"checkpoint in {where} has no saved run config; cannot check it")
    # a key added after the checkpoint was written had, in that run, the value it defaults to
    saved = {**{k: v for k, v in LATER_KEYS.items() if k not in saved}, **saved}
    keys = (set(run_config) | set(saved)) - RESUMABLE_CHANGES
    changed = sorted(k for k in keys if run_config.get(k) != saved.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {run_config.get(k)!r}" for k in changed)
        raise ValueError(
            f"cannot resume {where}: the run config differs from the checkpoint's ({diffs}); "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change. Use another out-dir or "
            "resume=false"
        )
    if run_config.get("dp-sgd"):
        raise ValueError(
            "resume with dp-sgd is not supported: each client's Opacus accountant history lives "
            "in its Flower Context.state, which a new run starts empty, so the clients' epsilon "
            "would restart at 0. Run without resume, or without dp-sgd"
        )


def build_components(cfg: RunConfig, task: ServerTask) -> list[Component]:
    """The components the run config asks for: central DP, secure aggregation, FLTrust's
    root update (a rule that takes a reference), then the ``adversary`` plug-in."""
    out: list[Component] = []
    rule = build_rule(cfg)
    check_root_dataset(cfg, rule)
    if cfg.central_dp:
        out.append(CentralDP.from_params(
            cfg.central_dp, rule=cfg.rule.name, clients_per_round=cfg.clients_per_round,
            distributed=bool(cfg.secagg)))
    if cfg.secagg:
        out.append(SecureAggregation.from_params(
            cfg.secagg, seed=cfg.seed, min_clients=cfg.min_clients,
            central_dp=cfg.central_dp or None, clients_per_round=cfg.clients_per_round))
    if needs_reference(rule):
        out.append(RootUpdate(task, cfg, server_device(cfg.server_device)))
    if cfg.adversary:
        plugin = resolve_object(cfg.adversary)(cfg)
        if plugin is not None:
            if not isinstance(plugin, Component):
                raise ValueError(
                    f"adversary {cfg.adversary!r} returned {type(plugin).__name__}, which is not "
                    "a server.stages.Component"
                )
            out.append(plugin)
    return out


def run_federation(
    transport: Transport,
    cfg: RunConfig,
    *,
    components: Sequence[Component] = (),
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the whole federation over ``transport``; one metrics row per round (0 = initial).

    Parameters
    ----------
    transport
        How messages reach the nodes (a Flower grid through :mod:`server.transport`).
    cfg
        The parsed run config.
    components
        Components beyond those the run config names (tests, tools); they act after them.
    on_round
        Called with each metrics row.
    """
    task = resolve_object(cfg.task)(cfg.flat)
    if not isinstance(task, ServerTask):
        raise ValueError(
            f"task provider returned {type(task).__name__}, which lacks build_model() or "
            "test_data()"
        )
    model = task.build_model()
    x_test, y_test = task.test_data()
    spec = ModelSpec.from_state(model.state_dict())
    device = server_device(cfg.server_device)
    ckpt_dir = Path(cfg.out_dir) / "checkpoint" if cfg.out_dir else None
    ckpt: Checkpoint | None = None
    if ckpt_dir is not None:
        if not cfg.resume:
            refuse_used_out_dir(cfg.out_dir)
        remove_temporaries(ckpt_dir)
        if cfg.resume:
            ckpt = load_checkpoint(ckpt_dir, model.state_dict())
            if ckpt is None:
                log.warning("resume=true but %s holds no checkpoint: the run starts at round 1",
                            ckpt_dir)
    comps = [*build_components(cfg, task), *components,
             MetricsLog(cfg.out_dir, on_round=on_round)]
    rule = build_rule(cfg)
    if cfg.clients_per_round and not cfg.central_dp:  # n is known before round 1
        check_defense_runs(cfg, rule, cfg.clients_per_round)
    plan = Plan(
        sampling="fixed", clients_per_round=cfg.clients_per_round, min_clients=cfg.min_clients,
        node_wait_timeout=cfg.node_wait_timeout, round_timeout=cfg.round_timeout,
    )
    for c in comps:
        plan = c.configure(plan)
    first_rule_state = (rule.init_state(spec.dim, dtype=torch.float64, device=device)
                        if rule.stateful else None)
    if ckpt is None:
        rule_state = first_rule_state
        states = {c.name: c.init_state() for c in comps}
        global_flat = spec.flatten(model.state_dict())
    else:  # everything is checked before anything of the checkpoint is used
        check_resumable(cfg.flat, ckpt.extra["run_config"], ckpt_dir)
        saved = ckpt.extra["components"]
        missing = sorted({c.name for c in comps} - set(saved))
        if missing:
            raise ValueError(
                f"checkpoint in {ckpt_dir} has no state for components {missing}: resume "
                "with the components the run was started with, or delete the checkpoint "
                "folder to restart the run from round 1"
            )
        try:
            check_like(ckpt.extra["rule_state"], first_rule_state, f"{rule.name} state")
        except ValueError as exc:
            raise ValueError(f"checkpoint in {ckpt_dir} does not fit the rule ({exc}): delete "
                             "the checkpoint folder to restart the run from round 1") from None
        rule_state = ckpt.extra["rule_state"]
        if isinstance(rule_state, Tensor):
            rule_state = rule_state.to(device)
        states = {c.name: saved[c.name] for c in comps}
        model.load_state_dict(ckpt.model)  # the non-floating entries (counters) come from it
        global_flat = spec.flatten(ckpt.model)  # float64, exactly the saved global model
        log.info("resuming after round %d from %s", ckpt.server_round, ckpt_dir)
    base_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def checkpoint(rnd: int, run: RunState) -> None:
        assert ckpt_dir is not None
        flat = run.global_flat.detach().to(device="cpu", dtype=torch.float64)
        exact = {k: p.reshape(shape) for k, p, shape in
                 zip(spec.keys, torch.split(flat, spec.sizes), spec.shapes, strict=True)}
        save_checkpoint(ckpt_dir, Checkpoint(
            rnd, {**base_state, **exact},
            {"rule_state": run.rule_state, "components": run.components,
             "run_config": dict(cfg.flat)},
        ))

    fed = Federation(
        spec=spec, model=model, base_state=base_state,
        evaluate=lambda m: evaluate_model(m, x_test, y_test, device),
        rule=rule, components=tuple(comps), plan=plan, seed=cfg.seed, device=device,
        num_rounds=cfg.num_rounds, checkpoint=checkpoint if ckpt_dir is not None else None,
    )
    log.info("fedshield server: rule=%s clients-per-round=%s min-clients=%d sampling=%s "
             "node-wait-timeout=%.0fs components=%s", rule.name,
             plan.clients_per_round or "all", plan.min_clients, plan.sampling,
             plan.node_wait_timeout, [c.name for c in comps])
    if cfg.out_dir:
        write_provenance(cfg.out_dir, str(device))
    start = ckpt.server_round + 1 if ckpt is not None else 1
    return run_rounds(fed, transport, RunState(start, global_flat, rule_state, states))
