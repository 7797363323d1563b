"""Contract suite over the registry: every rule, alone and behind every pre-aggregation step.

A rule is tested the moment it is registered. The equivariances and properties each rule
declares (``equivariances``, ``properties``; for steps ``preserves``) are checked; a
declared property that does not hold fails here.
"""

from __future__ import annotations

import pytest
import torch

import aggregation

from ._cases import (
    DEVICES,
    assert_close,
    build_case,
    build_pre,
    build_rule,
    case_ids,
    declared,
    gen,
    is_random,
    sample,
)

DTYPES = [torch.float32, torch.float64]


def _composable(case: str) -> bool:
    """compose() refuses a rule that keys a history by client (foolsgold, fldetector) after
    a step that mixes clients' rows (bucketing, nnm): see test_history.py."""
    rule, *pre = case.split("+")
    return not (build_rule(rule).needs_clients  # type: ignore[attr-defined]
                and any(not build_pre(p).rowwise for p in pre))  # type: ignore[attr-defined]


CASES = [c for c in case_ids() if _composable(c)]
# rules that do not bound an update's magnitude: the mean, FoolsGold (it weighs clients by
# their direction only) and FLDetector before its window fills (its base rule, the mean)
UNBOUNDED = {"mean", "foolsgold", "fldetector"}


def _with(attr: str, prop: str) -> list[str]:
    """The cases that declare ``prop`` (only those are held to it)."""
    return [c for c in CASES if prop in declared(build_case(c), attr)]


PERMUTATION_INVARIANT = _with("properties", "permutation_invariant")
UNANIMOUS = _with("properties", "unanimous")
WITHIN_BOUNDS = _with("properties", "within_bounds")
TRANSLATION = _with("equivariances", "translation")
SCALE = _with("equivariances", "scale")


def _call(agg: aggregation.Aggregator, x: torch.Tensor, w: torch.Tensor | None,
          seed: int = 0, clients: torch.Tensor | None = None) -> aggregation.AggregationResult:
    """Call with a fresh generator of a fixed seed, so random steps repeat exactly, client
    ids ``0..n-1`` (or ``clients``) and as the server's reference update the coordinate-wise
    median of ``x`` (it moves with ``x`` under the equivariances tested), which the rules
    keyed by client or scored against a reference need and the others ignore."""
    if clients is None:
        clients = torch.arange(x.shape[0], device=x.device)
    return agg(x, w, generator=gen(1000 + seed), clients=clients, reference=_reference(x))


def _reference(x: torch.Tensor) -> torch.Tensor:
    return x.median(dim=0).values


def _kept_is_tie_free(case: str) -> bool:
    """nnm gives clients with the same neighbour set *identical* rows, so which of them a
    selection rule keeps is an exact tie, broken by position: the update is the same, the
    kept client may differ."""
    return not case.endswith("+nnm")


def test_every_rule_and_step_is_covered() -> None:
    keyed = [r for r in aggregation.names() if build_rule(r).needs_clients]  # type: ignore[attr-defined]
    mixing = [p for p in aggregation.pre_names() if not build_pre(p).rowwise]  # type: ignore[attr-defined]
    assert set(keyed) == {"foolsgold", "fldetector"} and {"bucketing", "nnm"} <= set(mixing)
    assert len(CASES) == (len(aggregation.names()) * (1 + len(aggregation.pre_names()))
                          - len(keyed) * len(mixing))
    assert {"mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
            "geometric_median", "centered_clipping"} <= set(aggregation.names())
    assert {"norm_clip", "bucketing", "nnm"} <= set(aggregation.pre_names())


def test_declarations_match_the_documented_table() -> None:
    """What each rule promises (also in the table of ``help(aggregation)``)."""
    assert set(aggregation.names()) - set(PERMUTATION_INVARIANT) == set()
    # FLAME adds noise; FLAME and SignGuard clip to the median norm (towards the origin, the
    # global model), so they are neither translation equivariant nor within the bounds
    # FoolsGold gives n identical updates weight 0 (each is a perfect sybil of the others);
    # it and FLDetector compare directions or distances of histories, not translation-free
    # FLTrust rescales every update to the reference's norm and declares no equivariance
    assert set(aggregation.names()) - set(UNANIMOUS) == {"centered_clipping", "flame",
                                                          "foolsgold", "fltrust"}
    assert set(aggregation.names()) - set(WITHIN_BOUNDS) == {
        "centered_clipping", "flame", "signguard", "fltrust"}
    assert set(aggregation.names()) - set(TRANSLATION) == {
        "centered_clipping", "flame", "signguard", "foolsgold", "fldetector", "fltrust"}
    assert set(aggregation.names()) - set(SCALE) == {"centered_clipping", "geometric_median",
                                                      "fltrust"}
    assert not any(c.endswith("+bucketing") for c in PERMUTATION_INVARIANT)
    assert not any(c.endswith("+norm_clip") for c in TRANSLATION + SCALE + WITHIN_BOUNDS)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
