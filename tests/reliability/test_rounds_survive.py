"""No failure of a rule, a step or a component ends the run; combinations that can never
work, and settings that would fail every round, are refused before round 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from server.stages import Component, Round
from simulations.config import resolve_config
from simulations.engine import run_in_process

BASE = ["num-clients=6", "num-server-rounds=3", "model=logreg", "local-epochs=1"]


def _cfg(*overrides: str) -> dict[str, Any]:
    return resolve_config(None, [*BASE, *overrides])


class FailsIn(Component):
    """Raises at ``stage`` in round ``fail_round``; counts the rounds it saw."""

    def __init__(self, stage: str, fail_round: int) -> None:
        self.stage, self.fail_round = stage, fail_round
        self.name = f"fails-in-{stage}"

    def init_state(self) -> dict[str, int]:
        return {"seen": 0}

    def _maybe_fail(self, rnd: int, stage: str) -> None:
        if stage == self.stage and rnd == self.fail_round:
            raise RuntimeError(f"boom in {stage}")

    def exclude(self, rnd: int, state: Any) -> tuple[set[int], Any]:
        self._maybe_fail(rnd, "exclude")
        return set(), state

    def transform(self, rnd: Round, updates: Tensor, weights: Tensor,
                  state: Any) -> tuple[Tensor, Tensor, Any]:
        self._maybe_fail(rnd.number, "transform")
        return updates, weights, {"seen": state["seen"] + 1}

    def post_aggregate(self, rnd: Round, update: Tensor, state: Any) -> tuple[Tensor, Any]:
        self._maybe_fail(rnd.number, "post_aggregate")
        if self.stage == "overflow" and rnd.number == self.fail_round:
            return torch.full_like(update, float("inf")), state
        return update, state

    def evaluate(self, rnd: int, model: torch.nn.Module, state: Any) -> dict[str, float]:
        self._maybe_fail(rnd, "evaluate")
        return {"probe": 1.0}


@pytest.mark.parametrize(("stage", "reason"), [
    ("exclude", "failed at exclude: RuntimeError: boom in exclude"),
    ("transform", "failed at transform: RuntimeError: boom in transform"),
    ("post_aggregate", "failed at post_aggregate: RuntimeError: boom in post_aggregate"),
    ("overflow", "NaN or Inf"),
])
def test_a_failing_component_skips_only_its_round(stage: str, reason: str) -> None:
    rows = run_in_process(_cfg(), components=[FailsIn(stage, 2)])
    assert [r["skipped"] for r in rows[1:]] == [False, True, False]
    assert reason in rows[2]["skipped_reason"]
    assert rows[2]["accuracy"] == rows[1]["accuracy"]  # the model was kept
    assert rows[3]["accuracy"] != rows[2]["accuracy"]  # and training went on


def test_a_component_that_fails_to_evaluate_loses_only_its_metric() -> None:
    rows = run_in_process(_cfg(), components=[FailsIn("evaluate", 2)])
    assert [r["skipped"] for r in rows[1:]] == [False, False, False]
    assert ["probe" in r for r in rows] == [True, True, False, True]


def test_a_rule_failing_at_run_time_skips_the_round_not_the_run() -> None:
    # krum(f=1) after bucketing(s=2) needs 2f+3 = 5 buckets, so n >= 9; with 10 clients the
    # check before round 1 passes, then 6 of them time out in round 2: 4 replies, 2 buckets
    lost = {2: {0, 1, 2, 3, 4, 5}}

    def fault(pid: int, msg: Any) -> bool:
        return pid in lost.get(int(msg.content["config"]["server-round"]), set())

    rows = run_in_process(
        _cfg("num-clients=10", "aggregator=krum", "aggregator-params=f=1",
             "pre-aggregation=bucketing(s=2)", "min-clients=2"), fault=fault)
    assert [r["skipped"] for r in rows[1:]] == [False, True, False]
    assert "krum" in rows[2]["skipped_reason"] and "unchanged" in rows[2]["skipped_reason"]


@pytest.mark.parametrize(("overrides", "error", "match"), [
    (["aggregator=krum", "aggregator-params=f=1", "pre-aggregation=bucketing(s=2)"],
     ValueError, "cannot run with n=6"),
    (["aggregator=median", "pre-aggregation=bucketing(s=3)"], ValueError, "s < n/2"),
    (["aggregator=median", "pre-aggregation=bucketing(s=2)", "clients-per-round=4"],
     ValueError, "leaves 2 buckets"),
    (["min-clients=7"], ValueError, "min-clients=7 exceeds num-clients=6"),
    (["device=cuda:0"] if not torch.cuda.is_available() else ["device=bogus"],
     ValueError, "device"),
    (["server-device=bogus"], ValueError, "not a device"),
    (["aggregator=krum", "aggregator-params=f=2"], ValueError, "n >= 2f \\+ 3"),
])
def test_settings_that_would_fail_every_round_are_refused_before_round_1(
    overrides: list[str], error: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match):
        run_in_process(_cfg(*overrides, f"out-dir={tmp_path}"))
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing ran
