"""Identities of the individual rules, pre-aggregation steps and their composition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import aggregation
from aggregation import _checks, pre, rules

from ._cases import gen, sample

F64 = torch.float64


# --- mean ----------------------------------------------------------------------------------

def test_weighted_mean_matches_numpy_and_weight_duplication() -> None:
    x, w = sample(0, n=6, d=4)
    res = rules.mean(x, w)
    np.testing.assert_allclose(res.update.numpy(), np.average(x.numpy(), axis=0,
                                                              weights=w.numpy()), rtol=1e-12)
    torch.testing.assert_close(res.info["weights"].sum(), torch.tensor(1.0, dtype=F64))
    # integer weight k is the same as k copies of the update
    counts = torch.tensor([1.0, 3.0, 2.0, 1.0, 1.0, 4.0], dtype=F64)
    copies = x.repeat_interleave(counts.long(), dim=0)
    torch.testing.assert_close(rules.mean(x, counts).update, copies.mean(dim=0))


def test_max_weight_ratio_caps_a_forged_example_count() -> None:
    """One client claims 1e9 examples; capped at r x median it gets r / (n - 1 + r)."""
    n, r = 10, 3.0
    x = torch.zeros(n, 2, dtype=F64)
    x[0] = 1000.0
    w = torch.full((n,), 50.0, dtype=F64)
    w[0] = 1e9
    uncapped = rules.mean(x, w)
    capped = rules.mean(x, w, max_weight_ratio=r)
    assert float(uncapped.update[0]) > 999.0
    share = r / (n - 1 + r)
    torch.testing.assert_close(capped.update, torch.full((2,), 1000.0 * share, dtype=F64))
    torch.testing.assert_close(capped.info["weights"][0], torch.tensor(share, dtype=F64))
    # honest weights below the cap are untouched: capped mean of the rest is unchanged
    torch.testing.assert_close(rules.mean(x[1:], w[1:], max_weight_ratio=r).update,
                               rules.mean(x[1:], w[1:]).update)


def test_mean_kept_skips_zero_weights_and_use_weights_false_ignores_them() -> None:
    x, _ = sample(1, n=5, d=3)
    w = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0], dtype=F64)
    assert rules.mean(x, w).kept.tolist() == [0, 2, 4]
    unweighted = aggregation.get("mean", use_weights=False)(x, w)
    torch.testing.assert_close(unweighted.update, x.mean(dim=0))
    assert unweighted.kept.tolist() == [0, 1, 2, 3, 4]


# --- krum family ---------------------------------------------------------------------------

def test_krum_returns_a_copy() -> None:
    x, _ = sample(2, n=7, d=3)
    before = x.clone()
    res = rules.krum(x, f=1)
    res.update.add_(1.0)
    assert torch.equal(x, before)


def test_multi_krum_with_m_one_is_krum_and_m_n_minus_f_drops_the_outliers() -> None:
    x, _ = sample(3, n=9, d=4)
    x[[2, 6]] += 50.0
    k = rules.krum(x, f=2)
    mk1 = rules.multi_krum(x, f=2, m=1)
    assert torch.equal(k.update, mk1.update) and torch.equal(k.kept, mk1.kept)
    mk = rules.multi_krum(x, f=2)
    assert mk.kept.tolist() == [0, 1, 3, 4, 5, 7, 8]
    torch.testing.assert_close(mk.update, x[mk.kept].mean(dim=0))


def test_bulyan_rejects_the_outliers_and_averages_n_minus_4f_per_coordinate() -> None:
    x, _ = sample(4, n=11, d=5)
    x[[0, 5]] = 1e6
    res = rules.bulyan(x, f=2)
    assert 0 not in res.kept.tolist() and 5 not in res.kept.tolist()
    assert res.kept.numel() == 11 - 4 and res.info["selection_order"].numel() == 7
    honest = x[[i for i in range(11) if i not in (0, 5)]]
    assert bool((res.update.abs() <= honest.abs().max(dim=0).values).all())


# --- geometric median ----------------------------------------------------------------------

def _objective(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor | None = None) -> float:
    dist = torch.linalg.vector_norm(x - z, dim=1)
    return float(dist.mean() if w is None else (w * dist).sum() / w.sum())


def test_geometric_median_is_the_median_in_one_dimension() -> None:
    x = torch.tensor([[0.0], [1.0], [2.5], [3.0], [100.0]], dtype=F64)
    res = rules.geometric_median(x, nu=1e-12, iters=1000, tol=1e-14)
    torch.testing.assert_close(res.update, torch.tensor([2.5], dtype=F64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_geometric_median_minimises_the_sum_of_distances(weighted: bool) -> None:
    x, w = sample(5, n=9, d=3)
    x[0] = 1e4  # an outlier, which the geometric median resists
    weights = w if weighted else None
    res = rules.geometric_median(x, weights, iters=500, tol=1e-12)
    z = res.update
    best = _objective(x, z, weights)
    step = torch.randn(50, 3, generator=gen(6), dtype=F64) * 1e-3
    assert all(best <= _objective(x, z + s, weights) + 1e-12 for s in step)
    assert all(best <= _objective(x, xi, weights) for xi in x)
    assert int(res.info["iterations"]) < 500
    assert float(res.info["weights"][0]) < 1e-3 * float(res.info["weights"][1:].min())
    assert float(torch.linalg.vector_norm(z)) < 3.0


def test_geometric_median_weights_equal_duplication() -> None:
    x, _ = sample(7, n=5, d=3)
    counts = torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0], dtype=F64)
    a = rules.geometric_median(x, counts, iters=1000, tol=1e-13).update
    b = rules.geometric_median(x.repeat_interleave(counts.long(), dim=0), iters=1000,
                               tol=1e-13).update
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


# --- centered clipping ---------------------------------------------------------------------

def test_centered_clipping_with_a_large_radius_is_the_mean() -> None:
    x, w = sample(8, n=6, d=4)
    centre = torch.zeros(4, dtype=F64)
    torch.testing.assert_close(rules.centered_clipping(x, center=centre, tau=1e6).update,
                               x.mean(dim=0))
    torch.testing.assert_close(rules.centered_clipping(x, w, center=centre, tau=1e6).update,
                               rules.mean(x, w).update)


def test_centered_clipping_two_rounds_equal_two_iterations() -> None:
    """The state is exactly the centre: round 2 from round 1's state is iteration 2."""
    x, _ = sample(9, n=6, d=4)
    agg1 = aggregation.get("centered_clipping", tau=0.3)
    first = agg1(x)
    second = agg1(x, state=first.state)
    both = aggregation.get("centered_clipping", tau=0.3, iters=2)(x)
    torch.testing.assert_close(second.update, both.update)
    assert isinstance(first.state, torch.Tensor) and first.state is not first.update