def test_shape_dtype_device_and_kept(case: str, dtype: torch.dtype, device: str,
                                     weighted: bool) -> None:
    agg = build_case(case)
    x, w = sample(1, dtype=dtype, device=device)
    res = _call(agg, x, w if weighted else None)
    assert res.update.shape == (x.shape[1],)
    assert res.update.dtype == dtype
    assert res.update.device == x.device
    assert bool(torch.isfinite(res.update).all())
    kept = res.kept
    assert kept.dtype == torch.int64 and kept.dim() == 1 and kept.numel() >= 1
    assert kept.device == x.device
    assert bool((kept[1:] > kept[:-1]).all()), "kept must be sorted and unique"
    assert int(kept.min()) >= 0 and int(kept.max()) < x.shape[0]
    assert all(isinstance(v, torch.Tensor) for v in res.info.values())
    assert res.state is None or agg.stateful


@pytest.mark.parametrize("case", CASES)
def test_deterministic_given_generator(case: str) -> None:
    agg = build_case(case)
    x, w = sample(2, dtype=torch.float32)
    a, b = _call(agg, x, w), _call(agg, x, w)
    assert torch.equal(a.update, b.update) and torch.equal(a.kept, b.kept)


@pytest.mark.parametrize("case", PERMUTATION_INVARIANT)
@pytest.mark.parametrize("dtype", DTYPES)
def test_permutation_invariance(case: str, dtype: torch.dtype) -> None:
    agg = build_case(case)
    assert not is_random(agg)
    x, w = sample(3, dtype=dtype)
    perm = torch.randperm(x.shape[0], generator=gen(4))
    for weights in (None, w):
        base = _call(agg, x, weights)
        shuffled = _call(agg, x[perm], None if weights is None else weights[perm],
                         clients=perm)
        assert_close(shuffled.update, base.update, dtype)
        if _kept_is_tie_free(case):
            assert torch.equal(perm[shuffled.kept].sort().values, base.kept)


