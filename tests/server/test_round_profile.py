"""Every round's metrics row says where its seconds went: client training (the slowest and
the mean of the ``train-seconds`` each client reports), transfer (the exchange's wall time
minus the training on its critical path: the slowest client's when clients train in
parallel, the sum when the transport runs them in series), aggregation and evaluation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from server.rounds import ClientReply, Reply, decode_train_reply
from server.stages import Component, Round, Verdict
from simulations.config import load_config
from simulations.engine import run_in_process

PROFILE = ("train-max-seconds", "train-mean-seconds", "train-sum-seconds", "transfer-seconds",
           "exchange-seconds", "aggregation-seconds", "evaluation-seconds")


class SkipEveryRound(Component):
    """Skips every round after sampling: no exchange runs."""

    name = "skip-every-round"

    def admit(self, rnd: Round, state: Any) -> tuple[Verdict | None, Any]:
        return Verdict("skip", "the test skips every round"), state


def _rows(*components: Component) -> list[dict[str, Any]]:
    cfg = load_config(None, ["dataset=digits", "num-clients=4", "num-server-rounds=2",
                             "local-epochs=1"])
    return run_in_process(cfg, components=components)


def test_each_round_reports_its_profile_and_the_parts_add_up() -> None:
    rows = _rows()
    assert "train-max-seconds" not in rows[0]  # round 0 only evaluates
    for row in rows[1:]:
        assert not row["skipped"]
        for key in PROFILE:
            assert row[key] >= 0.0, (key, row[key])
        assert row["train-max-seconds"] > 0.0  # the clients reported their training
        assert row["train-mean-seconds"] <= row["train-max-seconds"]
        assert math.isclose(row["train-mean-seconds"] * row["num-replies"],
                            row["train-sum-seconds"], rel_tol=1e-9)
        # the in-process engine trains the clients one after another, inside the exchange
        assert row["train-sum-seconds"] <= row["exchange-seconds"]
        # ... so its transfer is the exchange minus all of their training
        assert math.isclose(row["train-sum-seconds"] + row["transfer-seconds"],
                            row["exchange-seconds"], rel_tol=1e-9, abs_tol=1e-12)
        parts = (row["exchange-seconds"] + row["aggregation-seconds"]
                 + row["evaluation-seconds"])
        assert parts <= row["round-seconds"] + 1e-6


def test_a_round_without_an_exchange_reports_zero_training_and_transfer() -> None:
    rows = _rows(SkipEveryRound())
    for row in rows[1:]:
        assert row["skipped"]
        assert (row["train-max-seconds"], row["train-mean-seconds"], row["train-sum-seconds"],
                row["transfer-seconds"]) == (0.0, 0.0, 0.0, 0.0)
        assert row["evaluation-seconds"] > 0.0


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf"), 2e9, "1.0"])
def test_a_reply_with_a_bad_train_seconds_is_rejected(seconds: object) -> None:
    reply = Reply(1, arrays={"arrays": {"w": torch.zeros(2)}},
                  metrics={"metrics": {"num-examples": 3, "train-seconds": seconds}})
    decoded = decode_train_reply(reply)
    assert decoded.state is None and decoded.error is not None
    assert "train-seconds" in decoded.error


@pytest.mark.parametrize(("in_series", "critical"), [(False, 3.0), (True, 6.0)])
def test_transfer_subtracts_the_training_on_the_critical_path(
    in_series: bool, critical: float
) -> None:
    from server.loop import _profile

    rnd = Round(1, torch.zeros(2))
    rnd.replies = tuple(ClientReply(n, None, 1.0, metrics={"train-seconds": s})
                        for n, s in ((1, 1.0), (2, 2.0), (3, 3.0)))
    out = _profile(rnd, 10.0, 0.5, in_series=in_series)
    assert out["transfer-seconds"] == 10.0 - critical
    assert (out["train-max-seconds"], out["train-sum-seconds"]) == (3.0, 6.0)
