"""fedshield's simulations: datasets, models, the in-process engine, benches, audits, CLI."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

__all__ = ["__version__", "version"]


def version() -> str:
    """fedshield's version: the installed distribution's, else ``pyproject.toml``'s.

    Raises
    ------
    RuntimeError
        If fedshield is neither installed nor run from a checkout with ``pyproject.toml``.
    """
    try:
        return metadata.version("fedshield")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, KeyError) as exc:
        raise RuntimeError(
            f"cannot tell fedshield's version: it is not installed and {pyproject} has no "
            "[project] version; install it with pip install -e ."
        ) from exc


__version__ = version()
