"""The docstring examples of the privacy core run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["privacy", "privacy.accounting", "privacy.clipping", "privacy.noise",
           "privacy.checks"]


@pytest.mark.filterwarnings("ignore:Optimal order is the")
@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_importing_the_core_does_not_import_opacus() -> None:
    import subprocess
    import sys

    code = "import sys, privacy; print('opacus' in sys.modules, 'scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
