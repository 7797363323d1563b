"""Client-side DP: DP-SGD with persistent accounting across rounds, and local DP.

The accounting, clipping and calibration they share are tested in ``tests/privacy``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from client.dp_sgd import (
    PrivacyBudgetExceeded,
    check_dp_compatible,
    dp_sgd_train,
    make_dp_compatible,
    make_private_trainer,
)
from client.local_dp import local_dp_update
from privacy import clip_updates, gaussian_noise, gaussian_sigma, history_from_json

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the", "ignore:GDP accounting")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def library_epsilon(kind: str, history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def linear(d_in: int, d_out: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default uniform(-1/sqrt(d_in), 1/sqrt(d_in)) initialisation,
    drawn from ``generator`` (built on the meta device, so the global RNG is not touched)."""
    layer = nn.Linear(d_in, d_out, device="meta").to_empty(device="cpu")
    bound = 1 / math.sqrt(d_in)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
    return layer


def tiny_task(seed: int = 0, n: int = 40) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = gen(seed)
    model = nn.Sequential(linear(4, 6, g), nn.ReLU(), linear(6, 2, g))
    x = torch.randn(n, 4, generator=gen(seed + 100))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return model, x, y


def sgd(model: nn.Module, lr: float = 0.2) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


# --- local DP ------------------------------------------------------------------------------


def test_local_dp_update_clips_without_noise() -> None:
    long = torch.tensor([3.0, 4.0, 0.0])
    out = local_dp_update(long, 1.0, noise_std=0.0, generator=gen(0))
    assert float(torch.linalg.vector_norm(out.double())) <= 1.0
    assert torch.allclose(out, long / 5, rtol=1e-6)
    short = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
    assert torch.equal(local_dp_update(short, 1.0, noise_std=0.0, generator=gen(0)), short)


def test_local_dp_update_noise_is_calibrated_to_two_c() -> None:
    c, eps, delta, d = 0.5, 2.0, 1e-5, 40_000
    x = torch.zeros(d, dtype=torch.float64)
    x[0] = 10.0
    out = local_dp_update(x, c, epsilon=eps, delta=delta, generator=gen(1))
    clipped = torch.zeros(d, dtype=torch.float64)
    clipped[0] = c
    residual = (out - clipped)[1:].numpy()
    sigma = gaussian_sigma(eps, delta, 2 * c)
    assert abs(residual.std() / sigma - 1) < 5 / math.sqrt(2 * residual.size)
    assert abs(residual.mean()) < 5 * sigma / math.sqrt(residual.size)
    assert torch.equal(out, local_dp_update(x, c, epsilon=eps, delta=delta, generator=gen(1)))


def test_local_dp_update_rejects_ambiguous_noise() -> None:
    x = torch.ones(3)
    with pytest.raises(ValueError, match="not both"):
        local_dp_update(x, 1.0, noise_std=1.0, epsilon=1.0, delta=1e-5, generator=gen(0))
    with pytest.raises(ValueError, match="needs noise_std"):
        local_dp_update(x, 1.0, epsilon=1.0, generator=gen(0))
    with pytest.raises(ValueError, match="epsilon < 1"):
        local_dp_update(x, 1.0, epsilon=2.0, delta=1e-5, method="classic", generator=gen(0))
    with pytest.raises(ValueError, match="NaN"):
        local_dp_update(torch.tensor([float("nan")]), 1.0, noise_std=0.0, generator=gen(0))
    with pytest.raises(ValueError, match="noise_std"):
        local_dp_update(x, 1.0, noise_std=-1.0, generator=gen(0))
    with pytest.raises(ValueError, match="clipping_norm"):
        local_dp_update(x, 0.0, noise_std=1.0, generator=gen(0))


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_local_dp_update_is_the_privacy_core_clip_then_noise_bit_for_bit(scale: float) -> None:
    x = torch.randn(1000, generator=gen(5)) * scale
    clipped, _, _ = clip_updates(x.unsqueeze(0), 1.0)
    sigma = gaussian_sigma(2.0, 1e-5, 2.0)
    expected = clipped[0] + gaussian_noise(1000, sigma, generator=gen(6))
    assert torch.equal(local_dp_update(x, 1.0, epsilon=2.0, delta=1e-5, generator=gen(6)),
                       expected)


# --- DP-SGD --------------------------------------------------------------------------------


