"""Imports flow one way (aggregation, privacy, runconfig -> server/client -> simulations);
Flower stays in the adapters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "aggregation", "privacy", "runconfig", "secagg", "server", "client", "simulations", "deploy",
)
_ABOVE_BASE = {"server", "client", "simulations", "deploy", "flwr", "opacus"}
FORBIDDEN = {
    # the base: pure maths, the privacy core and the run config know nothing above them
    "aggregation": _ABOVE_BASE | {"privacy", "runconfig"},
    "privacy": _ABOVE_BASE - {"opacus"} | {"runconfig"},
    "runconfig": _ABOVE_BASE | {"privacy", "torch"},
    "secagg": _ABOVE_BASE | {"privacy", "runconfig"},
    "server": {"client", "simulations"},
    "client": {"server", "simulations"},
    "simulations": {"deploy"},
    "deploy": {"server", "client", "simulations"},
}
# the only modules that may import Flower (API churn touches only them)
FLOWER_ADAPTERS = {
    "server/app.py", "server/transport.py", "client/app.py", "simulations/engine.py",
    "deploy/superexec.py",  # a SuperExec: Flower's own loop with another executor
}


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


FILES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_there_are_files_to_check() -> None:
    assert len(FILES) > 20


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_respect_the_layering(path: Path) -> None:
    rel = path.relative_to(ROOT)
    pkg = rel.parts[0]
    imported = _top_level_imports(path)
    bad = imported & FORBIDDEN[pkg]
    assert not bad, f"{rel} imports {sorted(bad)}, which {pkg}/ must not import"
    if "flwr" in imported:
        assert str(rel) in FLOWER_ADAPTERS, f"{rel} imports flwr outside the adapter files"
