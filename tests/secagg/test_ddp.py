"""Distributed DP under secure aggregation: the noise each client adds, what the sum holds
at and above the threshold, and what the accountant books (``secagg/ddp.py``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from privacy.accounting import epsilon_from_history
from secagg import SecAggAbort, SecAggParams, run_local
from secagg.ddp import DistributedDP, discrete_gaussian, sum_divergence_tau
from secagg.protocol import Msg, client_step

N, D, Z = 6, 20_000, 0.5  # neighbours='all': k = 5, t = ceil(0.6 * 5) = 3
PARAMS = SecAggParams(neighbours="all", clip=1.0, max_weight=1, noise_multiplier=Z)


def _inputs(seed: int, scale: float = 0.0) -> dict[int, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return {100 + i: (rng.normal(0, scale, D) if scale else np.zeros(D), 1) for i in range(N)}


def _noise(seed: int, **kw: Any) -> tuple[np.ndarray, Any]:
    """The noise in the decoded sum, on the integer grid (zero updates encode exactly)."""
    res = run_local(PARAMS, _inputs(seed), noise_seed=seed, **kw)
    assert res.dp is not None
    return res.noised_sum() / res.dp.step, res


def test_discrete_gaussian_has_the_discrete_gaussian_pmf() -> None:
    var = 4.0
    x = discrete_gaussian(200_000, var, np.random.default_rng(1))
    support = np.arange(-8, 9)
    pmf = np.exp(-support.astype(float) ** 2 / (2 * var))
    pmf /= np.exp(-np.arange(-60, 61) ** 2 / (2 * var)).sum()
    observed = np.array([(x == k).sum() for k in support] + [(np.abs(x) > 8).sum()])
    expected = np.append(pmf, 1 - pmf.sum()) * x.size
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_each_client_adds_sigma2_over_t_so_t_survivors_give_sigma2() -> None:
    dp = DistributedDP.for_round(clip=1.0, noise_multiplier=Z, bits=32, num_clients=N, dim=D)
    assert dp.client_variance(3) * 3 == pytest.approx(dp.sigma**2, rel=1e-12)
    assert dp.sigma == Z * dp.sensitivity
    assert dp.sensitivity == dp.levels / 2 + math.sqrt(D) / 2 + 1
    # the sum of t discrete Gaussians is as good as one [Kairouz et al. 2021]: tau = 0
    assert sum_divergence_tau(dp.client_variance(3), 3) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_sums_noise_variance_is_n_sigma2_over_t(seed: int) -> None:
    noise, res = _noise(seed)
    assert res.threshold == 3 and len(res.survivors) == N
    expected = N * res.dp.sigma**2 / res.threshold
    # sample variance of D normals: relative sd sqrt(2 / D) = 1 %; 5 sd
    assert abs(noise.var() / expected - 1) < 5 * math.sqrt(2 / D)
    assert abs(noise.mean()) < 5 * math.sqrt(expected / D)


def test_dropouts_above_the_threshold_keep_at_least_the_booked_noise() -> None:
    lost = {100, 101}  # lost at masked-input: their noise is not in the sum, t = 3 <= 4 left
    noise, res = _noise(3, drop=lambda stage, node: stage == "masked-input" and node in lost)
    assert len(res.survivors) == 4 and set(res.dropped["masked-input"]) == lost
    booked = res.dp.sigma**2  # what any t survivors guarantee, and what the accountant books
    assert noise.var() > booked * (1 - 5 * math.sqrt(2 / D))
    assert abs(noise.var() / (4 * booked / 3) - 1) < 5 * math.sqrt(2 / D)
    # lost while unmasking: its masked (noised) input is still in the sum
    noise, res = _noise(4, drop=lambda stage, node: stage == "unmask" and node in lost)
    assert len(res.survivors) == N
    assert abs(noise.var() / (N * booked / 3) - 1) < 5 * math.sqrt(2 / D)


def test_below_the_threshold_nothing_is_unmasked() -> None:
    lost = {100, 101, 102, 103}
    with pytest.raises(SecAggAbort, match="masked-input"):
        _noise(5, drop=lambda stage, node: stage == "masked-input" and node in lost)


def test_the_noised_sum_is_unbiased_around_the_clipped_sum() -> None:
    inputs = _inputs(6, scale=0.05)  # norms about 7: every update is clipped to 1
    res = run_local(PARAMS, inputs, noise_seed=6)
    assert res.dp is not None and res.weight == N and res.clipped == 0
    clipped = sum(u / max(1.0, float(np.linalg.norm(u))) for u, _ in inputs.values())
    err = (res.noised_sum() - clipped) / res.dp.step
    expected = N * res.dp.sigma**2 / res.threshold  # rounding adds at most N/2 per coordinate
    assert abs(err.var() / expected - 1) < 5 * math.sqrt(2 / D)
    assert abs(err.mean()) < 5 * math.sqrt(expected / D) + N / 2


def test_the_noise_is_reproducible_from_the_seed_and_differs_across_seeds() -> None:
    a, _ = _noise(7)
    b, _ = _noise(7)
    c, _ = _noise(8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_a_client_without_a_noise_seed_refuses_to_send_an_unnoised_update() -> None:
    with pytest.raises(ValueError, match="no noise_seed"):
        run_local(PARAMS, _inputs(0), noise_seed=None)


def test_a_server_asking_for_other_levels_is_refused() -> None:
    dp = DistributedDP.for_round(clip=1.0, noise_multiplier=Z, bits=32, num_clients=N, dim=D)
    msg = Msg(config={"stage": "advertise-keys", "session": "1", **PARAMS.to_config(),
                      "num-clients": N, "dim": D, "levels": dp.levels + 2})
    with pytest.raises(ValueError, match="quantisation levels"):
        client_step(msg, None, me=1, train=lambda: (np.zeros(D), 1))


def test_the_booked_epsilon_is_the_accountants_for_the_threshold_noise() -> None:
    """The component books (z, q): the multiplier of the noise t survivors guarantee on the
    integer sensitivity Delta; the engine's rows report the accountant's epsilon for it."""
    from simulations.config import resolve_config
    from simulations.engine import run_in_process

    z, m, delta = 0.8, 6, 1e-5
    rows = run_in_process(resolve_config(None, [
        "num-clients=6", "num-server-rounds=2", "model=logreg", "local-epochs=1",
        f"clients-per-round={m}", "secagg=neighbours='all'",
        f"central-dp=noise_multiplier={z}, clipping_norm=1.0, sampling='none', delta={delta}"]))
    for r in (1, 2):
        row = rows[r]
        assert not row["skipped"] and row["secagg-threshold"] == 3
        assert row["epsilon"] == epsilon_from_history([(z, 1.0, r)], delta)
        # the noise on the mean at the threshold: z Delta step / m = z C / m (Delta / (L/2))
        assert row["secagg-noise-std-threshold"] == pytest.approx(z * 1.0 / m, rel=1e-3)
        assert row["secagg-noise-std"] == pytest.approx(
            row["secagg-noise-std-threshold"] * math.sqrt(6 / 3), rel=1e-12)


def test_a_failed_round_is_neither_released_nor_booked() -> None:
    from simulations.config import resolve_config
    from simulations.engine import run_in_process

    from .test_engine import _drop

    rows = run_in_process(resolve_config(None, [
        "num-clients=6", "num-server-rounds=1", "model=logreg", "local-epochs=1",
        "clients-per-round=6", "secagg=neighbours='all'",
        "central-dp=noise_multiplier=0.8, clipping_norm=1.0, sampling='none'"]),
        fault=_drop({0, 1, 2, 3}, "masked-input"))
    assert rows[1]["skipped"] and "failed at stage masked-input" in rows[1]["skipped_reason"]
    assert rows[1]["loss"] == rows[0]["loss"] and rows[1]["epsilon"] == 0.0