def test_dp_sgd_epsilon_accumulates_across_rounds_like_one_accountant() -> None:
    model, x, y = tiny_task()
    kw = dict(batch_size=8, max_grad_norm=1.0, epochs=2, delta=1e-5, noise_multiplier=1.1)
    r1 = dp_sgd_train(model, sgd(model), x, y, generator=gen(1), **kw)  # type: ignore[arg-type]
    q, per_round = 1 / 5, 2 * 5  # N = 40, batch 8 -> q = 1/5, 5 steps per epoch
    assert r1.history == ((1.1, q, per_round),) and r1.steps == per_round
    assert r1.sample_rate == q
    stored = r1.history_json()  # what the ClientApp keeps in context.state
    r2 = dp_sgd_train(model, sgd(model), x, y, generator=gen(2),
                      history=history_from_json(stored), **kw)  # type: ignore[arg-type]
    assert r2.history == ((1.1, q, 2 * per_round),)
    # the default accountant is RDP (privacy.DEFAULT_ACCOUNTANT)
    assert r1.epsilon == pytest.approx(library_epsilon("rdp", [(1.1, q, per_round)], 1e-5),
                                       abs=1e-9)
    assert r2.epsilon == pytest.approx(library_epsilon("rdp", [(1.1, q, 2 * per_round)], 1e-5),
                                       abs=1e-9)
    assert r2.epsilon > r1.epsilon
    # forgetting the history would report the first round's epsilon again
    fresh = dp_sgd_train(model, sgd(model), x, y, generator=gen(3), **kw)  # type: ignore[arg-type]
    assert fresh.epsilon == pytest.approx(r1.epsilon, abs=1e-9)
    # one uninterrupted run of the same total steps books the same history
    model2, _, _ = tiny_task()
    whole = dp_sgd_train(model2, sgd(model2), x, y, generator=gen(1),
                         **{**kw, "epochs": 4})  # type: ignore[arg-type]
    assert whole.history == r2.history and whole.epsilon == r2.epsilon


def test_dp_sgd_with_the_prv_accountant_reports_opacus_prv() -> None:
    model, x, y = tiny_task()
    res = dp_sgd_train(model, sgd(model), x, y, batch_size=8, max_grad_norm=1.0, epochs=2,
                       delta=1e-5, noise_multiplier=1.1, accountant="prv", generator=gen(1))
    assert res.history == ((1.1, 0.2, 10),)
    assert res.epsilon == pytest.approx(library_epsilon("prv", [(1.1, 0.2, 10)], 1e-5), abs=1e-9)
    # same training whatever the accountant: it only changes what is reported
    model2, _, _ = tiny_task()
    dp_sgd_train(model2, sgd(model2), x, y, batch_size=8, max_grad_norm=1.0, epochs=2,
                 delta=1e-5, noise_multiplier=1.1, accountant="rdp", generator=gen(1))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(),
                                                 strict=True))


def test_dp_sgd_with_gdp_refuses_a_changed_noise_before_training() -> None:
    model, x, y = tiny_task()
    kw = dict(batch_size=8, max_grad_norm=1.0, epochs=1, delta=1e-5, accountant="gdp")
    r1 = dp_sgd_train(model, sgd(model), x, y, generator=gen(1), noise_multiplier=1.0,
                      **kw)  # type: ignore[arg-type]
    assert r1.history == ((1.0, 0.2, 5),) and r1.epsilon > 0
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="identical steps only"):
        dp_sgd_train(model, sgd(model), x, y, generator=gen(2), noise_multiplier=1.5,
                     history=r1.history, **kw)  # type: ignore[arg-type]
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_dp_sgd_repeated_rounds_leave_a_plain_model() -> None:
    model, x, y = tiny_task()
    keys = list(model.state_dict())
    hist: tuple[tuple[float, float, int], ...] = ()
    for r in range(3):  # would fail with "Trying to add hooks twice" without cleanup
        res = dp_sgd_train(model, sgd(model), x, y, batch_size=10, max_grad_norm=0.5, epochs=1,
                           delta=1e-5, noise_multiplier=1.0, accountant="rdp",
                           history=hist, generator=gen(r))
        hist = res.history
        assert list(model.state_dict()) == keys
        assert not hasattr(model, "autograd_grad_sample_hooks")
        for p in model.parameters():
            assert not any(hasattr(p, a) for a in ("grad_sample", "_forward_counter",
                                                   "summed_grad", "activations"))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert hist == ((1.0, 0.25, 12),)
    assert res.epsilon == pytest.approx(library_epsilon("rdp", list(hist), 1e-5), abs=1e-6)


