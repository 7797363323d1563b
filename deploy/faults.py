"""Fault drills on a real local federation: crashed, frozen and returning SuperNodes, and a
SuperLink restart with ``resume=true``. Each drill runs the app with real processes and
reports what happened and when.

Usage::

    python -m deploy.faults --workdir /tmp/drills                 # every drill
    python -m deploy.faults --workdir /tmp/drills --drill straggler --drill resume

Drills (three SuperNodes, TLS, node authentication):

``straggler``
    Node 2's ClientApp is frozen (SIGSTOP) in round 1 while its SuperNode keeps
    heartbeating: the round ends after ``round-timeout`` with the other two replies; the
    ClientApp is thawed afterwards and node 2 trains in round 2.
``crash``
    Node 2 (SuperNode, SuperExec, ClientApp) is SIGKILLed in round 1 and restarted by a
    supervisor loop: Flower reports NODE_UNAVAILABLE 30-60 s after the kill, the round
    goes on with two, the node is re-admitted once the SuperLink has marked it offline, and
    round 2 waits (``node-wait-timeout``) for it.
``min-clients``
    ``min-clients=3`` and node 2 is SIGKILLed and not restarted: round 1 is skipped
    (model unchanged) and round 2 gives up after ``node-wait-timeout``; the run still ends.
``resume``
    The SuperLink (and with it the ServerApp) is SIGKILLed after round 1, restarted on the
    same database and port, the SuperNodes reconnect by themselves, and a new run with
    ``resume=true`` continues from round 2.

Results go to ``<workdir>/faults.json`` and standard output. A workdir that holds earlier
drills' results (``faults.json``, ``out-<drill>``) or keys is refused unless ``--force``,
which replaces them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .federation import Federation
from .files import write_file
from .processes import ManagedProcess, descendants

__all__ = ["DRILLS", "main"]

REPO = Path(__file__).resolve().parents[1]
NUM_NODES = 3
VICTIM = 2
CLIENTAPP_STARTED = "Start `flwr-clientapp` process"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _rounds(out: Path) -> list[dict[str, Any]]:
    keys = ("round", "skipped", "accuracy", "num-sampled", "num-replies", "num-kept",
            "round-seconds", "skipped_reason")
    return [{k: r[k] for k in keys if k in r} for r in _jsonl(out / "metrics.jsonl")]


def _rejections(out: Path) -> list[dict[str, Any]]:
    return [
        {"round": a["round"], **r}
        for a in _jsonl(out / "audit.jsonl")
        for r in a.get("rejected", [])
    ]


def _clientapp_pids(node: ManagedProcess) -> list[int]:
    pids = []
    for pid in descendants(node.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"flwr-clientapp" in fh.read():
                    pids.append(pid)
        except OSError:
            continue
    return pids


Value = float | int | bool | str


def _config(out: Path, **overrides: Value) -> dict[str, Value]:
    base: dict[str, Value] = {
        "num-server-rounds": 2,
        "clients-per-round": 0,
        "min-clients": 2,
        "round-timeout": 150.0,
        "node-wait-timeout": 150.0,
        "out-dir": str(out),
    }
    base.update(overrides)
    return base


def _wait_round_start(fed: Federation, i: int) -> float:
    node = fed.supernodes[i]
    return fed.wait_log(node, CLIENTAPP_STARTED, count=node.log().count(CLIENTAPP_STARTED) + 1,
                        timeout=300.0)


def drill_straggler(fed: Federation, out: Path) -> dict[str, Any]:
    """Freeze node 2's ClientApp past ``round-timeout``; thaw it after the round."""
    timeout = 45.0
    proc = fed.submit(REPO, _config(out, **{"round-timeout": timeout}))
    t0 = time.time()
    t_start = _wait_round_start(fed, VICTIM)
    frozen: list[int] = []
    deadline = time.monotonic() + 30.0
    while not frozen and time.monotonic() < deadline:
        frozen = _clientapp_pids(fed.supernodes[VICTIM])
        time.sleep(0.05)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)  # cannot be caught: the process just stops
    t_frozen = time.time()
    # Thaw once round 1 is over (its row is in metrics.jsonl).
    while len(_jsonl(out / "metrics.jsonl")) < 2 and proc.alive():
        time.sleep(0.5)
    t_round1 = time.time()
    for pid in frozen:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    result = fed.wait_run(proc, timeout=600.0)
    return {
        "status": result.status,
        "round-timeout": timeout,
        "frozen_s_after_submit": t_frozen - t0,
        "clientapp_started_s_after_submit": t_start - t0,
        "round1_logged_s_after_freeze": t_round1 - t_frozen,
        "rounds": _rounds(out),
        "rejected": _rejections(out),
    }


