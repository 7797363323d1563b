"""The round loop: the stages of :mod:`server.stages`, in order, for every round.

The loop names no component: central DP, the simulation adversary, the metrics files and
whatever comes next act through the :class:`~server.stages.Component` interface. What
carries from one round to the next is one :class:`RunState` value, which the checkpoint
saves whole.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from aggregation import AggregationResult, Aggregator, PreconditionError, checked
from aggregation.registry import derive_seed, make_generator

from .metrics_log import safe_text
from .rounds import (
    ModelSpec,
    Payload,
    Rejection,
    RoundOutcome,
    decode_train_replies,
    round_info,
    rule_rejections,
    stack_updates,
    too_few_message,
    validate_replies,
)
from .sampling import draw_sample, wait_for_nodes
from .stages import Component, Plan, Round, Transport, Verdict, stages_of

__all__ = ["Federation", "RunState", "StageFailure", "run_rounds"]

log = logging.getLogger("fedshield.server")

T = TypeVar("T")


class StageFailure(RuntimeError):
    """A rule, a pre-aggregation step or a component failed; the round is skipped."""


def _guarded(stage: str, who: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``; any failure but a rule's precondition becomes a :class:`StageFailure`
    naming the stage and who failed (the traceback goes to the debug log)."""
    try:
        return fn(*args)
    except PreconditionError:
        raise
    except Exception as exc:
        log.debug("%s failed at %s", who, stage, exc_info=True)
        # the message may carry client-controlled text: escaped and capped
        raise StageFailure(
            f"{who} failed at {stage}: {type(exc).__name__}: {safe_text(str(exc))}") from exc


@dataclass
class RunState:
    """Everything that carries from one round to the next (what a checkpoint holds)."""

    next_round: int
    global_flat: Tensor  # (d,) float64 on the CPU
    rule_state: Any
    components: dict[str, Any]


@dataclass(frozen=True)
class Federation:
    """What is fixed for the whole run."""

    spec: ModelSpec
    model: nn.Module  # loaded with the global model whenever it is evaluated
    base_state: Mapping[str, Tensor]  # the model's full state dict (non-floating entries too)
    evaluate: Callable[[nn.Module], dict[str, float]]  # central evaluation
    rule: Aggregator
    components: tuple[Component, ...]
    plan: Plan
    seed: int
    device: torch.device
    num_rounds: int
    checkpoint: Callable[[int, RunState], None] | None = None

    def __post_init__(self) -> None:
        names = [c.name for c in self.components]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two components are named {dup}; component names must be unique")
        for flag in ("owns_exchange", "owns_aggregation"):
            owners = [c.name for c in self.components if getattr(c, flag)]
            if len(owners) > 1:
                raise ValueError(f"components {owners} all set {flag}; at most one may")

    def owner(self, flag: str) -> Component | None:
        return next((c for c in self.components if getattr(c, flag)), None)

    def load(self, flat: Tensor) -> nn.Module:
        """The model holding the ``(d,)`` parameters ``flat``."""
        self.model.load_state_dict({**self.base_state, **self.spec.unflatten(flat)})
        return self.model


def run_rounds(fed: Federation, transport: Transport, run: RunState) -> list[dict[str, Any]]:
    """Run rounds ``run.next_round .. fed.num_rounds``; return one metrics row per round."""
    rows: list[dict[str, Any]] = []
    if run.next_round == 1:
        rows.append(_publish(fed, run, 0, {"round": 0, "skipped": False,
                                           **_evaluate(fed, run, 0, run.global_flat)}, None))
    for number in range(run.next_round, fed.num_rounds + 1):
        t0 = time.perf_counter()
        exchange_seconds = 0.0  # stays 0 when no exchange runs (the round is skipped first)
        rnd = Round(number, run.global_flat)
        verdict = _sample(fed, transport, rnd, run)
        if verdict is not None and verdict.action == "stop":
            log.warning("round %d not run: %s", number, verdict.reason)
            stop: dict[str, Any] = {"round": number, "skipped": True, "stopped": verdict.reason}
            first = {**stop, **_evaluate(fed, run, number, run.global_flat)}
            rows.append(_publish(fed, run, number, *_record(fed, run, rnd, first, stop)))
            break
        if verdict is not None:
            log.warning("round %d: %s", number, verdict.reason)
            rnd.skipped_reason = verdict.reason
        else:
            t_exchange = time.perf_counter()
            try:
                replies = _exchange(fed, transport, rnd, run)
            except StageFailure as exc:
                replies, rnd.skipped_reason = [], f"{exc}; the global model is unchanged"
            exchange_seconds = time.perf_counter() - t_exchange
            if rnd.skipped_reason is None:
                _aggregate(fed, rnd, run, replies)
        if rnd.new_global is not None:
            run.global_flat = rnd.new_global
        t_evaluate = time.perf_counter()
        rnd.metrics = _evaluate(fed, run, number, run.global_flat)
        evaluation_seconds = time.perf_counter() - t_evaluate
        _revise(fed, rnd, run)
        report = _outcome(rnd).report()
        if verdict is None and not rnd.sampled and rnd.sample_note:
            report["skipped_reason"] = rnd.sample_note
        row: dict[str, Any] = {
            "round": number,
            "skipped": rnd.new_global is None,
            **rnd.metrics,
            "num-nodes": len(rnd.nodes),
            "num-sampled": len(rnd.sampled),
            "num-replies": len(rnd.replies),
            "num-kept": len(_outcome(rnd).kept_nodes),
            **_profile(rnd, exchange_seconds, evaluation_seconds,
                       in_series=bool(getattr(transport, "clients_in_series", False))),
            "round-seconds": time.perf_counter() - t0,
            **{k: v for k, v in rnd.info.items() if isinstance(v, float)},
        }
        rows.append(_publish(fed, run, number, *_record(fed, run, rnd, row, report)))
        run.next_round = number + 1
        if fed.checkpoint is not None:
            fed.checkpoint(number, run)
    return rows


