"""``fedshield-superexec``: Flower's SuperExec with ClientApp processes forked warm.

Why: Flower 1.41 gives a claimed task 30 s (``HEARTBEAT_DEFAULT_INTERVAL``, not
configurable) to send its first heartbeat, or the task goes back to pending and the
SuperNode starts another ClientApp process while the first runs on. A cold
``flwr-clientapp`` sends that heartbeat only after importing Flower's entry module, 2-3.4
CPU-seconds (measured on the 2-core CI box), and then imports torch when it loads the app
(2.5 CPU-s more, competing with the other nodes' starts). Twenty SuperNodes on two cores
start twenty such processes at once, miss the window, and every miss starts one more
process (README, fault table).

What: this SuperExec runs Flower's own loop (``flower-superexec``: task acquisition,
TLS, SuperExec authentication, health server and every flag stay Flower's) with one
change, the executor. ClientApp tasks are started as children of a fork server that has
imported Flower's ``flwr-clientapp`` entry and the modules in ``--preload`` (torch by
default) once, when the SuperExec starts (it waits until they are imported, and refuses to
start if one cannot be); a child runs exactly what ``flwr-clientapp`` runs, with the same
arguments, and reaches its first heartbeat in well under a second.
Every other task type (ServerApp, simulation) goes to Flower's subprocess executor
unchanged. The app itself is never preloaded: each child loads the run's FAB as
``flwr-clientapp`` does, so a new FAB is never shadowed by an earlier import.

Use it with a SuperNode in ``process`` isolation::

    flower-supernode --isolation process --port 9094 ...
    fedshield-superexec --insecure --runtime-api-address 127.0.0.1:9094 \\
        --parent-pid <SuperNode pid>

:class:`deploy.federation.Federation` does this with ``executor="fork"``, and
``deploy/start_supernode.sh --fork`` on a device. Linux and macOS (needs ``fork``).
Relies on the ``flwr.supercore.superexec`` executor interface of Flower 1.40 and 1.41
(fedshield's pin; their subprocess executors are identical); a Flower without it is
refused at start with the reason. A task whose launch fails (the fork server died) is
reported to Flower as failed, and the next launch starts a new fork server.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported at run time where used: main() explains a missing Flower
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

__all__ = ["DEFAULT_PRELOAD", "ForkClientAppExecutor", "clientapp_argv", "main"]

#: Modules the fork server imports besides Flower's ClientApp entry (fedshield's app
#: needs torch; its own packages are loaded from the FAB in each child).
DEFAULT_PRELOAD: tuple[str, ...] = ("torch",)

_CLIENTAPP_ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
# how long the fork server may take to import the preloaded modules at start
PRELOAD_TIMEOUT = 300.0
# This module by its import name (the fork server imports it; ``python -m`` runs it as
# ``__main__``, which the fork server would not find).
_THIS = "deploy.superexec"
_EXECUTOR_MODULE = "flwr.supercore.superexec.run_superexec"


def clientapp_argv(spec: ExecutionSpec) -> list[str]:
    """The ``flwr-clientapp`` command line for a launch spec, as Flower's subprocess
    executor builds it (``flwr.supercore.superexec.executor.SubprocessExecutor``).

    Parameters
    ----------
    spec
        The launch spec of a ClientApp task.

    Returns
    -------
    list[str]
        ``argv`` with the program name first.
    """
    argv = ["flwr-clientapp", "--runtime-api-address", spec.runtime_api_address,
            "--token", spec.token]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv


def _run_clientapp(entry: str, argv: list[str], quiet: bool) -> None:
    """Child of the fork server: call ``entry`` (``module:function``, Flower's
    ``flwr-clientapp``) with ``argv`` as ``sys.argv`` (its modules are already imported
    in the fork server, so this costs no import)."""
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    sys.argv = list(argv)
    module, _, attr = entry.partition(":")
    getattr(importlib.import_module(module), attr)()


def _probe(conn: Any, names: list[str]) -> None:
    """Child of the fork server: report which of ``names`` it does not have imported."""
    conn.send([n for n in names if n not in sys.modules])
    conn.close()


class ForkClientAppExecutor:
    """A SuperExec executor (Flower 1.40-1.41's ``Executor`` protocol) that forks ClientApp
    processes from a warm fork server and passes every other task type to Flower's
    subprocess executor.

    Parameters
    ----------
    preload
        Modules the fork server imports once, besides Flower's ClientApp entry. A module
        that is not installed is refused here rather than paid for by every task.
    entry
        ``module:function`` each child calls (Flower's ``flwr-clientapp``); tests pass
        another.

    Raises
    ------
    ImportError
        If a module in ``preload`` is not installed, or the fork server did not import it
        (it failed to import, or this process's fork server was started earlier without
        it).
    TimeoutError
        If the fork server has not imported them within ``PRELOAD_TIMEOUT`` seconds.
    """

    def __init__(
        self, preload: Sequence[str] = DEFAULT_PRELOAD, *, entry: str = _CLIENTAPP_ENTRY
    ) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        for name in preload:
            if importlib.util.find_spec(name) is None:
                raise ImportError(
                    f"--preload {name}: no module of that name is installed in "
                    f"{sys.executable}; install it or remove it from --preload"
                )
        module, sep, attr = entry.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"entry must be 'module:function', got {entry!r}")
        self.entry = entry
        self.preload = (_THIS, module, *preload)
        ctx = multiprocessing.get_context("forkserver")
        assert isinstance(ctx, multiprocessing.context.ForkServerContext)
        ctx.set_forkserver_preload(list(self.preload))
        self._ctx = ctx
        self._subprocess = SubprocessExecutor()
        self._children: list[multiprocessing.process.BaseProcess] = []
        self._check_preloaded()

    def _check_preloaded(self) -> None:
        """Start the fork server now, wait until it has imported the preloaded modules and
        check that it has: multiprocessing's fork server skips a module that fails to
        import, silently, and every task would then pay for it."""
        here, there = self._ctx.Pipe(duplex=False)
        probe = self._ctx.Process(target=_probe, args=(there, list(self.preload)),
                                  name="fedshield-superexec-probe")
        probe.start()
        there.close()
        try:
            if not here.poll(PRELOAD_TIMEOUT):
                raise TimeoutError(
                    f"the fork server did not import {', '.join(self.preload)} within "
                    f"{PRELOAD_TIMEOUT:.0f} s: is the machine overloaded?"
                )
            missing = here.recv()
        except EOFError:
            missing = list(self.preload)  # the probe died before answering
        finally:
            here.close()
            probe.join(10.0)
        if missing:
            raise ImportError(
                f"the fork server could not import {', '.join(missing)}: run "
                f"{sys.executable} -c 'import {missing[0]}' to see why, or remove it from "
                "--preload"
            )

    @property
    def running(self) -> int:
        """Number of forked ClientApp processes still running."""
        self.reconcile()
        return len(self._children)

    def get_eligible_capacity(
        self, supported_task_types: set[TaskType], **kwargs: Any
    ) -> tuple[set[TaskType], set[str]]:
        """Every supported task type can start now (as with Flower's subprocess executor)."""
        eligible: tuple[set[TaskType], set[str]] = self._subprocess.get_eligible_capacity(
            supported_task_types, **kwargs
        )
        return eligible

    def wait_for_capacity(self, task_type: TaskType | None = None, **kwargs: Any) -> None:
        """No capacity gate: returns at once."""
        self._subprocess.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a ClientApp task from the fork server; start any other task type as
        Flower's subprocess executor does. A fork that fails is reported as failed (Flower
        then lets the task expire and offers it again), never raised into Flower's loop."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            launched: LaunchResult = self._subprocess.launch(spec)
            return launched
        proc = self._ctx.Process(
            target=_run_clientapp,
            args=(self.entry, clientapp_argv(spec), bool(spec.suppress_output)),
            name=f"flwr-clientapp-task-{spec.task_id}",
        )
        try:
            proc.start()
        except Exception as exc:  # e.g. EOFError: the fork server died; next start renews it
            return LaunchResult.failed(
                f"could not fork the ClientApp process from the fork server: "
                f"{type(exc).__name__}: {exc}")
        # Not multiprocessing's to join at exit: a ClientApp ends on its own (it watches
        # this process's pid, as Flower's subprocess children do), and joining it would
        # hold a stopping SuperExec until every running task is done.
        multiprocessing.process._children.discard(proc)  # type: ignore[attr-defined]
        self._children.append(proc)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap ClientApp processes that have ended (no zombies between task polls)."""
        alive = []
        for proc in self._children:
            if proc.is_alive():
                alive.append(proc)
            else:
                proc.join(0)
                proc.close()
        self._children = alive

    def close(self) -> None:
        """Nothing to release: running ClientApps end on their own (they watch the
        SuperExec's pid, as Flower's subprocess children do)."""
        self._subprocess.close()


def _flower_superexec() -> Any:
    """Flower's SuperExec loop module, or a one-line exit naming the Flower it needs."""
    try:
        importlib.import_module("flwr.supercore.superexec.executor")
        return importlib.import_module(_EXECUTOR_MODULE)
    except ImportError as exc:
        raise SystemExit(
            f"fedshield-superexec: this Flower has no SuperExec executor interface "
            f"({exc}); it needs flwr>=1.40,<1.42 (fedshield's pin)"
        ) from None


def _install(module: Any, executor: ForkClientAppExecutor) -> None:
    """Make Flower's SuperExec loop (``module``, :func:`_flower_superexec`) use
    ``executor`` (for the subprocess executor type)."""
    from flwr.supercore.constant import ExecutorType

    if not hasattr(module, "get_executor"):
        raise SystemExit(
            f"fedshield-superexec: {_EXECUTOR_MODULE}.get_executor is missing in this "
            "Flower; it needs flwr>=1.40,<1.42 (fedshield's pin)"
        )

    def get_executor(executor_type: Any, *args: Any, **kwargs: Any) -> ForkClientAppExecutor:
        if executor_type != ExecutorType.SUBPROCESS:
            raise ValueError(
                "fedshield-superexec forks ClientApps on this machine; it runs only "
                f"with --executor subprocess, got --executor {executor_type}"
            )
        return executor

    module.get_executor = get_executor


def main(argv: Sequence[str] | None = None) -> None:
    """``fedshield-superexec``: ``flower-superexec`` with warm ClientApp processes.

    Takes every ``flower-superexec`` option, plus ``--preload MODULE[,MODULE...]``.
    """
    parser = argparse.ArgumentParser(
        prog="fedshield-superexec", add_help=False,
        description="flower-superexec whose ClientApp processes are forked from a "
        "fork server that imported Flower and --preload once; every other option is "
        "flower-superexec's (see flower-superexec --help)",
    )
    parser.add_argument(
        "--preload", default=",".join(DEFAULT_PRELOAD),
        help="comma-separated modules the fork server imports once "
        f"(default: {','.join(DEFAULT_PRELOAD)}); empty for none",
    )
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nflower-superexec options follow.\n")
    preload = tuple(m.strip() for m in args.preload.split(",") if m.strip())
    loop = _flower_superexec()
    from flwr.supercore.cli.flower_superexec import flower_superexec

    if not ("-h" in rest or "--help" in rest or "-V" in rest or "--version" in rest):
        try:
            executor = ForkClientAppExecutor(preload)
        except (ImportError, TimeoutError) as exc:
            raise SystemExit(f"fedshield-superexec: {exc}") from None
        _install(loop, executor)
    sys.argv = ["fedshield-superexec", *rest]
    flower_superexec()


if __name__ == "__main__":
    from deploy.superexec import main as _main  # the importable module, see _THIS

    _main()
