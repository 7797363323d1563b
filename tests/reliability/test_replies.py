"""Replies others control: each bad one is refused with the node and the reason, and the
round goes on with the good ones (issue: reliability, class "replies aggregated that
should not be")."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, Message

from client.app import app as client_app
from runconfig.config import RunConfig
from server.app import run_server
from simulations.config import resolve_config
from simulations.engine import ENGINE_KEYS, InProcessGrid

BASE = ["num-clients=5", "num-server-rounds=1", "model=logreg", "local-epochs=1",
        "aggregator=median"]

Tamper = Callable[[list[Message]], list[Message]]


class TamperingGrid(InProcessGrid):
    """Delivers every message, then lets ``tamper`` change the list of replies."""

    def __init__(self, tamper: Tamper, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tamper = tamper

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.tamper(list(super().send_and_receive(messages, timeout=timeout)))


def _run(tamper: Tamper, tmp_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[int]]:
    cfg = resolve_config(None, [*BASE, f"out-dir={tmp_path}"])
    grid = TamperingGrid(tamper, client_app, cfg, 5)
    rows = run_server(grid, RunConfig.from_flat({k: v for k, v in cfg.items() if k not in ENGINE_KEYS}))
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    return rows, audit[-1], grid.node_ids


def _set(msg: Message, field: str, value: Any) -> Message:
    msg.metadata.__dict__[field] = value
    return msg


def _metric(key: str, value: Any) -> Tamper:
    def tamper(replies: list[Message]) -> list[Message]:
        replies[0].content["metrics"][key] = value
        return replies
    return tamper


def _float64(scale: float) -> Tamper:
    def tamper(replies: list[Message]) -> list[Message]:
        arrays = replies[0].content["arrays"]
        key = next(iter(arrays.keys()))
        arrays[key] = Array(np.full(arrays[key].numpy().shape, scale, dtype=np.float64))
        return replies
    return tamper


CASES: dict[str, tuple[Tamper, str]] = {
    "late reply (answers no message of this round)": (
        lambda r: [_set(r[0], "_reply_to_message_id", "m-from-an-earlier-round"), *r[1:]],
        "answers no message sent in this round"),
    "reply whose sender is not the node it was sent to": (
        lambda r: [_set(r[0], "_src_node_id", r[1].metadata.src_node_id), *r[1:]],
        "came from node"),
    "a second reply to one message": (
        lambda r: [*r, r[0]], "second reply from the same node"),
    "float64 arrays beyond float32's range": (_float64(1e300), "dtype torch.float64"),
    "float64 arrays of ordinary values": (_float64(0.5), "dtype torch.float64"),
    "1e308 examples": (_metric("num-examples", 1e308), "'num-examples' must be"),
    "2**41 examples": (_metric("num-examples", 2**41), "must be in [1, 1099511627776]"),
    "fractional examples": (_metric("num-examples", 10.5), "must be an integer"),
    "NaN dp-epsilon": (_metric("dp-epsilon", float("nan")), "'dp-epsilon' must be a finite"),
    "negative dp-epsilon": (_metric("dp-epsilon", -1.0), "'dp-epsilon' must be in"),
    "list partition id": (_metric("partition-id", [0, 1]), "must be a number"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_reply_is_refused_and_the_round_goes_on(case: str, tmp_path: Path) -> None:
    tamper, reason = CASES[case]
    rows, audit, nodes = _run(tamper, tmp_path)
    assert not rows[-1]["skipped"], rows[-1].get("skipped_reason")
    invalid = [r for r in audit["rejected"] if r["stage"] == "invalid"]
    assert len(invalid) == 1, audit["rejected"]
    assert reason in invalid[0]["reason"], invalid[0]["reason"]
    assert invalid[0]["node_id"] in nodes
    kept = {p["node_id"] for p in audit["participants"]}
    assert invalid[0]["node_id"] not in kept or case == "a second reply to one message"
    assert len(audit["participants"]) == 4 if case != "a second reply to one message" else 5


def test_a_forged_sender_never_gives_a_node_two_updates(tmp_path: Path) -> None:
    rows, audit, nodes = _run(CASES["reply whose sender is not the node it was sent to"][0],
                              tmp_path)
    ids = [p["node_id"] for p in audit["participants"]]
    assert len(ids) == len(set(ids)) == 4