def test_dp_sgd_step_is_clipped_per_sample_mean() -> None:
    # one step with q = 1 (batch >= N) and negligible noise: theta -= lr * sum_i clip(g_i) / N
    model = linear(3, 2, gen(3))
    x = torch.randn(6, 3, generator=gen(4)) * 3
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    lr, s = 0.5, 0.1
    before = [p.detach().clone() for p in model.parameters()]
    grads = []
    for i in range(6):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        g = torch.autograd.grad(loss, list(model.parameters()))
        flat = torch.cat([t.reshape(-1) for t in g])
        grads.append(flat * min(1.0, s / float(flat.norm())))
    expected_step = -lr * torch.stack(grads).sum(0) / 6
    res = dp_sgd_train(model, sgd(model, lr), x, y, batch_size=6, max_grad_norm=s, epochs=1,
                       delta=1e-5, noise_multiplier=1e-9, accountant="rdp", generator=gen(0))
    assert res.sample_rate == 1.0 and res.steps == 1
    params = list(model.parameters())
    step = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before, strict=True)])
    assert torch.allclose(step, expected_step, atol=1e-6)


def test_dp_sgd_is_reproducible_from_its_generator() -> None:
    results = []
    for seed in (7, 7, 8):
        model, x, y = tiny_task()
        dp_sgd_train(model, sgd(model), x, y, batch_size=8, max_grad_norm=1.0, epochs=1,
                     delta=1e-5, noise_multiplier=1.0, accountant="rdp", generator=gen(seed))
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_batchnorm_is_refused_with_the_fix() -> None:
    model = nn.Sequential(linear(4, 8, gen(0)), nn.BatchNorm1d(8), nn.ReLU(), linear(8, 2, gen(1)))
    _, x, y = tiny_task()
    with pytest.raises(ValueError, match="GroupNorm"):
        dp_sgd_train(model, sgd(model), x, y, batch_size=8, max_grad_norm=1.0, epochs=1,
                     delta=1e-5, noise_multiplier=1.0, generator=gen(0))
    fixed = make_dp_compatible(model)
    check_dp_compatible(fixed)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())


def test_target_epsilon_mode_ends_within_target_then_stops() -> None:
    model, x, y = tiny_task()
    target, rounds = 3.0, 3
    kw = dict(batch_size=8, max_grad_norm=1.0, epochs=1, delta=1e-5, target_epsilon=target,
              planned_rounds=rounds, accountant="rdp")
    hist: tuple[tuple[float, float, int], ...] = ()
    eps = []
    for r in range(rounds):
        res = dp_sgd_train(model, sgd(model), x, y, generator=gen(r), history=hist,
                           **kw)  # type: ignore[arg-type]
        hist = res.history
        eps.append(res.epsilon)
    assert eps[0] < eps[1] < eps[2] <= target
    assert eps[2] > target - 0.05  # the search spends nearly all of it
    assert eps[2] == pytest.approx(library_epsilon("rdp", list(hist), 1e-5), abs=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PrivacyBudgetExceeded, match="budget"):
        dp_sgd_train(model, sgd(model), x, y, generator=gen(9), history=hist,
                     **kw)  # type: ignore[arg-type]
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_max_epsilon_budget_with_fixed_noise() -> None:
    model, x, y = tiny_task()
    spent = [(1.0, 0.2, 400)]
    with pytest.raises(PrivacyBudgetExceeded):
        make_private_trainer(model, sgd(model), x, y, batch_size=8, max_grad_norm=1.0, epochs=1,
                             delta=1e-5, noise_multiplier=1.0, max_epsilon=1.0,
                             accountant="rdp", history=spent, generator=gen(0))


@pytest.mark.parametrize("bad", [
    {"noise_multiplier": 1.0, "target_epsilon": 2.0},
    {},
    {"target_epsilon": 2.0},  # no planned_rounds
    {"noise_multiplier": 0.0},
    {"noise_multiplier": 1.0, "batch_size": 0},
    {"noise_multiplier": 1.0, "delta": 1.0},
    {"noise_multiplier": 1.0, "accountant": "pld"},
])
def test_make_private_trainer_rejects_bad_arguments(bad: dict[str, object]) -> None:
    model, x, y = tiny_task()
    kw: dict[str, object] = dict(batch_size=8, max_grad_norm=1.0, epochs=1, delta=1e-5)
    kw.update(bad)
    with pytest.raises(ValueError):
        make_private_trainer(model, sgd(model), x, y, generator=gen(0),
                             **kw)  # type: ignore[arg-type]
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_trainer_refuses_to_train_after_close() -> None:
    model, x, y = tiny_task()
    trainer = make_private_trainer(model, sgd(model), x, y, batch_size=8, max_grad_norm=1.0,
                                   epochs=1, delta=1e-5, noise_multiplier=1.0,
                                   accountant="rdp", generator=gen(0))
    with trainer:
        loss = trainer.train()
    assert np.isfinite(loss)
    with pytest.raises(RuntimeError, match="closed"):
        trainer.train()
