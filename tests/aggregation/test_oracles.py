"""Oracles: brute-force references, numpy/scipy, and Flower 1.41's own helpers.

Flower's helpers are called directly with numpy arrays (no server). Where Flower's
definition differs from ours, the test says how and compares only where they coincide.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

import aggregation
from aggregation import _checks, rules

from ._cases import gen

flwr_multikrum = pytest.importorskip("flwr.serverapp.strategy.multikrum")
flwr_bulyan = pytest.importorskip("flwr.serverapp.strategy.bulyan")
flwr_trimmed = pytest.importorskip("flwr.serverapp.strategy.fedtrimmedavg")
flwr_utils = pytest.importorskip("flwr.serverapp.strategy.strategy_utils")
flwr_app = pytest.importorskip("flwr.app")

SIZES = [(3, 0), (5, 1), (6, 1), (9, 2), (10, 3), (13, 2)]  # (n, f) with n >= 2f + 3


def _data(seed: int, n: int, d: int = 5) -> np.ndarray:
    return torch.randn(n, d, generator=gen(seed), dtype=torch.float64).numpy()


# --- brute-force references (python loops, float64, exact differences) -----------------

def _sq(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum((float(p) - float(q)) ** 2 for p, q in zip(a, b, strict=True)))


def _brute_krum_order(x: np.ndarray, idx: list[int], f: int, k: int | None = None) -> list[int]:
    """Indices of ``idx`` sorted by (Krum score within idx, total distance, index)."""
    n = len(idx)
    k = n - f - 2 if k is None else k
    keyed = []
    for i in idx:
        others = sorted(_sq(x[i], x[j]) for j in idx if j != i)
        keyed.append((sum(others[:k]), sum(others), i))
    return [i for *_, i in sorted(keyed)]


def _nearest(values: list[float], centre: float, k: int) -> list[float]:
    return sorted(values, key=lambda v: abs(v - centre))[:k]


def _brute_bulyan(x: np.ndarray, f: int) -> tuple[list[int], np.ndarray]:
    n, d = x.shape
    theta, beta = n - 2 * f, n - 4 * f
    remaining, order = list(range(n)), []
    for _ in range(theta):
        n_t = len(remaining)
        k = max(n_t - f - 2, f)
        pick = _brute_krum_order(x, remaining, f, k)[0]
        order.append(pick)
        remaining.remove(pick)
    out = np.empty(d)
    for c in range(d):
        column = sorted(x[i, c] for i in order)
        med = column[theta // 2] if theta % 2 else (column[theta // 2 - 1] + column[theta // 2]) / 2
        out[c] = sum(_nearest(column, med, beta)) / beta
    return order, out


@pytest.mark.parametrize(("n", "f"), SIZES)
@pytest.mark.parametrize("seed", range(3))
def test_krum_matches_brute_force(n: int, f: int, seed: int) -> None:
    x = _data(seed, n)
    res = rules.krum(torch.from_numpy(x), f=f)
    best = _brute_krum_order(x, list(range(n)), f)[0]
    assert res.kept.tolist() == [best]
    np.testing.assert_array_equal(res.update.numpy(), x[best])
    brute_scores = [sum(sorted(_sq(x[i], x[j]) for j in range(n) if j != i)[:n - f - 2])
                    for i in range(n)]
    np.testing.assert_allclose(res.info["scores"].numpy(), brute_scores, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("n", "f"), SIZES)
@pytest.mark.parametrize("seed", range(3))
def test_multi_krum_matches_brute_force(n: int, f: int, seed: int) -> None:
    x = _data(seed + 10, n)
    w = np.arange(1.0, n + 1)
    order = _brute_krum_order(x, list(range(n)), f)
    for m in sorted({1, (n - f + 1) // 2, n - f}):
        chosen = sorted(order[:m])
        plain = rules.multi_krum(torch.from_numpy(x), f=f, m=m)
        assert plain.kept.tolist() == chosen
        np.testing.assert_allclose(plain.update.numpy(), x[chosen].mean(axis=0), rtol=1e-12)
        weighted = rules.multi_krum(torch.from_numpy(x), torch.from_numpy(w), f=f, m=m)
        np.testing.assert_allclose(weighted.update.numpy(),
                                   np.average(x[chosen], axis=0, weights=w[chosen]), rtol=1e-12)


@pytest.mark.parametrize(("n", "f"), [(3, 0), (7, 1), (8, 1), (11, 2), (12, 2), (15, 3)])
@pytest.mark.parametrize("seed", range(3))
def test_bulyan_matches_brute_force(n: int, f: int, seed: int) -> None:
    x = _data(seed + 20, n)
    res = rules.bulyan(torch.from_numpy(x), f=f)
    order, expected = _brute_bulyan(x, f)
    assert res.info["selection_order"].tolist() == order
    assert res.kept.tolist() == sorted(order)
    np.testing.assert_allclose(res.update.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_krum_tie_is_broken_independently_of_client_order() -> None:
    """With n - f - 2 = 1 the score is the nearest distance, so the closest pair ties
    exactly; the total distance to all others decides (here client 1, nearer to 2)."""
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    for perm in itertools.permutations(range(3)):
        p = torch.tensor(perm)
        res = rules.krum(x[p], f=0)
        assert int(p[res.kept[0]]) == 1


# --- numpy / scipy -----------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10])
def test_median_matches_numpy_including_even_n(n: int) -> None:
    x = _data(n, n, d=6)
    np.testing.assert_array_equal(rules.median(torch.from_numpy(x)).update.numpy(),
                                  np.median(x, axis=0))
    if n % 2 == 0:  # torch.median returns the lower middle value, numpy their average
        lower = torch.from_numpy(x).median(dim=0).values.numpy()
        assert not np.allclose(lower, np.median(x, axis=0))


@pytest.mark.parametrize(("n", "f"), [(4, 1), (7, 2), (10, 3), (10, 0), (21, 5)])
def test_trimmed_mean_matches_scipy(n: int, f: int) -> None:
    """scipy trims ``int(proportiontocut * n)`` per side; ``(f + 0.5) / n`` makes that f
    exactly without depending on how ``f / n * n`` rounds."""
    x = _data(100 + n, n, d=6)
    expected = scipy.stats.trim_mean(x, (f + 0.5) / n, axis=0)
    np.testing.assert_allclose(rules.trimmed_mean(torch.from_numpy(x), f=f).update.numpy(),
                               expected, rtol=1e-12, atol=1e-15)


# --- Flower 1.41 ---------------------------------------------------------------------------

def _contents(x: np.ndarray, counts: np.ndarray) -> list[object]:
    return [
        flwr_app.RecordDict({
            "arrays": flwr_app.ArrayRecord([x[i].copy()]),
            "metrics": flwr_app.MetricRecord({"num-examples": int(counts[i])}),
        })
        for i in range(x.shape[0])
    ]


@pytest.mark.parametrize(("n", "f"), [s for s in SIZES if s[0] - s[1] - 2 > 1])
@pytest.mark.parametrize("seed", range(2))
def test_multi_krum_agrees_with_flower(n: int, f: int, seed: int) -> None:
    """Flower's ``select_multikrum`` uses the same score (its ``max(1, n - f - 2)`` clamp
    never bites when n >= 2f + 3) and averages the selection weighted by ``num-examples``:
    that is our ``multi_krum`` with ``use_weights=True`` and example counts as weights.
    Sizes with n - f - 2 = 1 are left out: there the closest pair ties exactly, Flower
    takes the lower position, we take the one nearer to everyone else."""
    x = _data(seed + 200, n)
    counts = np.arange(1, n + 1) * 10
    contents = _contents(x, counts)
    for m in sorted({1, n - f}):
        selected = flwr_multikrum.select_multikrum(contents, num_malicious_nodes=f,
                                                   num_nodes_to_select=m)
        flower_idx = sorted(next(i for i, c in enumerate(contents) if c is s) for s in selected)
        flower_avg = flwr_utils.aggregate_arrayrecords(selected, "num-examples")
        ours = aggregation.get("multi_krum", f=f, m=m, use_weights=True)(
            torch.from_numpy(x), torch.from_numpy(counts.astype(np.float64)))
        assert ours.kept.tolist() == flower_idx
        np.testing.assert_allclose(ours.update.numpy(), flower_avg.to_numpy_ndarrays()[0],
                                   rtol=1e-10)
        if m == 1:
            np.testing.assert_array_equal(rules.krum(torch.from_numpy(x), f=f).update.numpy(),
                                          x[flower_idx[0]])


@pytest.mark.parametrize(("n", "f"), [(4, 1), (7, 2), (10, 3), (10, 0)])
def test_trimmed_mean_agrees_with_flower(n: int, f: int) -> None:
    """Flower's ``trim_mean(array, beta)`` trims ``int(beta * n)`` per side (so at small n
    it silently trims nothing); with ``beta = (f + 0.5) / n`` it trims our f."""
    x = _data(300 + n, n)
    np.testing.assert_allclose(rules.trimmed_mean(torch.from_numpy(x), f=f).update.numpy(),
                               flwr_trimmed.trim_mean(x, (f + 0.5) / n), rtol=1e-12)


def test_median_agrees_with_flower_definition() -> None:
    """Flower's FedMedian has no helper: it applies ``np.median(np.stack(layers), axis=0)``
    per layer, which is what this computes on a flat layer."""
    x = _data(400, 8)
    np.testing.assert_array_equal(rules.median(torch.from_numpy(x)).update.numpy(),
                                  np.asarray(np.median(np.stack(list(x)), axis=0)))


@pytest.mark.parametrize(("n", "f"), [(7, 1), (8, 1), (11, 2), (15, 3)])
@pytest.mark.parametrize("seed", range(2))
def test_bulyan_coordinate_phase_agrees_with_flower(n: int, f: int, seed: int) -> None:
    """Flower's Bulyan picks its theta = n - 2f updates *once* by Multi-Krum score; the
    paper (and we) pick them iteratively, re-running Krum on what remains, so the selected
    sets can differ. The second phase coincides: Flower's ``aggregate_n_closest_weights``
    applied to our selected set, with the median as reference, gives our update. The first
    pick is Krum's choice in both."""
    x = _data(seed + 500, n)
    res = rules.bulyan(torch.from_numpy(x), f=f)
    chosen = res.info["selection_order"].tolist()
    selected = [[x[i]] for i in chosen]
    ref = [np.median(np.stack([s[0] for s in selected]), axis=0)]
    flower = flwr_bulyan.aggregate_n_closest_weights(ref, selected, n - 4 * f)
    np.testing.assert_allclose(res.update.numpy(), flower[0], rtol=1e-12, atol=1e-15)
    contents = _contents(x, np.ones(n))
    flower_first = flwr_multikrum.select_multikrum(contents, f, 1)[0]
    assert next(i for i, c in enumerate(contents) if c is flower_first) == chosen[0]


