"""End-to-end deployment tests: a real SuperLink and real SuperNodes on loopback.

One federation (SuperLink with TLS and SuperNode authentication, three SuperNodes, each a
separate process tree) is shared by the module. One two-round run of the default app
exercises the happy path and the crash path at once: SuperNode 2 is SIGKILLed as soon as
it starts training in round 1, it is restarted once round 1 is over, and round 2 waits
for it. Separate short tests check that impostors are refused.

Timing facts these tests rely on (Flower 1.41, measured): a SIGKILLed node is declared
unavailable 30-60 s after the kill (heartbeat every 30 s, patience 2), which ends its
round with an error reply; until then the SuperLink refuses to activate its key again.
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

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NUM_NODES = 3
VICTIM = 2  # the SuperNode killed mid-round
# Longer than Flower's node-unavailable detection (<= 60 s), so the crashed node's round
# ends on Flower's NODE_UNAVAILABLE reply, and bounded, so nothing can wait forever.
ROUND_TIMEOUT = 150.0
NODE_WAIT_TIMEOUT = 150.0


def _need_flower_cli() -> None:
    for exe in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if not (BIN / exe).exists():
            pytest.skip(f"{exe} not found next to {sys.executable}: install flwr")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    # node-3 is registered but never started by the federation: the no-CA impostor
    # uses it, so a refusal can only come from TLS, not from authentication.
    return write_bundle(tmp_path_factory.mktemp("certs"), nodes=NUM_NODES + 1, days=1)


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, certs: CertBundle
) -> Iterator[Federation]:
    _need_flower_cli()
    fed = Federation(tmp_path_factory.mktemp("federation"), num_nodes=NUM_NODES, certs=certs)
    try:
        fed.start(timeout=120.0)
        yield fed
    finally:
        fed.stop()
        left = tagged_pids(fed.tag)
        assert not left, f"processes of the federation still alive after stop(): {left}"


@dataclass(frozen=True)
class CrashRun:
    """What happened in the two-round run with a crashed and restarted SuperNode."""

    result: RunResult
    metrics: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    victim_id: int
    killed_after_s: float  # from submission to the kill
    round1_after_kill_s: float  # from the kill to round 1's metrics row
    rejoin_s: float  # from the kill to the SuperLink re-activating the victim


@pytest.fixture(scope="module")
def crash_run(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> CrashRun:
    fed = federation
    fed.wait_activated(set(fed.node_ids.values()), timeout=120.0)
    out = tmp_path_factory.mktemp("run")
    victim = fed.supernodes[VICTIM]
    started_before = victim.log().count("Start `flwr-clientapp` process")
    t0 = time.time()
    proc = fed.submit(
        REPO,
        {
            "num-server-rounds": 2,
            "clients-per-round": NUM_NODES,
            "min-clients": 2,
            "round-timeout": ROUND_TIMEOUT,
            "node-wait-timeout": NODE_WAIT_TIMEOUT,
            "out-dir": str(out),
        },
    )
    # The victim has pulled its round-1 model and launched its ClientApp: kill it now.
    fed.wait_log(victim, "Start `flwr-clientapp` process", count=started_before + 1,
                 timeout=240.0)
    t_kill = fed.kill_supernode(VICTIM, signal.SIGKILL)
    # Restart it once round 1 is over. Restarting at once can race Flower: if the node is
    # re-activated between its heartbeat expiry and the ServerApp's next poll (every 3 s),
    # no NODE_UNAVAILABLE reply is made and round 1 waits for the whole round-timeout.
    deadline = time.monotonic() + 240.0
    while len(_jsonl(out / "metrics.jsonl")) < 2:
        assert proc.alive() and time.monotonic() < deadline, proc.log()[-4000:]
        time.sleep(0.5)
    t_round1 = time.time()
    fed.rejoin_supernode(VICTIM, timeout=120.0)
    rejoin_s = time.time() - t_kill
    result = fed.wait_run(proc, timeout=420.0)
    metrics_path = out / "metrics.jsonl"
    assert metrics_path.exists(), f"no metrics.jsonl; run log:\n{result.log[-4000:]}"
    run = CrashRun(
        result=result,
        metrics=_jsonl(metrics_path),
        audit=_jsonl(out / "audit.jsonl") if (out / "audit.jsonl").exists() else [],
        victim_id=fed.node_id(VICTIM),
        killed_after_s=t_kill - t0,
        round1_after_kill_s=t_round1 - t_kill,
        rejoin_s=rejoin_s,
    )
    # Timings for the report (shown with pytest -s).
    print(
        f"\n[deploy] killed {run.killed_after_s:.1f} s after submit; round 1 over "
        f"{run.round1_after_kill_s:.1f} s after the kill; re-activated "
        f"{run.rejoin_s:.1f} s after the kill; run {result.wall_s:.1f} s; rounds: "
        + ", ".join(f"{r['round']}: {r.get('round-seconds', 0.0):.1f} s" for r in run.metrics)
    )
    return run


def test_run_finishes_and_model_improves(crash_run: CrashRun) -> None:
    assert crash_run.result.status == "finished:completed", crash_run.result.log[-4000:]
    rounds = {row["round"]: row for row in crash_run.metrics}
    assert sorted(rounds) == [0, 1, 2]
    assert not rounds[1]["skipped"] and not rounds[2]["skipped"]
    assert rounds[2]["accuracy"] > rounds[0]["accuracy"]
    assert rounds[2]["loss"] < rounds[0]["loss"]
    # `flwr run --stream` in a deployment shows each round's line and the lost node
    log = crash_run.result.log
    for r in (1, 2):
        assert f"round {r}: " in log and f"'accuracy': {rounds[r]['accuracy']}" in log, log[-4000:]
    assert f"rejected node {crash_run.victim_id}" in log, log[-4000:]


def test_killed_node_is_dropped_and_round_completes(crash_run: CrashRun) -> None:
    row = next(r for r in crash_run.metrics if r["round"] == 1)
    # Sent to all three; the crashed node's reply is Flower's NODE_UNAVAILABLE error,
    # which the server rejects; the round aggregates the other two.
    assert row["num-sampled"] == NUM_NODES
    assert row["num-kept"] == NUM_NODES - 1
    assert row["round-seconds"] < ROUND_TIMEOUT
    audit = next(a for a in crash_run.audit if a["round"] == 1)
    assert crash_run.victim_id not in {p["node_id"] for p in audit["participants"]}
    rejected = {r["node_id"]: r["reason"] for r in audit["rejected"]}
    assert "unavailable" in rejected[crash_run.victim_id].lower()


def test_killed_node_rejoins_and_trains(crash_run: CrashRun) -> None:
    # Same key, same node id: the restarted SuperNode is the same member of the federation.
    row = next(r for r in crash_run.metrics if r["round"] == 2)
    assert row["num-kept"] == NUM_NODES
    audit = next(a for a in crash_run.audit if a["round"] == 2)
    assert crash_run.victim_id in {p["node_id"] for p in audit["participants"]}
    # Flower 1.41 declares a crashed node unavailable within two heartbeat intervals
    # (2 x 30 s) after its last heartbeat, so round 1 ends within about a minute.
    assert crash_run.round1_after_kill_s <= 90.0


def test_unregistered_key_is_refused(federation: Federation, tmp_path: Path) -> None:
    stranger = write_bundle(tmp_path, nodes=1, keys_only=True, node_prefix="stranger")
    assert federation.superlink is not None
    activated_before = federation.superlink.log().count("Activated node_id=")
    node = federation.start_supernode(
        0, private_key=stranger.node_private_keys[0], name="stranger"
    )
    node.popen.wait(timeout=60.0)
    assert node.popen.returncode != 0
    assert "Failed to activate SuperNode" in node.log()
    assert "No SuperNode found with the given public key" in federation.superlink.log()
    assert federation.superlink.log().count("Activated node_id=") == activated_before


def test_supernode_without_the_ca_is_refused(
    federation: Federation, certs: CertBundle, tmp_path: Path
) -> None:
    spare = federation.register(certs.node_public_keys[NUM_NODES])
    other_ca = write_bundle(tmp_path / "other", days=1)
    assert other_ca.ca_cert is not None
    impostors = [
        # trusts only the operating system's CA bundle
        federation.start_supernode(0, private_key=certs.node_private_keys[NUM_NODES],
                                   system_ca=True, name="no-ca"),
        # trusts a different CA
        federation.start_supernode(0, private_key=certs.node_private_keys[NUM_NODES],
                                   root_certificates=other_ca.ca_cert, name="wrong-ca"),
    ]
    for node in impostors:
        node.popen.wait(timeout=60.0)
        assert node.popen.returncode != 0, node.log()
        assert "CERTIFICATE_VERIFY_FAILED" in node.log()
    # The key is registered, so only the TLS check can have stopped them.
    assert federation.activations(spare) == 0


def test_stop_ends_every_process_including_children(tmp_path: Path) -> None:
    _need_flower_cli()
    fed = Federation(tmp_path, num_nodes=0, auth=False)
    try:
        fed.start_superlink()
        # the SuperLink and the SuperExec it spawned both carry the tag
        assert len(tagged_pids(fed.tag)) >= 2
    finally:
        fed.stop()
    assert tagged_pids(fed.tag) == []
