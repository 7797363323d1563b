"""The fedshield ``ServerApp``: Flower's entry point to :func:`server.run.run_federation`.

One of the few files that import Flower. ``run_server(grid, run_config)`` parses the flat
run config once and runs the federation over the grid; ``flwr run .`` (through
:data:`app`), a deployment and the in-process simulation engine all call it.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from runconfig.config import RunConfig, Scalar

from .run import run_federation
from .stages import Component
from .transport import GridTransport

__all__ = ["app", "default_out_dir", "run_server"]

app = ServerApp()

log = logging.getLogger("fedshield.server")


def run_server(
    grid: Grid,
    run_config: Mapping[str, Scalar] | RunConfig,
    *,
    components: Sequence[Component] = (),
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the whole federation on ``grid``; return one metrics row per round (0 = initial).

    Parameters
    ----------
    grid
        Flower grid (deployment, Flower simulation or the in-process engine).
    run_config
        The flat run config, or one already parsed.
    components
        Extra round components (see :mod:`server.stages`), after those the config names.
    on_round
        Called with each metrics row (progress bars, tests).
    """
    cfg = run_config if isinstance(run_config, RunConfig) else RunConfig.from_flat(run_config)
    # a grid that can answer without Flower messages (the in-process engine's batched
    # mode) brings its own transport; any other grid is reached through its messages
    make_transport = getattr(grid, "make_transport", None)
    transport = make_transport() if callable(make_transport) else GridTransport(grid)
    return run_federation(transport, cfg, components=components, on_round=on_round)


def default_out_dir(run_id: int) -> Path:
    """Where a ServerApp run with an empty ``out-dir`` keeps its results:
    ``$FEDSHIELD_HOME/runs/<UTC time>-run<run id>`` (``FEDSHIELD_HOME`` defaults to
    ``~/.fedshield``), so a run started with ``flwr run .`` never loses them."""
    home = Path(os.environ.get("FEDSHIELD_HOME") or Path.home() / ".fedshield").expanduser()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return home / "runs" / f"{stamp}-run{run_id}"


@app.main()
def _main(grid: Grid, context: Context) -> None:
    # Flower streams this process's stdout to `flwr run --stream`; its own logging setup
    # leaves the root logger's level at WARNING, so fedshield's round lines get a handler
    out = logging.getLogger("fedshield")
    if not any(getattr(h, "_fedshield", False) for h in out.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._fedshield = True  # type: ignore[attr-defined]
        out.addHandler(handler)
    out.setLevel(logging.INFO)
    out.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_config = dict(context.run_config)
    if not run_config.get("out-dir"):
        run_config["out-dir"] = str(default_out_dir(context.run_id))
    log.info("results of this run go to %s", run_config["out-dir"])
    run_server(grid, run_config)