def test_bulyan_with_f_zero_is_the_mean_like_flower() -> None:
    """With f = 0 both definitions select all n and average all n (beta = n)."""
    x = _data(600, 6)
    selected = [[row] for row in x]
    flower = flwr_bulyan.aggregate_n_closest_weights([np.median(x, axis=0)], selected, 6)
    np.testing.assert_allclose(rules.bulyan(torch.from_numpy(x), f=0).update.numpy(), flower[0],
                               rtol=1e-12)
    np.testing.assert_allclose(flower[0], x.mean(axis=0), rtol=1e-12)


# --- precision: updates versus full weights ----------------------------------------------

def test_krum_is_exact_on_small_updates_where_flower_full_weight_distances_fail() -> None:
    """Honest updates are 1e-5 * noise, one client 1e-5 * 6 away; the model weights are of
    scale 1. Flower's ``|x|^2 + |y|^2 - 2xy`` on full float32 weights loses every digit of
    the distances (negative values, errors far beyond the distances themselves). Our Krum
    on float32 *updates* picks exactly the client the float64 brute force picks, and scores
    match to float32 precision; on full float32 weights it still picks right, thanks to
    median-centring (only the rounding of the stored weights remains)."""
    n, f, d = 9, 2, 2000
    g = gen(700)
    base = torch.randn(d, generator=g, dtype=torch.float64)  # model weights, scale 1
    updates = 1e-5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    updates[3] += 1e-5 * 6.0  # a far-away client, still at the 1e-5 scale
    truth = _brute_krum_order(updates.numpy(), list(range(n)), f)[0]

    ours = rules.krum(updates.float(), f=f)
    assert ours.kept.tolist() == [truth]
    true_d = np.array([[_sq(a, b) for b in updates.numpy()] for a in updates.numpy()])
    true_scores = np.sort(true_d + np.diag([math.inf] * n), axis=1)[:, :n - f - 2].sum(axis=1)
    np.testing.assert_allclose(ours.info["scores"].double().numpy(), true_scores, rtol=1e-5)
    assert 3 not in rules.multi_krum(updates.float(), f=f).kept.tolist()

    weights32 = (base + updates).float().numpy()
    records = [flwr_app.ArrayRecord([row]) for row in weights32]
    flower_d = flwr_multikrum.compute_distances(records)
    off = ~np.eye(n, dtype=bool)
    assert flower_d[off].min() < 0 or np.abs(flower_d - true_d)[off].max() > true_d[off].max()
    assert np.abs(flower_d - true_d)[off].max() > 10 * true_d[off].max()

    on_weights = rules.krum(torch.from_numpy(weights32), f=f)
    assert on_weights.kept.tolist() == [truth]


