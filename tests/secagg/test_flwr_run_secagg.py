"""Secure aggregation (with distributed DP) under Flower's own CLI: ``flwr run .``, a local
simulation with Ray, as a user would start it (README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import test_flwr_run

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.long]

# the temporary FLWR_HOME, and the cleanup of what `flwr run` leaves running
flwr_home = test_flwr_run.flwr_home

ROOT = Path(__file__).resolve().parents[2]
# Not Flower's default local ports (39091, 39093), which tests/server/test_flwr_run.py uses
PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39191", "FLWR_LOCAL_CONTROL_API_PORT": "39193"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cleanup reads /proc")
def test_flwr_run_simulation_with_secure_aggregation_and_distributed_dp(
    flwr_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ, **PORTS,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_DISABLE_USAGE_STATS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    run_config = (
        "num-server-rounds=2 model='logreg' clients-per-round=4 "
        "secagg='neighbours=\"all\"' "
        "central-dp='noise_multiplier=0.5, clipping_norm=1.0, sampling=\"none\"' "
        f"out-dir='{out}'"
    )
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), "--stream",
           "--run-config", run_config,
           "--federation-config", "num-supernodes=4 client-resources-num-cpus=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], log
    for r in rows[1:]:
        assert not r["skipped"], r.get("skipped_reason")
        assert r["secagg-survivors"] == 4 and r["secagg-threshold"] == 2  # k = 3, t = 2
        assert r["secagg-noise-std-threshold"] == pytest.approx(0.5 / 4, rel=1e-3)
    assert rows[2]["epsilon"] > rows[1]["epsilon"] > 0