def _profile(rnd: Round, exchange_seconds: float, evaluation_seconds: float, *,
             in_series: bool = False) -> dict[str, float]:
    """Where a round's seconds went: client training, transfer, aggregation, evaluation.

    ``train-max-seconds``, ``train-mean-seconds`` and ``train-sum-seconds`` are over the
    replies that report a ``train-seconds`` metric (0 when none does: no replies, or secure
    aggregation's stand-ins, whose training then counts in the transfer).
    ``transfer-seconds`` is the exchange's wall time minus the clients' training on its
    critical path: the slowest client's where the clients train in parallel (a
    deployment), the sum where the transport runs them one after another
    (``in_series``: the in-process engine): (de)serialisation, transport, waiting, and a
    client's first data loading. The clients report their own seconds, so a client that
    over-reports can make the transfer negative. Every timing key ends in ``-seconds``.
    """
    trained = [float(r.metrics["train-seconds"]) for r in rnd.replies
               if "train-seconds" in r.metrics]
    slowest = max(trained, default=0.0)
    return {
        "train-max-seconds": slowest,
        "train-mean-seconds": sum(trained) / len(trained) if trained else 0.0,
        "train-sum-seconds": sum(trained),
        "transfer-seconds": exchange_seconds - (sum(trained) if in_series else slowest),
        "exchange-seconds": exchange_seconds,
        "aggregation-seconds": rnd.seconds,
        "evaluation-seconds": evaluation_seconds,
    }


def client_ids(node_ids: Sequence[int], *, device: torch.device | str = "cpu") -> Tensor:
    """``(n,)`` int64 identities of the nodes ``node_ids``, for the rules that key a history
    by client.

    Flower's node ids are unsigned 64-bit integers (a deployment's reach past ``2**63``),
    so each id is read as the int64 with the same 64 bits: distinct nodes stay distinct.
    Negative ids (rows that stand for several clients, such as secure aggregation's group
    sums) pass unchanged.

    Raises
    ------
    ValueError
        An id outside ``[-2**63, 2**64)``.

    Examples
    --------
    >>> client_ids([1000, 2**64 - 1]).tolist()
    [1000, -1]
    """
    bad = [n for n in node_ids if not -(2**63) <= n < 2**64]
    if bad:
        raise ValueError(f"node ids must be in [-2**63, 2**64) (Flower's are uint64), got "
                         f"{bad[:3]}")
    return torch.tensor([n - 2**64 if n >= 2**63 else n for n in node_ids], dtype=torch.int64,
                        device=device)


