"""Every precondition and every bad input raises, with a message naming what is wrong."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch

import aggregation
from aggregation import pre, rules

from ._cases import build_case, build_pre, gen, sample

RULE_CASES = aggregation.names()
STEP_CASES = aggregation.pre_names()


def _bad_inputs() -> list[Any]:
    x, w = sample(0, n=8, d=3)
    nan, inf = x.clone(), x.clone()
    nan[2, 1] = math.nan
    inf[5, 0] = -math.inf
    bad_w = w.clone()
    bad_w[1] = math.nan
    return [
        pytest.param(x.numpy(), None, "must be a torch.Tensor", id="numpy"),
        pytest.param(x.to(torch.int64), None, "floating-point", id="int-dtype"),
        pytest.param(x[0], None, "must be 2-D", id="1d"),
        pytest.param(x[None], None, "must be 2-D", id="3d"),
        pytest.param(x[:0], None, "n >= 1", id="no-clients"),
        pytest.param(x[:, :0], None, "d >= 1", id="no-parameters"),
        pytest.param(nan, None, r"NaN or Inf in rows \[2\]", id="nan"),
        pytest.param(inf, None, r"NaN or Inf in rows \[5\]", id="inf"),
        pytest.param(x, w[:-1], r"shape \(n,\)=\(8,\), got \(7,\)", id="weights-shape"),
        pytest.param(x, w[:, None], r"shape \(n,\)=\(8,\)", id="weights-2d"),
        pytest.param(x, w.tolist(), "weights must be None or a torch.Tensor", id="weights-list"),
        pytest.param(x, -w, "non-negative", id="weights-negative"),
        pytest.param(x, torch.zeros(8), "all zero", id="weights-zero"),
        pytest.param(x, bad_w, "finite", id="weights-nan"),
        pytest.param(x, w > 0, "real numbers", id="weights-bool"),
    ]


@pytest.mark.parametrize(("updates", "weights", "message"), _bad_inputs())
@pytest.mark.parametrize("case", RULE_CASES + [f"median+{p}" for p in STEP_CASES])
def test_bad_input_raises_for_every_rule(case: str, updates: Any, weights: Any,
                                         message: str) -> None:
    agg = build_case(case)
    with pytest.raises(ValueError, match=message) as err:
        agg(updates, weights, generator=gen(0))
    assert str(err.value).startswith(case)


@pytest.mark.parametrize(("updates", "weights", "message"), _bad_inputs())
@pytest.mark.parametrize("step", STEP_CASES)
def test_bad_input_raises_for_every_step(step: str, updates: Any, weights: Any,
                                         message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        build_pre(step)(updates, weights, generator=gen(0))
    assert str(err.value).startswith(step)


def _x(n: int, d: int = 3) -> torch.Tensor:
    return sample(1, n=n, d=d)[0]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: rules.krum(_x(5), f=2),
     r"krum needs n >= 2f \+ 3, got n=5, f=2: lower f or sample more clients"),
    (lambda: rules.multi_krum(_x(4), f=1),
     r"multi_krum needs n >= 2f \+ 3, got n=4, f=1: lower f or sample more clients"),
    (lambda: rules.multi_krum(_x(7), f=1, m=7),
     "multi_krum needs 1 <= m <= n - f, got m=7, n=7, f=1: use m <= 6"),
    (lambda: rules.bulyan(_x(10), f=2),
     r"bulyan needs n >= 4f \+ 3, got n=10, f=2: lower f or sample more clients"),
    (lambda: rules.trimmed_mean(_x(4), f=2),
     "trimmed_mean needs n > 2f, got n=4, f=2: lower f or sample more clients"),
    (lambda: pre.nnm(_x(6), f=3), "nnm needs n > 2f, got n=6, f=3"),
    (lambda: pre.bucketing(_x(6), s=2, generator=None), "bucketing needs a torch.Generator"),
    (lambda: rules.mean(_x(4), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64),
                        max_weight_ratio=2.0),
     "mean with max_weight_ratio needs a positive median weight, got median 0"),
    (lambda: rules.mean(_x(4), max_weight_ratio=0.5), r"max_weight_ratio must be >= 1"),
    (lambda: rules.multi_krum(_x(5), torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64),
                              f=1, m=1),
     "multi_krum: the 1 selected clients .* all have weight 0"),
    (lambda: rules.centered_clipping(_x(4), center=torch.zeros(5), tau=1.0),
     r"shape \(d,\)=\(3,\), got \(5,\)"),
    (lambda: rules.centered_clipping(_x(4), center=torch.full((3,), math.nan), tau=1.0),
     "centre\\) contains NaN"),
    (lambda: rules.centered_clipping(_x(4), center=torch.zeros(3), tau=0.0),
     "tau must be > 0"),
    (lambda: rules.geometric_median(_x(4), nu=0.0), "nu must be > 0"),
    (lambda: rules.geometric_median(_x(4), iters=0), "iters must be >= 1"),
    (lambda: rules.geometric_median(_x(4), tol=-1.0), "tol must be >= 0"),
    (lambda: rules.median(_x(4), torch.ones(4, dtype=torch.float64)),
     "median has no weighted form"),
    (lambda: rules.krum(_x(5), torch.ones(5, dtype=torch.float64), f=1),
     "krum has no weighted form"),
    (lambda: pre.norm_clip(_x(4), max_norm=-1.0), "max_norm must be > 0"),
    (lambda: pre.bucketing(_x(4), s=0, generator=gen(0)), "s must be >= 1"),
])
def test_preconditions(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(("name", "params", "error", "message"), [
    ("krum", {"f": 1.5}, TypeError, "krum: f must be an int, got float 1.5"),
    ("krum", {"f": True}, TypeError, "f must be an int"),
    ("krum", {"f": -1}, ValueError, "f must be >= 0, got f=-1"),
    ("multi_krum", {"f": 1, "m": 0}, ValueError, "m must be >= 1"),
    ("multi_krum", {"f": 1, "use_weights": "yes"}, TypeError, "use_weights must be True or False"),
    ("mean", {"max_weight_ratio": 0.5}, ValueError, "max_weight_ratio must be >= 1"),
    ("mean", {"max_weight_ratio": math.inf}, ValueError, "max_weight_ratio must be finite"),
    ("centered_clipping", {"tau": 0}, ValueError, "tau must be > 0"),
    ("centered_clipping", {"tau": "1"}, TypeError, "tau must be a number"),
    ("geometric_median", {"iters": 0}, ValueError, "iters must be >= 1"),
])
def test_bad_hyperparameters_fail_at_construction(name: str, params: dict[str, Any],
                                                  error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message) if error is TypeError else message):
        aggregation.get(name, **params)


@pytest.mark.parametrize(("name", "params", "message"), [
    ("norm_clip", {"max_norm": 0.0}, "max_norm must be > 0"),
    ("bucketing", {"s": 0}, "s must be >= 1"),
    ("nnm", {"f": -2}, "f must be >= 0"),
])
def test_bad_step_hyperparameters_fail_at_construction(name: str, params: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregation.get_pre(name, **params)


def test_registered_rule_refuses_a_state_when_stateless() -> None:
    with pytest.raises(ValueError, match="krum is stateless but got state=Tensor"):
        aggregation.get("krum", f=0)(_x(4), state=torch.zeros(3))


def test_registered_bucketing_without_generator() -> None:
    agg = aggregation.compose(aggregation.get("mean"), [aggregation.get_pre("bucketing")])
    with pytest.raises(ValueError, match=r"bucketing needs a torch\.Generator"):
        agg(_x(6))


def test_composition_says_how_many_rows_the_steps_left() -> None:
    agg = build_case("bulyan+bucketing")  # f = 1: 13 clients become 7 rows, fine
    agg(_x(13), generator=gen(0))
    with pytest.raises(ValueError, match=r"bulyan needs n >= 4f \+ 3, got n=6, f=1.*"
                                         r"output of bucketing: 12 clients became 6 rows"):
        agg(_x(12), generator=gen(0))


def test_compose_rejects_a_bare_step() -> None:
    with pytest.raises(TypeError, match="wrap a single step in a list"):
        aggregation.compose(aggregation.get("mean"), aggregation.get_pre("nnm", f=1))  # type: ignore[arg-type]


def test_huge_finite_updates_are_accepted() -> None:
    """The cheap finiteness check (the sum) overflows here; the exact check then passes."""
    x = torch.full((3, 2), 3e38)
    assert not bool(torch.isfinite(x.sum()))
    torch.testing.assert_close(rules.median(x).update, torch.full((2,), 3e38))
