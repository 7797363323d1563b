"""Batch orders: the hashed order is a fair shuffle, the same for a client alone or among
many, and ``local_train`` and the batched schedule draw the same orders from a source."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from client.functional import client_batches, make_schedule
from client.order import (
    HashedOrder,
    draw_permutations,
    hashed_permutations,
    hashed_round_seed,
)
from client.train import TrainSettings, local_train
from runconfig.config import RunConfig

CPU = torch.device("cpu")


def test_every_segment_is_a_permutation() -> None:
    sizes = [5, 1, 0, 33, 2]
    p = hashed_permutations(11, [0, 1, 2, 3, 4], sizes, 3)
    assert p.dtype == torch.int64 and p.shape == (3 * sum(sizes),)
    pos = 0
    for n in sizes:
        for _ in range(3):
            assert sorted(p[pos:pos + n].tolist()) == list(range(n))
            pos += n


def test_a_client_alone_gets_its_order_among_many() -> None:
    gen = torch.Generator().manual_seed(0)
    clients = torch.randint(-1, 10**6, (40,), generator=gen).tolist()
    sizes = torch.randint(1, 70, (40,), generator=gen).tolist()
    together = hashed_permutations(99, clients, sizes, 2)
    pos = 0
    for c, n in zip(clients, sizes, strict=True):
        assert torch.equal(together[pos:pos + 2 * n], hashed_permutations(99, [c], [n], 2))
        pos += 2 * n


def test_orders_differ_by_seed_client_and_epoch() -> None:
    base = hashed_permutations(1, [7], [50], 2)
    assert not torch.equal(base[:50], base[50:])  # epochs
    assert not torch.equal(base, hashed_permutations(2, [7], [50], 2))  # seeds
    assert not torch.equal(base, hashed_permutations(1, [8], [50], 2))  # clients
    assert torch.equal(base, hashed_permutations(1, [7], [50], 2))  # reproducible
    # 64-bit seeds and negative client keys (a node with its own data file) are fine
    big = hashed_permutations(2**63 - 1, [-1], [50], 1)
    assert sorted(big.tolist()) == list(range(50))


def test_the_hashed_shuffle_is_uniform() -> None:
    """Where example 0 lands over 4000 client keys: uniform over 8 places (chi-square), and
    every ordered pair of places (0 before 1) about half the time."""
    n, draws = 8, 4000
    p = hashed_permutations(5, list(range(draws)), [n] * draws, 1).reshape(draws, n)
    place_of_0 = (p == 0).float().argmax(1)
    counts = torch.bincount(place_of_0, minlength=n).tolist()
    assert stats.chisquare(counts).pvalue > 1e-3, counts
    before = int(((p == 0).float().argmax(1) < (p == 1).float().argmax(1)).sum())
    assert stats.binomtest(before, draws).pvalue > 1e-3, before


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="one size >= 0 per client"):
        hashed_permutations(0, [1, 2], [3], 1)
    with pytest.raises(ValueError, match="epochs >= 1"):
        hashed_permutations(0, [1], [3], 0)
    with pytest.raises(ValueError, match="one size >= 0"):
        hashed_permutations(0, [1], [-3], 1)
    with pytest.raises(ValueError, match="one source per client"):
        draw_permutations([HashedOrder(1, 2)], [3, 4], 1)
    with pytest.raises(ValueError, match="share its seed"):
        draw_permutations([HashedOrder(1, 2), HashedOrder(2, 2)], [3, 4], 1)


def test_mixed_sources_draw_what_each_draws_alone() -> None:
    sources = [HashedOrder(4, 0), torch.Generator().manual_seed(3), HashedOrder(4, 2)]
    got = draw_permutations(sources, [3, 5, 4], 2)
    g = torch.Generator().manual_seed(3)
    torch.randint(0, 2**62, (1,), generator=g)  # local_train's dropout seed comes first
    want = torch.cat([hashed_permutations(4, [0], [3], 2), torch.randperm(5, generator=g),
                      torch.randperm(5, generator=g), hashed_permutations(4, [2], [4], 2)])
    assert torch.equal(got, want)


def test_local_train_uses_the_hashed_batches() -> None:
    """local_train's batches with a hashed order are client_batches' (so the batched engine's
    schedule): a model that records its inputs sees exactly those rows."""
    seen: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x[:, 0].detach().clone())
            return self.lin(x)  # type: ignore[no-any-return]

    n, st = 11, TrainSettings(epochs=2, batch_size=4)
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)  # row i holds the value i
    y = torch.zeros(n, dtype=torch.int64)
    order = HashedOrder(hashed_round_seed(3, 2), 5)
    local_train(Recorder(), x, y, st, device=CPU, generator=order)
    want = client_batches(n, st, generator=order)
    assert [s.long().tolist() for s in seen] == [b.tolist() for b in want]
    plan = make_schedule([n], st, [order])
    assert [r[0].tolist()[:len(b)] for r, b in zip(plan.rows, want, strict=True)] == \
        [b.tolist() for b in want]


def test_the_config_key_is_checked() -> None:
    from simulations.config import resolve_config

    flat = dict(resolve_config(None, ["batch-order=hashed"]))
    flat = {k: v for k, v in flat.items() if k not in ("num-clients", "engine", "reference")}
    assert RunConfig.from_flat(flat).batch_order == "hashed"
    with pytest.raises(ValueError, match="batch-order must be one of generator, hashed"):
        RunConfig.from_flat({**flat, "batch-order": "random"})
    with pytest.raises(ValueError, match="use batch-order='generator' with dp-sgd"):
        RunConfig.from_flat({**flat, "dp-sgd": "noise_multiplier=1.0, max_grad_norm=1.0"})
