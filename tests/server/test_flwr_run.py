"""The app runs under Flower's own CLI: `flwr run .` (local simulation with Ray).

This is the path a user takes with Flower's tools; the in-process engine used by the other
tests runs the same ServerApp/ClientApp code without Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.flower, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _pids_with_env(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (our temporary FLWR_HOME)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture
def flwr_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    yield home
    # `flwr run` leaves a detached SuperLink (and Ray) running: stop everything it started
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_with_env(f"FLWR_HOME={home}")
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not pids:
            break
        time.sleep(2)
    assert not _pids_with_env(f"FLWR_HOME={home}"), "processes left behind"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cleanup reads /proc")
def test_flwr_run_local_simulation_with_krum_under_attack(flwr_home: Path, tmp_path: Path) -> None:
    """`flwr run . --stream` with no out-dir: the round lines reach the terminal and the
    results go to the default folder under FEDSHIELD_HOME."""
    home = tmp_path / "fedshield-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FEDSHIELD_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_DISABLE_USAGE_STATS": "1",
        # flwr starts `flower-superlink` by name: the venv's bin must be on PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    flwr = Path(sys.executable).parent / "flwr"
    cmd = [
        str(flwr), "run", str(ROOT), "--stream",
        "--run-config",
        "num-server-rounds=2 aggregator='krum' num-malicious=2 model='logreg'",
        "--federation-config", "num-supernodes=7 client-resources-num-cpus=1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    runs = sorted((home / "runs").iterdir())
    assert len(runs) == 1, log
    out = runs[0]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], log
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert all(r["num-replies"] == 7 and r["num-kept"] == 1 for r in rows[1:])
    audit = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert all(len(a["rejected"]) == 6 and a["rejected"][0]["stage"] == "rule" for a in audit)
    # what the terminal showed: where the results go, each round's metrics, the rejections
    streamed = proc.stdout + proc.stderr
    assert f"results of this run go to {out}" in streamed
    for r in rows[1:]:
        assert f"round {r['round']}: " in streamed and f"'accuracy': {r['accuracy']}" in streamed
    assert streamed.count("not selected by krum") == 12
