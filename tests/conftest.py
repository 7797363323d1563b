"""Test-wide settings: one torch thread. The suite's models are tiny, and on 2 shared cores
intra-op threading costs more than it gains."""

from __future__ import annotations

import re

import pytest
import torch

torch.set_num_threads(1)


# Tests that run for many minutes (a deployment with secure aggregation and a killed node,
# `flwr run .` with secure aggregation) are opt-in, so the suite stays under 15 minutes on
# 2 cores: they run only when `-m` names the marker (`python -m pytest -m long`).
OPT_IN = {"long": "long deployment/simulation test (minutes): run it with python -m pytest -m long"}


def _selects(markexpr: str, marker: str) -> bool:
    """Whether ``-m`` names ``marker`` other than negated (``long``, ``long and deploy``)."""
    tokens = re.findall(r"[\w-]+", markexpr)
    return any(t == marker and (i == 0 or tokens[i - 1] != "not") for i, t in enumerate(tokens))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = str(config.getoption("markexpr") or "")
    for marker, reason in OPT_IN.items():
        if _selects(markexpr, marker):
            continue
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
