"""FoolsGold and FLDetector: histories keyed by client, each rule's defining behaviour on
constructed multi-round inputs, reference computations, and the state's round trip.

The contract suite (``test_contract.py``) covers shapes, dtypes, determinism and the
declared properties of a first round.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import Tensor

import aggregation
from aggregation import PreconditionError, history
from aggregation.catalog import Rule
from aggregation.registry import make_generator

RULES = ["foolsgold", "fldetector"]


def built(name: str) -> Rule:
    rule = aggregation.get(name)
    assert isinstance(rule, Rule)
    return rule


def ids(n: int, offset: int = 1000) -> Tensor:
    return torch.arange(offset, offset + n, dtype=torch.int64)


def roundtrip(state: object) -> object:
    """What a checkpoint gives back: ``torch.save`` then ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------- registration


def test_registered_stateful_keyed_by_client_and_not_dp_compatible() -> None:
    assert set(RULES) <= set(aggregation.names())
    for name in RULES:
        rule = aggregation.get(name)
        assert isinstance(rule, Rule)
        assert rule.stateful and rule.needs_clients and not rule.needs_reference
        assert not rule.use_weights
        why = aggregation.central_dp_refusal(name)
        assert why and "no sensitivity analysis" not in why
    assert not built("foolsgold").random and built("fldetector").random