@pytest.mark.parametrize("case", UNANIMOUS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_inputs_give_that_input(case: str, dtype: torch.dtype) -> None:
    agg = build_case(case)
    x, w = sample(5, dtype=dtype)
    same = x[:1].expand_as(x).clone()
    for weights in (None, w):
        res = _call(agg, same, weights)
        assert_close(res.update, x[0], dtype)


@pytest.mark.parametrize("case", TRANSLATION)
@pytest.mark.parametrize("dtype", DTYPES)
def test_translation_equivariance(case: str, dtype: torch.dtype) -> None:
    agg = build_case(case)
    x, w = sample(6, dtype=dtype)
    shift = 3.0 * torch.randn(x.shape[1], generator=gen(7), dtype=torch.float64).to(dtype)
    for weights in (None, w):
        base, moved = _call(agg, x, weights), _call(agg, x + shift, weights)
        assert_close(moved.update, base.update + shift, dtype)
        if _kept_is_tie_free(case):
            assert torch.equal(moved.kept, base.kept)


@pytest.mark.parametrize("case", SCALE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [0.01, 7.0])
def test_scale_equivariance(case: str, dtype: torch.dtype, c: float) -> None:
    agg = build_case(case)
    x, w = sample(8, dtype=dtype)
    for weights in (None, w):
        base, scaled = _call(agg, x, weights), _call(agg, c * x, weights)
        assert_close(scaled.update, c * base.update, dtype, atol_scale=c)
        if _kept_is_tie_free(case):
            assert torch.equal(scaled.kept, base.kept)


@pytest.mark.parametrize("case", WITHIN_BOUNDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_within_coordinate_bounds(case: str, dtype: torch.dtype) -> None:
    agg = build_case(case)
    for seed in range(3):
        x, w = sample(10 + seed, dtype=dtype)
        x = x * torch.logspace(-3, 3, x.shape[1], dtype=dtype)  # coordinates of every scale
        slack = 1e-12 if dtype == torch.float64 else 1e-6
        lo, hi = x.min(dim=0).values, x.max(dim=0).values
        for weights in (None, w):
            u = _call(agg, x, weights).update
            assert bool((u >= lo - slack * lo.abs()).all() and (u <= hi + slack * hi.abs()).all())


@pytest.mark.parametrize("case", CASES)
def test_declarations_are_honest_for_composition(case: str) -> None:
    """A composition declares what the rule declares and every step preserves."""
    agg = build_case(case)
    rule = getattr(agg, "rule", agg)
    pre = getattr(agg, "pre", ())
    expected_eq = declared(rule, "equivariances")
    expected_props = declared(rule, "properties")
    for p in pre:
        expected_eq &= declared(p, "equivariances")
        expected_props &= declared(p, "preserves")
    assert declared(agg, "equivariances") == expected_eq
    assert declared(agg, "properties") == expected_props
    assert agg.stateful == rule.stateful


@pytest.mark.parametrize("case", CASES)
def test_state_contract(case: str) -> None:
    agg = build_case(case)
    x, w = sample(20, dtype=torch.float32)
    state = agg.init_state(x.shape[1], dtype=x.dtype, device=x.device)
    if not agg.stateful:
        assert state is None
        with pytest.raises(ValueError, match="stateless"):
            _call_with_state(agg, x, torch.zeros(x.shape[1]))
        return
    implicit = _call(agg, x, w)
    explicit = _call_with_state(agg, x, state, w)
    assert torch.equal(implicit.update, explicit.update)
    if isinstance(state, dict):  # histories keyed by client: a dict of tensors
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        assert isinstance(implicit.state, dict) and set(implicit.state) == set(state)
        first = {k: v.clone() for k, v in state.items()}
        again = _call_with_state(agg, x, state, w)
        assert all(torch.equal(state[k], first[k]) for k in state), "state was mutated"
        assert all(torch.equal(again.state[k], implicit.state[k])  # type: ignore[index]
                   for k in state)
        return
    assert isinstance(state, torch.Tensor) and state.shape == (x.shape[1],)
    assert isinstance(implicit.state, torch.Tensor)
    torch.testing.assert_close(implicit.state, implicit.update)
    # the returned state is not an alias of the returned update
    before = implicit.state.clone()
    implicit.update.add_(1.0)
    assert torch.equal(implicit.state, before)


def _call_with_state(agg: aggregation.Aggregator, x: torch.Tensor, state: object,
                     w: torch.Tensor | None = None) -> aggregation.AggregationResult:
    return agg(x, w, state=state, generator=gen(1000),
               clients=torch.arange(x.shape[0], device=x.device), reference=_reference(x))


def _ignores_weights(case: str) -> bool:
    agg = build_case(case)
    rule = getattr(agg, "rule", agg)
    # bucketing weighs the members of a bucket, whatever the rule after it does
    return not getattr(rule, "use_weights", True) and not case.endswith("+bucketing")


@pytest.mark.parametrize("case", [c for c in CASES if _ignores_weights(c)])
def test_rules_that_ignore_weights_ignore_them(case: str) -> None:
    agg = build_case(case)
    x, w = sample(21)
    assert torch.equal(_call(agg, x, w).update, _call(agg, x, None).update)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_updates_near_the_dtype_maximum_neither_overflow_nor_dominate(
        case: str, dtype: torch.dtype) -> None:
    """A Byzantine update at 0.9 x the largest float must not turn the aggregate into Inf
    or NaN (squared norms and plain sums overflow; the rules avoid both), and with the one
    outlier that f = 1 allows, every robust rule stays at the honest scale."""
    agg = build_case(case)
    x, w = sample(30, dtype=dtype)
    big = 0.9 * torch.finfo(dtype).max
    one = x.clone()
    one[2] = big
    two = one.clone()
    two[9, :3] = big  # a plain sum of the two overflows
    for data in (one, two):
        for weights in (None, w):
            assert bool(torch.isfinite(_call(agg, data, weights).update).all())
    if case.split("+")[0] not in UNBOUNDED:
        for weights in (None, w):
            assert float(_call(agg, one, weights).update.abs().max()) < 100.0
