"""Each omniscient attack's defining property, its contract, and its input checks."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from scipy.stats import norm
from torch import Tensor

import aggregation
from aggregation.registry import derive_seed, make_generator
from simulations import attacks as A
from simulations.engine import ENGINE_KEYS

EXPECTED = {
    "alie", "alie_adaptive", "fang_krum", "fang_trimmed_mean", "gaussian_noise", "ipm",
    "ipm_adaptive", "mimic", "min_max", "min_sum", "scaling", "sign_flip_mean",
}
DEFENSE_AWARE = ["alie_adaptive", "fang_krum", "ipm_adaptive"]
RANDOM = {"gaussian_noise", "fang_trimmed_mean"}


def honest_stack(h: int = 10, d: int = 7, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    g = make_generator(seed)
    base = torch.randn(d, generator=g, dtype=torch.float64)
    return (base + 0.5 * torch.randn(h, d, generator=g, dtype=torch.float64)).to(dtype)


def noisy_honest(h: int = 10, d: int = 8, seed: int = 4) -> Tensor:
    """SGD-like updates: a small common drift under larger per-client noise.

    Fang's Krum attack wins when the honest spread is comparable to the honest mean's
    distance from the origin (the received model); with a far, tight honest cluster no
    lambda can win and the search gives up (tested below).
    """
    g = make_generator(seed)
    drift = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    return drift + torch.randn(h, d, generator=g, dtype=torch.float64)


def reference_krum(f: int) -> Any:
    """Brute-force Krum [Blanchard et al., 2017] reporting ``update`` and ``kept``."""

    def krum(updates: Tensor, weights: Tensor | None = None, *,
             generator: torch.Generator | None = None) -> SimpleNamespace:
        n = updates.shape[0]
        scores = []
        for i in range(n):
            dists = sorted(float(((updates[i] - updates[j]) ** 2).sum())
                           for j in range(n) if j != i)
            scores.append(sum(dists[: n - f - 2]))
        best = min(range(n), key=lambda i: scores[i])
        return SimpleNamespace(update=updates[best], kept=torch.tensor([best]))

    return krum


def build(name: str) -> A.Attack:
    return A.get_attack(name)


def call(attack: A.Attack, honest: Tensor, f: int, seed: int = 0) -> Tensor:
    agg = reference_krum(f) if attack.needs_aggregator else None
    return attack(honest, f=f, generator=make_generator(seed), aggregator=agg)


# --------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert set(A.attack_names()) == EXPECTED
    assert A.attack_names() == sorted(A.attack_names())
    assert sorted(n for n in EXPECTED if A.get_attack(n).needs_aggregator) == DEFENSE_AWARE


def test_unknown_name_and_parameter() -> None:
    with pytest.raises(KeyError, match="did you mean 'alie'"):
        A.get_attack("aliee")
    with pytest.raises(TypeError, match="'zz'.*valid parameters: z"):
        A.get_attack("alie", zz=1.0)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("sign_flip_mean", {"scale": 0.0}),
        ("sign_flip_mean", {"scale": math.inf}),
        ("gaussian_noise", {"std": -1.0}),
        ("scaling", {"scale": -2.0}),
        ("alie", {"z": -0.5}),
        ("alie", {"z": math.nan}),
        ("ipm", {"epsilon": 0.0}),
        ("min_max", {"perturbation": "uniform"}),
        ("min_sum", {"perturbation": "bad"}),
        ("fang_trimmed_mean", {"b": 1.0}),
        ("fang_krum", {"epsilon": -1.0}),
        ("fang_krum", {"stop_threshold": 0.0}),
        ("alie_adaptive", {"low": 0.0}),
        ("alie_adaptive", {"low": 2.0, "high": 1.0}),
        ("alie_adaptive", {"grid": 1}),
        ("ipm_adaptive", {"refine": -1}),
        ("ipm_adaptive", {"high": math.inf}),
    ],
)
def test_bad_parameter_values(name: str, params: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=name):
        A.get_attack(name, **params)


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_shape_dtype_device_determinism(name: str, dtype: torch.dtype) -> None:
    honest = honest_stack(dtype=dtype)
    before = honest.clone()
    attack = build(name)
    f = 3
    out = call(attack, honest, f, seed=1)
    assert out.shape == (f, honest.shape[1])
    assert out.dtype == dtype and out.device == honest.device
    assert bool(torch.isfinite(out).all())
    assert torch.equal(honest, before)  # input untouched
    assert torch.equal(out, call(attack, honest, f, seed=1))  # same seed, same output
    other = call(attack, honest, f, seed=2)
    if name in RANDOM:
        assert not torch.equal(out, other)
    else:
        assert torch.equal(out, other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cuda_matches_cpu(name: str) -> None:
    honest = honest_stack()
    attack = build(name)
    cpu = call(attack, honest, 3)
    gpu = call(attack, honest.cuda(), 3)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)


@pytest.mark.parametrize(
    ("honest", "f", "exc", "match"),
    [
        (torch.zeros(5), 1, ValueError, r"\(h, d\)"),
        (torch.zeros(0, 3), 1, ValueError, r"\(h, d\)"),
        (torch.zeros(3, 0), 1, ValueError, r"\(h, d\)"),
        (torch.zeros(3, 2, dtype=torch.int64), 1, ValueError, "floating"),
        (torch.tensor([[0.0, math.nan], [1.0, 1.0]]), 1, ValueError, "NaN"),
        (torch.tensor([[0.0, math.inf], [1.0, 1.0]]), 1, ValueError, "NaN or Inf"),
        (torch.zeros(3, 2), 0, ValueError, "f >= 1"),
        (torch.zeros(3, 2), True, TypeError, "int"),
        (torch.zeros(3, 2), 1.0, TypeError, "int"),
    ],
)
def test_input_checks(honest: Tensor, f: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        A.get_attack("sign_flip_mean")(honest, f=f, generator=make_generator(0))


def test_generator_must_be_a_generator() -> None:
    with pytest.raises(TypeError, match="make_generator"):
        A.get_attack("gaussian_noise")(torch.zeros(3, 2), f=1, generator=0)  # type: ignore[arg-type]


def test_missing_aggregator_raises() -> None:
    with pytest.raises(ValueError, match="needs the defense"):
        A.get_attack("fang_krum")(honest_stack(), f=2, generator=make_generator(0))


# --------------------------------------------------------------------------- simple attacks


def test_sign_flip_mean_scaling_ipm_are_multiples_of_the_mean() -> None:
    honest = honest_stack()
    mu = honest.mean(dim=0)
    g = make_generator(0)
    for name, params, coef in [
        ("sign_flip_mean", {"scale": 1.0}, -1.0),
        ("sign_flip_mean", {"scale": 3.0}, -3.0),
        ("scaling", {"scale": 10.0}, 10.0),
        ("ipm", {"epsilon": 0.1}, -0.1),
        ("ipm", {"epsilon": 2.0}, -2.0),
    ]:
        out = A.get_attack(name, **params)(honest, f=4, generator=g)
        torch.testing.assert_close(out, (coef * mu).expand(4, -1), rtol=1e-12, atol=0.0)


def test_gaussian_noise_statistics() -> None:
    honest = torch.full((4, 300), 7.0)
    out = A.get_attack("gaussian_noise", std=0.5)(honest, f=200, generator=make_generator(3))
    # 60000 draws: the sample mean is within 5 standard errors of 0, the std within 2 %
    assert abs(float(out.mean())) < 5 * 0.5 / math.sqrt(out.numel())
    assert abs(float(out.std()) - 0.5) < 0.01


# --------------------------------------------------------------------------- ALIE


@pytest.mark.parametrize(("n", "f"), [(50, 12), (50, 1), (10, 2), (100, 24), (7, 3)])
def test_alie_z_max_matches_the_paper_formula(n: int, f: int) -> None:
    s = math.floor(n / 2 + 1) - f
    assert A.alie_z_max(n, f) == pytest.approx(norm.ppf((n - s) / n), rel=1e-9)


def test_alie_z_max_reference_value() -> None:
    # n = 50, f = 12: s = 14, z = Phi^{-1}(0.72)
    assert A.alie_z_max(50, 12) == pytest.approx(norm.ppf(0.72), abs=1e-12)
    assert A.alie_z_max(50, 12) == pytest.approx(0.5828415, abs=1e-6)


def test_alie_z_max_refuses_attacker_majority() -> None:
    with pytest.raises(ValueError, match="s = floor"):
        A.alie_z_max(10, 6)  # s = 6 - 6 = 0
    with pytest.raises(ValueError, match="1 <= f < n"):
        A.alie_z_max(3, 3)


def test_alie_is_mean_minus_z_std() -> None:
    honest = honest_stack(h=38, d=11)
    mu, sigma = honest.mean(dim=0), honest.std(dim=0, correction=1)
    out = A.get_attack("alie", z=1.5)(honest, f=12, generator=make_generator(0))
    torch.testing.assert_close(out, (mu - 1.5 * sigma).expand(12, -1), rtol=1e-12, atol=0.0)
    # z=None: the paper's z_max with n = h + f = 50, f = 12
    auto = A.get_attack("alie")(honest, f=12, generator=make_generator(0))
    z = norm.ppf((50 - 14) / 50)
    torch.testing.assert_close(auto, (mu - z * sigma).expand(12, -1), rtol=1e-9, atol=1e-12)


def test_alie_needs_two_honest() -> None:
    with pytest.raises(ValueError, match="h >= 2"):
        A.get_attack("alie", z=1.0)(torch.ones(1, 3), f=1, generator=make_generator(0))


# --------------------------------------------------------------------------- min-max / min-sum


def max_dist(m: Tensor, honest: Tensor) -> float:
    return float(torch.linalg.vector_norm(honest - m, dim=1).max())


def sum_sq(m: Tensor, honest: Tensor) -> float:
    return float(((honest - m) ** 2).sum())


def max_pairwise(honest: Tensor) -> float:
    return max(float(torch.linalg.vector_norm(a - b)) for a in honest for b in honest)


def max_honest_sum(honest: Tensor) -> float:
    return max(sum_sq(g, honest) for g in honest)


def bisection_oracle(ok: Any, hi: float = 1.0) -> float:
    """Largest gamma with ok(gamma), by doubling then 200 bisection steps."""
    while ok(hi):
        hi *= 2
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@pytest.mark.parametrize("perturbation", ["unit", "std", "sign"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_max_bound_holds_and_gamma_is_maximal(perturbation: str, seed: int) -> None:
    honest = honest_stack(h=9, d=6, seed=seed)
    mu = honest.mean(dim=0)
    p = A.perturbation_vector(honest, perturbation)  # type: ignore[arg-type]
    bound = max_pairwise(honest)
    out = A.get_attack("min_max", perturbation=perturbation)(
        honest, f=2, generator=make_generator(0))
    assert torch.equal(out[0], out[1])
    assert max_dist(out[0], honest) <= bound * (1 + 1e-12)
    gamma = A.min_max_gamma(honest, p)
    assert gamma > 0
    torch.testing.assert_close(out[0], mu + gamma * p, rtol=1e-12, atol=1e-12)
    assert max_dist(mu + 1.01 * gamma * p, honest) > bound  # near-maximal
    oracle = bisection_oracle(lambda g: max_dist(mu + g * p, honest) <= bound)
    assert gamma == pytest.approx(oracle, rel=1e-9)


@pytest.mark.parametrize("perturbation", ["unit", "std", "sign"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_sum_bound_holds_and_gamma_is_maximal(perturbation: str, seed: int) -> None:
    honest = honest_stack(h=9, d=6, seed=seed)
    mu = honest.mean(dim=0)
    p = A.perturbation_vector(honest, perturbation)  # type: ignore[arg-type]
    bound = max_honest_sum(honest)
    out = A.get_attack("min_sum", perturbation=perturbation)(
        honest, f=2, generator=make_generator(0))
    assert sum_sq(out[0], honest) <= bound * (1 + 1e-12)
    gamma = A.min_sum_gamma(honest, p)
    assert gamma > 0
    torch.testing.assert_close(out[0], mu + gamma * p, rtol=1e-12, atol=1e-12)
    assert sum_sq(mu + 1.01 * gamma * p, honest) > bound
    oracle = bisection_oracle(lambda g: sum_sq(mu + g * p, honest) <= bound)
    assert gamma == pytest.approx(oracle, rel=1e-9)


def test_perturbation_vectors() -> None:
    honest = torch.tensor([[1.0, -2.0, 0.0], [3.0, -2.0, 0.0]], dtype=torch.float64)
    mu = torch.tensor([2.0, -2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(A.perturbation_vector(honest, "unit"), -mu / mu.norm())
    torch.testing.assert_close(A.perturbation_vector(honest, "sign"),
                               torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(A.perturbation_vector(honest, "std"),
                               -honest.std(dim=0, correction=1))


def test_min_max_degenerate_cases() -> None:
    same = torch.ones(4, 3)
    # identical honest updates: no room, the attack is the (common) honest update
    out = A.get_attack("min_max", perturbation="sign")(same, f=2, generator=make_generator(0))
    torch.testing.assert_close(out, same[:2])
    with pytest.raises(ValueError, match="nonzero honest mean"):
        A.get_attack("min_sum")(torch.zeros(3, 2), f=1, generator=make_generator(0))


# --------------------------------------------------------------------------- Fang et al.


def test_fang_trimmed_mean_deviates_against_s_on_every_coordinate() -> None:
    honest = honest_stack(h=12, d=40, seed=5)
    honest[:, :10] += 3.0  # all-positive coordinates
    honest[:, 10:20] -= 3.0  # all-negative coordinates
    mu = honest.mean(dim=0)
    s = torch.sign(mu)
    out = A.get_attack("fang_trimmed_mean", b=2.0)(honest, f=5, generator=make_generator(0))
    assert bool(((out - mu) * s < 0).all())
    # beyond the honest extreme, against s
    w_min, w_max = honest.min(dim=0).values, honest.max(dim=0).values
    assert bool(torch.where(s > 0, out <= w_min, out >= w_max).all())


@pytest.mark.parametrize("b", [1.5, 2.0, 4.0])
def test_fang_trimmed_mean_intervals_match_the_paper(b: float) -> None:
    honest = torch.tensor(
        [[1.0, 2.0, -1.0, -3.0, 1.0, -1.0],
         [3.0, 0.5, -2.0, -1.0, -0.5, 0.5]], dtype=torch.float64)
    # means: 2, 1.25, -1.5, -2, 0.25, -0.25
    out = A.get_attack("fang_trimmed_mean", b=b)(honest, f=50, generator=make_generator(1))
    for j in range(honest.shape[1]):
        col = honest[:, j].tolist()
        w_min, w_max, mean = min(col), max(col), sum(col) / len(col)
        if mean >= 0:
            lo, hi = (w_min / b, w_min) if w_min > 0 else (b * w_min, w_min)
        else:
            lo, hi = (w_max, b * w_max) if w_max > 0 else (w_max, w_max / b)
        vals = out[:, j]
        assert bool(((vals >= lo) & (vals <= hi)).all()), (j, lo, hi, vals)
        # uniform draws: 50 of them spread over most of the interval
        assert float(vals.max() - vals.min()) > 0.8 * (hi - lo)


def test_fang_krum_lambda_max_matches_the_paper() -> None:
    honest = honest_stack(h=8, d=5, seed=3)
    f = 2
    n, d = 10, 5
    sums = []
    for i in range(8):
        dists = sorted(float(torch.linalg.vector_norm(honest[i] - honest[j]))
                       for j in range(8) if j != i)
        sums.append(sum(dists[: n - f - 2]))
    expected = min(sums) / ((n - 2 * f - 1) * math.sqrt(d)) + max(
        float(torch.linalg.vector_norm(g)) for g in honest) / math.sqrt(d)
    res = A.fang_krum_search(honest, f, aggregator=reference_krum(f),
                             generator=make_generator(0))
    assert res.lam_max == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("epsilon", [0.0, 1e-3])
def test_fang_krum_makes_krum_select_an_attacker(epsilon: float) -> None:
    honest = noisy_honest()
    f = 3
    krum = reference_krum(f)
    res = A.fang_krum_search(honest, f, aggregator=krum, generator=make_generator(0),
                             epsilon=epsilon)
    assert res.selected
    assert int(krum(torch.cat([honest, res.malicious])).kept[0]) >= 10
    # lambda is lambda_max halved k times, and the previous (double) lambda failed
    k = math.log2(res.lam_max / res.lam)
    assert k == pytest.approx(round(k), abs=1e-9)
    s = torch.where(honest.mean(dim=0) >= 0, 1.0, -1.0).to(honest.dtype)
    torch.testing.assert_close(res.malicious[0], -res.lam * s)
    dist = torch.linalg.vector_norm(res.malicious - res.malicious[0], dim=1)
    torch.testing.assert_close(dist[1:], torch.full((f - 1,), epsilon, dtype=dist.dtype))
    if res.lam < res.lam_max:
        bigger = (-2 * res.lam * s).unsqueeze(0) + (res.malicious - res.malicious[0])
        assert int(krum(torch.cat([honest, bigger])).kept[0]) < 10


def test_fang_krum_gives_up_below_the_threshold() -> None:
    def always_first(updates: Tensor, weights: Tensor | None = None, *,
                     generator: torch.Generator | None = None) -> SimpleNamespace:
        return SimpleNamespace(update=updates[0], kept=torch.tensor([0]))

    honest = honest_stack(h=6, d=4)
    res = A.fang_krum_search(honest, 2, aggregator=always_first, generator=make_generator(0),
                             stop_threshold=1e-3)
    assert not res.selected
    assert 1e-3 <= res.lam < 2e-3
    # a tight honest cluster far from the origin: Krum never picks -lambda s for any lambda
    far = honest_stack(h=10, d=8, seed=0) + 5.0
    res = A.fang_krum_search(far, 3, aggregator=reference_krum(3), generator=make_generator(0))
    assert not res.selected


def test_fang_krum_needs_enough_honest() -> None:
    with pytest.raises(ValueError, match="h >= f \\+ 2"):
        A.get_attack("fang_krum")(honest_stack(h=4), f=3, generator=make_generator(0),
                                  aggregator=reference_krum(3))


def test_fang_krum_against_the_real_krum() -> None:
    if not hasattr(aggregation, "get"):
        pytest.skip("aggregation.get is not available yet")
    honest = noisy_honest()
    f = 3
    krum = aggregation.get("krum", f=f)
    out = A.get_attack("fang_krum")(honest, f=f, generator=make_generator(0), aggregator=krum)
    result = krum(torch.cat([honest, out]), None, generator=make_generator(0))
    assert bool((result.kept >= 10).all())
    torch.testing.assert_close(result.update, out[0])


# --------------------------------------------------------------------------- mimic


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mimic_copies_the_most_extreme_client_along_the_top_direction(seed: int) -> None:
    honest = honest_stack(h=9, d=12, seed=seed)
    centred = honest - honest.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    proj = (centred @ vh[0]).abs()
    expected = int(torch.argmax(proj))
    assert A.mimic_index(honest) == expected
    out = A.get_attack("mimic")(honest, f=4, generator=make_generator(0))
    assert torch.equal(out, honest[expected].expand(4, -1))


def test_mimic_single_honest() -> None:
    honest = torch.tensor([[1.0, 2.0]])
    out = A.get_attack("mimic")(honest, f=2, generator=make_generator(0))
    assert torch.equal(out, honest.expand(2, -1))


def test_client_and_omniscient_attack_names_are_disjoint() -> None:
    """One name, one attack: a run config's ``attack`` cannot mean two things."""
    from client.poisoning import DATA_ATTACKS, UPDATE_POISONINGS

    client = set(UPDATE_POISONINGS) | set(DATA_ATTACKS)
    assert len(client) == len(UPDATE_POISONINGS) + len(DATA_ATTACKS)
    assert client & set(A.ATTACKS) == set()
    assert {"sign_flip", "gaussian"} <= client
    assert {"sign_flip_mean", "gaussian_noise"} <= set(A.ATTACKS)