@pytest.mark.parametrize("name", RULES)
def test_refuses_to_run_without_client_ids(name: str) -> None:
    x = torch.randn(6, 4, generator=make_generator(0))
    rule = aggregation.get(name)
    g = make_generator(0)
    with pytest.raises(ValueError, match=rf"^{name} keys its history by client: pass "
                                         r"clients=\(n,\) int64 ids"):
        rule(x, generator=g)
    with pytest.raises(ValueError, match=r"\(n,\) = \(6,\) int64"):
        rule(x, generator=g, clients=torch.arange(6, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(n,\) = \(6,\) int64"):
        rule(x, generator=g, clients=torch.arange(5))
    with pytest.raises(ValueError, match=r"unique .* repeated ids \[3\]"):
        rule(x, generator=g, clients=torch.tensor([0, 1, 2, 3, 3, 4]))


@pytest.mark.parametrize("name", RULES)
def test_refuses_after_a_step_that_mixes_clients(name: str) -> None:
    rule = aggregation.get(name)
    for step in (aggregation.get_pre("bucketing", s=2), aggregation.get_pre("nnm", f=1)):
        with pytest.raises(ValueError, match=rf"{name} keys its history by client.*"
                                             rf"{step.name} mix clients' rows"):
            aggregation.compose(rule, [step])


@pytest.mark.parametrize("name", RULES)
def test_refuses_a_state_of_another_shape(name: str) -> None:
    rule = aggregation.get(name)
    g = make_generator(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    state = rule(x, clients=ids(5), generator=g).state
    with pytest.raises(ValueError, match="state must be a dict with keys"):
        rule(x, clients=ids(5), generator=g, state={"history": x})
    with pytest.raises(ValueError, match=r"expected .*d=3 parameters"):
        rule(x[:, :3], clients=ids(5), generator=g, state=state)


@pytest.mark.parametrize(
    ("name", "params", "exc", "match"),
    [
        ("foolsgold", {"kappa": 0.0}, ValueError, "foolsgold: kappa must be > 0"),
        ("fldetector", {"window": 0}, ValueError, "fldetector: window must be >= 1"),
        ("fldetector", {"draws": 1}, ValueError, "fldetector: draws must be >= 2"),
        ("fldetector", {"base": "krum"}, ValueError, "base='krum' cannot follow"),
        ("fldetector", {"base": "foolsgold"}, ValueError, "cannot follow"),
        ("fldetector", {"base": "medain"}, KeyError, "did you mean 'median'"),
        ("fldetector", {"base": 3}, TypeError, "must be a rule name"),
    ],
)
def test_hyperparameters_are_checked_when_the_rule_is_built(
        name: str, params: dict[str, object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        aggregation.get(name, **params)


# --------------------------------------------------------------------------- FoolsGold


def reference_foolsgold_weights(h: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """The paper's Algorithm 1 (steps over the histories), written with loops in numpy."""
    n = h.shape[0]
    unit = h / np.linalg.norm(h, axis=1, keepdims=True)
    cs = unit @ unit.T
    v = np.array([max(0.0, max(cs[i, j] for j in range(n) if j != i)) for i in range(n)])
    for i in range(n):
        for j in range(n):
            if i != j and v[i] < v[j]:
                cs[i, j] *= v[i] / v[j]
    alpha = np.array([1.0 - max(cs[i, j] for j in range(n) if j != i) for i in range(n)])
    alpha = np.clip(alpha, 0.0, 1.0)
    alpha = alpha / alpha.max()
    alpha[alpha == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        w = kappa * (np.log(alpha / (1.0 - alpha)) + 0.5)
    out: np.ndarray = np.clip(w, 0.0, 1.0)
    return out


def honest_and_sybils(seed: int, h: int = 8, s: int = 4, d: int = 50,
                      spread: float = 0.01) -> Tensor:
    """``h`` honest updates in independent directions, then ``s`` sybils sending nearly the
    same update."""
    g = make_generator(seed)
    honest = torch.randn(h, d, generator=g, dtype=torch.float64)
    goal = torch.randn(d, generator=g, dtype=torch.float64)
    sybils = goal + spread * torch.randn(s, d, generator=g, dtype=torch.float64)
    return torch.cat([honest, sybils])


@pytest.mark.parametrize("seed", range(10))
def test_foolsgold_matches_the_papers_algorithm(seed: int) -> None:
    g = make_generator(seed)
    h = torch.randn(9, 20, generator=g, dtype=torch.float64)
    h[5:] = h[5] + 0.3 * torch.randn(4, 20, generator=g, dtype=torch.float64)
    for kappa in (0.5, 1.0, 2.0):
        ours, _ = history.foolsgold_weights(h, kappa)
        np.testing.assert_allclose(ours.numpy(), reference_foolsgold_weights(h.numpy(), kappa),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("spread", [0.0, 0.01])
def test_foolsgold_down_weights_sybils_and_keeps_honest_diverse_clients(
        seed: int, spread: float) -> None:
    x = honest_and_sybils(seed, spread=spread)
    res = aggregation.get("foolsgold")(x, clients=ids(12))
    w = res.info["weights"]
    assert bool((w[:8] == 1.0).all()) and bool((w[8:] == 0.0).all())
    assert res.kept.tolist() == list(range(8))
    torch.testing.assert_close(res.update, x[:8].mean(dim=0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_foolsgold_sees_sybils_through_their_history(seed: int) -> None:
    """Each round the sybils' updates are hidden in noise as large as the update, so one
    round does not separate them; their summed histories converge while the honest
    clients' stay apart."""
    g = make_generator(seed)
    d, h, s = 200, 10, 4
    goal = torch.randn(d, generator=g, dtype=torch.float64)
    directions = torch.randn(h, d, generator=g, dtype=torch.float64)
    rule = aggregation.get("foolsgold")
    state = None
    weights = []
    for _ in range(5):
        honest = directions + torch.randn(h, d, generator=g, dtype=torch.float64)
        sybils = goal + torch.randn(s, d, generator=g, dtype=torch.float64)
        res = rule(torch.cat([honest, sybils]), clients=ids(h + s), state=state)
        state = res.state
        weights.append(res.info["weights"])
    assert bool((weights[0][h:] > 0).any())  # round 1: not yet separated
    for w in weights[2:]:
        assert bool((w[:h] == 1.0).all()) and bool((w[h:] == 0.0).all())


def test_foolsgold_history_is_keyed_by_client_and_kept_when_absent() -> None:
    g = make_generator(5)
    rule = aggregation.get("foolsgold")
    a = torch.randn(6, 10, generator=g, dtype=torch.float64)
    b = torch.randn(6, 10, generator=g, dtype=torch.float64)
    c = torch.randn(4, 10, generator=g, dtype=torch.float64)
    clients_a = ids(6)
    s1 = rule(a, clients=clients_a).state
    # round 2: clients 1000..1005 in reverse row order
    s2 = rule(b.flip(0), clients=clients_a.flip(0), state=s1).state
    # round 3: 1001 and 1003 absent, 1006 and 1007 new
    clients_c = torch.tensor([1007, 1000, 1006, 1002])
    s3 = rule(c, clients=clients_c, state=s2).state
    assert isinstance(s3, dict)
    hist = dict(zip(s3["clients"].tolist(), s3["history"], strict=True))
    assert set(hist) == set(range(1000, 1008))
    for i in (1, 3, 4, 5):  # absent: its history stays a + b
        if i in (4, 5):
            continue
        torch.testing.assert_close(hist[1000 + i], a[i] + b[i], rtol=0, atol=0)
    torch.testing.assert_close(hist[1000], a[0] + b[0] + c[1], rtol=0, atol=0)
    torch.testing.assert_close(hist[1002], a[2] + b[2] + c[3], rtol=0, atol=0)
    torch.testing.assert_close(hist[1007], c[0], rtol=0, atol=0)
    torch.testing.assert_close(hist[1006], c[2], rtol=0, atol=0)
    # the returned states are new objects: the previous ones are untouched
    assert isinstance(s1, dict)
    torch.testing.assert_close(s1["history"], a, rtol=0, atol=0)


def test_foolsgold_refuses_a_round_where_everyone_looks_like_a_sybil() -> None:
    x = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(PreconditionError, match="every client looks like a sybil"):
        aggregation.get("foolsgold")(x, clients=ids(4))
    one = aggregation.get("foolsgold")(x[:1], clients=ids(1))
    assert one.kept.tolist() == [0] and torch.equal(one.update, x[0])


# --------------------------------------------------------------------------- FLDetector


def quadratic_rounds(seed: int, rounds: int, *, n: int = 30, d: int = 50,
                     switch: int | None = None, window: int = 4,
                     noise: float = 0.01) -> list[aggregation.AggregationResult]:
    """``rounds`` rounds of one gradient step on client quadratics
    ``f_i(w) = (w - c_i)^T A (w - c_i) / 2`` with noise, rows shuffled each round (the
    history follows the ids, not the rows). From round ``switch`` on, client 1000 sends the
    opposite of its update."""
    g = make_generator(seed)
    a = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    centres = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.zeros(d, dtype=torch.float64)
    rule = aggregation.get("fldetector", window=window)
    state: object = None
    out = []
    for t in range(rounds):
        x = -0.1 * (w - centres) * a + noise * torch.randn(n, d, generator=g,
                                                           dtype=torch.float64)
        if switch is not None and t >= switch:
            x[0] = -x[0]
        perm = torch.randperm(n, generator=g)
        res = rule(x[perm], clients=ids(n)[perm], state=state,
                   generator=make_generator(seed * 1000 + t))
        # report the result in client order
        inv = torch.argsort(perm)
        out.append(aggregation.AggregationResult(
            res.update, perm[res.kept].sort().values, res.state,
            {k: v[inv] if v.dim() == 1 else v for k, v in res.info.items()}))
        state = res.state
        w = w + res.update
    return out


@pytest.mark.parametrize("seed", range(5))
def test_fldetector_flags_a_client_that_stops_matching_its_history(seed: int) -> None:
    results = quadratic_rounds(seed, 13, switch=9)
    for t, res in enumerate(results):
        flagged = res.info["flagged"].nonzero().flatten().tolist()
        # the switch shows in client 0's score for the `window` rounds that remember it
        assert flagged == ([0] if t >= 9 else []), (t, flagged)
        assert bool(res.info["attack"]) == (t >= 9)
        assert res.kept.tolist() == [i for i in range(30) if i not in flagged]
    scores = results[9].info["scores"]
    assert float(scores[0]) > 2 * float(scores[1:].max())


def test_fldetector_flags_nobody_when_nobody_attacks() -> None:
    """The gap statistic may see two clusters in honest scores by chance (measured: one
    round in 640 with these settings); over 10 runs of 16 rounds at most one may."""
    runs = [quadratic_rounds(seed, 16) for seed in range(10)]
    false_alarms = sum(bool(res.info["flagged"].any()) for results in runs for res in results)
    assert false_alarms <= 1
    assert all(bool(res.info["attack"]) == bool(res.info["flagged"].any())
               for results in runs for res in results)
    # every client is scored once its window filled (one round to start the pairs,
    # one for the first prediction, then `window` = 4 distances): from round 6 on
    assert all(bool(r[5].info["scored"].all()) and not bool(r[4].info["scored"].any())
               for r in runs)


def test_fldetector_before_any_history_is_the_base_rule() -> None:
    g = make_generator(2)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    for base in ("mean", "median"):
        res = aggregation.get("fldetector", base=base)(x, clients=ids(7), generator=g)
        assert torch.equal(res.update, aggregation.get(base)(x).update)
        assert res.kept.tolist() == list(range(7))


def reference_bfgs(s: Tensor, y: Tensor) -> Tensor:
    """The dense BFGS matrix after the updates with the pairs in order, from ``sigma I``."""
    sigma = float(y[-1] @ s[-1] / (s[-1] @ s[-1]))
    b = sigma * torch.eye(s.shape[1], dtype=torch.float64)
    for si, yi in zip(s, y, strict=True):
        bs = b @ si
        b = b - torch.outer(bs, bs) / (si @ bs) + torch.outer(yi, yi) / (yi @ si)
    return b


@pytest.mark.parametrize("m", [1, 2, 5])
def test_lbfgs_is_the_bfgs_matrix_of_its_pairs(m: int) -> None:
    """The compact form equals the BFGS recursion; on a quadratic it satisfies the latest
    secant equation ``B s_m = y_m``."""
    g = make_generator(4)
    d = 12
    q = torch.randn(d, d, generator=g, dtype=torch.float64)
    hessian = q @ q.T + d * torch.eye(d, dtype=torch.float64)
    s = torch.randn(m, d, generator=g, dtype=torch.float64)
    y = s @ hessian  # y_i = H s_i
    v = torch.randn(3, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(history.lbfgs_hvp(s, y, v), v @ reference_bfgs(s, y).T,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(history.lbfgs_hvp(s, y, s[-1:]), y[-1:], rtol=1e-9, atol=1e-9)


def test_two_means_split_is_the_brute_force_optimum() -> None:
    g = make_generator(6)
    z = torch.rand(20, 7, generator=g, dtype=torch.float64)
    wss, threshold = history.two_means_split(z)
    for row, best, cut in zip(z, wss, threshold, strict=True):
        values = sorted(row.tolist())
        costs = [np.var(values[:k]) * k + np.var(values[k:]) * (7 - k) for k in range(1, 7)]
        assert math.isclose(float(best), min(costs), rel_tol=1e-12, abs_tol=1e-15)
        assert float(cut) == values[int(np.argmin(costs)) + 1]


def test_gap_statistic_finds_two_groups_and_not_one() -> None:
    g = make_generator(8)
    one = torch.randn(40, generator=g, dtype=torch.float64)
    two = torch.cat([one[:30], 8.0 + one[30:]])
    assert history.gap_says_clusters(two, draws=20, generator=make_generator(0))[0]
    assert not history.gap_says_clusters(one, draws=20, generator=make_generator(0))[0]
    assert history.gap_says_clusters(torch.ones(5), draws=20,
                                     generator=make_generator(0)) == (False, 0.0)


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize("name", RULES)
def test_state_round_trips_through_a_checkpoint(name: str) -> None:
    """A state restored as a checkpoint restores it gives the same next rounds, bit for bit
    (also after a move to another device dtype-free: the rule moves it to the updates')."""
    g = make_generator(9)
    n, d = 8, 6
    rule = aggregation.get(name, **({"window": 2} if name == "fldetector" else {}))
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(6)]
    state: object = None
    for x in xs[:3]:
        state = rule(x, clients=ids(n), state=state, generator=make_generator(1)).state
    restored = roundtrip(state)
    a_state, b_state = state, restored
    for x in xs[3:]:
        a = rule(x, clients=ids(n), state=a_state, generator=make_generator(2))
        b = rule(x, clients=ids(n), state=b_state, generator=make_generator(2))
        assert torch.equal(a.update, b.update) and torch.equal(a.kept, b.kept)
        a_state, b_state = a.state, b.state
    assert isinstance(a_state, dict) and isinstance(b_state, dict)
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)


@pytest.mark.parametrize("name", RULES)
def test_first_state_is_what_a_missing_state_means(name: str) -> None:
    rule = aggregation.get(name)
    g = make_generator(10)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    first = rule.init_state(4, dtype=torch.float64, device="cpu")
    a = rule(x, clients=ids(5), generator=make_generator(0))
    b = rule(x, clients=ids(5), state=first, generator=make_generator(0))
    assert torch.equal(a.update, b.update)
    assert isinstance(a.state, dict) and isinstance(b.state, dict)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert isinstance(first, dict) and all(isinstance(v, Tensor) for v in first.values())


def test_a_history_rule_runs_after_norm_clip_which_keeps_one_row_per_client() -> None:
    rule = aggregation.compose(aggregation.get("foolsgold"),
                               [aggregation.get_pre("norm_clip", max_norm=1.0)])
    x = torch.randn(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state = rule.init_state(20, dtype=torch.float64, device="cpu")
    res = rule(x, state=state, clients=torch.arange(5))
    assert res.kept.tolist() == [0, 1, 2, 3, 4]  # five distinct honest directions
    with pytest.raises(ValueError, match="keys its history by client"):
        aggregation.compose(aggregation.get("foolsgold"), [aggregation.get_pre("bucketing", s=2)])
