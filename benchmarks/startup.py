"""Start-up of a ClientApp process: what importing the apps costs, in fresh processes.

A deployment starts a ``flwr-clientapp`` process for every round of every node; before it
trains it imports ``client.app``. Each statement below runs in a new Python process
(``python -X importtime -c STATEMENT``), ``--repeats`` times, and the table gives the median
and the fastest wall time of the process, and the largest top-level imports of the median
run (from ``-X importtime``, cumulative microseconds). The rows:

- ``python``: the interpreter alone (the floor);
- ``import torch``, ``import flwr.clientapp``: the two packages every ClientApp needs;
- ``import client.app``: fedshield's ClientApp, as a ClientApp process imports it now;
- ``import client.app, opacus``: the same plus Opacus, which ``client.app`` imported
  eagerly before Opacus was made a lazy import of the DP-SGD path (the "before" figure);
- ``import server.app``: the ServerApp's, for comparison.

    python benchmarks/startup.py               # 7 runs of each statement
    python benchmarks/startup.py --repeats 3

The machine is shared in development: every figure depends on what else runs. The run
prints the load average; compare rows within one run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STATEMENTS: tuple[tuple[str, str], ...] = (
    ("python", "pass"),
    ("import torch", "import torch"),
    ("import flwr.clientapp", "import flwr.clientapp"),
    ("import client.app", "import client.app"),
    ("import client.app, opacus", "import client.app, opacus"),
    ("import server.app", "import server.app"),
)
_IMPORTTIME = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")


@dataclass(frozen=True)
class Run:
    """One fresh process: its wall seconds and its top-level imports' cumulative seconds."""

    seconds: float
    top: tuple[tuple[str, float], ...]


def run_once(statement: str) -> Run:
    """``statement`` in a fresh ``python -X importtime`` process, from the repository root."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], cwd=ROOT,
        capture_output=True, text=True, check=False,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"python -c {statement!r} failed:\n{proc.stderr[-2000:]}")
    top: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = _IMPORTTIME.match(line)
        if m and len(m.group(3)) == 1:  # one space of indent: a top-level import
            top[m.group(4)] = int(m.group(2)) / 1e6
    ranked = sorted(top.items(), key=lambda kv: -kv[1])
    return Run(seconds, tuple(ranked[:4]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per row")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.repeats} fresh processes "
          "per row")
    print()
    print("| statement | median s | fastest s | largest imports (cumulative s, median run) |")
    print("|---|---|---|---|")
    for label, statement in STATEMENTS:
        runs = sorted((run_once(statement) for _ in range(args.repeats)),
                      key=lambda r: r.seconds)
        median = runs[len(runs) // 2]
        top = ", ".join(f"{name} {s:.2f}" for name, s in median.top) or "-"
        print(f"| `{label}` | {statistics.median(r.seconds for r in runs):.2f} | "
              f"{runs[0].seconds:.2f} | {top} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