def test_krum_keeps_its_precision_when_the_centring_rows_hold_every_byzantine() -> None:
    """Distances are centred on the median of the first 2f + 1 rows. Put the f Byzantine
    updates first, 1e3 away from honest updates of scale 1e-5, all on full float32 weights
    of scale 1: at most f of those 2f + 1 rows are Byzantine, so the centre stays among the
    honest updates and Krum still picks the client the float64 brute force picks (a centre
    on a Byzantine row loses every digit of the honest distances)."""
    n, f, d = 11, 3, 3000
    g = gen(701)
    base = torch.randn(d, generator=g, dtype=torch.float64)
    updates = 1e-5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    updates[:f] += 1e3
    updates[f + 2] += 1e-5 * 4.0
    truth = _brute_krum_order(updates.numpy(), list(range(n)), f)[0]
    weights32 = (base + updates).float()
    assert rules.krum(weights32, f=f).kept.tolist() == [truth]
    assert rules.krum(updates.float(), f=f).kept.tolist() == [truth]
    kept = rules.multi_krum(weights32, f=f, m=n - f - 1).kept.tolist()
    assert set(kept).isdisjoint(range(f)) and f + 2 not in kept


# --- the previous implementation (one sort per column, one (n, d) centred copy) ----------
# The column kernels change the order of floating-point sums (trimmed mean, Bulyan's
# coordinate phase, Multi-Krum's average, the Gram matrix accumulated over chunks, the
# centre of the distances); selections and medians are unchanged. Tolerances: a sum of
# m terms of the convex weights 1/m may differ by at most 2 m eps max|x| per coordinate;
# distances by 1e-5 (float32) / 1e-12 (float64) of the largest distance.

