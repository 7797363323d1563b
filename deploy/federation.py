"""Start a real Flower 1.41 federation (one SuperLink, N SuperNodes) on one machine.

Every component is a separate operating-system process talking HTTPS over loopback,
exactly as on separate machines: the SuperLink serves the Fleet, Control and Runtime APIs
on one port with TLS (``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``) and, by
default, SuperNode authentication (``--enable-supernode-auth``); each SuperNode has its
own EC key (registered with ``flwr supernode register``), its own Runtime API port
(``--port``, where its ClientApp processes connect), its own ``FLWR_HOME`` and its own
data partition (``--node-config "partition-id=i num-partitions=N"``). The ``flwr`` CLI
reaches the SuperLink through a connection written to ``$FLWR_HOME/config.toml``
with the root certificate.

Usage::

    python -m deploy.federation --workdir /tmp/fed --nodes 3          # then, printed:
    FLWR_HOME=/tmp/fed/flwr-home flwr run . fedshield --stream
    python -m deploy.federation --workdir /tmp/fed --nodes 3 \\
        --run . --run-config "num-server-rounds=3"                    # run, then stop

``--run-config`` takes whitespace-separated ``key=value`` overrides, read by
:func:`runconfig.overrides.parse_overrides` (quote values with spaces: ``out-dir='/a b'``).

Processes are tracked so that none outlives the federation (:mod:`deploy.processes`):
each is started in its own session with an environment marker
``FEDSHIELD_DEPLOY_TAG=<uuid>`` that its children (SuperExec, ServerApp, ClientApp
processes) inherit; :meth:`Federation.stop` ends the process trees and then every process
still carrying the marker, by process id.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import tomli_w

from runconfig.overrides import parse_overrides

from .certs import CertBundle, write_bundle
from .connection import write_connection
from .files import write_file
from .processes import (
    TAG_VAR,
    ManagedProcess,
    free_port,
    kill_pids,
    spawn,
    tagged_pids,
    wait_listening,
    wait_log,
)

__all__ = [
    "EXECUTORS",
    "FLWR_QUIET_ENV",
    "Federation",
    "RunResult",
    "format_node_config",
    "main",
    "write_connection",
]

ConfigValue = bool | int | float | str

#: Environment that keeps every Flower process quiet, offline and reproducible.
FLWR_QUIET_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

_RUN_ID = re.compile(r"Successfully started run (\d+)")
#: How a SuperNode starts ClientApp processes (see ``Federation``'s ``executor``).
EXECUTORS: tuple[str, ...] = ("subprocess", "fork")
# times a SuperNode whose Runtime API port was taken is started again on another port
PORT_RETRIES = 3

log = logging.getLogger("fedshield.deploy")
_FINISHED = "finished"


@dataclass(frozen=True)
class RunResult:
    """Outcome of :meth:`Federation.run`.

    ``status`` is Flower's run status, e.g. ``"finished:completed"``, or
    ``"timeout:<status>"`` when the run was stopped after ``timeout`` seconds.
    """

    run_id: int
    status: str
    wall_s: float
    log: str


def _format_value(key: str, value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # Flower splits the pairs with the pattern "[^"]*", so a value cannot hold a double
    # quote; TOML basic strings need backslashes escaped and forbid control characters.
    if (
        not isinstance(value, str)
        or '"' in value
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise ValueError(
            f"config value for {key!r} must be a bool, a number or a string without double "
            f"quotes or control characters, got {value!r}"
        )
    return '"' + value.replace("\\", "\\\\") + '"'


def format_node_config(config: Mapping[str, ConfigValue]) -> str:
    """Format ``config`` for ``flower-supernode --node-config`` (space-separated TOML pairs).

    Examples
    --------
    >>> format_node_config({"partition-id": 0, "num-partitions": 3, "data-path": "/d.npz"})
    'partition-id=0 num-partitions=3 data-path="/d.npz"'
    """
    for key in config:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"config keys are [A-Za-z0-9_-]+, got {key!r}")
    return " ".join(f"{k}={_format_value(k, v)}" for k, v in config.items())


class Federation:
    """One SuperLink and N SuperNodes as real processes on this machine.

    Parameters
    ----------
    workdir
        Directory for certificates, logs, the SuperLink database and each component's
        ``FLWR_HOME``.
    num_nodes
        Number of SuperNodes; node ``i`` gets ``partition-id=i num-partitions=num_nodes``.
    tls
        Serve HTTPS with certificates from ``certs`` (generated into
        ``workdir/certs`` when ``None``). ``False`` runs plain HTTP (a warning is printed).
    auth
        Enable SuperNode authentication (needs ``tls``): only registered keys may join.
    certs
        Existing certificates and node keys (needs ``num_nodes`` node keys).
    node_config
        Extra node-config entries per node (``data-path`` for a device with its own
        data), merged over the partition entries.
    host
        Address the SuperLink binds and the SuperNodes dial; loopback by default.
    bin_dir
        Directory of the ``flower-superlink``, ``flower-supernode`` and ``flwr``
        executables (default: next to this Python interpreter).
    connection
        Name of the ``flwr`` connection written to ``config.toml``.
    extra_env
        Extra environment variables for every component.
    die_with_parent
        On Linux, every component gets SIGKILL when the thread that started it dies
        (``prctl(PR_SET_PDEATHSIG)``), so a killed launcher or test runner leaves nothing
        running. Start components from one long-lived thread. Turn it off to let the
        federation outlive this process.
    force
        Replace the certificates and keys an earlier federation generated in
        ``workdir/certs`` (``--force``); without it they are never overwritten.
    database
        Keep the SuperLink's state in the SQLite file ``workdir/state.db`` (it survives a
        SuperLink restart). ``False`` keeps it in memory: Flower 1.41's SQLite state
        answers concurrent uploads with HTTP 500 ("database is locked", a 5 s busy
        timeout, no retry) once about ten SuperNodes upload at once, and the lost replies
        leave the round waiting for ``round-timeout``; with the state in memory and
        ``executor="fork"`` the load test kept all 20 nodes in all 5 rounds (README, fault
        table). A restarted in-memory SuperLink starts empty (its nodes
        register and activate again).

    executor
        How each SuperNode starts its ClientApp processes. ``"subprocess"``: Flower's
        default (``flower-superexec`` starts a fresh ``flwr-clientapp`` per task, which
        imports Flower and torch each time). ``"fork"``: the node runs in ``process``
        isolation next to a ``fedshield-superexec`` that forks each ClientApp from a
        process that imported them once (:mod:`deploy.superexec`); needed when many nodes
        share few cores, where cold starts miss Flower's 30 s first-heartbeat window.

    Raises
    ------
    FileExistsError
        If ``workdir/certs`` holds an earlier federation's keys and ``force`` is false.

    Examples
    --------
    >>> with Federation("/tmp/fed", num_nodes=2) as fed:  # doctest: +SKIP
    ...     fed.start()
    ...     result = fed.run(".", {"num-server-rounds": 2})
    ...     result.status
    'finished:completed'
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        num_nodes: int = 3,
        tls: bool = True,
        auth: bool = True,
        certs: CertBundle | None = None,
        node_config: Sequence[Mapping[str, ConfigValue]] | None = None,
        host: str = "127.0.0.1",
        bin_dir: str | os.PathLike[str] | None = None,
        connection: str = "fedshield",
        extra_env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
        force: bool = False,
        database: bool = True,
        executor: str = "subprocess",
    ) -> None:
        if num_nodes < 0:
            raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
        if auth and not tls:
            raise ValueError(
                "SuperNode authentication requires TLS (Flower refuses it over plain "
                "HTTP): set tls=True or auth=False"
            )
        if executor not in EXECUTORS:
            raise ValueError(
                f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}"
            )
        if node_config is not None and len(node_config) != num_nodes:
            raise ValueError(
                f"node_config needs one mapping per node, got {len(node_config)} for "
                f"num_nodes={num_nodes}"
            )
        self.workdir = Path(workdir).resolve()
        self.num_nodes = num_nodes
        self.tls = tls
        self.auth = auth
        self.host = host
        self.connection = connection
        self.bin_dir = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self.tag = uuid.uuid4().hex
        self.die_with_parent = die_with_parent
        self.database = database
        self.executor = executor
        if executor == "fork" and not (self.bin_dir / "fedshield-superexec").exists():
            raise FileNotFoundError(
                f"executor='fork' needs {self.bin_dir / 'fedshield-superexec'}: install "
                "fedshield into that environment (pip install -e ., as make test does)"
            )
        self.superexecs: dict[int, ManagedProcess] = {}
        self._port_retries: dict[int, int] = {}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        if tls and certs is None:
            try:
                certs = write_bundle(self.workdir / "certs", nodes=num_nodes, overwrite=force)
            except FileExistsError as exc:
                raise FileExistsError(
                    f"{exc}. They are an earlier federation's keys: pass --force "
                    f"(force=True) to replace them, --certs {self.workdir / 'certs'} to use "
                    "them again, or choose another --workdir"
                ) from None
        if certs is not None and auth and len(certs.node_private_keys) < num_nodes:
            raise ValueError(
                f"certs hold {len(certs.node_private_keys)} node keys, need {num_nodes}"
            )
        self.certs = certs
        self._node_config = [dict(c) for c in node_config] if node_config else [
            {} for _ in range(num_nodes)
        ]
        self._extra_env = dict(extra_env or {})
        self.port = 0
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[int, ManagedProcess] = {}
        self.node_ids: dict[int, int] = {}
        self._others: list[ManagedProcess] = []
        if not tls:
            print(
                "WARNING: TLS is off: model updates and node traffic travel in clear text. "
                "Use this only on a trusted, isolated network.",
                file=sys.stderr,
            )

    # ------------------------------------------------------------------ environment
    @property
    def address(self) -> str:
        """SuperLink ``host:port`` (Fleet, Control and Runtime APIs share it)."""
        return f"{self.host}:{self.port}"

    def env(self, flwr_home: Path | None = None) -> dict[str, str]:
        """Environment for a component: quiet Flower, our tag, ``bin_dir`` on ``PATH``."""
        env = dict(os.environ)
        env.update(FLWR_QUIET_ENV)
        env.update(self._extra_env)
        env[TAG_VAR] = self.tag
        # The SuperLink and SuperNodes spawn `flower-superexec` by name from PATH.
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_HOME"] = str(flwr_home if flwr_home is not None else self.flwr_home)
        # Apps must run from the installed FAB, not from a checkout on PYTHONPATH.
        env.pop("PYTHONPATH", None)
        return env

    def _spawn(
        self, name: str, argv: list[str], flwr_home: Path, *, cwd: Path | None = None
    ) -> ManagedProcess:
        flwr_home.mkdir(parents=True, exist_ok=True)
        return spawn(
            name, argv, log_path=self.log_dir / f"{name}.log", env=self.env(flwr_home),
            cwd=cwd or self.workdir, die_with_parent=self.die_with_parent,
        )

    def flwr(
        self, *args: str, timeout: float = 60.0, cwd: str | os.PathLike[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI with this federation's ``FLWR_HOME`` and return its result."""
        return subprocess.run(
            [str(self.bin_dir / "flwr"), *args],
            env=self.env(),
            cwd=cwd if cwd is not None else self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    # ------------------------------------------------------------------ SuperLink
    def start_superlink(self, *, port: int | None = None, timeout: float = 60.0) -> None:
        """Start the SuperLink (state in ``workdir/state.db``, or in memory when
        ``database`` is false) and wait until it listens.

        Raises
        ------
        RuntimeError
            If it exits or does not listen within ``timeout`` seconds (its log is quoted).
        """
        if self.superlink is not None and self.superlink.alive():
            raise RuntimeError("the SuperLink is already running: stop_superlink() first")
        self.port = port or self.port or free_port(self.host)
        argv = [
            str(self.bin_dir / "flower-superlink"),
            "--host", self.host,
            "--port", str(self.port),
            *(["--database", str(self.workdir / "state.db")] if self.database else []),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls:
            assert self.certs is not None and self.certs.server_cert is not None
            assert self.certs.server_key is not None and self.certs.ca_cert is not None
            argv += [
                "--ssl-certfile", str(self.certs.server_cert),
                "--ssl-keyfile", str(self.certs.server_key),
                "--ssl-ca-certfile", str(self.certs.ca_cert),
            ]
        else:
            argv.append("--insecure")
        if self.auth:
            argv.append("--enable-supernode-auth")
        self.superlink = self._spawn("superlink", argv, self.workdir / "superlink-home")
        write_connection(
            self.flwr_home,
            self.connection,
            self.address,
            root_certificates=self.certs.ca_cert if self.tls and self.certs else None,
            insecure=not self.tls,
            force=True,  # the federation's own FLWR_HOME: a restart may change the port
        )
        wait_listening(self.superlink, self.host, self.port, timeout=timeout,
                       log_text="startup complete")

    def stop_superlink(self, *, sig: signal.Signals | None = None) -> None:
        """Stop the SuperLink: gracefully, or with ``sig`` (e.g. SIGKILL) on its tree."""
        if self.superlink is None:
            return
        if sig is not None:
            self.superlink.kill(sig)
        self.superlink.stop()

    # ------------------------------------------------------------------ SuperNodes
    def register(self, public_key: Path) -> int:
        """Register a SuperNode public key with ``flwr supernode register``; return node id.

        Raises
        ------
        RuntimeError
            If the CLI fails (its output is quoted).
        """
        res = self.flwr("supernode", "register", str(public_key), self.connection,
                        "--format", "json")
        try:
            payload = json.loads(res.stdout[res.stdout.index("{"):])
            return int(payload["node-id"])
        except (ValueError, KeyError) as err:
            raise RuntimeError(
                f"flwr supernode register {public_key} failed (exit {res.returncode}):\n"
                f"{res.stdout}\n{res.stderr}"
            ) from err

    def register_all(self) -> dict[int, int]:
        """Register the public key of every node ``0..num_nodes-1``; return ``{i: node_id}``."""
        assert self.certs is not None
        for i in range(self.num_nodes):
            self.node_ids[i] = self.register(self.certs.node_public_keys[i])
        return dict(self.node_ids)

    def node_config(self, i: int) -> dict[str, ConfigValue]:
        """Node config of node ``i``: its partition plus the extra entries given."""
        base: dict[str, ConfigValue] = {"partition-id": i, "num-partitions": self.num_nodes}
        if 0 <= i < len(self._node_config):
            base.update(self._node_config[i])
        return base

    def start_supernode(
        self,
        i: int,
        *,
        private_key: Path | None = None,
        root_certificates: Path | None = None,
        node_config: Mapping[str, ConfigValue] | None = None,
        system_ca: bool = False,
        extra_args: Sequence[str] = (),
        name: str | None = None,
    ) -> ManagedProcess:
        """Start SuperNode ``i`` (own Runtime API port and ``FLWR_HOME``); do not wait.

        ``private_key`` and ``root_certificates`` default to node ``i``'s key and the CA;
        pass others to try an impostor; ``system_ca`` omits ``--root-certificates`` so the
        node trusts only the operating system's CA bundle. Without ``name`` the process is node ``i``'s (a
        running node ``i`` is refused); with ``name`` it is an extra process (logged as
        ``name``) that :meth:`stop` still ends.
        """
        tracked = name is None
        name = name or f"node-{i}"
        if tracked and i in self.supernodes and self.supernodes[i].alive():
            raise RuntimeError(f"{name} is already running: kill_supernode({i}) first")
        runtime_port = free_port("127.0.0.1")
        argv = [
            str(self.bin_dir / "flower-supernode"),
            "--superlink", self.address,
            "--host", "127.0.0.1",
            "--port", str(runtime_port),
            "--node-config", format_node_config(node_config or self.node_config(i)),
        ]
        secret: Path | None = None
        if self.executor == "fork":
            # Only a holder of this secret may take tasks from the node's Runtime API
            # (Flower's SuperExec HMAC auth; Flower's subprocess mode runs without it).
            node_home = self.workdir / "nodes" / name
            node_home.mkdir(parents=True, exist_ok=True)
            secret = write_file(node_home / "superexec.secret", secrets.token_bytes(32),
                                private=True, force=True)
            argv += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        if self.tls:
            assert self.certs is not None and self.certs.ca_cert is not None
            if not system_ca:
                argv += ["--root-certificates", str(root_certificates or self.certs.ca_cert)]
        else:
            argv.append("--insecure")
        if self.auth:
            assert self.certs is not None
            key = private_key or self.certs.node_private_keys[i]
            argv += ["--auth-supernode-private-key", str(key)]
        argv += list(extra_args)
        proc = self._spawn(name, argv, self.workdir / "nodes" / name)
        if tracked:
            self.supernodes[i] = proc
        else:
            self._others.append(proc)
        if secret is not None:
            # Dials the node's Runtime API (retrying until it listens) and exits with it.
            superexec = self._spawn(f"{name}-superexec", [
                str(self.bin_dir / "fedshield-superexec"), "--insecure",
                "--runtime-api-address", f"127.0.0.1:{runtime_port}",
                "--parent-pid", str(proc.pid), "--superexec-auth-secret-file", str(secret),
            ], self.workdir / "nodes" / name)
            if tracked:
                old = self.superexecs.pop(i, None)
                if old is not None:
                    self._others.append(old)  # still stopped by stop()
                self.superexecs[i] = superexec
            else:
                self._others.append(superexec)
        return proc

    def _check_supernodes(self, node_ids: set[int] | None) -> None:
        """While waiting for nodes: restart a SuperNode that lost its Runtime API port;
        refuse a node whose ``fedshield-superexec`` exited (``executor="fork"``).

        :func:`free_port` picks a port that another process may take before the SuperNode
        binds it (many nodes starting at once, other servers on the machine); such a node
        exits with "address already in use" and is started again on a new port, at most
        :data:`PORT_RETRIES` times. A node awaited (``node_ids``, or every node when
        ``None``) that exited for another reason ends the wait at once.

        Raises
        ------
        RuntimeError
            Naming the node, with its log's tail.
        """
        for i, proc in list(self.supernodes.items()):
            if proc.alive():
                continue
            text = proc.log()
            if "address already in use" in text and self._port_retries.get(i, 0) < PORT_RETRIES:
                self._port_retries[i] = self._port_retries.get(i, 0) + 1
                log.warning("node-%d: its Runtime API port was taken; starting it again on "
                            "another port (retry %d of %d)", i, self._port_retries[i],
                            PORT_RETRIES)
                self.start_supernode(i)
                continue
            awaited = node_ids is None or self.node_ids.get(i) in node_ids
            if awaited:
                raise RuntimeError(f"node-{i} exited while the federation waited for it:\n"
                                   f"{text[-1500:]}")
        for i, superexec in list(self.superexecs.items()):
            # a node without its SuperExec would be online and never run a task
            node = self.supernodes.get(i)
            if node is not None and node.alive() and not superexec.alive():
                raise RuntimeError(
                    f"node-{i}'s fedshield-superexec exited (the node could run no task):\n"
                    f"{superexec.log()[-1500:]}")

    def start_supernodes(self) -> None:
        """Start every SuperNode ``0..num_nodes-1``."""
        for i in range(self.num_nodes):
            self.start_supernode(i)

    def kill_supernode(self, i: int, sig: signal.Signals = signal.SIGKILL) -> float:
        """Kill SuperNode ``i`` and its ClientApp processes; return the kill time (epoch s)."""
        proc = self.supernodes[i]
        superexec = self.superexecs.get(i)
        t = time.time()
        if superexec is not None:
            # fork executor: its ClientApps are its descendants; killed first, before it
            # can see the node gone and exit, leaving them to be re-parented
            superexec.kill(sig)
        proc.kill(sig)
        if superexec is not None:
            superexec.stop(grace=5.0)
        proc.stop(grace=5.0)
        return t

    def node_id(self, i: int) -> int:
        """Node id of SuperNode ``i``: from its registration, else from its log.

        Raises
        ------
        KeyError
            If the node was neither registered nor has logged its id yet.
        """
        if i in self.node_ids:
            return self.node_ids[i]
        if i in self.supernodes:
            found = re.findall(r"SuperNode ID: (\d+)", self.supernodes[i].log())
            if found:
                return int(found[-1])
        raise KeyError(f"node {i} has no known node id yet (not registered, not started)")

    def activations(self, node_id: int) -> int:
        """How many times the SuperLink has activated ``node_id`` (from its log)."""
        assert self.superlink is not None
        return self.superlink.log().count(f"Activated node_id={node_id}")

    def rejoin_supernode(
        self, i: int, *, timeout: float = 150.0, retry_every: float = 3.0
    ) -> float:
        """Restart SuperNode ``i`` until the SuperLink activates it again; return seconds.

        After a crash the SuperLink keeps the node ``online`` until two heartbeat
        intervals pass (30 s each in Flower 1.41) and refuses to activate the same key
        meanwhile (``flower-supernode`` exits with code 1, "[code: 2004] Failed to activate
        SuperNode"). A supervisor therefore restarts it until it is accepted, as this does.

        Raises
        ------
        TimeoutError
            If the node is not activated within ``timeout`` seconds.
        """
        nid = self.node_id(i)
        before = self.activations(nid)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            proc = self.start_supernode(i)
            while proc.alive() and self.activations(nid) == before:
                if time.monotonic() - t0 > timeout:
                    break
                time.sleep(0.25)
            if self.activations(nid) > before:
                return time.monotonic() - t0
            proc.stop(grace=2.0)
            time.sleep(retry_every)
        raise TimeoutError(f"node {i} (id {nid}) was not re-activated within {timeout} s")

    def wait_log(
        self, proc: ManagedProcess, text: str, *, count: int = 1, timeout: float = 120.0
    ) -> float:
        """Wait until ``text`` occurs ``count`` times in ``proc``'s log; return the time.

        :func:`deploy.processes.wait_log`, kept here for the drills and tests that hold a
        federation.

        Raises
        ------
        TimeoutError
            After ``timeout`` seconds, or at once if the process exited first.
        """
        return wait_log(proc, text, count=count, timeout=timeout)

    def nodes(self) -> list[dict[str, str]]:
        """The SuperLink's node table (``flwr supernode list --format json``)."""
        res = self.flwr("supernode", "list", self.connection, "--format", "json")
        try:
            payload = json.loads(res.stdout[res.stdout.index("{"):])
            nodes: list[dict[str, str]] = payload["nodes"]
            return nodes
        except (ValueError, KeyError) as err:
            raise RuntimeError(f"flwr supernode list failed:\n{res.stdout}\n{res.stderr}") from err

    def online(self) -> set[int]:
        """Ids of the nodes the SuperLink currently lists as online."""
        return {int(n["node-id"]) for n in self.nodes() if n.get("status") == "online"}

    def wait_online(self, count: int, *, timeout: float = 60.0, poll: float = 2.0) -> set[int]:
        """Wait until at least ``count`` nodes are online; return their ids.

        Raises
        ------
        TimeoutError
            After ``timeout`` seconds, with the node table and the SuperNode logs' tails.
        """
        deadline = time.monotonic() + timeout
        online: set[int] = set()
        while time.monotonic() < deadline:
            online = self.online()
            if len(online) >= count:
                return online
            time.sleep(poll)
        tails = "\n".join(f"--- {p.name}\n{p.log()[-1500:]}" for p in self.supernodes.values())
        raise TimeoutError(f"{len(online)} of {count} nodes online after {timeout} s\n{tails}")

    def activated(self) -> set[int]:
        """Node ids the SuperLink has activated so far (from its log; cheaper than the CLI)."""
        assert self.superlink is not None
        return {int(m) for m in re.findall(r"Activated node_id=(\d+)", self.superlink.log())}

    def wait_activated(self, node_ids: set[int], *, timeout: float = 90.0) -> None:
        """Wait until the SuperLink has activated every id in ``node_ids``.

        Raises
        ------
        TimeoutError
            After ``timeout`` seconds, with the SuperNode logs' tails.
        """
        deadline = time.monotonic() + timeout
        while not node_ids <= self.activated():
            self._check_supernodes(node_ids)
            if time.monotonic() > deadline:
                tails = "\n".join(
                    f"--- {p.name}\n{p.log()[-1500:]}" for p in self.supernodes.values()
                )
                raise TimeoutError(
                    f"nodes {sorted(node_ids - self.activated())} not activated after "
                    f"{timeout} s\n{tails}"
                )
            time.sleep(0.2)

    def start(self, *, wait: bool = True, timeout: float = 90.0) -> None:
        """Start the SuperLink, register the node keys (with auth) and start every node.

        With ``wait`` it returns once the SuperLink has activated every node.
        """
        self.start_superlink()
        if self.auth:
            self.register_all()
        self.start_supernodes()
        if wait:
            deadline = time.monotonic() + timeout
            ids = dict(self.node_ids)
            # without authentication a node gets a fresh id at each start and logs it
            while len(ids) < self.num_nodes:
                self._check_supernodes(None)
                for i in range(self.num_nodes):
                    try:
                        ids[i] = self.node_id(i)
                    except KeyError:
                        pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"SuperNodes did not start within {timeout} s")
                time.sleep(0.2)
            self.wait_activated(set(ids.values()), timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ runs
    def submit(
        self,
        app_dir: str | os.PathLike[str],
        run_config: Mapping[str, ConfigValue] | None = None,
    ) -> ManagedProcess:
        """Start ``flwr run <app_dir> <connection> [--run-config file] --stream``; do not wait.

        The overrides are written to a TOML file, so any string value survives quoting.
        The returned process streams the run's logs and exits when the run ends; pass it to
        :meth:`wait_run`.
        """
        app = Path(app_dir).resolve()
        argv = [str(self.bin_dir / "flwr"), "run", str(app), self.connection]
        if run_config:
            cfg = self.workdir / f"run-config-{uuid.uuid4().hex[:8]}.toml"
            write_file(cfg, tomli_w.dumps(dict(run_config)).encode(), private=False)
            argv += ["--run-config", str(cfg)]
        argv.append("--stream")
        proc = self._spawn(f"flwr-run-{uuid.uuid4().hex[:8]}", argv, self.flwr_home, cwd=app)
        self._others.append(proc)
        return proc

    def run_id(self, proc: ManagedProcess, *, timeout: float = 60.0) -> int:
        """The run id that ``flwr run`` printed, waiting up to ``timeout`` seconds for it.

        Raises
        ------
        RuntimeError
            If ``flwr run`` exited or timed out without starting a run (its output quoted).
        """
        deadline = time.monotonic() + timeout
        while True:
            match = _RUN_ID.search(proc.log())
            if match is not None:
                return int(match.group(1))
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"flwr run did not start a run:\n{proc.log()[-3000:]}")
            time.sleep(0.2)

    def run_status(self, run_id: int) -> str:
        """Flower's status string of ``run_id`` (``"running"``, ``"finished:completed"``...)."""
        res = self.flwr("list", self.connection, "--run-id", str(run_id), "--format", "json")
        try:
            payload = json.loads(res.stdout[res.stdout.index("{"):])
            status: str = payload["runs"][0]["status"]
            return status
        except (ValueError, KeyError, IndexError) as err:
            raise RuntimeError(f"flwr list failed:\n{res.stdout}\n{res.stderr}") from err

    def wait_run(self, proc: ManagedProcess, *, timeout: float = 600.0) -> RunResult:
        """Wait for a submitted run to end and return its final status.

        After ``timeout`` seconds the run is stopped with ``flwr stop`` and the status is
        reported as ``"timeout:<status>"``: nothing waits forever.

        Raises
        ------
        RuntimeError
            If the run could not be submitted (the CLI output is quoted).
        """
        t0 = time.monotonic()
        run_id = self.run_id(proc, timeout=timeout)
        try:
            proc.popen.wait(timeout=max(0.0, timeout - (time.monotonic() - t0)))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        if timed_out:
            self.flwr("stop", str(run_id), self.connection)
            proc.stop(grace=2.0)
            status = "timeout:" + self.run_status(run_id)
        else:
            status = self.run_status(run_id)
            # The log stream may end a moment before the final status is stored.
            deadline = time.monotonic() + 15.0
            while not status.startswith(_FINISHED) and time.monotonic() < deadline:
                time.sleep(1.0)
                status = self.run_status(run_id)
        return RunResult(run_id, status, time.monotonic() - t0, proc.log())

    def run(
        self,
        app_dir: str | os.PathLike[str],
        run_config: Mapping[str, ConfigValue] | None = None,
        *,
        timeout: float = 600.0,
    ) -> RunResult:
        """Run the app to completion (:meth:`submit` then :meth:`wait_run`)."""
        return self.wait_run(self.submit(app_dir, run_config), timeout=timeout)

    # ------------------------------------------------------------------ teardown
    def processes(self) -> Iterator[ManagedProcess]:
        """Every process started by this object."""
        yield from self.supernodes.values()
        yield from self.superexecs.values()
        yield from self._others
        if self.superlink is not None:
            yield self.superlink

    def stop(self) -> None:
        """End every process of this federation: trees first, then anything tagged."""
        for proc in list(self.processes()):
            proc.stop(grace=5.0)
        leftovers = tagged_pids(self.tag)
        if leftovers:
            kill_pids(leftovers, grace=2.0)

    def __enter__(self) -> Federation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy.federation",
        description="Start a SuperLink and N SuperNodes on this machine (TLS + node auth).",
    )
    p.add_argument("--workdir", required=True, help="certs, logs, state, FLWR_HOMEs")
    p.add_argument("--nodes", type=int, default=3, help="number of SuperNodes")
    p.add_argument("--certs", help="existing deploy.certs directory (default: generate)")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP, no TLS and no node authentication (NOT for real data)")
    p.add_argument("--no-auth", action="store_true", help="TLS without node authentication")
    p.add_argument("--in-memory", action="store_true",
                   help="keep the SuperLink's state in memory, not in SQLite (many nodes: "
                        "Flower 1.41's SQLite state drops concurrent uploads; lost on restart)")
    p.add_argument("--data-path", action="append", default=[],
                   help="I=PATH: node I trains on its own .npz file (repeatable)")
    p.add_argument("--run", metavar="APP_DIR",
                   help="run this app once the nodes are online, then stop everything")
    p.add_argument("--run-config", default="",
                   help="run-config overrides for --run, e.g. \"num-server-rounds=3 "
                   "aggregator='krum'\" (whitespace-separated key=value)")
    p.add_argument("--timeout", type=float, default=1800.0, help="--run time limit (s)")
    p.add_argument("--executor", choices=EXECUTORS, default="subprocess",
                   help="how SuperNodes start ClientApps: Flower's fresh process per task, "
                        "or 'fork' from a process that imported Flower and torch once "
                        "(many nodes on few cores)")
    p.add_argument("--force", action="store_true",
                   help="replace the keys an earlier federation generated in WORKDIR/certs")
    return p


def _load_certs(path: Path, nodes: int) -> CertBundle:
    """Read a ``python -m deploy.certs`` directory (``nodes`` = node keys required)."""
    def need(p: Path) -> Path:
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: create it with python -m deploy.certs")
        return p

    return CertBundle(
        path, need(path / "ca.crt"), None, need(path / "server.pem"), need(path / "server.key"),
        tuple(need(path / f"node-{i}") for i in range(nodes)),
        tuple(need(path / f"node-{i}.pub") for i in range(nodes)),
    )


def _raise_interrupt(signum: int, frame: object) -> None:
    # SIGTERM (e.g. from a service manager) takes the same cleanup path as Ctrl-C.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        run_config = parse_overrides(args.run_config)
    except ValueError as exc:
        print(f"error: --run-config: {exc}", file=sys.stderr)
        return 2
    extra: list[dict[str, ConfigValue]] = [{} for _ in range(args.nodes)]
    for item in args.data_path:
        idx, _, path = item.partition("=")
        if not idx.isdigit() or not path or int(idx) >= args.nodes:
            print(f"error: --data-path wants I=PATH with 0 <= I < {args.nodes}, got {item!r}",
                  file=sys.stderr)
            return 2
        extra[int(idx)]["data-path"] = str(Path(path).resolve())
    tls = not args.insecure
    need_keys = args.nodes if tls and not args.no_auth else 0
    certs = _load_certs(Path(args.certs), need_keys) if args.certs and tls else None
    try:
        fed = Federation(args.workdir, num_nodes=args.nodes, tls=tls,
                         auth=tls and not args.no_auth, certs=certs, node_config=extra,
                         database=not args.in_memory, executor=args.executor,
                         force=args.force)
    except (FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        fed.start()
        print(f"SuperLink {fed.address} (logs: {fed.log_dir}); nodes online: "
              f"{sorted(fed.online())}", flush=True)
        if args.run:
            result = fed.run(args.run, run_config, timeout=args.timeout)
            print(result.log)
            print(f"run {result.run_id}: {result.status} in {result.wall_s:.1f} s")
            return 0 if result.status == "finished:completed" else 1
        print("Submit runs from another shell with:\n"
              f"  FLWR_HOME={fed.flwr_home} flwr run . {fed.connection} --stream\n"
              "Ctrl-C stops the federation.", flush=True)  # also when logged to a file
        while all(p.alive() for p in fed.processes()):
            time.sleep(1.0)
        dead = [p.name for p in fed.processes() if not p.alive()]
        print(f"error: {', '.join(dead)} exited; see {fed.log_dir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        fed.stop()


if __name__ == "__main__":
    raise SystemExit(main())
