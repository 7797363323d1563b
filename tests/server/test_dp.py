"""Central DP (DP-FedAvg, adaptive clipping): the mechanism and what it books.

The accounting, clipping and noise it is built on are tested in ``tests/privacy``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy import stats

import privacy
import server.dp
from privacy import PrivacyAccountant, gaussian_noise
from server.dp import (
    CentralDPConfig,
    CentralDPState,
    DPFedAvg,
    check_rule_compatible,
    dp_mean,
    poisson_sample,
    update_noise_multiplier,
)

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- sampling and what is booked -----------------------------------------------------------


def test_flower_notes_reference_values() -> None:
    # N = 100 clients, 10 per round (Poisson, q = 0.1), z = 1, 100 rounds, delta = 1e-3
    cfg = CentralDPConfig(noise_multiplier=1.0, clipping_norm=1.0)
    dp = DPFedAvg(cfg, 10)
    z, q = dp.accounting_event(100)
    assert (z, q) == (1.0, 0.1)
    booked = PrivacyAccountant(cfg.accountant)
    for _ in range(100):
        booked.step(z, q)
    assert booked.history == [(1.0, 0.1, 100)]
    assert booked.epsilon(cfg.delta) == privacy.epsilon_from_history([(1.0, 0.1, 100)], 1e-5)
    assert booked.epsilon(1e-3) == pytest.approx(5.64, abs=0.005)  # RDP, the default


def test_server_uses_the_privacy_core_accountant() -> None:
    # server/privacy.py imports PrivacyAccountant from server.dp: the same class
    assert server.dp.PrivacyAccountant is privacy.PrivacyAccountant
    assert CentralDPConfig(noise_multiplier=1.0, clipping_norm=1.0).accountant == (
        privacy.DEFAULT_ACCOUNTANT)
    with pytest.raises(ValueError, match="cannot use the gdp accountant"):
        CentralDPConfig(noise_multiplier=1.0, clipping_norm=1.0, accountant="gdp")


def test_accounting_event_per_sampling_mode() -> None:
    def dp(sampling: str, m: int) -> DPFedAvg:
        cfg = CentralDPConfig(noise_multiplier=1.2, clipping_norm=1.0,
                              sampling=sampling)  # type: ignore[arg-type]
        return DPFedAvg(cfg, m)

    assert dp("poisson", 10).accounting_event(200) == (1.2, 0.05)
    assert dp("none", 20).accounting_event(20) == (1.2, 1.0)
    assert dp("fixed", 10).accounting_event(200) == (0.6, 1.0)
    with pytest.raises(ValueError, match="every node"):
        dp("none", 10).accounting_event(20)
    with pytest.raises(ValueError, match="m <= N"):
        dp("poisson", 30).accounting_event(20)


def test_fixed_sampling_books_a_gaussian_of_sensitivity_two_c() -> None:
    # RDP of the unsampled Gaussian mechanism: alpha * Delta^2 / (2 sigma^2), with
    # Delta = 2C (a fixed-size sample swaps one client for another) and sigma = z C.
    z, c, rounds = 3.0, 0.7, 40
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = np.array([a * (2 * c) ** 2 / (2 * (z * c) ** 2) for a in orders]) * rounds
    expected, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    dp = DPFedAvg(CentralDPConfig(noise_multiplier=z, clipping_norm=c, sampling="fixed"), 10)
    booked = PrivacyAccountant("rdp")
    booked.step(*dp.accounting_event(100), steps=rounds)
    assert booked.epsilon(1e-5) == pytest.approx(float(expected), rel=1e-9)
    poisson = PrivacyAccountant("rdp")
    poisson.step(*DPFedAvg(CentralDPConfig(noise_multiplier=z, clipping_norm=c), 10)
                 .accounting_event(100), steps=rounds)
    assert poisson.epsilon(1e-5) < booked.epsilon(1e-5)


def test_poisson_sample_edges_and_reproducibility() -> None:
    assert poisson_sample(7, 0.0, generator=gen(0)) == []
    assert poisson_sample(7, 1.0, generator=gen(0)) == list(range(7))
    assert poisson_sample(0, 0.5, generator=gen(0)) == []
    assert poisson_sample(50, 0.3, generator=gen(5)) == poisson_sample(50, 0.3, generator=gen(5))
    with pytest.raises(ValueError):
        poisson_sample(5, 1.5, generator=gen(0))


def test_poisson_sample_is_independent_bernoulli() -> None:
    n_nodes, q, draws = 40, 0.25, 3000
    g = gen(11)
    hits = np.zeros((draws, n_nodes))
    for t in range(draws):
        idx = poisson_sample(n_nodes, q, generator=g)
        assert idx == sorted(set(idx))
        hits[t, idx] = 1
    per_node = hits.mean(axis=0)  # each ~ q, se = sqrt(q(1-q)/draws) ~ 0.0079
    assert np.abs(per_node - q).max() < 5 * math.sqrt(q * (1 - q) / draws)
    sizes = hits.sum(axis=1)  # Binomial(40, 0.25): mean 10, variance 7.5
    assert abs(sizes.mean() - n_nodes * q) < 5 * math.sqrt(n_nodes * q * (1 - q) / draws)
    assert sizes.var() == pytest.approx(n_nodes * q * (1 - q), rel=0.1)


# --- DP mean and its noise --------------------------------------------------------------------


def test_dp_mean_without_noise_is_fixed_denominator_mean_of_clipped() -> None:
    x = torch.tensor([[3.0, 4.0, 0.0], [0.1, 0.0, 0.2], [0.0, -10.0, 0.0]], dtype=torch.float64)
    expected = (torch.tensor([0.6, 0.8, 0.0]) + torch.tensor([0.1, 0.0, 0.2])
                + torch.tensor([0.0, -1.0, 0.0])).double() / 5
    out = dp_mean(x, 1.0, 0.0, 5, generator=gen(0))
    assert out.dtype == torch.float64
    assert torch.allclose(out, expected, atol=1e-6)


def test_dp_mean_is_the_privacy_core_clip_then_noise_bit_for_bit() -> None:
    x = torch.randn(6, 50, generator=gen(1)) * 2
    clipped, _, _ = privacy.clip_updates(x, 0.8)
    noise = gaussian_noise(50, 1.1 * 0.8, generator=gen(2))
    assert torch.equal(dp_mean(x, 0.8, 1.1, 9, generator=gen(2)), (clipped.sum(0) + noise) / 9)


def test_dp_mean_with_no_replies_is_pure_noise() -> None:
    out = dp_mean(torch.zeros(0, 4), 2.0, 1.5, 10, generator=gen(3))
    expected = gaussian_noise(4, 1.5 * 2.0, generator=gen(3)) / 10
    assert torch.equal(out, expected)


def test_dp_mean_noise_has_std_zc_over_m() -> None:
    z, c, m, d, draws = 1.3, 0.5, 8, 250, 400
    x = torch.randn(6, d, generator=gen(1)) * 0.3
    clean = dp_mean(x, c, 0.0, m, generator=gen(0))
    g = gen(2)
    noise = torch.stack([dp_mean(x, c, z, m, generator=g) - clean for _ in range(draws)])
    samples = noise.flatten().double().numpy()
    sigma, n = z * c / m, samples.size
    assert abs(samples.mean()) < 5 * sigma / math.sqrt(n)
    assert abs(samples.std() / sigma - 1) < 5 / math.sqrt(2 * n)
    assert stats.kstest(samples / sigma, "norm").pvalue > 1e-4
    assert torch.equal(dp_mean(x, c, z, m, generator=gen(9)), dp_mean(x, c, z, m, generator=gen(9)))


def test_fixed_dpfedavg_equals_dp_mean() -> None:
    cfg = CentralDPConfig(noise_multiplier=0.9, clipping_norm=0.4)
    dp = DPFedAvg(cfg, 7)
    x = torch.randn(5, 30, generator=gen(4))
    result, state = dp.apply(dp.init(), x, generator=gen(8))
    assert torch.equal(result.update, dp_mean(x, 0.4, 0.9, 7, generator=gen(8)))
    assert result.noise_std == pytest.approx(0.9 * 0.4 / 7)
    assert result.unclipped_fraction is None
    assert state == CentralDPState(0.4, 1)
    assert CentralDPState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


# --- adaptive clipping --------------------------------------------------------------------------


def test_update_noise_multiplier_identity_and_limit() -> None:
    for z, sb in [(1.0, 5.0), (0.7, 0.5), (2.0, 1.01)]:
        zd = update_noise_multiplier(z, sb)
        assert zd**-2 + (2 * sb) ** -2 == pytest.approx(z**-2, rel=1e-12)
        assert zd > z
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        update_noise_multiplier(1.0, 0.5)
    cfg = CentralDPConfig(noise_multiplier=1.0, clipping_norm=1.0, adaptive=True)
    assert DPFedAvg(cfg, 100).count_stddev == 5.0  # m / 20
    with pytest.raises(ValueError, match="sample more clients"):
        DPFedAvg(cfg, 10)  # sigma_b = 0.5 = z / 2


@pytest.mark.parametrize(("gamma", "start"), [(0.5, 0.1), (0.5, 50.0), (0.9, 0.5)])
def test_adaptive_clip_tracks_target_quantile(gamma: float, start: float) -> None:
    # norms ~ 2 exp(N(0, 0.5^2)): the gamma quantile is 2 exp(0.5 Phi^-1(gamma))
    m, d, rounds = 100, 5, 300
    cfg = CentralDPConfig(noise_multiplier=1.0, clipping_norm=start, adaptive=True,
                          target_quantile=gamma, clip_lr=0.2)
    dp = DPFedAvg(cfg, m)
    g_data, g_noise = gen(21), gen(22)
    state = dp.init()
    trace = []
    for _ in range(rounds):
        dirs = torch.randn(m, d, generator=g_data, dtype=torch.float64)
        norms = 2 * torch.exp(0.5 * torch.randn(m, generator=g_data, dtype=torch.float64))
        x = dirs / dirs.norm(dim=1, keepdim=True) * norms.unsqueeze(1)
        result, new = dp.apply(state, x, generator=g_noise)
        assert result.clipping_norm == state.clipping_norm
        assert result.unclipped_fraction is not None
        assert new.clipping_norm == pytest.approx(
            state.clipping_norm * math.exp(-0.2 * (result.unclipped_fraction - gamma)))
        assert result.noise_std == pytest.approx(dp.z_update * state.clipping_norm / m)
        state = new
        trace.append(state.clipping_norm)
    target = 2 * math.exp(0.5 * float(stats.norm.ppf(gamma)))
    assert abs(np.mean(trace[-50:]) / target - 1) < 0.1


def test_adaptive_unclipped_fraction_is_unbiased() -> None:
    # 100 updates, 30 of norm 0.5 and 70 of norm 2, C = 1: b = 0.3 on average
    m = 100
    dp = DPFedAvg(CentralDPConfig(noise_multiplier=1.0, clipping_norm=1.0, adaptive=True), m)
    x = torch.zeros(m, 2, dtype=torch.float64)
    x[:30, 0], x[30:, 0] = 0.5, 2.0
    g = gen(5)
    fractions = [dp.apply(dp.init(), x, generator=g)[0].unclipped_fraction for _ in range(500)]
    values = np.array(fractions, dtype=float)
    se = dp.count_stddev / m / math.sqrt(values.size)
    assert abs(values.mean() - 0.3) < 5 * se
    assert values.std() == pytest.approx(dp.count_stddev / m, rel=0.15)


# --- rule compatibility ---------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["krum", "median", "trimmed_mean", "multi_krum", "bulyan",
                                  "geometric_median", "centered_clipping"])
def test_check_rule_compatible_refuses_non_mean(rule: str) -> None:
    with pytest.raises(ValueError, match="unweighted mean"):
        check_rule_compatible(rule)


def test_check_rule_compatible_refuses_an_unknown_rule_by_name() -> None:
    with pytest.raises(KeyError, match="did you mean 'median'"):
        check_rule_compatible("medain")


def test_check_rule_compatible_mean_weights_and_pre() -> None:
    check_rule_compatible("mean")
    check_rule_compatible("mean", weights=[5.0, 5.0, 5.0], pre=["norm_clip"])
    check_rule_compatible("mean", weights=torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="unequal weights"):
        check_rule_compatible("mean", weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="bucketing"):
        check_rule_compatible("mean", pre=["bucketing"])


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"noise_multiplier": 0.0}, {"noise_multiplier": -1.0}, {"clipping_norm": 0.0},
    {"clipping_norm": float("inf")}, {"target_quantile": 1.0}, {"clip_lr": 0.0},
    {"delta": 1.0}, {"delta": 0.0}, {"max_epsilon": -1.0}, {"sampling": "uniform"},
    {"accountant": "gdp"}, {"accountant": "pld"}, {"clipped_count_stddev": 1.0},
    {"adaptive": True, "clipped_count_stddev": -1.0}, {"noise_multiplier": True},
])
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    params: dict[str, object] = {"noise_multiplier": 1.0, "clipping_norm": 1.0, **bad}
    with pytest.raises(ValueError):
        CentralDPConfig(**params)  # type: ignore[arg-type]


def test_config_from_dict() -> None:
    cfg = CentralDPConfig.from_dict({"noise-multiplier": 1, "clipping-norm": 2,
                                     "sampling": "none", "max-epsilon": 8})
    assert cfg == CentralDPConfig(noise_multiplier=1.0, clipping_norm=2.0, sampling="none",
                                  max_epsilon=8.0)
    with pytest.raises(TypeError, match="noise_multiplier"):
        CentralDPConfig.from_dict({"noise-multipler": 1.0, "clipping-norm": 1.0})
