"""The round's extension points, each shown by a small component (tests/server/example_components.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.app import handle_train
from runconfig.config import RunConfig
from server.app import run_server
from server.checkpoint import load_checkpoint
from server.loop import Federation
from server.rounds import ModelSpec
from server.stages import Component, Plan, stages_of
from simulations.config import resolve_config
from simulations.engine import ENGINE_KEYS, InProcessGrid, run_in_process
from simulations.task import build_task

from .example_components import (
    Quarantine,
    Rollback,
    RoundCounter,
    ServerStep,
    TwoExchanges,
    server_step_update,
)

BASE = ["num-clients=6", "num-server-rounds=2", "model=logreg", "local-epochs=1"]


def _cfg(*overrides: str) -> dict[str, Any]:
    return resolve_config(None, [*BASE, *overrides])


def _app_cfg(cfg: dict[str, Any]) -> RunConfig:
    return RunConfig.from_flat({k: v for k, v in cfg.items() if k not in ENGINE_KEYS})


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.endswith("-seconds")} for r in rows]


def _client_with_query() -> ClientApp:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, ctx: Context) -> Message:
        return handle_train(msg, ctx)

    @app.query()
    def _query(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({"config": ConfigRecord({"ready": True})}), reply_to=msg)

    return app


def test_a_component_owns_the_exchange_with_two_exchanges_per_round(tmp_path: Path) -> None:
    plain = run_in_process(_cfg(f"out-dir={tmp_path / 'plain'}"))
    cfg = _cfg(f"out-dir={tmp_path}")
    grid = InProcessGrid(_client_with_query(), cfg, 6)
    two = TwoExchanges()
    rows = run_server(grid, _app_cfg(cfg), components=[two])
    assert len(grid.call_seconds) == 2 * 6 * 2  # query + train, 6 nodes, 2 rounds
    assert _strip(rows) == _strip(plain)  # same training, only the exchange differs
    state = load_checkpoint(tmp_path / "checkpoint")
    assert state is not None and state.extra["components"]["two-exchanges"] == {"exchanges": 4}


def test_a_node_that_misses_the_first_exchange_does_not_train(tmp_path: Path) -> None:
    cfg = _cfg(f"out-dir={tmp_path}", "aggregator=median")

    def no_query_from_0(pid: int, msg: Message) -> bool:
        return pid == 0 and msg.metadata.message_type == "query"

    grid = InProcessGrid(_client_with_query(), cfg, 6, fault=no_query_from_0)
    rows = run_server(grid, _app_cfg(cfg), components=[TwoExchanges()])
    assert [r["num-replies"] for r in rows[1:]] == [5, 5]
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    for record in audit:
        assert 0 not in {p["partition_id"] for p in record["participants"]}
        assert [(r["node_id"], r["stage"]) for r in record["rejected"]] == [(grid.node_ids[0], "timeout")]


def test_quarantined_nodes_are_never_sampled(tmp_path: Path) -> None:
    cfg = _cfg(f"out-dir={tmp_path}")
    nodes = InProcessGrid(ClientApp(), cfg, 6).node_ids
    rows = run_in_process(cfg, components=[Quarantine({nodes[1], nodes[4]})])
    assert [r["num-nodes"] for r in rows[1:]] == [4, 4]
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    for record in audit:
        assert sorted(p["partition_id"] for p in record["participants"]) == [0, 2, 3, 5]


def test_rollback_keeps_the_previous_model_when_the_loss_rises(tmp_path: Path) -> None:
    # FedAvg under a strong sign flip raises the loss: those rounds are undone
    cfg = _cfg(f"out-dir={tmp_path}", "num-malicious=3", "attack=sign_flip",
               "attack-params=scale=4.0", "num-server-rounds=4")
    rows = run_in_process(cfg, components=[Rollback(tolerance=0.0)])
    undone = [r["round"] for r in rows[1:] if r.get("revised-by-rollback") == 1.0]
    assert undone, "the attack should raise the loss at least once"
    kept = [r["loss"] for r in rows if r["round"] not in undone]
    assert kept == sorted(kept, reverse=True)  # every kept model is no worse than the last
    # the model in use at the end is the last kept one
    task = build_task(_app_cfg(cfg).flat)
    model = task.build_model()
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    assert ckpt is not None
    model.load_state_dict(ckpt.model)
    x, y = task.test_data()
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(model(x), y))
    assert loss == pytest.approx(kept[-1], rel=1e-6)
    assert ckpt.extra["components"]["rollback"]["loss"] == kept[-1]


def test_a_server_side_update_from_server_data(tmp_path: Path) -> None:
    cfg = _cfg(f"out-dir={tmp_path}", "num-server-rounds=1")
    task = build_task(_app_cfg(cfg).flat)
    x, y = task.test_data()
    step = ServerStep(x[:64], y[:64], lr=0.5)
    run_in_process(cfg, components=[step])
    model = task.build_model()
    spec = ModelSpec.from_state(model.state_dict())
    expected = spec.flatten(model.state_dict()) + server_step_update(model, x[:64], y[:64], 0.5)
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    assert ckpt is not None
    got = spec.flatten(ckpt.model)  # the float64 global model, stored exactly
    torch.testing.assert_close(got, expected)


def test_component_state_survives_a_resume(tmp_path: Path) -> None:
    run_in_process(_cfg(f"out-dir={tmp_path}"), components=[RoundCounter()])
    rows = run_in_process(_cfg(f"out-dir={tmp_path}", "num-server-rounds=4", "resume=true"),
                          components=[RoundCounter()])
    assert [r["counted-rounds"] for r in rows] == [3, 4]
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    assert ckpt is not None and ckpt.extra["components"]["counter"] == {"rounds": 4}


def test_resume_refuses_a_checkpoint_without_a_components_state(tmp_path: Path) -> None:
    run_in_process(_cfg(f"out-dir={tmp_path}"))
    with pytest.raises(ValueError, match="no state for components \\['counter'\\]"):
        run_in_process(_cfg(f"out-dir={tmp_path}", "num-server-rounds=3", "resume=true"),
                       components=[RoundCounter()])


def test_stages_of_names_the_overridden_methods() -> None:
    assert stages_of(TwoExchanges()) == ["exchange"]
    assert stages_of(Quarantine(set())) == ["exclude"]
    assert stages_of(Rollback(0.0)) == ["revise", "publish"]
    assert stages_of(ServerStep(torch.zeros(1, 1), torch.zeros(1), 0.1)) == [
        "server_update", "transform"]
    assert stages_of(Component()) == []


def _fed(components: tuple[Component, ...]) -> Federation:
    model = torch.nn.Linear(2, 2)
    import aggregation

    return Federation(
        spec=ModelSpec.from_state(model.state_dict()), model=model,
        base_state=model.state_dict(), evaluate=lambda m: {}, rule=aggregation.get("mean"),
        components=components, plan=Plan("fixed", 0, 1, 0.0, 1.0), seed=0,
        device=torch.device("cpu"), num_rounds=1,
    )


def test_components_need_unique_names_and_one_owner_per_stage() -> None:
    with pytest.raises(ValueError, match="unique"):
        _fed((RoundCounter(), RoundCounter()))

    class Other(TwoExchanges):
        name = "other"

    with pytest.raises(ValueError, match="owns_exchange"):
        _fed((TwoExchanges(), Other()))


class _ScaleInPlace(Component):
    """Multiplies the stack in place (returns the same tensor object)."""

    name = "scale-in-place"

    def transform(self, rnd: Any, updates: torch.Tensor, weights: torch.Tensor,
                  state: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        updates.mul_(self.factor)
        return updates, weights, state

    def __init__(self, factor: float) -> None:
        self.factor = factor


def _stack_scans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the shape of every (n, d) stack that aggregation's input check scans."""
    import aggregation._checks as checks

    scans: list[tuple[int, ...]] = []
    validate = checks._validate

    def counting(rule: str, updates: object, weights: object | None) -> Any:
        if isinstance(updates, torch.Tensor) and updates.dim() == 2:
            scans.append(tuple(updates.shape))
        return validate(rule, updates, weights)

    monkeypatch.setattr(checks, "_validate", counting)
    return scans


