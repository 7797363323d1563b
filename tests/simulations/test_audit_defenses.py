"""Each defense's gradient transformation, checked against its formula and against the
mechanism it stands for (the privacy core, the client's local DP)."""

from __future__ import annotations

import math

import pytest
import torch

from client.local_dp import local_dp_update
from privacy import clip_updates, gaussian_noise
from simulations.audit.defenses import (
    DEFENSES,
    ClientStep,
    batch_gradient,
    dp_sgd_gradient,
    draw_client_batches,
    flatten,
    make_defense,
    per_sample_gradients,
    prune_smallest,
)
from simulations.datasets import load_dataset
from simulations.models import build_model

B = 4


@pytest.fixture(scope="module")
def step() -> ClientStep:
    ds = load_dataset("digits", seed=0)
    model = build_model("mlp", ds.input_shape, ds.num_classes,
                        generator=torch.Generator().manual_seed(0)).eval()
    return ClientStep(model, ds.x_train[:B], ds.y_train[:B], lr=0.1,
                      pool_x=ds.x_train[B:], pool_y=ds.y_train[B:])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_names_and_errors() -> None:
    assert DEFENSES.names() == sorted(
        ["clipping", "dp_sgd", "local_dp", "none", "pruning", "secagg_sum"])
    with pytest.raises(KeyError, match="did you mean 'dp_sgd'"):
        make_defense("dp_sdg", noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="max_grad_norm"):
        make_defense("dp_sgd", noise_multiplier=1.0, max_norm=1.0)
    with pytest.raises(ValueError, match="noise_multiplier >= 0"):
        make_defense("dp_sgd", noise_multiplier=-1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
        make_defense("pruning", fraction=1.5)
    with pytest.raises(ValueError, match="k >= 1"):
        make_defense("secagg_sum", k=0)


def test_per_sample_gradients_match_one_example_at_a_time(step: ClientStep) -> None:
    per = per_sample_gradients(step.model, step.x, step.y)
    for i in range(B):
        single = batch_gradient(step.model, step.x[i:i + 1], step.y[i:i + 1])
        for p, s in zip(per, single, strict=True):
            assert torch.allclose(p[i], s, atol=1e-6)
    mean = [p.mean(0) for p in per]
    for m, g in zip(mean, batch_gradient(step.model, step.x, step.y), strict=True):
        assert torch.allclose(m, g, atol=1e-6)


def test_none_is_the_exact_batch_gradient(step: ClientStep) -> None:
    obs = make_defense("none")(step, generator=_gen(0))
    assert (obs.num_examples, obs.normaliser) == (B, B)
    for o, g in zip(obs.gradient, batch_gradient(step.model, step.x, step.y), strict=True):
        assert torch.equal(o, g)


def test_dp_sgd_without_noise_is_the_mean_of_clipped_per_sample_gradients(
        step: ClientStep) -> None:
    c = 0.5
    obs = make_defense("dp_sgd", noise_multiplier=0.0, max_grad_norm=c)(step, generator=_gen(0))
    per = flatten(per_sample_gradients(step.model, step.x, step.y), batch_dims=1)  # (B, d)
    norms = per.norm(dim=1)
    assert (norms > c).all()  # the check below is about clipping, so every row must clip
    clipped = per * (c / norms)[:, None]
    assert torch.allclose(clipped.norm(dim=1), torch.full((B,), c), atol=1e-6)
    assert torch.allclose(flatten(obs.gradient), clipped.mean(0), atol=1e-7)
    # a large C clips nothing: DP-SGD without noise is the plain gradient
    loose = make_defense("dp_sgd", noise_multiplier=0.0, max_grad_norm=1e6)(step,
                                                                           generator=_gen(0))
    assert torch.allclose(flatten(loose.gradient),
                          flatten(batch_gradient(step.model, step.x, step.y)), atol=1e-7)


def test_dp_sgd_noise_is_gaussian_with_std_z_c_over_b() -> None:
    b, d, z, c = 8, 40_000, 0.7, 2.0
    per = torch.randn(b, d, generator=_gen(1), dtype=torch.float64)
    clean = dp_sgd_gradient(per, noise_multiplier=0.0, max_grad_norm=c, generator=_gen(2))
    noisy = dp_sgd_gradient(per, noise_multiplier=z, max_grad_norm=c, generator=_gen(2))
    e = (noisy - clean) * b / (z * c)  # standard normal coordinates
    # mean 0 (se 0.005), variance 1 (se 0.007), kurtosis 3 (se 0.025)
    assert abs(float(e.mean())) < 0.025
    assert abs(float(e.var()) - 1) < 0.035
    assert abs(float((e**4).mean() / e.var() ** 2) - 3) < 0.12
    # same generator seed, same noise
    again = dp_sgd_gradient(per, noise_multiplier=z, max_grad_norm=c, generator=_gen(2))
    assert torch.equal(noisy, again)


def test_dp_sgd_is_the_privacy_core_clip_then_noise_bit_for_bit() -> None:
    per = torch.randn(5, 300, generator=_gen(7))
    got = dp_sgd_gradient(per, noise_multiplier=0.8, max_grad_norm=1.5, generator=_gen(8))
    clipped, _, _ = clip_updates(per, 1.5)
    noise = gaussian_noise(300, 0.8 * 1.5, generator=_gen(8))
    assert torch.equal(got, (clipped.sum(0) + noise) / 5)


def test_dp_sgd_doc_example_by_hand() -> None:
    g = torch.tensor([[3.0, 4.0], [0.0, 0.5]], dtype=torch.float64)
    got = dp_sgd_gradient(g, noise_multiplier=0.0, max_grad_norm=1.0, generator=_gen(0))
    # row 1 has norm 5 -> (0.6, 0.8); row 2 has norm 0.5 <= 1 -> unchanged
    assert torch.allclose(got, torch.tensor([0.3, 0.65], dtype=torch.float64))


@pytest.mark.parametrize("max_norm", [1e-3, 0.05, 1e3])
def test_clipping_bounds_the_update_norm_in_update_units(step: ClientStep,
                                                        max_norm: float) -> None:
    obs = make_defense("clipping", max_norm=max_norm)(step, generator=_gen(0))
    g = flatten(batch_gradient(step.model, step.x, step.y))
    u_seen = -step.lr * flatten(obs.gradient)  # the update the server received
    u = -step.lr * g
    if float(u.norm()) > max_norm:
        assert float(u_seen.norm()) == pytest.approx(max_norm, rel=1e-5)
        assert torch.allclose(u_seen, u * (max_norm / u.norm()), atol=1e-9)
    else:
        assert torch.allclose(u_seen, u, atol=1e-9)


def test_local_dp_is_the_clients_local_dp_update(step: ClientStep) -> None:
    obs = make_defense("local_dp", clipping_norm=0.01, noise_std=0.02)(step, generator=_gen(3))
    u = -step.lr * flatten(batch_gradient(step.model, step.x, step.y))
    sent = local_dp_update(u, 0.01, noise_std=0.02, generator=_gen(3))
    assert torch.equal(flatten(obs.gradient), -sent / step.lr)


def test_clipping_is_the_privacy_core_clip(step: ClientStep) -> None:
    obs = make_defense("clipping", max_norm=0.05)(step, generator=_gen(0))
    u = -step.lr * flatten(batch_gradient(step.model, step.x, step.y))
    assert torch.equal(flatten(obs.gradient), -clip_updates(u.unsqueeze(0), 0.05)[0][0] / step.lr)


def test_local_dp_clips_then_adds_noise_of_the_given_std(step: ClientStep) -> None:
    c = 0.01
    quiet = make_defense("local_dp", clipping_norm=c, noise_std=0.0)(step, generator=_gen(3))
    assert float((step.lr * flatten(quiet.gradient)).norm()) <= c * (1 + 1e-5)
    s = 0.02
    loud = make_defense("local_dp", clipping_norm=c, noise_std=s)(step, generator=_gen(3))
    noise = -step.lr * (flatten(loud.gradient) - flatten(quiet.gradient))  # update units
    d = noise.numel()
    assert abs(float(noise.std()) / s - 1) < 5 / math.sqrt(2 * d)
    assert abs(float(noise.mean())) < 5 * s / math.sqrt(d)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9, 0.999, 1.0])
