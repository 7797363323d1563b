"""Building every registered rule and composition with test hyperparameters."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import Tensor

import aggregation
from aggregation.catalog import PRE_AGGREGATORS, RULES

# Values for hyperparameters that have no default. A new rule or step with another
# required hyperparameter fails loudly here until a test value is added.
REQUIRED_TEST_VALUES: dict[str, Any] = {"f": 1, "tau": 10.0, "max_norm": 100.0}

N, D = 15, 7  # bulyan(f=1) after bucketing(s=2) needs ceil(15 / 2) = 8 >= 4f + 3 rows

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
)
DEVICES = ["cpu", CUDA]


def params_for(factory: Any, kind: str, name: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for p in inspect.signature(factory).parameters.values():
        if p.default is inspect.Parameter.empty:
            if p.name not in REQUIRED_TEST_VALUES:
                pytest.fail(f"{kind} {name!r} requires {p.name!r}: add a value to "
                            "REQUIRED_TEST_VALUES in tests/aggregation/_cases.py")
            params[p.name] = REQUIRED_TEST_VALUES[p.name]
    return params


def build_rule(name: str) -> aggregation.Aggregator:
    return aggregation.get(name, **params_for(RULES.get(name), "aggregator", name))


def build_pre(name: str) -> aggregation.PreAggregator:
    return aggregation.get_pre(name, **params_for(PRE_AGGREGATORS.get(name), "step", name))


def case_ids() -> list[str]:
    """Every rule alone and behind every pre-aggregation step: 'krum', 'krum+bucketing'."""
    rules = aggregation.names()
    return rules + [f"{r}+{p}" for r in rules for p in aggregation.pre_names()]


def build_case(case: str) -> aggregation.Aggregator:
    rule, *pre = case.split("+")
    agg = aggregation.compose(build_rule(rule), [build_pre(p) for p in pre])
    assert agg.name == case
    return agg


def is_random(agg: aggregation.Aggregator) -> bool:
    return any(getattr(p, "random", False) for p in getattr(agg, "pre", ()))


def gen(seed: int) -> torch.Generator:
    return aggregation.make_generator(seed)


def sample(seed: int, n: int = N, d: int = D, *, dtype: torch.dtype = torch.float64,
           device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Random updates ``(n, d)`` and positive weights ``(n,)``."""
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = 0.5 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64)
    return x.to(dtype=dtype, device=device), w.to(dtype=dtype, device=device)


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for results of O(1) updates in ``dtype``."""
    return (1e-9, 1e-9) if dtype == torch.float64 else (1e-4, 1e-4)


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype,
                 atol_scale: float = 1.0) -> None:
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * atol_scale)


def declared(obj: object, attr: str) -> frozenset[str]:
    """The ``equivariances`` / ``properties`` / ``preserves`` an object declares."""
    value = getattr(obj, attr)
    assert isinstance(value, frozenset)
    return value