def test_centered_clipping_is_translation_equivariant_with_its_state() -> None:
    x, _ = sample(10, n=6, d=4)
    shift = torch.randn(4, generator=gen(11), dtype=F64) * 5
    centre = torch.randn(4, generator=gen(12), dtype=F64)
    base = rules.centered_clipping(x, center=centre, tau=0.5, iters=3)
    moved = rules.centered_clipping(x + shift, center=centre + shift, tau=0.5, iters=3)
    torch.testing.assert_close(moved.update, base.update + shift)
    not_moved = rules.centered_clipping(x + shift, center=centre, tau=0.5, iters=3)
    assert not torch.allclose(not_moved.update, base.update + shift)


def test_centered_clipping_each_step_moves_at_most_tau() -> None:
    x, _ = sample(13, n=6, d=4)
    x[2] = 1e9
    centre = torch.zeros(4, dtype=F64)
    res = rules.centered_clipping(x, center=centre, tau=0.25)
    assert float(torch.linalg.vector_norm(res.update - centre)) <= 0.25 + 1e-12
    assert float(res.info["clip_scales"][2]) < 1e-9
    # identical inputs are reached after enough iterations (ceil(|x| / tau) steps)
    same = x[:1].expand(5, 4).clone()
    same[:] = torch.tensor([0.3, -0.4, 0.0, 0.0], dtype=F64)  # norm 0.5
    far = rules.centered_clipping(same, center=centre, tau=0.25, iters=2)
    torch.testing.assert_close(far.update, same[0])


# --- pre-aggregation steps -----------------------------------------------------------------