def drill_crash(fed: Federation, out: Path) -> dict[str, Any]:
    """SIGKILL node 2 in round 1, restart it until re-admitted; round 2 waits for it."""
    proc = fed.submit(REPO, _config(out, **{"clients-per-round": NUM_NODES}))
    t0 = time.time()
    _wait_round_start(fed, VICTIM)
    t_kill = fed.kill_supernode(VICTIM)
    rejoin_s = fed.rejoin_supernode(VICTIM, timeout=150.0)
    result = fed.wait_run(proc, timeout=600.0)
    return {
        "status": result.status,
        "killed_s_after_submit": t_kill - t0,
        "readmitted_s_after_kill": rejoin_s,
        "victim_node_id": fed.node_id(VICTIM),
        "rounds": _rounds(out),
        "rejected": _rejections(out),
    }


def drill_min_clients(fed: Federation, out: Path) -> dict[str, Any]:
    """min-clients=3 with node 2 dead for good: both rounds skipped, the run ends."""
    wait = 20.0
    proc = fed.submit(REPO, _config(out, **{"min-clients": 3, "node-wait-timeout": wait}))
    t0 = time.time()
    _wait_round_start(fed, VICTIM)
    t_kill = fed.kill_supernode(VICTIM)
    result = fed.wait_run(proc, timeout=600.0)
    t_end = time.time()
    rejoin_s = fed.rejoin_supernode(VICTIM, timeout=150.0)
    return {
        "status": result.status,
        "node-wait-timeout": wait,
        "killed_s_after_submit": t_kill - t0,
        "run_ended_s_after_kill": t_end - t_kill,
        "readmitted_after_run_s": rejoin_s,
        "rounds": _rounds(out),
    }


def drill_resume(fed: Federation, out: Path) -> dict[str, Any]:
    """SIGKILL the SuperLink after round 1, restart it, resume in a new run."""
    proc = fed.submit(REPO, _config(out, **{"num-server-rounds": 3}))
    first_run = fed.run_id(proc)
    while len(_jsonl(out / "metrics.jsonl")) < 2:
        if not proc.alive():
            raise RuntimeError(f"run ended before round 1:\n{proc.log()[-3000:]}")
        time.sleep(0.2)
    reconnect = "Connection successful after"
    counts = {i: fed.supernodes[i].log().count(reconnect) for i in fed.supernodes}
    t_kill = time.time()
    fed.stop_superlink(sig=signal.SIGKILL)
    proc.stop(grace=2.0)
    rounds_at_kill = _rounds(out)
    fed.start_superlink(port=fed.port)
    t_up = time.time()
    # The SuperNodes retry with back-off and keep their node ids (no re-activation).
    for i, node in fed.supernodes.items():
        fed.wait_log(node, reconnect, count=counts[i] + 1, timeout=180.0)
    t_nodes = time.time()
    result = fed.run(REPO, _config(out, **{"num-server-rounds": 3, "resume": True}),
                     timeout=600.0)
    return {
        "status": result.status,
        "killed_run_status": fed.run_status(first_run),
        "rounds_at_kill": [r["round"] for r in rounds_at_kill],
        "superlink_up_s_after_kill": t_up - t_kill,
        "nodes_reconnected_s_after_restart": t_nodes - t_up,
        "rounds": _rounds(out),
    }


DRILLS: dict[str, Callable[[Federation, Path], dict[str, Any]]] = {
    "straggler": drill_straggler,
    "crash": drill_crash,
    "min-clients": drill_min_clients,
    "resume": drill_resume,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected drills on one federation; return 0 when every run completed."""
    p = argparse.ArgumentParser(prog="python -m deploy.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--drill", action="append", choices=sorted(DRILLS),
                   help="drill to run (repeatable; default: all)")
    p.add_argument("--force", action="store_true",
                   help="replace the results and keys of earlier drills in WORKDIR")
    args = p.parse_args(argv)
    work = Path(args.workdir).resolve()
    drills = args.drill or list(DRILLS)
    earlier = [work / "faults.json", work / "federation" / "certs",
               *(work / f"out-{name}" for name in drills)]
    used = [str(path.relative_to(work)) for path in earlier if path.exists()]
    if used and not args.force:
        print(f"error: {work} holds earlier drills' results or keys ({', '.join(used)}): "
              "pass --force to replace them, or choose another --workdir", file=sys.stderr)
        return 2
    for name in drills:  # --force: a drill's run must not resume into its old results
        shutil.rmtree(work / f"out-{name}", ignore_errors=True)
    report: dict[str, Any] = {}
    ok = True
    with Federation(work / "federation", num_nodes=NUM_NODES, force=args.force) as fed:
        t = time.time()
        fed.start(timeout=180.0)
        report["federation_start_s"] = time.time() - t
        for name in drills:
            t = time.time()
            try:
                report[name] = DRILLS[name](fed, work / f"out-{name}")
            except Exception as exc:  # a drill that fails is reported, the others still run
                report[name] = {"error": repr(exc)}
            report[name]["wall_s"] = time.time() - t
            ok = ok and report[name].get("status") == "finished:completed"
            print(json.dumps({name: report[name]}, indent=1), flush=True)
    write_file(work / "faults.json", json.dumps(report, indent=1).encode(), private=False,
               force=args.force)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
