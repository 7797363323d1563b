"""Every path of the column and distance kernels against a plain torch reference.

The kernels (:mod:`aggregation._checks`) pick a path by speed alone: a sorting network
(pruned to the ranks a rule reads) for ``n <= 24`` rows, numpy's sort of transposed pieces
beyond, one thread or several, one block or many; the Gram matrix by numpy's ``syrk`` in
column groups on CPU, by torch's GEMM elsewhere. Whatever the path, the result must be what
``torch.median`` / a full sort / a float64 brute force give.
"""

from __future__ import annotations

import math

import pytest
import torch

from aggregation import _checks, rules

from ._cases import gen

NS = [1, 2, 3, 5, 17, 100]
DTYPES = [torch.float32, torch.float64]
# (label, blocks of a few columns, number of threads)
PATHS = [("one block, one thread", False, 1), ("many blocks, two threads", True, 2),
         ("many blocks, three threads", True, 3)]


@pytest.fixture(params=PATHS, ids=[p[0] for p in PATHS])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    label, small, threads = request.param
    if small:  # pieces of a few columns, and threads however small the input is
        monkeypatch.setattr(_checks, "_SORT_ELEMENTS", 64)
        monkeypatch.setattr(_checks, "_MAP_ELEMENTS", 256)
        monkeypatch.setattr(_checks, "_GRAM_PIECE_ELEMENTS", 300)
    monkeypatch.setattr(_checks, "_THREADED_ELEMENTS", 0 if threads > 1 else 1 << 62)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    return str(label)


def _updates(n: int, dtype: torch.dtype, seed: int, d: int = 203) -> torch.Tensor:
    """``(n, d)`` values rounded to halves, so most columns hold ties."""
    x = (2 * torch.randn(n, d, generator=gen(seed), dtype=torch.float64)).round() / 2
    return x.to(dtype)


