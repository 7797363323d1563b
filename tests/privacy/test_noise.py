"""Gaussian noise from a generator, and the calibration of the Gaussian mechanism."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, stats

from privacy import gaussian_noise, gaussian_sigma


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_noise_is_standard_normal_times_std() -> None:
    std, d = 0.7, 200_000
    e = gaussian_noise(d, std, generator=gen(1), dtype=torch.float64) / std
    samples = e.numpy()
    assert abs(samples.mean()) < 5 / math.sqrt(d)
    assert abs(samples.std() - 1) < 5 / math.sqrt(2 * d)
    assert stats.kstest(samples[:20_000], "norm").pvalue > 1e-4


def test_noise_is_a_function_of_the_generator_and_std_does_not_shift_the_stream() -> None:
    a = gaussian_noise(5, 2.0, generator=gen(3))
    assert torch.equal(a, gaussian_noise(5, 2.0, generator=gen(3)))
    assert torch.equal(a, 2.0 * torch.randn(5, generator=gen(3)))
    g = gen(4)
    assert bool((gaussian_noise(3, 0.0, generator=g) == 0).all())
    assert torch.equal(gaussian_noise(3, 1.0, generator=g), torch.randn(6, generator=gen(4))[3:])


def test_gaussian_noise_checks() -> None:
    with pytest.raises(ValueError, match="std"):
        gaussian_noise(3, -1.0, generator=gen(0))
    with pytest.raises(ValueError, match="std"):
        gaussian_noise(3, float("inf"), generator=gen(0))
    with pytest.raises(ValueError, match="d must be"):
        gaussian_noise(-1, 1.0, generator=gen(0))
    with pytest.raises(ValueError, match="generator is on cpu"):
        gaussian_noise(3, 1.0, generator=gen(0), device="meta")


def hockey_stick(sigma: float, epsilon: float, sensitivity: float) -> float:
    """delta(eps) = int max(0, p - e^eps q) for p = N(0, s^2), q = N(Delta, s^2), numerically."""
    def f(x: float) -> float:
        p = stats.norm.pdf(x, 0.0, sigma)
        q = stats.norm.pdf(x, sensitivity, sigma)
        return max(0.0, float(p - math.exp(epsilon) * q))

    lo, hi = -40 * sigma - 40 * sensitivity, 40 * sigma + 40 * sensitivity
    value, _ = integrate.quad(f, lo, hi, limit=500, epsabs=1e-14, epsrel=1e-10,
                              points=[0.0, sensitivity])
    return float(value)


@pytest.mark.parametrize(("eps", "delta", "sens"),
                         [(0.5, 1e-5, 1.0), (2.0, 1e-5, 0.3), (8.0, 1e-6, 2.0), (0.1, 1e-3, 1.0)])
def test_analytic_gaussian_sigma_attains_delta(eps: float, delta: float, sens: float) -> None:
    sigma = gaussian_sigma(eps, delta, sens)
    assert hockey_stick(sigma, eps, sens) == pytest.approx(delta, rel=1e-5)
    assert hockey_stick(sigma * 0.99, eps, sens) > delta  # and it is the smallest such sigma
    if eps < 1:
        assert sigma < gaussian_sigma(eps, delta, sens, method="classic")


def test_sigma_scales_with_the_sensitivity() -> None:
    assert gaussian_sigma(1.5, 1e-5, 2.0) == pytest.approx(2 * gaussian_sigma(1.5, 1e-5, 1.0),
                                                           rel=1e-9)


def test_classic_gaussian_sigma_formula_and_range() -> None:
    assert gaussian_sigma(0.5, 1e-5, 2.0, method="classic") == pytest.approx(
        2.0 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="epsilon < 1"):
        gaussian_sigma(1.0, 1e-5, 1.0, method="classic")
    with pytest.raises(ValueError, match="delta"):
        gaussian_sigma(0.5, 1.5, 1.0)
    with pytest.raises(ValueError, match="unknown method"):
        gaussian_sigma(0.5, 1e-5, 1.0, method="exact")  # type: ignore[arg-type]
