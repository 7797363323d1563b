"""``fedshield bench --ray``: a small matrix on a Ray head started on this machine gives the
local pool's results, files and resume; an unreachable address fails in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from simulations.bench import DONE, RayCluster, RayUnreachableError, ray_runtime_env, run_bench
from simulations.cli import main as cli_main
from simulations.scenario import Scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")

# three cells of the quick scenario's kind, two rounds: seconds each
SMALL: dict[str, Any] = {
    "name": "ray-small",
    "fixed": {"dataset": "digits", "model": "mlp", "num-clients": 6, "num-server-rounds": 2,
              "local-epochs": 1, "learning-rate": 0.3},
    "matrix": {"partition": ["iid"], "attack": ["ipm(epsilon=10.0)"],
               "defense": ["mean", "median", "trimmed_mean"], "malicious": [1], "seed": [0]},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timings_out(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items()
            if not k.endswith(("-seconds", "_seconds")) and k != "seconds"}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [_timings_out(json.loads(ln)) for ln in path.read_text().splitlines()]


def _results(out: Path) -> list[dict[str, Any]]:
    return _jsonl(out / "results.jsonl")


def _cell_files(out: Path) -> dict[str, set[str]]:
    return {d.name: {f.name for f in d.iterdir()} for d in sorted((out / "cells").iterdir())}


def _config(out: Path, cell: str) -> dict[str, Any]:
    with (out / "cells" / cell / "config.toml").open("rb") as fh:
        cfg = tomllib.load(fh)
    assert Path(cfg.pop("out-dir")) == (out / "cells" / cell).resolve()
    return cfg


class RayHead(NamedTuple):
    address: str
    temp: Path  # Ray's temporary folder (sessions, logs, shipped packages)


@pytest.fixture
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A Ray head on this machine (2 CPUs, no dashboard); stopped afterwards."""
    temp = tmp_path_factory.mktemp("ray")
    short = None
    if len(str(temp)) > 40:  # Ray's socket paths under it must stay within 107 bytes
        temp = Path(short := tempfile.mkdtemp(prefix="fsray", dir="/tmp"))
    port = _free_port()
    ports = {flag: _free_port() for flag in (
        "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "node-manager-port", "object-manager-port")}
    log = temp / "head.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("PYTHONPATH", None)  # the workers import fedshield from the shipped copy
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--block",
             "--disable-usage-stats", f"--temp-dir={temp}",
             *(f"--{flag}={p}" for flag, p in ports.items())],
            cwd=temp, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None, f"ray start failed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start hung:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield RayHead(f"127.0.0.1:{port}", temp)
    finally:
        # the head and every process it started share its process group
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.flower  # starts a Ray head
def test_a_matrix_on_ray_gives_the_local_pools_results_and_resumes(
    ray_head: RayHead, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario: Scenario = parse_scenario(SMALL)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    # the local run in this process: the pool's workers run the same execute_cell, and
    # this process has torch and the data loaded already (seconds saved)
    assert run_bench(scenario, local, jobs=0, quiet=True, plots=False).exit_code == 0
    monkeypatch.chdir(tmp_path)  # the cells must not depend on the driver's folder
    lines: list[str] = []
    result = run_bench(scenario, "ray", ray=RayCluster(ray_head.address), echo=lines.append,
                       plots=False)
    assert result.exit_code == 0, result.markdown
    assert f"Ray at {ray_head.address} (1 CPU per cell)" in lines[0]
    assert _results(on_ray) == _results(local)  # identical accuracies, losses, audits...
    assert len(_results(on_ray)) == 3 * 3  # 3 cells, rounds 0..2
    assert _cell_files(on_ray) == _cell_files(local)
    for cell in _cell_files(local):
        assert _config(on_ray, cell) == _config(local, cell)
        for name in ("audit.jsonl", "metrics.jsonl"):
            assert _jsonl(on_ray / "cells" / cell / name) == _jsonl(local / "cells" / cell / name)
    assert (on_ray / "summary.md").read_text() == (local / "summary.md").read_text()
    # rerunning resumes: every cell is read back, nothing is sent to the cluster
    stamps = {p: p.stat().st_mtime_ns for p in on_ray.glob(f"cells/*/{DONE}")}
    again: list[str] = []
    run_bench(scenario, on_ray, ray=RayCluster(ray_head.address), echo=again.append, plots=False)
    assert again[0].startswith("resuming") and "3 of 3 cells already done" in again[0]
    assert {p: p.stat().st_mtime_ns for p in on_ray.glob(f"cells/*/{DONE}")} == stamps

    # the workers ran the packages the driver shipped (their folders, not this checkout)
    shipped = list(ray_head.temp.glob(
        "session_*/runtime_resources/py_modules_files/*/simulations/bench.py"))
    assert shipped and shipped[0].read_text() == (ROOT / "simulations" / "bench.py").read_text()


def test_an_unreachable_address_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(RayUnreachableError, match=rf"no Ray cluster answers at {address} .*"
                       r"ray start --head --port="):
        run_bench(parse_scenario(SMALL), tmp_path / "b", ray=RayCluster(address), quiet=True,
                  plots=False)
    code = cli_main(["bench", "--dataset", "digits", "--defenses", "mean", "--attacks", "none",
                     "--rounds", "1", "--ray", address, "--out", str(tmp_path / "c"),
                     "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"no Ray cluster answers at {address}" in err[0] and "ray start --head" in err[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["--ray-cpus", "2"], "--ray-cpus sets what each cell reserves on a Ray cluster: add --ray"),
    (["--ray", "h:1", "--jobs", "2"], "with --ray the cluster runs as many cells"),
    (["--ray", "h:1", "--ray-cpus", "0"], "--ray-cpus must be a positive number"),
    (["--ray", "h:1", "--ray-gpus", "-1"], "--ray-gpus must be >= 0"),
    (["--ray", "h:1", "--ray-gpus", "2.5"], "a fraction below 1 or a whole number"),
    (["--ray", "nowhere"], "is not HOST:PORT, ray://HOST:PORT or auto"),
])
def test_ray_options_are_checked(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["bench", "--dataset", "digits", "--defenses", "mean", "--attacks", "none",
                     "--rounds", "1", "--out", str(tmp_path / "b"), "--quiet", *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_the_runtime_env_ships_every_package_a_cell_imports() -> None:
    env = ray_runtime_env()
    assert [Path(f) for f in env["py_modules"]] == [
        ROOT / name for name in ("aggregation", "privacy", "runconfig", "secagg", "server",
                                 "client", "simulations")]
    assert "__pycache__" in env["excludes"]


def test_ray_cells_take_whole_cpus_as_torch_threads_and_absolute_data() -> None:
    assert RayCluster("h:1", cpus=0.5).threads == 1 and RayCluster("h:1", cpus=3).threads == 3
    assert RayCluster("h:1", gpus=0.25).describe() == "Ray at h:1 (1 CPU, 0.25 GPU per cell)"
    relative = {**SMALL, "fixed": {**SMALL["fixed"], "dataset": "npz:data/x.npz"}}
    with pytest.raises(ValueError, match="is a relative path; with --ray give it absolute"):
        run_bench(parse_scenario(relative), "unused", ray=RayCluster("h:1"), validate=False,
                  quiet=True, plots=False)