def _reference_median(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    lower = torch.median(x, dim=0).values
    if n % 2 == 1:
        return lower
    return lower / 2 + x.kthvalue(n // 2 + 1, dim=0).values / 2


def _sum_bound(x: torch.Tensor, m: int) -> torch.Tensor:
    """Largest difference two summation orders of ``m`` convex terms can give."""
    return 2 * m * torch.finfo(x.dtype).eps * x.abs().amax(dim=0)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_median_equals_torch_median(n: int, dtype: torch.dtype, path: str) -> None:
    x = _updates(n, dtype, seed=n)
    out = rules.median(x).update
    assert out.dtype == dtype
    assert torch.equal(out, _reference_median(x))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_trimmed_mean_equals_the_mean_of_the_sorted_middle(n: int, dtype: torch.dtype,
                                                           path: str) -> None:
    x = _updates(n, dtype, seed=100 + n)
    for f in sorted({0, (n - 1) // 4, (n - 1) // 2}):
        m = n - 2 * f
        expected = x.sort(dim=0).values[f:n - f].double().mean(dim=0)
        out = rules.trimmed_mean(x, f=f).update
        assert out.dtype == dtype
        assert bool(((out.double() - expected).abs() <= _sum_bound(x, m).double()).all()), f


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sorted_column_map_with_ranks_gives_those_ranks(n: int, dtype: torch.dtype,
                                                        path: str) -> None:
    """With ``ranks``, the columns fn reads hold the sorted values, on every path."""
    x = _updates(n, dtype, seed=200 + n)
    ranks = sorted({0, n // 2, n - 1, (n - 1) // 3})
    expected = x.sort(dim=0).values  # (n, d)
    for r in ranks:
        def rank_r(s: torch.Tensor, r: int = r) -> torch.Tensor:
            return s[:, r]

        assert torch.equal(_checks.sorted_column_map(x, rank_r, ranks=ranks), expected[r])


@pytest.mark.parametrize("n", range(1, 13))
def test_selection_network_selects_every_rank_of_every_zero_one_input(n: int) -> None:
    """The 0-1 principle, rank by rank and for the pair a median of even n reads: after
    the pruned network, the wires asked for hold the sorted values."""
    bits = ((torch.arange(2 ** n)[:, None] >> torch.arange(n)) & 1).float()  # (2^n, n)
    expected = bits.sort(dim=1).values
    for ranks in [(r,) for r in range(n)] + [(n // 2 - 1, n // 2)] * (n % 2 == 0):
        wires = bits.clone()
        for lo, hi, only in _checks.selection_network(n, ranks):
            a, b = wires[:, lo].clone(), wires[:, hi].clone()
            if only != 2:
                wires[:, lo] = torch.minimum(a, b)
            if only != 1:
                wires[:, hi] = torch.maximum(a, b)
        assert torch.equal(wires[:, list(ranks)], expected[:, list(ranks)]), ranks
    assert len(_checks.selection_network(21, (10,))) < len(_checks.sorting_network(21))


def test_sorted_column_map_refuses_ranks_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, n\) = \[0, 3\)"):
        _checks.sorted_column_map(torch.zeros(3, 4), lambda s: s[:, 0], ranks=(3,))


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum", "bulyan"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_are_never_reached_with_nan_or_inf(rule: str, bad: float,
                                                   dtype: torch.dtype) -> None:
    x = _updates(17, dtype, seed=300)
    x[5, 7] = bad
    params = {} if rule == "median" else {"f": 2}
    with pytest.raises(ValueError, match=r"NaN or Inf in rows \[5\]"):
        getattr(rules, rule)(x, **params)


# --- the Gram matrix ------------------------------------------------------------------------

@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_distances_match_a_float64_brute_force(n: int, dtype: torch.dtype, path: str) -> None:
    x = torch.randn(n, 503, generator=gen(400 + n), dtype=torch.float64)
    x[: n // 10] += 3.0
    x = x.to(dtype)
    exact = ((x.double()[:, None, :] - x.double()[None, :, :]) ** 2).sum(dim=2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for f in (None, n // 10):
        dist = _checks.pairwise_sq_distances(x, f)
        assert dist.dtype == dtype
        assert torch.equal(dist, dist.T) and bool((dist.diagonal() == 0).all())
        assert float((dist.double() - exact).abs().max()) <= tol * max(float(exact.max()), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_gram_is_the_same_for_any_number_of_threads(dtype: torch.dtype,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Column groups are fixed and summed in order: 1, 2 or 5 threads give the same bits;
    the torch GEMM path (other devices) agrees to rounding."""
    x = torch.randn(23, 4001, generator=gen(500), dtype=torch.float64).to(dtype)
    centre = x.median(dim=0).values
    monkeypatch.setattr(_checks, "_GRAM_PIECE_ELEMENTS", 1000)
    monkeypatch.setattr(_checks, "_THREADED_ELEMENTS", 0)
    grams = []
    for threads in (1, 2, 5):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        grams.append(_checks._centred_gram_cpu(x, centre))
    assert all(torch.equal(grams[0], g) for g in grams[1:])
    assert grams[0].dtype == torch.float64
    c = (x - centre).double()
    exact = c @ c.T
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    assert float((grams[0] - exact).abs().max()) <= tol * float(exact.abs().max())
    by_torch = _checks._centred_gram_chunks(x, centre, dtype)
    assert float((grams[0] - by_torch).abs().max()) <= tol * float(exact.abs().max())


def test_krum_selection_is_the_brute_force_one_at_update_scale_1e_5() -> None:
    """Updates of scale 1e-5 in float32 on every Gram path: Krum picks the client a
    float64 brute force picks."""
    n, f, d = 12, 2, 3001
    x = 1e-5 * torch.randn(n, d, generator=gen(600), dtype=torch.float64)
    x[4] += 1e-5 * 3.0
    exact = ((x[:, None, :] - x[None, :, :]) ** 2).sum(dim=2)
    exact.fill_diagonal_(math.inf)
    truth = int(exact.topk(n - f - 2, dim=1, largest=False).values.sum(dim=1).argmin())
    x32 = x.float()
    assert rules.krum(x32, f=f).kept.tolist() == [truth]
    centre = x32[:2 * f + 1].median(dim=0).values
    for gram in (_checks._centred_gram_cpu(x32, centre),
                 _checks._centred_gram_chunks(x32, centre, torch.float32)):
        sq = gram.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2 * gram).fill_diagonal_(math.inf)
        scores = dist.topk(n - f - 2, dim=1, largest=False).values.sum(dim=1)
        assert int(scores.argmin()) == truth


def test_every_path_is_exercised() -> None:
    """The parameters above reach both the network (n <= 24) and the numpy sort."""
    assert any(n <= _checks._NETWORK_MAX_ROWS for n in NS)
    assert any(n > _checks._NETWORK_MAX_ROWS for n in NS)