# -- the stages ----------------------------------------------------------------------
def _sample(fed: Federation, transport: Transport, rnd: Round, run: RunState) -> Verdict | None:
    """exclude -> wait for nodes -> draw the sample -> admit."""
    excluded: set[int] = set()
    for c in fed.components:
        try:
            out, run.components[c.name] = _guarded(
                "exclude", c.name, c.exclude, rnd.number, run.components[c.name])
        except StageFailure as exc:
            return Verdict("skip", str(exc))
        excluded |= out
    plan = fed.plan
    wanted = max(plan.min_clients, plan.clients_per_round, 1)
    nodes = wait_for_nodes(transport.node_ids, wanted, timeout=plan.node_wait_timeout,
                           rnd=rnd.number, excluded=excluded)
    rnd.nodes = tuple(nodes)
    if len(nodes) < plan.min_clients:
        rnd.sample_note = (
            f"only {len(nodes)} nodes connected after node-wait-timeout="
            f"{plan.node_wait_timeout:.0f}s, fewer than min-clients={plan.min_clients}"
        )
        log.warning("round %d: %s: skipping round", rnd.number, rnd.sample_note)
    else:
        if plan.clients_per_round > len(nodes) and plan.sampling == "fixed":
            log.warning("round %d: clients-per-round=%d but only %d nodes connected: sampling "
                        "all of them", rnd.number, plan.clients_per_round, len(nodes))
        gen = make_generator(derive_seed(fed.seed, "sample", rnd.number))
        rnd.sampled = tuple(draw_sample(nodes, plan, gen))
    verdict: Verdict | None = None
    for c in fed.components:
        try:
            v, run.components[c.name] = _guarded(
                "admit", c.name, c.admit, rnd, run.components[c.name])
        except StageFailure as exc:
            v = Verdict("skip", str(exc))
        if verdict is None or (v is not None and v.action == "stop"):
            verdict = v if v is not None else verdict
    return verdict


def _exchange(fed: Federation, transport: Transport, rnd: Round, run: RunState) -> list[Any]:
    """Send the global model to the sampled nodes; decode the train replies."""
    if not rnd.sampled:
        return []
    payload = Payload(
        arrays={"arrays": fed.spec.unflatten(rnd.global_flat)},
        configs={"config": {"server-round": rnd.number}},
    )
    owner = fed.owner("owns_exchange")
    if owner is not None:
        raw, run.components[owner.name] = _guarded(
            "exchange", owner.name, owner.exchange,
            rnd, transport, payload, fed.plan.round_timeout, run.components[owner.name])
    else:
        raw = transport.send("train", {n: payload for n in rnd.sampled},
                             timeout=fed.plan.round_timeout)
    replies = decode_train_replies(raw)
    rnd.replies = tuple(replies)
    return replies


def _aggregate(fed: Federation, rnd: Round, run: RunState, replies: Sequence[Any]) -> None:
    """validate -> stack -> server update -> transform -> aggregate -> post-process."""
    t0 = time.perf_counter()
    accepted, rejections = validate_replies(replies, fed.spec)
    rnd.accepted = tuple(accepted)
    rnd.rejections = rejections
    answered = {r.node_id for r in replies}
    missing = [
        Rejection(n, -1, "timeout", "no reply within round-timeout (node lost or too slow)")
        for n in sorted(set(rnd.sampled) - answered)
    ]
    try:
        if len(accepted) < fed.plan.min_clients:
            rnd.skipped_reason = too_few_message(len(accepted), fed.plan.min_clients)
            return
        g = rnd.global_flat.to(device=fed.device, dtype=torch.float64)
        updates, weights = stack_updates(accepted, g, fed.spec)
        # components' states change only when the whole round goes through
        states = dict(run.components)
        try:
            result, update, rule_state = _apply(fed, rnd, run, states, g, updates, weights)
        except (PreconditionError, StageFailure) as exc:  # too few clients, or a failure
            rnd.skipped_reason = f"{exc}; the global model is unchanged"
            return
        new_global = (g + update).cpu()
        if not bool(torch.isfinite(new_global).all()):
            rnd.skipped_reason = ("the new global model has NaN or Inf entries (the aggregate "
                                  "overflowed); the global model is unchanged")
            return
        run.components.update(states)
        run.rule_state = rule_state
        rnd.rejections += rule_rejections(accepted, result, fed.rule.name)
        rnd.result = result
        rnd.info = round_info(result, accepted)
        rnd.update_norm = float(update.norm())
        rnd.new_global = new_global
    finally:
        rnd.rejections += missing
        rnd.seconds = time.perf_counter() - t0


