"""The fedshield ``ServerApp``: Flower's entry point to :func:`server.run.run_federation`.

One of the few files that import Flower. ``run_server(grid, run_config)`` parses the flat
run config once and runs the federation over the grid; ``flwr run .`` (through
:data:`app`), a deployment and the in-process simulation engine all call it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from runconfig.config import RunConfig, Scalar

from .run import run_federation
from .stages import Component
from .transport import GridTransport

__all__ = ["app", "run_server"]

app = ServerApp()


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
    return run_federation(GridTransport(grid), cfg, components=components, on_round=on_round)


@app.main()
def _main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_server(grid, context.run_config)