def test_pruning_zeroes_exactly_the_smallest_fraction(fraction: float) -> None:
    v = torch.randn(1001, generator=_gen(4), dtype=torch.float64)  # no zeros, no ties
    out = prune_smallest(v, fraction)
    k = math.floor(fraction * 1001)
    assert int((out == 0).sum()) == k
    kept = out != 0
    assert torch.equal(out[kept], v[kept])
    if 0 < k < 1001:
        assert float(v[~kept].abs().max()) <= float(v[kept].abs().min())


def test_pruning_defense_acts_on_the_whole_flattened_gradient(step: ClientStep) -> None:
    obs = make_defense("pruning", fraction=0.9)(step, generator=_gen(0))
    g = flatten(batch_gradient(step.model, step.x, step.y))
    assert torch.equal(flatten(obs.gradient), prune_smallest(g, 0.9))
    assert int((flatten(obs.gradient) != 0).sum()) <= g.numel() - math.floor(0.9 * g.numel())


@pytest.mark.parametrize("k", [1, 2, 5])
def test_secagg_sum_is_the_sum_of_k_client_gradients(step: ClientStep, k: int) -> None:
    obs = make_defense("secagg_sum", k=k)(step, generator=_gen(5))
    assert (obs.num_examples, obs.normaliser) == (k * B, B)
    assert step.pool_x is not None and step.pool_y is not None
    expected = flatten(batch_gradient(step.model, step.x, step.y))
    if k > 1:
        others = draw_client_batches(step.pool_x, step.pool_y, k - 1, B, generator=_gen(5))
        for xo, yo in others:
            expected = expected + flatten(batch_gradient(step.model, xo, yo))
    assert torch.allclose(flatten(obs.gradient), expected, atol=1e-6)


def test_draw_client_batches_are_disjoint_and_refuse_a_small_pool() -> None:
    pool_x = torch.arange(20, dtype=torch.float32)[:, None]
    pool_y = torch.arange(20)
    batches = draw_client_batches(pool_x, pool_y, 4, 5, generator=_gen(6))
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(20))
    for xb, yb in batches:
        assert torch.equal(xb[:, 0].long(), yb)
    with pytest.raises(ValueError, match="lower k"):
        draw_client_batches(pool_x, pool_y, 5, 5, generator=_gen(6))


def test_secagg_needs_a_pool(step: ClientStep) -> None:
    bare = ClientStep(step.model, step.x, step.y)
    with pytest.raises(ValueError, match="pool_x"):
        make_defense("secagg_sum", k=2)(bare, generator=_gen(0))


def test_client_step_checks_its_inputs() -> None:
    model = build_model("logreg", (3,), 2, generator=_gen(0))
    with pytest.raises(ValueError, match="equal B"):
        ClientStep(model, torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="lr > 0"):
        ClientStep(model, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), lr=0.0)