def test_norm_clip_bounds_norms_and_keeps_directions() -> None:
    x, w = sample(14, n=8, d=5)
    x[3] *= 100
    res = pre.norm_clip(x, w, max_norm=2.0)
    norms = torch.linalg.vector_norm(res.updates, dim=1)
    assert bool((norms <= 2.0 + 1e-12).all())
    small = torch.linalg.vector_norm(x, dim=1) <= 2.0
    assert torch.equal(res.updates[small], x[small])
    cos = torch.nn.functional.cosine_similarity(res.updates, x, dim=1)
    torch.testing.assert_close(cos, torch.ones(8, dtype=F64))
    assert res.weights is w and torch.equal(res.members, torch.eye(8, dtype=torch.bool))


@pytest.mark.parametrize(("n", "s"), [(10, 2), (11, 3), (5, 1), (4, 9)])
def test_bucketing_partitions_the_clients(n: int, s: int) -> None:
    x, w = sample(15, n=n, d=3)
    res = pre.bucketing(x, w, s=s, generator=gen(16))
    rows = math.ceil(n / s)
    assert res.updates.shape == (rows, 3) and res.members.shape == (rows, n)
    assert torch.equal(res.members.sum(dim=0), torch.ones(n, dtype=torch.long))
    assert res.weights is not None
    torch.testing.assert_close(res.weights, res.members.to(F64) @ w)
    for j in range(rows):
        idx = res.members[j].nonzero().flatten()
        torch.testing.assert_close(res.updates[j], rules.mean(x[idx], w[idx]).update)
    plain = pre.bucketing(x, None, s=s, generator=gen(16))
    assert torch.equal(plain.members, res.members)
    assert plain.weights is not None
    torch.testing.assert_close(plain.weights, res.members.sum(dim=1).to(F64))


@pytest.mark.parametrize("weighted", [False, True])
def test_mean_after_bucketing_is_the_mean(weighted: bool) -> None:
    """Bucket means weighted by bucket weight sums recompose the overall (weighted) mean."""
    x, w = sample(17, n=13, d=4)
    weights = w if weighted else None
    agg = aggregation.compose(aggregation.get("mean"), [aggregation.get_pre("bucketing", s=3)])
    res = agg(x, weights, generator=gen(18))
    torch.testing.assert_close(res.update, rules.mean(x, weights).update)
    assert res.kept.tolist() == list(range(13))


def test_bucketing_zero_weight_bucket_gets_plain_mean_and_zero_weight() -> None:
    x, _ = sample(19, n=4, d=2)
    w = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=F64)
    res = pre.bucketing(x, w, s=2, generator=gen(20))
    assert res.weights is not None
    for j in range(2):
        idx = res.members[j].nonzero().flatten()
        if float(w[idx].sum()) == 0.0:
            torch.testing.assert_close(res.updates[j], x[idx].mean(dim=0))
            assert float(res.weights[j]) == 0.0


def test_bucketing_permutation_is_uniform_over_seeds() -> None:
    """P(two given clients share a bucket) = (s - 1) / (n - 1) for a uniform permutation."""
    n, s, draws = 10, 2, 3000
    x = torch.zeros(n, 1)
    together = sum(
        bool(pre.bucketing(x, s=s, generator=gen(seed)).members[:, [0, 1]].all(dim=1).any())
        for seed in range(draws)
    )
    p = (s - 1) / (n - 1)
    assert abs(together / draws - p) < 4 * math.sqrt(p * (1 - p) / draws)


def test_bucketing_with_one_per_bucket_only_permutes() -> None:
    x, _ = sample(21, n=6, d=2)
    res = pre.bucketing(x, s=1, generator=gen(22))
    order = res.members.float().argmax(dim=1)
    assert torch.equal(res.updates, x[order])
    assert sorted(order.tolist()) == list(range(6))


def _brute_nnm(x: torch.Tensor, f: int) -> torch.Tensor:
    n = x.shape[0]
    out = torch.empty_like(x)
    for i in range(n):
        others = sorted((float(torch.sum((x[i] - x[j]) ** 2)), j) for j in range(n) if j != i)
        idx = [i] + [j for _, j in others[:n - f - 1]]
        out[i] = x[idx].mean(dim=0)
    return out


