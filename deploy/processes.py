"""Long-running processes on this machine: spawn with a log file, wait until they listen or
log a line, find their descendants and every process carrying a tag, stop process trees.

Linux only where it reads ``/proc``. Used by :mod:`deploy.federation` for the SuperLink,
the SuperNodes and ``flwr run``; nothing here knows about Flower.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "TAG_VAR",
    "ManagedProcess",
    "descendants",
    "free_port",
    "kill_pids",
    "port_open",
    "spawn",
    "tagged_pids",
    "wait_listening",
    "wait_log",
]

#: Environment variable that marks every process of one group (inherited by children).
TAG_VAR = "FEDSHIELD_DEPLOY_TAG"

# Exec shim: the started command gets SIGKILL when the thread that started it dies, so
# not even a SIGKILLed test runner leaves a server behind (Flower's SuperExec, ServerApp
# and ClientApp children watch their parent's pid and follow). Linux prctl(2).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (bind to port 0, release).

    Another process may take it before it is used; callers start the server promptly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_open(host: str, port: int, *, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds within ``timeout`` seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after it.
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Return the process ids of every descendant of ``pid`` (Linux ``/proc``), not ``pid``.

    Orphans re-parented to ``init`` are not found: :func:`tagged_pids` catches those.
    """
    children = _children_map()
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def tagged_pids(tag: str) -> list[int]:
    """Return the ids of live processes whose environment holds ``TAG_VAR=tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def kill_pids(pids: Sequence[int], *, grace: float = 5.0) -> None:
    """Send SIGTERM to ``pids``, wait up to ``grace`` seconds, then SIGKILL survivors."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if _alive(p)]
        for p in live:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline and any(_alive(p) for p in live):
            time.sleep(0.05)


@dataclass
class ManagedProcess:
    """A long-running process started in its own session (:func:`spawn`), with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """Process id of the started command."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: signal.Signals = signal.SIGKILL, *, tree: bool = True) -> list[int]:
        """Send ``sig`` to the process and (``tree``) every descendant; return their ids.

        ``SIGKILL`` on the tree simulates a device that loses power: the SuperNode, its
        SuperExec and the running ClientApp vanish without a goodbye to the SuperLink.
        """
        pids = ([*descendants(self.pid)] if tree else []) + [self.pid]
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        return pids

    def stop(self, *, grace: float = 5.0) -> None:
        """End the process tree (SIGTERM, then SIGKILL) and reap the process."""
        if self.alive():
            kill_pids([self.pid, *descendants(self.pid)], grace=grace)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None



def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path,
    die_with_parent: bool = True,
) -> ManagedProcess:
    """Start ``argv`` in its own session, stdout and stderr appended to ``log_path``.

    Parameters
    ----------
    name
        What logs and errors call the process.
    argv
        The command; ``argv[0]`` is an executable path.
    log_path
        Log file, opened for appending (closed by :meth:`ManagedProcess.stop`).
    env, cwd
        The process's environment and working directory.
    die_with_parent
        On Linux, the process gets SIGKILL when the thread that started it dies
        (``prctl(PR_SET_PDEATHSIG)``), so a killed launcher leaves nothing running.

    Returns
    -------
    ManagedProcess
        The running process (its ``argv`` is ``argv``, without the exec shim).
    """
    log = log_path.open("ab")
    full = list(argv)
    if die_with_parent and sys.platform.startswith("linux"):
        full = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
    popen = subprocess.Popen(
        full,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
    )
    return ManagedProcess(name, popen, log_path, list(argv), log)


def wait_listening(
    proc: ManagedProcess, host: str, port: int, *, timeout: float, log_text: str = ""
) -> None:
    """Wait until ``proc`` accepts TCP connections on ``host:port`` and (if given) has
    logged ``log_text``.

    Raises
    ------
    RuntimeError
        If the process exits, or does not listen within ``timeout`` seconds (the tail of
        its log is quoted).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                               f"{proc.log()[-3000:]}")
        if port_open(host, port) and log_text in proc.log():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not listen on {host}:{port} within {timeout} s:\n"
                       f"{proc.log()[-3000:]}")


def wait_log(proc: ManagedProcess, text: str, *, count: int = 1, timeout: float = 120.0) -> float:
    """Wait until ``text`` occurs ``count`` times in ``proc``'s log; return the time (epoch s).

    Raises
    ------
    TimeoutError
        After ``timeout`` seconds, or at once if the process exited first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.log().count(text) >= count:
            return time.time()
        if not proc.alive():
            raise TimeoutError(f"{proc.name} exited before logging {text!r} x{count}")
        time.sleep(0.1)
    raise TimeoutError(f"{proc.name} did not log {text!r} x{count} within {timeout} s")
