"""A ClientApp process imports only what every round needs: the heavy optional packages
(Opacus for DP-SGD, scikit-learn, SciPy, Matplotlib, Ray, Hugging Face datasets) load on
first use, not when ``client.app`` or ``server.app`` is imported. Each import runs in a
fresh process, so what this test process already loaded does not count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("opacus", "sklearn", "scipy", "matplotlib", "ray", "datasets", "pandas", "pyarrow",
         "hypothesis", "torchvision")


def _loaded_after(statement: str) -> list[str]:
    code = (f"import json, sys; {statement}; "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("module", ["client.app", "server.app"])
def test_importing_an_app_loads_no_heavy_optional_package(module: str) -> None:
    assert _loaded_after(f"import {module}") == []


def test_the_check_sees_a_heavy_import() -> None:
    assert "opacus" in _loaded_after("import client.app, opacus")