@pytest.mark.parametrize(("n", "f"), [(5, 0), (7, 2), (10, 4)])
def test_nnm_matches_brute_force(n: int, f: int) -> None:
    x, w = sample(23 + n, n=n, d=3)
    res = pre.nnm(x, w, f=f)
    torch.testing.assert_close(res.updates, _brute_nnm(x, f))
    assert res.weights is w and torch.equal(res.members, torch.eye(n, dtype=torch.bool))
    if f == 0:
        torch.testing.assert_close(res.updates, x.mean(dim=0).expand(n, 3))


# --- composition ---------------------------------------------------------------------------

def test_compose_maps_kept_back_to_original_clients() -> None:
    x, _ = sample(30, n=14, d=3)
    agg = aggregation.compose(aggregation.get("krum", f=1),
                              [aggregation.get_pre("bucketing", s=2)])
    res = agg(x, generator=gen(31))
    buckets = pre.bucketing(x, s=2, generator=gen(31))
    chosen = rules.krum(buckets.updates, f=1)
    assert res.kept.tolist() == buckets.members[chosen.kept[0]].nonzero().flatten().tolist()
    torch.testing.assert_close(res.update, chosen.update)
    assert torch.equal(res.info["members"], buckets.members)
    torch.testing.assert_close(res.info["scores"], chosen.info["scores"])
    assert agg.name == "krum+bucketing"


def test_nested_composition_equals_the_flat_one() -> None:
    x, w = sample(32, n=16, d=3)
    rule = aggregation.get("multi_krum", f=1)
    bucket, mix = aggregation.get_pre("bucketing", s=2), aggregation.get_pre("nnm", f=1)
    flat = aggregation.compose(rule, [bucket, mix])(x, w, generator=gen(33))
    nested = aggregation.compose(aggregation.compose(rule, [mix]), [bucket])(
        x, w, generator=gen(33))
    torch.testing.assert_close(flat.update, nested.update)
    assert torch.equal(flat.kept, nested.kept)


def test_compose_with_no_steps_is_the_rule_and_state_passes_through() -> None:
    rule = aggregation.get("centered_clipping", tau=0.5)
    assert aggregation.compose(rule, []) is rule
    agg = aggregation.compose(rule, [aggregation.get_pre("norm_clip", max_norm=1.0)])
    assert agg.stateful
    x, _ = sample(34, n=5, d=3)
    centre = torch.ones(3, dtype=F64)
    res = agg(x, state=centre)
    expected = rules.centered_clipping(pre.norm_clip(x, max_norm=1.0).updates, center=centre,
                                       tau=0.5)
    torch.testing.assert_close(res.update, expected.update)
    assert isinstance(res.state, torch.Tensor)
    torch.testing.assert_close(res.state, expected.update)


# --- kernels: sorted columns and one validation per call -----------------------------------