# --------------------------------------------------------------------------- adaptive ALIE / IPM

ADAPTIVE = {"alie_adaptive": ("alie", "z"), "ipm_adaptive": ("ipm", "epsilon")}


def defenses(f: int) -> list[tuple[str, dict[str, Any]]]:
    return [("mean", {}), ("median", {}), ("trimmed_mean", {"f": f}), ("krum", {"f": f}),
            ("multi_krum", {"f": f}), ("bulyan", {"f": f}), ("geometric_median", {}),
            ("centered_clipping", {"tau": 1.0}), ("flame", {}), ("dnc", {"f": f}),
            ("signguard", {})]


def defended_distance(agg: Any, honest: Tensor, malicious: Tensor, seed: int) -> float:
    """How far the defense moves the aggregate from the honest mean, evaluated with the
    generator the search derives from the attack's generator of ``seed``."""
    gen = make_generator(A._int_seed(make_generator(seed)))
    out = agg(torch.cat([honest, malicious]), None, generator=gen)
    return float(torch.linalg.vector_norm(out.update.double() - honest.double().mean(dim=0)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("defense", [name for name, _ in defenses(3)])
@pytest.mark.parametrize("adaptive", sorted(ADAPTIVE))
def test_adaptive_moves_the_defended_aggregate_at_least_as_far_as_the_fixed_attack(
        adaptive: str, defense: str, seed: int) -> None:
    f = 3
    honest = noisy_honest(h=16, d=60, seed=seed)
    agg = aggregation.get(defense, **dict(defenses(f))[defense])
    fixed_name, _ = ADAPTIVE[adaptive]
    gen = make_generator(seed)
    fixed = A.get_attack(fixed_name)(honest, f=f, generator=gen)
    crafted = A.get_attack(adaptive)(honest, f=f, generator=make_generator(seed),
                                     aggregator=agg)
    ours = defended_distance(agg, honest, crafted, seed)
    theirs = defended_distance(agg, honest, fixed, seed)
    assert ours >= theirs * (1 - 1e-12)


@pytest.mark.parametrize("defense", ["mean", "median", "trimmed_mean", "krum"])
def test_adaptive_ipm_and_alie_beat_the_default_strength_on_plain_rules(defense: str) -> None:
    """Against rules that do not filter, a stronger attack moves them farther than the
    fixed defaults (ipm's epsilon = 0.1, alie's z_max); the search finds it."""
    f = 3
    honest = noisy_honest(h=16, d=60, seed=0)
    agg = aggregation.get(defense, **dict(defenses(f))[defense])
    for adaptive in ADAPTIVE:
        fixed_name, _ = ADAPTIVE[adaptive]
        fixed = A.get_attack(fixed_name)(honest, f=f, generator=make_generator(0))
        crafted = A.get_attack(adaptive)(honest, f=f, generator=make_generator(0),
                                         aggregator=agg)
        assert defended_distance(agg, honest, crafted, 0) > 1.2 * defended_distance(
            agg, honest, fixed, 0), adaptive


def test_adaptive_output_is_the_fixed_attack_at_the_chosen_strength() -> None:
    honest = noisy_honest(h=12, d=20, seed=3)
    agg = aggregation.get("median")
    res = A.alie_search(honest, 3, aggregator=agg, generator=make_generator(0))
    torch.testing.assert_close(res.malicious, A.alie(honest, 3, z=res.strength))
    # the paper's z_max was among the candidates, with its distance
    tried = dict(res.tried)
    assert A.alie_z_max(15, 3) in tried
    assert res.distance == max(tried.values())
    ties = [s for s, d in res.tried if d == res.distance]
    assert res.strength == min(ties)  # ties go to the smallest strength
    res = A.ipm_search(honest, 3, aggregator=agg, generator=make_generator(0))
    torch.testing.assert_close(res.malicious, A.ipm(honest, 3, epsilon=res.strength))
    assert 0.1 in dict(res.tried)
    assert len(res.tried) == 1 + 9 + 8  # the default, the grid, the refinements


def peaked(peak: float) -> Any:
    """A fake defense whose distance from the honest mean is a known function of IPM's
    epsilon (read back from the last row): exp(-log(eps / peak)^2), largest at ``peak``."""

    def agg(updates: Tensor, weights: Tensor | None = None, *,
            generator: torch.Generator | None = None) -> SimpleNamespace:
        honest = updates[:-3]
        mu = honest.mean(dim=0)
        eps = float(-(updates[-1] @ mu) / (mu @ mu))
        bump = math.exp(-math.log(eps / peak) ** 2)
        return SimpleNamespace(update=mu + bump * mu / mu.norm(), kept=torch.arange(3))

    return agg


@pytest.mark.parametrize("peak", [0.02, 0.37, 3.7, 55.0])
def test_strength_search_finds_the_peak_of_a_known_objective(peak: float) -> None:
    honest = noisy_honest(h=10, d=8, seed=1)
    res = A.ipm_search(honest, 3, aggregator=peaked(peak), generator=make_generator(0))
    assert abs(math.log(res.strength / peak)) < math.log(1.2)
    assert res.distance == pytest.approx(math.exp(-math.log(res.strength / peak) ** 2))


def test_strength_search_skips_refused_candidates_and_raises_if_all_are() -> None:
    honest = noisy_honest(h=10, d=8, seed=1)
    inner = peaked(3.7)

    def refuses_large(updates: Tensor, weights: Tensor | None = None, *,
                      generator: torch.Generator | None = None) -> SimpleNamespace:
        mu = updates[:-3].mean(dim=0)
        if float(-(updates[-1] @ mu) / (mu @ mu)) > 1.0:
            raise ValueError("refused")
        out: SimpleNamespace = inner(updates, weights, generator=generator)
        return out

    res = A.ipm_search(honest, 3, aggregator=refuses_large, generator=make_generator(0))
    assert res.strength <= 1.0
    assert any(math.isnan(d) for _, d in res.tried)

    def refuses_all(updates: Tensor, weights: Tensor | None = None, *,
                    generator: torch.Generator | None = None) -> SimpleNamespace:
        raise ValueError("krum needs n >= 2f + 3")

    with pytest.raises(ValueError, match="krum needs"):
        A.get_attack("ipm_adaptive")(honest, f=3, generator=make_generator(0),
                                     aggregator=refuses_all)


def test_random_defenses_see_one_generator_for_every_candidate() -> None:
    """Each evaluation gets a fresh generator of the same seed, so FLAME's noise is the
    same for every candidate and only the strength differs."""
    seeds: list[int] = []

    def spy(updates: Tensor, weights: Tensor | None = None, *,
            generator: torch.Generator | None = None) -> SimpleNamespace:
        assert generator is not None
        seeds.append(int(torch.randint(0, 2**31, (1,), generator=generator)))
        return SimpleNamespace(update=updates.mean(dim=0), kept=torch.arange(3))

    A.get_attack("alie_adaptive")(honest_stack(), f=3, generator=make_generator(0),
                                  aggregator=spy)
    assert len(seeds) == 18 and len(set(seeds)) == 1


def test_alie_adaptive_needs_two_honest() -> None:
    with pytest.raises(ValueError, match="alie_adaptive: needs h >= 2"):
        A.get_attack("alie_adaptive")(torch.ones(1, 3), f=1, generator=make_generator(0),
                                      aggregator=reference_krum(1))


# --------------------------------------------------------------------------- the defense in use


def test_round_defense_binds_the_rounds_context_for_every_candidate() -> None:
    """The search calls the defense with the round's weights, clients (rows honest first,
    then the attackers) and reference, for every candidate strength."""
    seen: list[tuple[Tensor | None, Tensor | None, Tensor | None]] = []

    def spy(updates: Tensor, weights: Tensor | None = None, *,
            generator: torch.Generator | None = None, clients: Tensor | None = None,
            reference: Tensor | None = None) -> SimpleNamespace:
        seen.append((weights, clients, reference))
        return SimpleNamespace(update=updates.mean(dim=0), kept=torch.arange(updates.shape[0]))

    honest = honest_stack(h=7, d=5)
    weights = torch.arange(1.0, 11.0, dtype=torch.float64)
    clients = torch.tensor([5, 9, 2, 7, 0, 1, 3, 8, 4, 6])
    reference = torch.ones(5, dtype=torch.float64)
    defense = A.RoundDefense(spy, weights=weights, clients=clients, reference=reference)
    A.get_attack("ipm_adaptive")(honest, f=3, generator=make_generator(0), aggregator=defense)
    assert len(seen) == 1 + 9 + 8
    for w, c, r in seen:
        assert w is weights and c is clients and r is reference
    with pytest.raises(ValueError, match="clients bound for 10 clients, the stack has 8 rows"):
        A.RoundDefense(spy, clients=clients)(torch.zeros(8, 5))


@pytest.mark.parametrize("adaptive", sorted(ADAPTIVE))
def test_adaptive_attacks_search_against_fltrust_given_its_reference(adaptive: str) -> None:
    """FLTrust refuses a call without the server's reference update, so an unbound search
    has no candidate; bound to the round, it searches and beats the fixed strength."""
    f = 3
    honest = noisy_honest(h=12, d=30, seed=2)
    rule = aggregation.get("fltrust")
    with pytest.raises(ValueError, match="reference"):
        A.get_attack(adaptive)(honest, f=f, generator=make_generator(0), aggregator=rule)
    reference = honest.mean(dim=0) + 0.1 * torch.randn(30, generator=make_generator(9),
                                                       dtype=torch.float64)
    defense = A.RoundDefense(rule, reference=reference)
    crafted = A.get_attack(adaptive)(honest, f=f, generator=make_generator(0),
                                     aggregator=defense)
    fixed = A.get_attack(ADAPTIVE[adaptive][0])(honest, f=f, generator=make_generator(0))
    assert defended_distance(defense, honest, crafted, 0) >= defended_distance(
        defense, honest, fixed, 0) * (1 - 1e-12)


@pytest.mark.parametrize("adaptive", sorted(ADAPTIVE))
def test_the_adversary_searches_against_the_runs_rule_and_pre_aggregation(adaptive: str) -> None:
    """The adversary hands the adaptive attack the run's defense (rule and pre-aggregation
    steps, ``server.run.build_rule``): its crafted updates are the ones searched against
    that defense, and differ from those searched against the bare rule."""
    from client.malicious import malicious_partitions
    from runconfig.config import RunConfig
    from server.rounds import ClientReply
    from server.run import build_rule
    from simulations.adversary import build_adversary
    from simulations.config import resolve_config

    flat = resolve_config(None, ["num-malicious=3", f"attack={adaptive}", "aggregator=median",
                                 "pre-aggregation=bucketing(s=2)"])
    cfg = RunConfig.from_flat({k: v for k, v in flat.items() if k not in ENGINE_KEYS})
    adv = build_adversary(cfg)
    assert adv is not None and adv.aggregator is not None
    updates = noisy_honest(h=10, d=12, seed=5)
    replies = [ClientReply(100 + i, {}, 1.0, partition_id=i, metrics={"num-partitions": 10})
               for i in range(10)]
    out, failure = adv.mount(1, updates, replies)
    assert failure is None
    bad = sorted(malicious_partitions(10, 3, 0))
    honest = updates[[i for i in range(10) if i not in bad]]
    gen = make_generator(derive_seed(0, "adversary", 1))
    expected = A.get_attack(adaptive)(honest, f=3, generator=gen, aggregator=build_rule(cfg))
    torch.testing.assert_close(out[bad], expected, rtol=0, atol=0)
    bare = A.get_attack(adaptive)(honest, f=3, generator=make_generator(
        derive_seed(0, "adversary", 1)), aggregator=aggregation.get("median"))
    assert not torch.equal(out[bad], bare)  # bucketing changed the chosen strength