def _old_median(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    lower = x.median(dim=0).values
    return lower if n % 2 == 1 else lower / 2 + x.kthvalue(n // 2 + 1, dim=0).values / 2


def _old_distances(x: torch.Tensor) -> torch.Tensor:
    c = x - x.median(dim=0).values
    gram = c @ c.T
    sq = gram.diagonal()
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    dist = 0.5 * (dist + dist.T)
    dist.fill_diagonal_(0.0)
    return dist.clamp_(min=0.0)


def _old_bulyan(x: torch.Tensor, f: int) -> tuple[list[int], torch.Tensor]:
    from aggregation._checks import krum_scores, lex_order

    n = x.shape[0]
    theta, beta = n - 2 * f, n - 4 * f
    dist = _old_distances(x)
    remaining = torch.ones(n, dtype=torch.bool)
    order: list[int] = []
    for t in range(theta):
        gone = ~remaining
        scores = krum_scores(dist.masked_fill(gone[None, :], math.inf), max(n - t - f - 2, f))
        totals = dist.masked_fill(gone[None, :], 0.0).sum(dim=1)
        pick = int(lex_order(scores.masked_fill(gone, math.inf),
                             totals.masked_fill(gone, math.inf))[0])
        remaining[pick] = False
        order.append(pick)
    selected = x[order]
    closest = (selected - _old_median(selected)).abs().topk(beta, dim=0, largest=False).indices
    return order, x.new_full((beta,), 1.0 / beta) @ selected.gather(0, closest)


def _sum_bound(x: torch.Tensor, m: int) -> torch.Tensor:
    return 2 * m * torch.finfo(x.dtype).eps * x.abs().amax(dim=0)


def _cases_vs_old() -> list[tuple[int, int, torch.dtype]]:
    return [(n, d, dt) for n, d in [(7, 50), (16, 400), (31, 1000), (60, 3000)]
            for dt in (torch.float32, torch.float64)]


@pytest.mark.parametrize(("n", "d", "dtype"), _cases_vs_old())
def test_column_kernels_match_the_previous_implementation(n: int, d: int,
                                                          dtype: torch.dtype) -> None:
    x = torch.randn(n, d, generator=gen(800 + n), dtype=torch.float64).to(dtype)
    x[: n // 8] += 4.0  # a few outliers, so trimming and selection matter
    f = max(1, (n - 3) // 4)
    assert torch.equal(rules.median(x).update, _old_median(x))
    old_trimmed = x.new_full((n - 2 * f,), 1.0 / (n - 2 * f)) @ x.sort(dim=0).values[f:n - f]
    new_trimmed = rules.trimmed_mean(x, f=f).update
    assert bool(((new_trimmed - old_trimmed).abs() <= _sum_bound(x, n - 2 * f)).all())

    exact = torch.cdist(x.double(), x.double()) ** 2
    scale = float(exact.max())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for dist in (_old_distances(x), _checks.pairwise_sq_distances(x, f),
                 _checks.pairwise_sq_distances(x)):
        assert float((dist.double() - exact).abs().max()) <= tol * scale

    k = n - f - 2
    old_scores = _old_distances(x).masked_fill(torch.eye(n, dtype=torch.bool), math.inf)
    old_scores = old_scores.topk(k, dim=1, largest=False).values.sum(dim=1)
    new = rules.multi_krum(x, f=f)
    torch.testing.assert_close(new.info["scores"], old_scores, rtol=100 * tol, atol=0.0)
    old_chosen = sorted(old_scores.argsort()[: n - f].tolist())
    assert new.kept.tolist() == old_chosen
    old_mean = x[old_chosen].mean(dim=0)
    assert bool(((new.update - old_mean).abs() <= _sum_bound(x, n - f)).all())
    assert rules.krum(x, f=f).kept.tolist() == [int(old_scores.argmin())]

    if n >= 4 * f + 3:
        order, old_update = _old_bulyan(x, f)
        res = rules.bulyan(x, f=f)
        assert res.info["selection_order"].tolist() == order
        assert bool(((res.update - old_update).abs() <= _sum_bound(x, n - 4 * f)).all())


# --- aggregation in the updates' own dtype --------------------------------------------------

@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean", "krum", "multi_krum",
                                  "bulyan"])
@pytest.mark.parametrize("scale", [1e-5, 1.0])
def test_float32_updates_aggregate_in_float32_as_well_as_in_float64(rule: str,
                                                                    scale: float) -> None:
    """The rules compute in the updates' dtype: on float32 updates (of scale 1e-5, as after
    a round of local SGD, or 1) the float32 result equals the float64 aggregate of the very
    same values to float32 rounding (2 n eps max|x| per coordinate) and keeps the same
    clients, so converting float32 updates to float64 first buys nothing."""
    n, f, d = 31, 4, 20_000
    x64 = scale * torch.randn(n, d, generator=gen(900), dtype=torch.float64)
    x64[:f] += 20 * scale
    x32 = x64.float()
    params: dict[str, int] = {} if rule in ("mean", "median") else {"f": f}
    r32 = aggregation.get(rule, **params)(x32)
    r64 = aggregation.get(rule, **params)(x32.double())
    assert r32.update.dtype == torch.float32
    assert torch.equal(r32.kept, r64.kept)
    error = (r32.update.double() - r64.update).abs()
    assert bool((error <= _sum_bound(x32, n).double()).all())