@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few columns, so small inputs run through many blocks and pieces, and
    in worker threads however small they are."""
    monkeypatch.setattr(_checks, "_SORT_ELEMENTS", 64)
    monkeypatch.setattr(_checks, "_MAP_ELEMENTS", 256)
    monkeypatch.setattr(_checks, "_THREADED_ELEMENTS", 0)


@pytest.mark.parametrize("n", range(1, 17))
def test_sorting_network_sorts_every_zero_one_input(n: int) -> None:
    """The 0-1 principle: a comparator network that sorts all 2^n inputs of zeros and ones
    sorts every input."""
    bits = (torch.arange(2 ** n)[:, None] >> torch.arange(n)) & 1  # (2^n, n)
    wires = bits.clone()
    for lo, hi in _checks.sorting_network(n):
        a, b = wires[:, lo].clone(), wires[:, hi].clone()
        wires[:, lo], wires[:, hi] = torch.minimum(a, b), torch.maximum(a, b)
    assert torch.equal(wires, bits.sort(dim=1).values)
    assert all(0 <= lo < hi < n for lo, hi in _checks.sorting_network(n))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 24, 25, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.usefixtures("small_blocks")
def test_sorted_column_map_hands_fn_every_column_sorted(n: int, dtype: torch.dtype,
                                                        threads: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path (sorting network for n <= 24, numpy sort beyond, torch.sort for
    bfloat16), in one or two threads, across many blocks: fn sees each column's values
    sorted, and its outputs land on the right columns. Values are rounded so ties occur."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x = (3 * torch.randn(n, 301, generator=gen(n), dtype=F64)).round().to(dtype)
    blocks: list[torch.Tensor] = []

    def keep(s: torch.Tensor) -> torch.Tensor:
        blocks.append(s.clone())
        return s[:, -1]

    out = _checks.sorted_column_map(x, keep)
    expected = x.T.sort(dim=1).values  # (d, n)
    assert torch.equal(torch.cat(blocks), expected)
    assert torch.equal(out, expected[:, -1]) and out.dtype == dtype
    rows = torch.tensor([i for i in range(n) if i % 3 != 1] or [0])
    blocks.clear()
    _checks.sorted_column_map(x, keep, rows=rows)
    assert torch.equal(torch.cat(blocks), x[rows].T.sort(dim=1).values)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("n", [1, 2, 5, 6, 30, 31])
def test_median_and_bulyan_window_on_many_blocks(n: int) -> None:
    """The column kernels on inputs spanning many blocks give what torch's own
    reductions give: the median exactly, Bulyan's coordinate phase to rounding."""
    x = torch.randn(n, 257, generator=gen(40 + n), dtype=F64)
    lower = x.median(dim=0).values
    expected = lower if n % 2 else lower / 2 + x.kthvalue(n // 2 + 1, dim=0).values / 2
    assert torch.equal(rules.median(x).update, expected)
    beta = n - 2 if n > 2 else n  # (n = 2, one kept, would be a tie by construction)
    closest = (x - expected).abs().topk(beta, dim=0, largest=False).indices
    p = x.new_full((beta,), 1.0 / beta)
    window = _checks.sorted_column_map(x, lambda s: rules._closest_to_median_mean(s, beta, p))
    torch.testing.assert_close(window, x.gather(0, closest).mean(dim=0), rtol=1e-12,
                               atol=1e-14)


def test_bulyan_window_keeps_the_lower_of_two_equally_far_values() -> None:
    """Values -1, 0, 1 around the median 0, two kept: both -1 and 1 are 1 away; the lower
    is kept (as the brute-force reference does), deterministically."""
    s = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 1.0], [-1.0, 0.0, 2.0]])
    p = s.new_full((2,), 0.5)
    assert rules._closest_to_median_mean(s, 2, p).tolist() == [-0.5, 0.5, -0.5]


def test_each_input_is_validated_once_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule object validates and its function does not check the same tensors again;
    a composition validates its input once and the rule its step's output once."""
    seen: list[str] = []
    validate = _checks._validate

    def counting(rule: str, updates: object, weights: object | None) -> object:
        seen.append(rule)
        return validate(rule, updates, weights)

    monkeypatch.setattr(_checks, "_validate", counting)
    x, w = sample(50)
    for name, params in [("krum", {"f": 1}), ("multi_krum", {"f": 1, "use_weights": True}),
                         ("median", {}), ("trimmed_mean", {"f": 2}), ("bulyan", {"f": 1})]:
        seen.clear()
        aggregation.get(name, **params)(x, w)
        assert seen == [name]
    seen.clear()
    clipped_krum = aggregation.compose(aggregation.get("krum", f=1),
                                       [aggregation.get_pre("norm_clip", max_norm=1.0)])
    clipped_krum(x, w)
    assert seen == ["krum+norm_clip", "krum"]
    seen.clear()
    rules.krum(x, f=1)  # called directly, the function checks its input itself
    assert seen == ["krum"]


def test_inputs_already_checked_are_only_the_same_tensors() -> None:
    x, w = sample(51)
    bad = x.clone()
    bad[2, 1] = math.nan
    with _checks.checked(x, w):
        assert _checks.check_inputs("r", x, w)[0] is x
        assert _checks.check_inputs("r", x, None)[1] is None
        with pytest.raises(ValueError, match="NaN or Inf in rows \\[2\\]"):
            _checks.check_inputs("r", bad, w)
        with pytest.raises(ValueError, match="negative"):
            _checks.check_inputs("r", x, -w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rules.median(bad)
