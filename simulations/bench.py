"""Running a bench: every cell of a :class:`~simulations.scenario.Scenario`, in parallel
worker processes, resumable, then the summary tables and plots.

The scenario language (entries, axes, the matrix of cells and their checks) is
:mod:`simulations.scenario`; the command line is ``fedshield bench``
(:mod:`simulations.cli`)::

    fedshield bench quick --out results/quick

Running and resuming
--------------------
Each cell runs :func:`simulations.engine.run_in_process` in a worker process (``--jobs N``
workers, spawned, one torch thread each; ``--jobs 0`` runs the cells in this process). A
finished cell leaves ``DIR/cells/<cell-id>/`` with ``config.toml``, ``metrics.jsonl``,
``audit.jsonl`` and, written last and atomically, ``DONE``. The cell id is a readable slug
plus the first 10 hex digits of the SHA-256 of the cell's resolved run config, so the
same config always maps to the same folder. Rerunning the same command resumes: cells with
``DONE`` are read back, a folder without ``DONE`` is deleted and rerun from scratch. A cell
that raises is recorded in ``DIR/failures.jsonl`` and in the summary, the bench goes on,
and the exit code is 1. The resolved scenario is saved as ``DIR/scenario.toml``; running a
different scenario into the same ``DIR`` is refused unless ``--force``.

Reports (:mod:`simulations.report`): ``results.jsonl``, ``summary.csv``, ``summary.md``
(printed at the end), ``heatmap.png``, ``curves.png``.

On a Ray cluster
----------------
``--ray ADDRESS`` (:class:`RayCluster`) sends each cell as a Ray task instead, reserving
``--ray-cpus`` CPUs (also its torch threads) and ``--ray-gpus`` GPUs (a fraction shares a
GPU), with the same folders, resume and reports as the local pool. The driver ships the
fedshield packages it runs with (Ray ``runtime_env`` ``py_modules``), so a worker needs
only the dependencies installed, not the project; every node must see ``--out`` at the same
absolute path (one machine, or a shared file system), and ``npz:`` data sets must be
absolute paths, since workers do not run in the driver's folder.

Examples
--------
>>> from simulations.scenario import load_scenario
>>> result = run_bench(load_scenario("quick"), "results/quick", jobs=2)  # doctest: +SKIP
>>> result.exit_code  # doctest: +SKIP
0
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Scalar, save_config
from .report import CellRecord, write_reports
from .scenario import MATRIX_KEYS, Cell, Scenario, check_cells, load_scenario

__all__ = [
    "DONE",
    "BenchResult",
    "CellOutcome",
    "CellRunner",
    "RayCluster",
    "RayUnreachableError",
    "ScenarioMismatchError",
    "default_jobs",
    "execute_cell",
    "ray_runtime_env",
    "run_bench",
    "run_federation",
]

DONE = "DONE"
"""The file a finished cell folder holds, written last and atomically."""
CellRunner = Callable[[dict[str, Scalar]], list[dict[str, Any]]]
"""Runs one federation from its run config (``out-dir`` set); returns its metrics rows."""


class ScenarioMismatchError(ValueError):
    """The output folder holds the results of a different scenario."""


class RayUnreachableError(ConnectionError):
    """No Ray cluster answers at the address given."""


# the packages a cell imports; shipped to Ray workers so that they need not install fedshield
SHIPPED_PACKAGES = ("aggregation", "privacy", "runconfig", "secagg", "server", "client",
                    "simulations")


@dataclass(frozen=True)
class RayCluster:
    """Where ``--ray`` sends the cells, and what each cell's task reserves.

    Parameters
    ----------
    address
        ``HOST:PORT`` of a head started with ``ray start --head --port=PORT``,
        ``ray://HOST:PORT`` (Ray Client), or ``auto`` (the cluster this machine is part of).
    cpus
        CPUs a cell reserves (> 0; fractions allowed); its torch threads are
        ``max(1, floor(cpus))``.
    gpus
        GPUs a cell reserves: 0, a fraction below 1 (``0.25``: four cells share a GPU) or a
        whole number.

    Examples
    --------
    >>> RayCluster("127.0.0.1:6379", cpus=2, gpus=0.5).threads
    2
    >>> RayCluster("127.0.0.1:6379", gpus=1.5)
    Traceback (most recent call last):
    ...
    ValueError: --ray-gpus must be 0, a fraction below 1 or a whole number (Ray's rule), got 1.5
    """

    address: str
    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise ValueError("--ray needs an address: HOST:PORT of a Ray head, ray://HOST:PORT "
                             "or auto")
        if not (math.isfinite(self.cpus) and self.cpus > 0):
            raise ValueError(f"--ray-cpus must be a positive number of CPUs per cell, got "
                             f"{self.cpus}")
        if not (math.isfinite(self.gpus) and self.gpus >= 0):
            raise ValueError(f"--ray-gpus must be >= 0 GPUs per cell, got {self.gpus}")
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"--ray-gpus must be 0, a fraction below 1 or a whole number "
                             f"(Ray's rule), got {self.gpus}")

    @property
    def threads(self) -> int:
        """Torch threads of a cell: ``max(1, floor(cpus))``."""
        return max(1, int(self.cpus))

    def describe(self) -> str:
        """``'Ray at ADDRESS (1 CPU, 0.25 GPU per cell)'``."""
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"Ray at {self.address} ({self.cpus:g} CPU{gpu} per cell)"


@dataclass(frozen=True)
class CellOutcome:
    """What a worker returns: the rows of a finished cell, or the error of a failed one."""

    rows: tuple[dict[str, Any], ...]
    seconds: float
    error: str = ""
    traceback: str = ""


def run_federation(config: dict[str, Scalar]) -> list[dict[str, Any]]:
    """The default :data:`CellRunner`: :func:`simulations.engine.run_in_process`."""
    from .engine import run_in_process

    return run_in_process(config)


def _json_default(obj: object) -> Any:
    tolist = getattr(obj, "tolist", None)
    return tolist() if callable(tolist) else str(obj)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def execute_cell(config: Mapping[str, Scalar], cell_dir: str, runner: CellRunner) -> CellOutcome:
    """Run one cell from scratch in ``cell_dir``; write ``DONE`` last, atomically.

    Deletes whatever ``cell_dir`` held, writes ``config.toml``, runs ``runner`` (with
    ``out-dir = cell_dir``), writes ``metrics.jsonl`` from the returned rows, removes the
    per-round checkpoint, then writes ``DONE``. An ``Exception`` of the run is returned as
    a failed :class:`CellOutcome` (no ``DONE``); ``KeyboardInterrupt`` propagates.
    """
    path = Path(cell_dir)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    cfg = {**config, "out-dir": str(path)}
    save_config(cfg, path / "config.toml")
    t0 = time.perf_counter()
    try:
        rows = [dict(r) for r in runner(cfg)]
        if not rows:
            raise ValueError("the run returned no metrics rows")
    except Exception as exc:
        return CellOutcome(
            (), time.perf_counter() - t0, f"{type(exc).__name__}: {exc}", traceback.format_exc()
        )
    seconds = time.perf_counter() - t0
    _atomic_write(
        path / "metrics.jsonl",
        "".join(json.dumps(r, default=_json_default) + "\n" for r in rows),
    )
    shutil.rmtree(path / "checkpoint", ignore_errors=True)
    _atomic_write(path / DONE, json.dumps({"seconds": seconds, "finished": time.time()}) + "\n")
    return CellOutcome(tuple(rows), seconds)


def _ray_cell(
    config: dict[str, Scalar], cell_dir: str, runner: CellRunner, threads: int
) -> CellOutcome:
    """A cell as a Ray task: :func:`execute_cell` with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    out = Path(cell_dir).parent
    if not out.is_dir():
        return CellOutcome((), 0.0, f"the bench folder {out} does not exist on Ray node "
                           f"{socket.gethostname()}: --out must be on a file system every "
                           "node mounts at the same path")
    return execute_cell(config, cell_dir, runner)


def _init_worker(parent: int) -> None:
    import logging
    import threading

    import torch

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    # A killed bench (SIGKILL, OOM) leaves its workers orphaned, blocked on the task queue
    # or still running a cell; they leave as soon as the parent is gone.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="fedshield-parent-watch", daemon=True).start()


def _load_done(cell: Cell, path: Path) -> CellRecord | None:
    """The record of a finished cell folder, or ``None`` if it must be (re)run."""
    done = path / DONE
    if not done.is_file():
        return None
    try:
        meta = json.loads(done.read_text())
        rows = tuple(
            json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        )
    except (OSError, ValueError):
        return None
    if not rows:
        return None
    return CellRecord(cell.cell_id, cell.coords, "done", rows, seconds=meta.get("seconds"))


def default_jobs() -> int:
    """``min(2, os.cpu_count())`` worker processes."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class BenchResult:
    """Records of every cell (scenario order), the markdown summary and the exit code."""

    records: tuple[CellRecord, ...]
    markdown: str
    exit_code: int

    @property
    def failed(self) -> list[CellRecord]:
        """The failed cells."""
        return [r for r in self.records if r.status == "failed"]


def _check_out_dir(scenario: Scenario, out: Path, *, force: bool) -> None:
    saved = out / "scenario.toml"
    if not saved.exists() or force:
        return
    try:
        old = load_scenario(saved)
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise ScenarioMismatchError(
            f"{out} holds a bench whose scenario.toml no longer loads ({exc}); choose another "
            "--out, or pass --force to run this scenario there"
        ) from exc
    if old.digest() == scenario.digest():
        return
    a, b = old.to_dict(), scenario.to_dict()
    diffs = [
        f"fixed {k}: {a['fixed'].get(k)!r} -> {b['fixed'].get(k)!r}"
        for k in dict.fromkeys([*a["fixed"], *b["fixed"]])
        if a["fixed"].get(k) != b["fixed"].get(k)
    ] + [f"matrix {k} differs" for k in MATRIX_KEYS if a["matrix"].get(k) != b["matrix"].get(k)]
    raise ScenarioMismatchError(
        f"{out} holds the results of a different scenario (saved {old.name!r}, digest "
        f"{old.digest()[:12]}; this one {scenario.name!r}, digest {scenario.digest()[:12]}; "
        f"{'; '.join(diffs[:6])}): choose another --out, or pass --force to run this scenario "
        "there (cells whose run config is unchanged are reused)"
    )


def run_bench(
    scenario: Scenario,
    out: str | Path,
    *,
    jobs: int | None = None,
    force: bool = False,
    quiet: bool = False,
    plots: bool = True,
    runner: CellRunner = run_federation,
    echo: Callable[[str], None] = print,
    validate: bool = True,
    ray: RayCluster | None = None,
) -> BenchResult:
    """Run (or resume) every cell of ``scenario`` into ``out`` and write the reports.

    Parameters
    ----------
    scenario
        The matrix.
    out
        Output folder (see the module docstring for its layout).
    jobs
        Worker processes (spawned; one torch thread each); ``0`` runs the cells in this
        process (torch threads set to 1 meanwhile). Default :func:`default_jobs`; not with
        ``ray``.
    force
        Run even if ``out`` holds a different scenario.
    quiet
        No progress lines (the summary table is still returned).
    plots
        Write ``heatmap.png`` and ``curves.png``.
    runner
        Runs one federation (picklable when ``jobs > 0`` or with ``ray``); tests pass a fake.
    echo
        Where progress lines go.
    validate
        Check registered names before running (:func:`check_cells`).
    ray
        Run each cell as a task on this Ray cluster instead of the local pool.

    Returns
    -------
    BenchResult
        ``exit_code`` 0 when every cell finished, 1 when one failed.

    Raises
    ------
    ScenarioMismatchError
        ``out`` holds a different scenario and ``force`` is false.
    RayUnreachableError
        No Ray cluster answers at ``ray.address``.
    KeyboardInterrupt
        Propagated after the running cells stopped; rerunning resumes.
    """
    out = Path(out)
    if ray is not None and jobs is not None:
        raise ValueError("--jobs sets the local pool's workers; with --ray the cluster runs "
                         "as many cells at once as its resources hold (--ray-cpus per cell)")
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 0:
        raise ValueError(f"jobs must be >= 0 (0 runs in this process), got {jobs}")
    cells = scenario.cells()
    if validate:
        check_cells(cells)
    if ray is not None:
        _check_absolute_data(cells)
    _check_out_dir(scenario, out, force=force)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "scenario.toml", scenario.to_toml())
    failures_path = out / "failures.jsonl"
    failures_path.write_text("")

    records: dict[str, CellRecord] = {}
    pending: list[Cell] = []
    for cell in cells:
        rec = _load_done(cell, out / "cells" / cell.cell_id)
        if rec is None:
            pending.append(cell)
        else:
            records[cell.cell_id] = rec
    total = len(cells)
    say = (lambda _msg: None) if quiet else echo
    if records:
        say(f"resuming in {out}: {len(records)} of {total} cells already done")
    where = ray.describe() if ray is not None else f"{jobs or 'in-process'} worker(s)"
    say(f"{scenario.name}: {len(pending)} cell(s) to run, {where}")

    def finish(cell: Cell, outcome: CellOutcome) -> None:
        count = len(records) + 1
        if outcome.error:
            records[cell.cell_id] = CellRecord(
                cell.cell_id, cell.coords, "failed", error=outcome.error, seconds=outcome.seconds
            )
            line = {"cell": cell.cell_id, **cell.coords.__dict__, "error": outcome.error,
                    "traceback": outcome.traceback, "seconds": outcome.seconds}
            with failures_path.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
            say(f"[{count}/{total}] {cell.coords.label()} FAILED ({outcome.seconds:.1f}s): "
                f"{outcome.error}")
            return
        records[cell.cell_id] = CellRecord(
            cell.cell_id, cell.coords, "done", outcome.rows, seconds=outcome.seconds
        )
        acc = outcome.rows[-1].get("accuracy")
        asr = outcome.rows[-1].get("asr")
        extra = f" asr={asr:.3f}" if isinstance(asr, float) else ""
        acc_text = f"{acc:.3f}" if isinstance(acc, float) else "?"
        say(f"[{count}/{total}] {cell.coords.label()} acc={acc_text}{extra} "
            f"({outcome.seconds:.1f}s)")

    if ray is not None:
        _run_ray(pending, out, runner, finish, ray)
    elif jobs == 0:
        _run_here(pending, out, runner, finish)
    else:
        _run_pool(pending, out, runner, finish, jobs)

    ordered = tuple(
        records.get(c.cell_id) or CellRecord(c.cell_id, c.coords, "pending") for c in cells
    )
    markdown = write_reports(ordered, out, title=scenario.name, plots=plots)
    failed = sum(r.status != "done" for r in ordered)
    return BenchResult(ordered, markdown, 1 if failed else 0)


def _run_here(
    pending: Sequence[Cell], out: Path, runner: CellRunner,
    finish: Callable[[Cell, CellOutcome], None],
) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cell in pending:
            finish(cell, execute_cell(dict(cell.config), str(out / "cells" / cell.cell_id), runner))
    finally:
        torch.set_num_threads(threads)


def _run_pool(
    pending: Sequence[Cell], out: Path, runner: CellRunner,
    finish: Callable[[Cell, CellOutcome], None], jobs: int,
) -> None:
    import multiprocessing

    if not pending:
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)
    )
    futures: dict[Future[CellOutcome], Cell] = {}
    try:
        for cell in pending:
            fut = pool.submit(
                execute_cell, dict(cell.config), str(out / "cells" / cell.cell_id), runner
            )
            futures[fut] = cell
        for fut in as_completed(futures):
            cell = futures[fut]
            try:
                outcome = fut.result()
            except BrokenProcessPool as exc:
                outcome = CellOutcome(
                    (), 0.0, f"worker process died (killed, out of memory or crashed) while "
                    f"this cell was queued or running: {exc}",
                )
            finish(cell, outcome)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------
# Ray


def _check_absolute_data(cells: Sequence[Cell]) -> None:
    """Refuse ``npz:`` data sets named by a relative path: Ray workers run elsewhere."""
    for cell in cells:
        dataset = str(cell.config.get("dataset", ""))
        if dataset.startswith("npz:") and not Path(dataset[4:]).is_absolute():
            raise ValueError(
                f"cell {cell.coords.label()!r}: dataset {dataset!r} is a relative path; with "
                f"--ray give it absolute (npz:{Path(dataset[4:]).resolve()}), since Ray "
                "workers do not run in this folder"
            )


def ray_runtime_env() -> dict[str, Any]:
    """The Ray ``runtime_env`` of a bench's tasks: the fedshield packages this process runs.

    Ray packs each folder once per content (cached in the cluster) and puts the copies
    first on the workers' ``sys.path``: a worker runs the driver's code, installed or not.
    """
    import importlib

    folders = []
    for name in SHIPPED_PACKAGES:
        module = importlib.import_module(name)
        if module.__file__ is None:  # pragma: no cover - a namespace package
            raise ValueError(f"cannot ship package {name!r} to Ray workers: it has no folder")
        folders.append(str(Path(module.__file__).resolve().parent))
    return {"py_modules": folders, "excludes": ["__pycache__", "*.pyc"]}


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT``; ``None`` for ``auto``."""
    text = address.removeprefix("ray://")
    if text == "auto":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--ray {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def _first_line(exc: BaseException) -> str:
    return next(iter(str(exc).strip().splitlines()), type(exc).__name__)


def _unreachable(address: str, why: str) -> RayUnreachableError:
    where = _host_port(address)
    port = where[1] if where is not None else 6379
    return RayUnreachableError(
        f"no Ray cluster answers at {address} ({why}): start a head there with `ray start "
        f"--head --port={port}` and pass the address it prints, or run without --ray"
    )


def _connect(cluster: RayCluster) -> Any:
    """``ray``, connected to ``cluster`` with :func:`ray_runtime_env`."""
    where = _host_port(cluster.address)
    if where is not None:  # fail in seconds, not after Ray's minute of retries
        try:
            socket.create_connection(where, timeout=10.0).close()
        except OSError as exc:
            raise _unreachable(cluster.address, f"{type(exc).__name__}: {exc}") from exc
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - flwr[simulation] installs it
        raise ValueError("--ray needs Ray: pip install 'flwr[simulation]'") from exc
    if ray.is_initialized():
        raise ValueError("this process is already connected to Ray; --ray connects by itself")
    try:
        ray.init(address=cluster.address, runtime_env=ray_runtime_env(),
                 logging_level=logging.WARNING, namespace="fedshield-bench")
    except (ConnectionError, RuntimeError) as exc:
        raise _unreachable(cluster.address, _first_line(exc)) from exc
    return ray


def _run_ray(
    pending: Sequence[Cell], out: Path, runner: CellRunner,
    finish: Callable[[Cell, CellOutcome], None], cluster: RayCluster,
) -> None:
    if not pending:
        return
    ray = _connect(cluster)
    # workers run in their own folders: the cell folders are absolute
    cells_dir = out.resolve() / "cells"
    task = ray.remote(_ray_cell).options(
        num_cpus=cluster.cpus, num_gpus=cluster.gpus, max_retries=0, name="fedshield-cell")
    refs: dict[Any, Cell] = {}
    try:
        for cell in pending:
            ref = task.remote(dict(cell.config), str(cells_dir / cell.cell_id), runner,
                              cluster.threads)
            refs[ref] = cell
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker or its node died
                    outcome = CellOutcome((), 0.0, f"the Ray task of this cell failed: "
                                          f"{type(exc).__name__}: {_first_line(exc)}")
                finish(refs[ref], outcome)
    except BaseException:
        for ref in refs:  # finished tasks ignore it; the others stop, their folders stay
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.shutdown()
