"""Secure aggregation in a deployment: a real SuperLink and real SuperNodes on loopback,
TLS and SuperNode authentication, one SuperNode SIGKILLed during the masked-input stage.

Four SuperNodes, all neighbours (``k = 3``, threshold ``t = 2``). Round 1: the victim is
killed as soon as it starts its ClientApp for its third secure aggregation message (the
masked-input stage, where it trains and masks); Flower declares it unavailable 30-60 s later
and the server drops it at that stage. Each survivor's self-mask seed is held by its two
surviving neighbours and the victim's mask key by three (``>= t``), so the server removes
the masks and the round completes over the three survivors. The victim is restarted once
round 1 is over, and round 2 aggregates all four.

With three SuperNodes (``k = 2``, ``t = 2``) the same kill leaves each survivor's seed with
one surviving neighbour, below the threshold: measured, round 1 then fails cleanly at
masked-input ("client ...'s secrets are held by 1 surviving neighbours, fewer than the
threshold 2; the global model is unchanged") and the run goes on to round 2.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.certs import CertBundle, write_bundle
from deploy.federation import Federation, RunResult
from deploy.processes import tagged_pids

pytestmark = [pytest.mark.deploy, pytest.mark.long, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NUM_NODES = 4
VICTIM = 1
ROUND_TIMEOUT = 240.0  # longer than Flower's node-unavailable detection (<= 60 s)
STARTED = "Start `flwr-clientapp` process"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class SecAggRun:
    result: RunResult
    metrics: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    victim_id: int


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    for exe in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if not (BIN / exe).exists():
            pytest.skip(f"{exe} not found next to {sys.executable}: install flwr")
    certs: CertBundle = write_bundle(tmp_path_factory.mktemp("certs"), nodes=NUM_NODES, days=1)
    fed = Federation(tmp_path_factory.mktemp("federation"), num_nodes=NUM_NODES, certs=certs)
    try:
        fed.start(timeout=240.0)
        yield fed
    finally:
        fed.stop()
        left = tagged_pids(fed.tag)
        assert not left, f"processes of the federation still alive after stop(): {left}"


@pytest.fixture(scope="module")
def secagg_run(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> SecAggRun:
    fed = federation
    fed.wait_activated(set(fed.node_ids.values()), timeout=240.0)
    out = tmp_path_factory.mktemp("run")
    victim = fed.supernodes[VICTIM]
    before = victim.log().count(STARTED)
    proc = fed.submit(REPO, {
        "num-server-rounds": 2, "clients-per-round": NUM_NODES, "min-clients": 2,
        "model": "logreg", "secagg": "neighbours='all'", "round-timeout": ROUND_TIMEOUT,
        "node-wait-timeout": ROUND_TIMEOUT, "out-dir": str(out),
    })
    # messages 1, 2, 3 of round 1: advertise-keys, share-keys, masked-input
    fed.wait_log(victim, STARTED, count=before + 3, timeout=600.0)
    fed.kill_supernode(VICTIM, signal.SIGKILL)
    deadline = time.monotonic() + 600.0
    while not (out / "metrics.jsonl").exists() or len(_jsonl(out / "metrics.jsonl")) < 2:
        assert proc.alive() and time.monotonic() < deadline, proc.log()[-4000:]
        time.sleep(0.5)
    fed.rejoin_supernode(VICTIM, timeout=240.0)
    result = fed.wait_run(proc, timeout=900.0)
    assert (out / "metrics.jsonl").exists(), result.log[-4000:]
    run = SecAggRun(result, _jsonl(out / "metrics.jsonl"), _jsonl(out / "audit.jsonl"),
                    fed.node_id(VICTIM))
    print("\n[deploy secagg] run " f"{result.wall_s:.1f} s; rounds: "
          + ", ".join(f"{r['round']}: {r.get('round-seconds', 0.0):.1f} s" for r in run.metrics))
    return run


def test_a_node_killed_while_masking_is_dropped_and_the_round_completes(
    secagg_run: SecAggRun,
) -> None:
    assert secagg_run.result.status == "finished:completed", secagg_run.result.log[-4000:]
    row = next(r for r in secagg_run.metrics if r["round"] == 1)
    assert not row["skipped"], row.get("skipped_reason")
    assert row["secagg-survivors"] == NUM_NODES - 1
    assert row["secagg-dropped-masked-input"] == 1
    audit = next(a for a in secagg_run.audit if a["round"] == 1)
    dropped = audit["secagg"]["dropped"]["masked-input"]
    assert list(dropped) == [str(secagg_run.victim_id)], dropped


def test_the_run_continues_with_the_restarted_node(secagg_run: SecAggRun) -> None:
    rounds = {r["round"]: r for r in secagg_run.metrics}
    assert sorted(rounds) == [0, 1, 2]
    assert not rounds[2]["skipped"], rounds[2].get("skipped_reason")
    assert rounds[2]["secagg-survivors"] == NUM_NODES
    assert rounds[2]["loss"] < rounds[0]["loss"]
