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

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .loop import Federation, RunState, run_rounds
from .metrics_log import MetricsLog
from .privacy import CentralDP
from .provenance import write_provenance
from .rounds import ModelSpec
from .stages import Component, Plan, Transport

__all__ = ["ServerTask", "build_aggregator", "build_rule", "evaluate_model", "run_federation"]

log = logging.getLogger("fedshield.server")


@runtime_checkable
class ServerTask(Protocol):
    """What the server needs from the task: a model and the held-out test split."""

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
    """The components the run config asks for: central DP, then the ``adversary`` plug-in."""
    out: list[Component] = []
    if cfg.central_dp:
        out.append(CentralDP.from_params(
            cfg.central_dp, rule=cfg.rule.name, clients_per_round=cfg.clients_per_round))
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
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.server_device == "auto" else torch.device(cfg.server_device)
    )
    ckpt_dir = Path(cfg.out_dir) / "checkpoint" if cfg.out_dir else None
    ckpt = load_checkpoint(ckpt_dir) if (cfg.resume and ckpt_dir is not None) else None
    comps = [
        *build_components(cfg, task), *components,
        MetricsLog(cfg.out_dir, keep_through_round=ckpt.server_round if ckpt else None,
                   on_round=on_round),
    ]
    rule = build_rule(cfg)
    plan = Plan(
        sampling="fixed", clients_per_round=cfg.clients_per_round, min_clients=cfg.min_clients,
        node_wait_timeout=cfg.node_wait_timeout, round_timeout=cfg.round_timeout,
    )
    for c in comps:
        plan = c.configure(plan)
    if ckpt is not None:
        check_resumable(cfg.flat, ckpt.extra.get("run_config"), ckpt_dir)
        model.load_state_dict({**model.state_dict(), **ckpt.model})
        saved = ckpt.extra.get("components", {})
        missing = sorted({c.name for c in comps} - set(saved) - {"metrics"})
        if missing:
            raise ValueError(f"checkpoint in {ckpt_dir} has no state for components {missing}; "
                             "resume=false to start afresh")
        rule_state = ckpt.extra.get("rule_state")
        if isinstance(rule_state, Tensor):
            rule_state = rule_state.to(device)
        states = {c.name: saved.get(c.name) for c in comps}
        log.info("resuming after round %d from %s", ckpt.server_round, ckpt_dir)
    base_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    global_flat = spec.flatten(base_state)
    if ckpt is None:
        rule_state = (rule.init_state(spec.dim, dtype=torch.float64, device=device)
                      if rule.stateful else None)
        states = {c.name: c.init_state() for c in comps}

    def checkpoint(rnd: int, run: RunState) -> None:
        assert ckpt_dir is not None
        save_checkpoint(ckpt_dir, Checkpoint(
            rnd, {**base_state, **spec.unflatten(run.global_flat)},
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