def _apply(
    fed: Federation, rnd: Round, run: RunState, states: dict[str, Any], g: Tensor,
    updates: Tensor, weights: Tensor,
) -> tuple[AggregationResult, Tensor, Any]:
    """server update -> transform -> aggregate -> post-process; ``states`` updated in place.

    Returns the rule's result, the ``(d,)`` update to apply and the rule's new state.
    """
    for c in fed.components:
        ref, states[c.name] = _guarded("server_update", c.name, c.server_update,
                                       rnd, fed.load(rnd.global_flat), states[c.name])
        rnd.server_update = ref if ref is not None else rnd.server_update
    for c in fed.components:
        updates, weights, states[c.name] = _guarded(
            "transform", c.name, c.transform, rnd, updates, weights, states[c.name])
    # on the aggregation device: noise and permutations are drawn where the updates are
    gen = make_generator(derive_seed(fed.seed, "aggregate", rnd.number), device=fed.device)
    owner = fed.owner("owns_aggregation")
    rule_state = run.rule_state
    if owner is not None:
        result, states[owner.name] = _guarded(
            "aggregate", owner.name, owner.aggregate, rnd, updates, weights, gen,
            states[owner.name])
    else:
        # row i of the stack is rnd.accepted[i] (stack_updates; transforms keep the rows)
        clients = client_ids([r.node_id for r in rnd.accepted], device=fed.device)
        # Untransformed, a non-empty stack of a model narrower than float64 is valid by
        # construction: finite replies (at most float32's 3.4e38) minus a finite float64
        # global model cannot overflow float64, and the weights are validated replies'
        # num-examples (1 to 2^40). The rule need not scan the (n, d) stack again. An empty
        # stack (min-clients=0 and no valid reply), a stack a transform may have changed
        # (even in place), or one of float64 replies (1e308 - (-1e308) overflows) is
        # checked as usual.
        trusted = (updates.shape[0] >= 1
                   and not any("transform" in stages_of(c) for c in fed.components)
                   and all(torch.finfo(t).max < 1e300 for t in fed.spec.dtypes))
        vouched = checked(updates, weights) if trusted else contextlib.nullcontext()

        def aggregate() -> AggregationResult:
            with vouched:
                return fed.rule(updates, weights, state=run.rule_state, generator=gen,
                                clients=clients, reference=rnd.server_update)

        result = _guarded("aggregate", f"rule {fed.rule.name}", aggregate)
        rule_state = result.state
    update = result.update
    for c in fed.components:
        update, states[c.name] = _guarded(
            "post_aggregate", c.name, c.post_aggregate, rnd, update, states[c.name])
    return result, update, rule_state


def _evaluate(fed: Federation, run: RunState, number: int, flat: Tensor) -> dict[str, float]:
    """Central evaluation of the model ``flat``, plus each component's metrics."""
    model = fed.load(flat)
    out = fed.evaluate(model)
    for c in fed.components:
        try:
            out.update(_guarded("evaluate", c.name, c.evaluate, number, model,
                                run.components[c.name]))
        except StageFailure as exc:  # the round stands; only this component's metrics miss
            log.warning("round %d: %s", number, exc)
    return out


def _revise(fed: Federation, rnd: Round, run: RunState) -> None:
    """A component may replace the new global model after evaluation (rollback)."""
    for c in fed.components:
        try:
            flat, run.components[c.name] = _guarded(
                "revise", c.name, c.revise, rnd, run.components[c.name])
        except StageFailure as exc:  # the new model stands
            log.warning("round %d: %s", rnd.number, exc)
            continue
        if flat is not None:
            log.warning("round %d: %s replaced the new global model", rnd.number, c.name)
            run.global_flat = flat.to(device="cpu", dtype=torch.float64)
            rnd.info[f"revised-by-{c.name}"] = 1.0


def _outcome(rnd: Round) -> RoundOutcome:
    kept = () if rnd.result is None else tuple(
        rnd.accepted[int(i)].node_id for i in rnd.result.kept.tolist())
    return RoundOutcome(
        rnd.number, rnd.new_global, None, rnd.accepted, kept, tuple(rnd.rejections),
        rnd.skipped_reason, rnd.seconds,
        update_norm=rnd.update_norm, info=rnd.info,
    )


def _record(
    fed: Federation, run: RunState, rnd: Round, row: dict[str, Any], report: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Components add their fields to the row and the report."""
    for c in fed.components:
        try:
            row_fields, report_fields, run.components[c.name] = _guarded(
                "record", c.name, c.record, rnd, row, report, run.components[c.name])
        except StageFailure as exc:  # the round stands; only this component's fields miss
            if c.critical:  # e.g. a privacy accountant that could not book a released round
                raise
            log.warning("round %d: %s", rnd.number, exc)
            continue
        row.update(row_fields)
        report.update(report_fields)
    if report.get("skipped_reason"):
        row["skipped_reason"] = report["skipped_reason"]
    return row, report


def _publish(
    fed: Federation, run: RunState, number: int, row: dict[str, Any],
    report: dict[str, Any] | None,
) -> dict[str, Any]:
    for c in fed.components:
        run.components[c.name] = c.publish(number, row, report, run.components[c.name])
    return row
