"""``deploy.superexec``: ClientApp processes forked from a warm fork server.

The fast tests drive :class:`ForkClientAppExecutor` with a stand-in entry that records
what the child saw; the deployment test runs a real federation with ``executor="fork"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.superexec import ForkClientAppExecutor, clientapp_argv

from ._superexec_entry import OUT_VAR

executor_types = pytest.importorskip("flwr.supercore.superexec.executor")
constant = pytest.importorskip("flwr.supercore.constant")
ExecutionSpec = executor_types.ExecutionSpec
TaskType = constant.TaskType

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _spec(token: str, **kw: Any) -> Any:
    fields: dict[str, Any] = dict(
        task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token=token,
        insecure=True, root_certificates_path=None, runtime_dependency_install=False,
        parent_pid=os.getpid(), suppress_output=False, task_id=7,
    )
    fields.update(kw)
    return ExecutionSpec(**fields)


SPECS = [
    dict(),
    dict(insecure=False, root_certificates_path="/etc/ca.pem"),
    dict(insecure=False, root_certificates_path=None, parent_pid=None),
    dict(runtime_dependency_install=True, runtime_api_address="[::1]:1234"),
]


@pytest.mark.parametrize("kw", SPECS)
def test_argv_is_the_one_flowers_subprocess_executor_passes(
    kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.superexec.executor import subprocess_executor

    seen: list[list[str]] = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen",
                        lambda args, **_: seen.append(list(args)))
    spec = _spec("tok", **kw)
    subprocess_executor.SubprocessExecutor().launch(spec)
    assert seen == [clientapp_argv(spec)]
    assert seen[0][0] == "flwr-clientapp"


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # the fork server inherits the environment when it starts (in the fixture below)
    out = tmp_path_factory.mktemp("superexec")
    os.environ[OUT_VAR] = str(out)
    try:
        yield out
    finally:
        os.environ.pop(OUT_VAR, None)


@pytest.fixture(scope="module")
def executor(out_dir: Path) -> ForkClientAppExecutor:
    # one per test process: multiprocessing keeps a single fork server
    return ForkClientAppExecutor(
        preload=("wave",), entry="tests.deploy._superexec_entry:record"
    )


def _wait_for(path: Path, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():  # renamed into place whole
        assert time.monotonic() < deadline, f"the forked ClientApp wrote no {path.name}"
        time.sleep(0.05)
    return dict(json.loads(path.read_text()))


def test_clientapp_task_runs_the_entry_forked_with_flowers_argv(
    executor: ForkClientAppExecutor, out_dir: Path
) -> None:
    spec = _spec("t1", insecure=False, root_certificates_path="/etc/ca.pem")
    result = executor.launch(spec)
    assert result.status == executor_types.LaunchResultStatus.ACCEPTED
    seen = _wait_for(out_dir / "t1.json")
    assert seen["argv"] == clientapp_argv(spec)
    # forked from the fork server (not a child of this process, not a fresh interpreter),
    # which had imported the preloaded module before the task arrived
    assert seen["ppid"] != os.getpid()
    assert seen["preloaded"] is True
    deadline = time.monotonic() + 30.0
    while executor.running:  # reconcile() reaps it
        assert time.monotonic() < deadline, "the ended ClientApp was not reaped"
        time.sleep(0.05)


def test_concurrent_tasks_each_get_their_own_process(
    executor: ForkClientAppExecutor, out_dir: Path
) -> None:
    tokens = [f"c{i}" for i in range(5)]
    for i, tok in enumerate(tokens):
        assert executor.launch(_spec(tok, task_id=100 + i)).status == "accepted"
    seen = [_wait_for(out_dir / f"{tok}.json") for tok in tokens]
    assert len({s["pid"] for s in seen}) == len(tokens)
    assert [s["argv"][s["argv"].index("--token") + 1] for s in seen] == tokens


def test_other_task_types_go_to_flowers_subprocess_executor(
    executor: ForkClientAppExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: list[Any] = []
    monkeypatch.setattr(executor._subprocess, "launch",
                        lambda spec: launched.append(spec) or "sub")
    spec = _spec("s1", task_type=TaskType.SERVER_APP)
    assert executor.launch(spec) == "sub"
    assert launched == [spec]


def test_a_failed_fork_is_reported_to_flower_not_raised(
    executor: ForkClientAppExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    class DeadForkServer:
        def __init__(self, **_: Any) -> None:
            pass

        def start(self) -> None:
            raise EOFError("unexpected EOF")  # what a dead fork server gives

    monkeypatch.setattr(executor._ctx, "Process", DeadForkServer)
    result = executor.launch(_spec("dead", task_id=9))
    assert result.status == executor_types.LaunchResultStatus.FAILED
    assert "EOFError: unexpected EOF" in (result.message or "")


def test_a_module_the_fork_server_lacks_is_refused(executor: ForkClientAppExecutor) -> None:
    # this process's fork server was started (by the fixture) without tabnanny: a second
    # executor asking for it cannot get it, and says so instead of paying for it per task
    with pytest.raises(ImportError, match="fork server could not import tabnanny"):
        ForkClientAppExecutor(preload=("tabnanny",),
                              entry="tests.deploy._superexec_entry:record")


def test_a_preload_module_that_is_not_installed_is_refused() -> None:
    with pytest.raises(ImportError, match="no_such_module_xyz.*--preload"):
        ForkClientAppExecutor(preload=("no_such_module_xyz",))


def test_entry_must_name_a_function() -> None:
    with pytest.raises(ValueError, match="module:function"):
        ForkClientAppExecutor(preload=(), entry="tests.deploy._superexec_entry")


def test_cli_refuses_a_missing_preload_module_in_one_line() -> None:
    exe = BIN / "fedshield-superexec"
    if not exe.exists():
        pytest.skip(f"{exe} not installed: pip install -e .")
    proc = subprocess.run(
        [str(exe), "--preload", "no_such_module_xyz", "--insecure",
         "--runtime-api-address", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode != 0
    assert "no_such_module_xyz" in proc.stderr and "Traceback" not in proc.stderr


def test_federation_refuses_an_unknown_executor(tmp_path: Path) -> None:
    from deploy.federation import Federation

    with pytest.raises(ValueError, match="executor must be one of subprocess, fork"):
        Federation(tmp_path, num_nodes=1, tls=False, auth=False, executor="thread")


def _need_deploy_executables() -> None:
    for exe in ("flower-superlink", "flower-supernode", "flwr", "fedshield-superexec"):
        if not (BIN / exe).exists():
            pytest.skip(f"{exe} not found next to {sys.executable}: pip install -e .")


def _small_run(out: Path, nodes: int, rounds: int) -> dict[str, Any]:
    """Run config of a short logreg run in which every node trains every round."""
    return {"num-server-rounds": rounds, "clients-per-round": nodes, "min-clients": nodes,
            "model": "logreg", "local-epochs": 1, "round-timeout": 300.0, "out-dir": str(out)}


@pytest.mark.deploy
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_federation_with_forked_clientapps_runs_rounds(tmp_path: Path) -> None:
    from deploy.federation import Federation
    from deploy.processes import tagged_pids

    _need_deploy_executables()
    out = tmp_path / "out"
    fed = Federation(tmp_path / "fed", num_nodes=2, executor="fork", database=False)
    try:
        fed.start(timeout=300.0)
        result = fed.run(REPO, _small_run(out, nodes=2, rounds=2), timeout=500)
        assert result.status == "finished:completed", result.log[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert [r["num-kept"] for r in rows[1:]] == [2, 2]
        for i in range(2):
            # the node and its SuperExec share a private secret (SuperExec auth)
            secret = fed.workdir / "nodes" / f"node-{i}" / "superexec.secret"
            assert secret.stat().st_mode & 0o777 == 0o600
            assert len(secret.read_bytes()) == 32
            # each round's ClientApp was forked by the node's fedshield-superexec; the
            # SuperNode (process isolation) started none
            started = "Start `flwr-clientapp` process"
            assert fed.superexecs[i].log().count(started) == 2
            assert fed.supernodes[i].log().count(started) == 0
    finally:
        fed.stop()
    assert not tagged_pids(fed.tag)


@pytest.mark.deploy
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_start_supernode_script_with_fork_runs_a_round(tmp_path: Path) -> None:
    from deploy.federation import Federation
    from deploy.processes import free_port, spawn, tagged_pids

    _need_deploy_executables()
    out = tmp_path / "out"
    fed = Federation(tmp_path / "fed", num_nodes=0, tls=False, auth=False, database=False)
    node = None
    try:
        fed.start(timeout=120.0)
        env = {**fed.env(tmp_path / "node-home"), "FLWR_BIN_DIR": str(BIN)}
        (tmp_path / "node-home").mkdir()
        node = spawn("script-node", [
            shutil.which("bash") or "/bin/bash", str(REPO / "deploy" / "start_supernode.sh"), "--superlink", fed.address,
            "--insecure", "--fork", "--port", str(free_port()),
            "--partition-id", "0", "--num-partitions", "1",
        ], log_path=tmp_path / "script-node.log", env=env, cwd=tmp_path)
        fed.wait_online(1, timeout=120.0)
        result = fed.run(REPO, _small_run(out, nodes=1, rounds=1), timeout=500)
        assert result.status == "finished:completed", result.log[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("num-kept") for r in rows] == [None, 1]
        # the one ClientApp came from the script's fedshield-superexec (the SuperNode runs
        # in process isolation and starts none itself)
        text = node.log()
        assert "Starting Flower SuperExec" in text
        assert text.count("Start `flwr-clientapp` process") == 1
    finally:
        if node is not None:
            node.stop(grace=5.0)
        fed.stop()
    assert not tagged_pids(fed.tag)


@pytest.mark.deploy
@pytest.mark.timeout(120)
def test_start_supernode_script_stops_the_node_when_its_superexec_exits(tmp_path: Path) -> None:
    from deploy.processes import free_port

    if not (BIN / "flower-supernode").exists():
        pytest.skip(f"flower-supernode not found next to {sys.executable}: install flwr")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flower-supernode").symlink_to(BIN / "flower-supernode")
    stub = bin_dir / "fedshield-superexec"
    stub.write_text("#!/bin/sh\nsleep 2\necho 'superexec: bad preload' >&2\nexit 3\n")
    stub.chmod(0o755)
    env = {**os.environ, "FLWR_BIN_DIR": str(bin_dir), "TMPDIR": str(tmp_path)}
    t0 = time.monotonic()
    proc = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(REPO / "deploy" / "start_supernode.sh"),
         "--superlink", "127.0.0.1:9", "--insecure", "--fork", "--port", str(free_port()),
         "--partition-id", "0", "--num-partitions", "1"],
        env=env, capture_output=True, text=True, timeout=90, check=False,
    )
    # the node (which could never run a task) was stopped, not left online
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "fedshield-superexec exited with 3; stopping the SuperNode" in proc.stderr
    assert time.monotonic() - t0 < 60
    # the per-node SuperExec secret was removed with the script
    assert not list(tmp_path.glob("fedshield-superexec.*"))
