"""FLAME, DnC and SignGuard: each rule's defining behaviour on constructed inputs, checked
over many seeds, against reference computations, and on CPU and CUDA.

The contract suite (``test_contract.py``) covers shapes, dtypes, determinism and the
declared properties; here each defense meets the attack it was built against.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_distances as sk_cosine_distances
from torch import Tensor

import aggregation
from aggregation import PreconditionError, detection
from aggregation.catalog import Rule
from aggregation.registry import make_generator
from simulations.attacks import get_attack
from simulations.metrics import detection_scores

from ._cases import DEVICES

RULES = ["flame", "dnc", "signguard"]
SEEDS = range(10)
H, F = 16, 4  # honest and Byzantine clients; the attackers are rows H..H+F-1


def build(name: str, **params: object) -> aggregation.Aggregator:
    if name == "dnc":
        params.setdefault("f", F)
    return aggregation.get(name, **params)


def run(name: str, x: Tensor, seed: int = 0, **params: object) -> aggregation.AggregationResult:
    return build(name, **params)(x, generator=make_generator(seed))


def attackers_kept(result: aggregation.AggregationResult) -> list[int]:
    return [i for i in result.kept.tolist() if i >= H]


def clipped_mean_oracle(x: Tensor, kept: Tensor) -> Tensor:
    """Mean of the kept rows, each clipped to the median norm over all rows (numpy)."""
    a = x.double().numpy()
    norms = np.linalg.norm(a, axis=1)
    bound = np.median(norms)
    scale = np.minimum(1.0, bound / np.where(norms > 0, norms, 1.0))
    return torch.from_numpy((a * scale[:, None])[kept.numpy()].mean(axis=0))


# --------------------------------------------------------------------------- registration


def test_registered_random_not_weighted_and_not_dp_compatible() -> None:
    assert set(RULES) <= set(aggregation.names())
    for name in RULES:
        rule = build(name)
        assert isinstance(rule, Rule)
        assert rule.random and not rule.stateful and not rule.use_weights
        assert not rule.needs_clients and not rule.needs_reference
        why = aggregation.central_dp_refusal(name)
        assert why and "no sensitivity analysis" not in why


@pytest.mark.parametrize("name", RULES)
def test_refuses_to_run_without_a_generator(name: str) -> None:
    x = torch.randn(8, 5, generator=make_generator(0))
    with pytest.raises(ValueError, match=rf"^{name} draws random numbers: pass generator="):
        build(name)(x)
    with pytest.raises(TypeError, match="torch.Generator"):
        build(name)(x, generator=0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "params", "exc", "match"),
    [
        ("flame", {"lam": -0.1}, ValueError, "flame: lam must be >= 0"),
        ("flame", {"noise": 0.1}, TypeError, "valid parameters: lam"),
        ("dnc", {"c": 0.0}, ValueError, "dnc: c must be > 0"),
        ("dnc", {"iters": 0}, ValueError, "dnc: iters must be >= 1"),
        ("dnc", {"sub_dim": 0}, ValueError, "dnc: sub_dim must be >= 1"),
        ("signguard", {"lower": 1.5, "upper": 3.0}, ValueError, "lower <= 1 <= upper"),
        ("signguard", {"upper": 0.5}, ValueError, "signguard: upper must be >= 1"),
        ("signguard", {"coord_fraction": 1.5}, ValueError, "must be <= 1"),
        ("signguard", {"coord_fraction": 0.0}, ValueError, "must be > 0"),
    ],
)
def test_hyperparameters_are_checked_when_the_rule_is_built(
        name: str, params: dict[str, object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        build(name, **params)


@pytest.mark.parametrize("name", RULES)
def test_a_different_generator_draws_differently(name: str) -> None:
    """The randomness comes from the generator (FLAME: the noise; DnC and SignGuard: the
    coordinate samples, visible in their diagnostics)."""
    x = honest_and_backdoor(5, d=400)
    params = {"sub_dim": 50} if name == "dnc" else {}
    a, b = run(name, x, 1, **params), run(name, x, 2, **params)
    key = {"flame": None, "dnc": "scores", "signguard": "features"}[name]
    if key is None:
        assert not torch.equal(a.update, b.update)
    else:
        assert not torch.equal(a.info[key], b.info[key])


# --------------------------------------------------------------------------- FLAME


def honest_and_backdoor(seed: int, d: int = 200) -> Tensor:
    """16 honest updates around a common direction (pairwise cosine ~0.7) and 4 backdoor
    updates in a tight cluster of their own, 75 degrees away from the honest mean."""
    g = make_generator(seed)
    base = torch.randn(d, generator=g, dtype=torch.float64)
    honest = base + 0.7 * torch.randn(H, d, generator=g, dtype=torch.float64)
    target = 0.3 * honest.mean(dim=0) + torch.randn(d, generator=g, dtype=torch.float64)
    backdoor = target + 0.05 * torch.randn(F, d, generator=g, dtype=torch.float64)
    return torch.cat([honest, backdoor])


@pytest.mark.parametrize("seed", SEEDS)
def test_flame_drops_a_tight_cluster_of_backdoor_updates(seed: int) -> None:
    x = honest_and_backdoor(seed)
    res = run("flame", x, seed)
    assert attackers_kept(res) == []
    assert res.kept.numel() >= (H + F) // 2 + 1
    assert torch.equal(res.info["labels"] >= 0,
                       torch.isin(torch.arange(H + F), res.kept))
    # the plain mean is dragged towards the backdoor, FLAME's aggregate is not
    target = x[H:].mean(dim=0)
    honest_mean = x[:H].mean(dim=0)
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(res.update, target, dim=0)) < float(cos(x.mean(dim=0), target, dim=0))
    assert float(cos(res.update, honest_mean, dim=0)) > 0.95


@pytest.mark.parametrize("seed", SEEDS)
def test_flame_clips_to_the_median_norm_and_adds_lambda_s_noise(seed: int) -> None:
    x = honest_and_backdoor(seed)
    x[:4] *= 5.0  # honest clients with large updates: admitted, but clipped
    plain = run("flame", x, seed, lam=0.0)
    torch.testing.assert_close(plain.update, clipped_mean_oracle(x, plain.kept),
                               rtol=1e-12, atol=1e-12)
    bound = float(np.median(np.linalg.norm(x.numpy(), axis=1)))
    assert float(plain.info["median_norm"]) == pytest.approx(bound, rel=1e-12)
    noisy = run("flame", x, seed, lam=0.01)
    assert torch.equal(noisy.kept, plain.kept)
    z = torch.randn(x.shape[1], generator=make_generator(seed), dtype=torch.float64)
    torch.testing.assert_close(noisy.update - plain.update, 0.01 * bound * z,
                               rtol=1e-9, atol=1e-12)
    assert float(noisy.info["noise_std"]) == pytest.approx(0.01 * bound, rel=1e-12)


def test_flame_noise_has_the_stated_standard_deviation() -> None:
    """Over 20000 coordinates the noise's sample std is within 2 % of lam * S."""
    x = torch.ones(5, 20000, dtype=torch.float64)  # unanimous: the aggregate is x[0] + noise
    res = run("flame", x, 3, lam=0.5)
    bound = math.sqrt(20000.0)
    noise = res.update - 1.0
    assert abs(float(noise.std()) / (0.5 * bound) - 1.0) < 0.02
    assert abs(float(noise.mean())) < 5 * 0.5 * bound / math.sqrt(20000.0)