def test_the_rule_trusts_the_servers_own_stack_but_checks_a_transformed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = sum(p.numel() for p in build_task(_app_cfg(_cfg()).flat).build_model().parameters())
    all_scans = _stack_scans(monkeypatch)
    rows = run_in_process(_cfg(f"out-dir={tmp_path / 'a'}", "num-server-rounds=2"))
    scans = [s for s in all_scans if s == (6, d)]  # not the start-up probe of the rule
    assert len(rows) == 3 and not any(r["skipped"] for r in rows[1:])
    assert scans == []  # finite by construction: never scanned again
    # a transform may change the stack in place: the rule checks it, and refuses an
    # overflow that the transform made, which it could not if it trusted the stack
    run_in_process(_cfg(f"out-dir={tmp_path / 'b'}", "num-server-rounds=2"),
                   components=[_ScaleInPlace(1.0)])
    assert [s for s in all_scans if s == (6, d)] == [(6, d)] * 2
    bad = run_in_process(_cfg(f"out-dir={tmp_path / 'c'}", "num-server-rounds=1"),
                         components=[_ScaleInPlace(float("inf"))])
    assert bad[-1]["skipped"]
    assert "mean: updates contain NaN or Inf" in bad[-1]["skipped_reason"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_rule_checks_the_stack_of_a_float64_model(dtype: torch.dtype) -> None:
    # float64 replies can overflow when the global model is subtracted (1e308 - (-1e308)):
    # their stack is checked; a float32 model's stack cannot overflow and is trusted
    from server.loop import RunState, StageFailure, _apply
    from server.stages import Round

    fed = _fed(())
    model = torch.nn.Linear(2, 2).to(dtype)
    fed = Federation(**{**fed.__dict__, "model": model, "base_state": model.state_dict(),
                        "spec": ModelSpec.from_state(model.state_dict())})
    g = torch.zeros(fed.spec.dim, dtype=torch.float64)
    updates = torch.full((3, fed.spec.dim), float("inf"), dtype=torch.float64)
    run = RunState(1, g, None, {})
    rnd = Round(1, g)
    # trusted, the input scan is skipped; the rule's check of its output still refuses
    reason = "updates contain NaN or Inf" if dtype == torch.float64 else "non-finite update"
    with pytest.raises(StageFailure, match=reason):
        _apply(fed, rnd, run, {}, g, updates, torch.ones(3, dtype=torch.float64))


def test_an_empty_stack_is_refused_by_the_rule_not_trusted(tmp_path: Path) -> None:
    # min-clients=0 and no valid reply: the (0, d) stack must not pass as "checked"; the
    # rule refuses it and the round is skipped, with the rule's reason
    cfg = _cfg(f"out-dir={tmp_path}", "min-clients=0", "num-server-rounds=1")
    rows = run_in_process(cfg, fault=lambda pid, msg: msg.metadata.message_type == "train")
    assert rows[1]["skipped"] and rows[1]["num-kept"] == 0
    assert "mean: updates must have n >= 1 clients" in rows[1]["skipped_reason"]


def test_a_transform_set_on_an_instance_runs_and_the_stack_is_checked_after_it(
    tmp_path: Path
) -> None:
    calls: list[int] = []

    def blow_up(rnd: Any, updates: torch.Tensor, weights: torch.Tensor,
                state: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        calls.append(rnd.number)
        updates.mul_(float("inf"))
        return updates, weights, state

    comp = RoundCounter()
    comp.transform = blow_up  # type: ignore[method-assign]
    rows = run_in_process(_cfg(f"out-dir={tmp_path}", "num-server-rounds=1"), components=[comp])
    assert calls == [1]
    assert "mean: updates contain NaN or Inf" in rows[1]["skipped_reason"]
