"""Process utilities of the deploy tools, on plain Python processes (no Flower), and the
``python -m deploy.federation`` command line up to the point where it would start one."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from deploy import federation
from deploy.processes import (
    TAG_VAR,
    descendants,
    free_port,
    port_open,
    spawn,
    tagged_pids,
    wait_listening,
    wait_log,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# prints a line, starts a child that sleeps, listens on argv[1] when given, then waits
_PARENT = """
import socket, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("child", child.pid, flush=True)
if len(sys.argv) > 1:
    s = socket.socket()
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen()
    print("startup complete", flush=True)
time.sleep(60)
"""


def _env(tag: str) -> dict[str, str]:
    return {**os.environ, TAG_VAR: tag}


def test_spawn_wait_and_stop_end_the_whole_tree(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    port = free_port()
    proc = spawn("parent", [sys.executable, "-c", _PARENT, str(port)],
                 log_path=tmp_path / "parent.log", env=_env(tag), cwd=tmp_path)
    try:
        wait_listening(proc, "127.0.0.1", port, timeout=30.0, log_text="startup complete")
        assert port_open("127.0.0.1", port)
        wait_log(proc, "child ", timeout=30.0)
        child = int(proc.log().split("child ")[1].split()[0])
        assert child in descendants(proc.pid)
        assert {proc.pid, child} <= set(tagged_pids(tag))
        assert proc.argv[0] == sys.executable  # without the die-with-parent shim
    finally:
        proc.stop(grace=5.0)
    assert not proc.alive()
    deadline = time.monotonic() + 10.0
    while tagged_pids(tag):
        assert time.monotonic() < deadline, f"left behind: {tagged_pids(tag)}"
        time.sleep(0.1)


def test_waits_fail_fast_when_the_process_exits(tmp_path: Path) -> None:
    proc = spawn("quitter", [sys.executable, "-c", "print('bye')"],
                 log_path=tmp_path / "q.log", env=_env(uuid.uuid4().hex), cwd=tmp_path)
    try:
        proc.popen.wait(timeout=30.0)
        with pytest.raises(RuntimeError, match="quitter exited with 0:\nbye"):
            wait_listening(proc, "127.0.0.1", free_port(), timeout=30.0)
        with pytest.raises(TimeoutError, match="exited before logging 'never'"):
            wait_log(proc, "never", timeout=30.0)
        assert wait_log(proc, "bye", timeout=1.0) <= time.time()
    finally:
        proc.stop()


def test_federation_cli_flags_and_bad_run_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = federation._parser().parse_args([
        "--workdir", str(tmp_path), "--nodes", "2", "--run", ".", "--insecure",
        "--run-config", "num-server-rounds=3 aggregator='krum' out-dir='/tmp/a b'",
        "--data-path", "0=/d.npz", "--timeout", "60",
    ])
    assert (args.nodes, args.run, args.insecure, args.no_auth, args.timeout) == (
        2, ".", True, False, 60.0)
    assert args.data_path == ["0=/d.npz"]
    # a bad --run-config is refused before any process starts
    assert federation.main(["--workdir", str(tmp_path), "--run", ".",
                            "--run-config", "aggregator='krum"]) == 2
    assert "unclosed ' quote" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_federation_cli_executor_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert federation._parser().parse_args(["--workdir", "w"]).executor == "subprocess"
    assert federation._parser().parse_args(
        ["--workdir", "w", "--executor", "fork"]).executor == "fork"
    with pytest.raises(SystemExit):
        federation._parser().parse_args(["--workdir", "w", "--executor", "thread"])
    assert "invalid choice: 'thread'" in capsys.readouterr().err
    # fork needs fedshield-superexec next to the Flower executables: refused in one line
    empty = tmp_path / "bin"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="fedshield-superexec.*pip install -e"):
        federation.Federation(tmp_path / "w", num_nodes=1, tls=False, auth=False,
                              bin_dir=empty, executor="fork")