def test_cosine_distances_match_scikit_learn_and_handle_zero_and_huge_rows() -> None:
    x = torch.randn(9, 30, generator=make_generator(1), dtype=torch.float64)
    ours = detection.cosine_distances(x)
    ref = np.clip(sk_cosine_distances(x.numpy()), 0.0, 2.0)
    np.fill_diagonal(ref, 0.0)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    x[2] = 0.0
    x[5] = 0.9 * torch.finfo(torch.float64).max * torch.sign(x[5])
    dist = detection.cosine_distances(x)
    assert bool(torch.isfinite(dist).all())
    assert torch.equal(dist[2, [0, 1, 3]], torch.ones(3, dtype=torch.float64))
    sign_only = torch.sign(x[5])
    expected = 1.0 - float(torch.nn.functional.cosine_similarity(sign_only, x[0], dim=0))
    assert float(dist[5, 0]) == pytest.approx(expected, abs=1e-12)


def test_flame_needs_two_clients() -> None:
    with pytest.raises(PreconditionError, match=r"flame needs n >= 2 clients.*got n=1"):
        run("flame", torch.ones(1, 3))


# --------------------------------------------------------------------------- DnC


def sgd_like(seed: int, d: int = 200) -> Tensor:
    """Honest updates: a small common drift under larger per-client noise."""
    g = make_generator(seed)
    drift = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    return drift + 0.5 * torch.randn(H, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("attack", ["min_max", "min_sum"])
@pytest.mark.parametrize("perturbation", ["unit", "std", "sign"])
def test_dnc_removes_the_min_max_and_min_sum_updates(seed: int, attack: str,
                                                     perturbation: str) -> None:
    honest = sgd_like(seed)
    crafted = get_attack(attack, perturbation=perturbation)(
        honest, f=F, generator=make_generator(seed))
    x = torch.cat([honest, crafted])
    res = run("dnc", x, seed)
    assert res.kept.tolist() == list(range(H))
    torch.testing.assert_close(res.update, honest.mean(dim=0), rtol=1e-12, atol=1e-12)
    scores = detection_scores(res.kept, list(range(H + F)), set(range(H, H + F)))
    assert (scores["precision"], scores["recall"]) == (1.0, 1.0)


def test_min_max_passes_krum_where_dnc_stops_it() -> None:
    """The setting above is one where a distance-based rule is fooled: Krum picks a
    min-max update, DnC removes all of them."""
    fooled = 0
    for seed in SEEDS:
        honest = sgd_like(seed)
        crafted = get_attack("min_max")(honest, f=F, generator=make_generator(seed))
        x = torch.cat([honest, crafted])
        fooled += int(aggregation.get("krum", f=F)(x).kept[0]) >= H
        assert attackers_kept(run("dnc", x, seed)) == []
    assert fooled >= 8


@pytest.mark.parametrize("seed", range(5))
def test_dnc_scores_are_squared_projections_on_the_top_singular_vector(seed: int) -> None:
    x = torch.randn(11, 40, generator=make_generator(seed), dtype=torch.float64)
    x[3] += 4.0  # one clear outlier, so the top singular value is simple
    centred = (x - x.mean(dim=0)).numpy()
    v = np.linalg.svd(centred, full_matrices=False)[2][0]
    peak = float(x.abs().max())
    expected = (centred @ v) ** 2 / peak**2  # the scores of the rescaled sample
    np.testing.assert_allclose(detection.dnc_scores(x).numpy(), expected,
                               rtol=1e-9, atol=1e-12)


def test_dnc_removes_floor_cf_per_iteration_and_keeps_the_intersection() -> None:
    x = torch.randn(20, 300, generator=make_generator(7), dtype=torch.float64)
    res = run("dnc", x, 1, f=3, c=1.5, iters=6, sub_dim=20)  # removes floor(4.5) = 4
    removed = res.info["times_removed"]
    assert int(removed.sum()) == 6 * 4
    assert res.info["scores"].shape == (6, 20)
    assert res.kept.tolist() == (removed == 0).nonzero().flatten().tolist()
    for t in range(6):  # each iteration removed its 4 highest scores
        top = res.info["scores"][t].topk(4).indices
        assert bool((removed[top] >= 1).all())
    torch.testing.assert_close(res.update, x[res.kept].mean(dim=0), rtol=1e-12, atol=1e-12)
    # all coordinates sampled: every iteration is the same
    full = run("dnc", x, 1, f=3, c=1.5, iters=6, sub_dim=300)
    assert set(full.info["times_removed"].tolist()) == {0, 6}
    assert full.kept.numel() == 16


def test_dnc_refuses_removing_every_client() -> None:
    with pytest.raises(PreconditionError, match=r"dnc needs n > floor\(c f\), got n=4, f=4"):
        run("dnc", torch.randn(4, 3, generator=make_generator(0)), f=4)
    x = torch.randn(6, 50, generator=make_generator(0))
    with pytest.raises(PreconditionError, match="dnc removed every client"):
        run("dnc", x, f=5, iters=40, sub_dim=3)


# --------------------------------------------------------------------------- SignGuard


def sign_skewed(seed: int, d: int = 5000) -> Tensor:
    """Honest updates whose coordinates lean positive on 3/4 of the coordinates: about
    58 % positive entries. Sign statistics see a sign flip only when the honest updates
    are not balanced between signs, as gradients of a trained network are not."""
    g = make_generator(seed)
    lean = torch.where(torch.rand(d, generator=g, dtype=torch.float64) < 0.75, 0.5, -0.5)
    return lean + torch.randn(H, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(20))
def test_signguard_removes_sign_flipped_and_scaled_updates(seed: int) -> None:
    honest = sign_skewed(seed)
    attack = torch.cat([-honest[:2], 10.0 * honest[2:3], 0.01 * honest[3:4]])
    x = torch.cat([honest, attack])
    res = run("signguard", x, seed)
    assert attackers_kept(res) == []
    assert res.kept.numel() >= 12  # SignGuard also drops a few honest clients
    assert res.info["norm_ok"][H:].tolist() == [True, True, False, False]
    flipped_label = res.info["labels"][H:H + 2]
    assert bool((res.info["labels"][res.kept] != flipped_label[0]).all())
    torch.testing.assert_close(res.update, clipped_mean_oracle(x, res.kept),
                               rtol=1e-12, atol=1e-12)


def test_sign_features_are_normalised_fractions() -> None:
    sample = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, -1.0, -1.0, 2.0]])
    # fractions (pos, zero, neg): (1/2, 1/4, 1/4), (1/4, 0, 3/4); column maxima 1/2, 1/4, 3/4
    expected = torch.tensor([[1.0, 1.0, 1 / 3], [0.5, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(detection.sign_features(sample), expected)


def test_signguard_with_identical_features_keeps_every_client() -> None:
    """Bandwidth 0 (at least half the clients share their features): one cluster per
    distinct feature vector, here all of them."""
    x = torch.arange(1.0, 7.0, dtype=torch.float64)[:, None] * torch.ones(6, 10)
    res = run("signguard", x, 0, coord_fraction=1.0)
    assert float(res.info["bandwidth"]) == 0.0
    assert res.kept.tolist() == [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(res.update, clipped_mean_oracle(x, res.kept))


def test_signguard_refuses_when_it_keeps_nobody() -> None:
    x = torch.tensor([[-50.0, -50.0], [-50.0, -50.0], [-1e-4, -1e-4], [-1e-4, -1e-4],
                      [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    # median norm 1.41: only the three [1, 1] pass the norm filter; the largest sign
    # cluster is the four negative ones, 50x above or 1e-4x below the median
    with pytest.raises(PreconditionError, match="signguard kept no client: 3 of n=7"):
        run("signguard", x, 0, coord_fraction=1.0)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("name", RULES)
def test_cuda_matches_cpu_with_a_cpu_generator(name: str, device: str) -> None:
    x = honest_and_backdoor(3, d=500)
    cpu = run(name, x, 4)
    gpu = run(name, x.to(device), 4)
    assert gpu.update.device.type == "cuda" and gpu.kept.device.type == "cuda"
    assert torch.equal(gpu.kept.cpu(), cpu.kept)
    torch.testing.assert_close(gpu.update.cpu(), cpu.update, rtol=1e-9, atol=1e-12)
