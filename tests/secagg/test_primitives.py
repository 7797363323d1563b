"""Quantisation, Shamir sharing, mask streams, the neighbour graph; and that a masked
upload looks uniform."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from secagg import Msg, Quantiser, SecAggParams, run_local
from secagg.crypto import mask_stream
from secagg.graph import neighbour_count, neighbours, threshold_for
from secagg.shamir import PRIME, reconstruct, share


# -- quantisation ----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12), d=st.integers(1, 40), bits=st.sampled_from([12, 20, 32, 40, 64]),
    clip=st.floats(0.01, 100.0), seed=st.integers(0, 2**31),
)
@example(n=1, d=24, bits=64, clip=1.0, seed=24)  # +clip wrapped to -clip before
def test_decoded_weighted_mean_is_within_half_a_step(
    n: int, d: int, bits: int, clip: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    max_weight = 50
    q = Quantiser.for_round(clip=clip, bits=bits, num_clients=n, max_weight=max_weight) \
        if (2**bits - 1) // (n * max_weight) >= 2 else None
    if q is None:
        return
    x = rng.uniform(-2 * clip, 2 * clip, (n, d))
    w = rng.integers(1, max_weight + 1, n)
    total = np.zeros(d, dtype=q.dtype)
    for xi, wi in zip(x, w, strict=True):
        total += q.encode(xi, int(wi))[0]
    ref = (w[:, None] * np.clip(x, -clip, clip)).sum(0) / w.sum()
    assert np.abs(q.decode(q.reduce(total), int(w.sum())) - ref).max() <= q.error_bound * (1 + 1e-9)


@pytest.mark.parametrize(("num_clients", "max_weight"), [(1, 50), (1, 1), (3, 7)])
def test_the_top_of_the_range_stays_a_level_at_64_bits(num_clients: int, max_weight: int) -> None:
    """At 64 bits the levels exceed float64's 2^53: ``+clip`` rounded past the top level
    and, weighted, wrapped the sum to ``-clip`` (hypothesis found n=1, d=24, clip=1,
    weights 50). Every client at ``+clip`` with the largest weight decodes to ``+clip``."""
    q = Quantiser.for_round(clip=1.0, bits=64, num_clients=num_clients, max_weight=max_weight)
    x = np.array([1.0, 5.0, -1.0, -5.0, 0.999999999999])
    total = np.zeros(5, dtype=q.dtype)
    for _ in range(num_clients):
        z, _ = q.encode(x, max_weight)
        assert int(z.max()) <= q.levels * max_weight
        total += z
    got = q.decode(q.reduce(total), num_clients * max_weight)
    assert np.abs(got - np.clip(x, -1, 1)).max() <= q.error_bound


def test_the_quantiser_refuses_what_would_wrap_or_is_not_a_weight() -> None:
    with pytest.raises(ValueError, match="raise bits"):
        Quantiser.for_round(clip=1.0, bits=8, num_clients=100, max_weight=10)
    q = Quantiser.for_round(clip=1.0, bits=32, num_clients=2, max_weight=10)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="positive integers"):
            q.encode(np.zeros(2), bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        q.encode(np.array([np.nan]), 1)


def test_the_clipped_count_is_exact() -> None:
    q = Quantiser.for_round(clip=1.0, bits=32, num_clients=1, max_weight=1)
    assert q.encode(np.array([-1.5, -1.0, 0.0, 1.0, 1.0001]), 1)[1] == 2


# -- Shamir ----------------------------------------------------------------------------
def test_any_t_shares_rebuild_the_secret_and_fewer_do_not() -> None:
    secret = os.urandom(96)
    holders = [3, 17, 1000, 2**63, 5]
    shares = share(secret, holders, t=3)
    assert {len(s) for s in shares.values()} == {99}
    for subset in itertools.combinations(holders, 3):
        assert reconstruct({h: shares[h] for h in subset}, t=3) == secret
    with pytest.raises(ValueError, match="need 3 shares"):
        reconstruct({h: shares[h] for h in holders[:2]}, t=3)
    # t-1 shares and a forged one interpolate to something else
    forged = {**{h: shares[h] for h in holders[:2]}, 5: os.urandom(99)}
    try:
        assert reconstruct(forged, t=3) != secret
    except ValueError:
        pass  # or to no 32-byte secret at all


def test_t_minus_one_shares_are_uniform_whatever_the_secret() -> None:
    # the share of holder 0 under t=2 is secret + a * 1 with a uniform in GF(p): its top
    # bytes are spread the same way for a zero secret and an all-ones secret
    ones, zeros = bytes([255]) * 32, bytes(32)
    for secret in (ones, zeros):  # bits 255..252 of the share (byte 0 holds bit 256)
        values = [share(secret, [0, 1], 2)[0][1] >> 4 for _ in range(800)]
        hist = np.bincount(np.array(values), minlength=16)
        assert chisquare(hist).pvalue > 1e-4
    assert PRIME > 2**256


def test_share_refuses_bad_thresholds_and_lengths() -> None:
    with pytest.raises(ValueError, match="threshold"):
        share(bytes(32), [1, 2], t=3)
    with pytest.raises(ValueError, match="multiple of 32"):
        share(bytes(31), [1, 2], t=1)
    with pytest.raises(ValueError, match="distinct"):
        share(bytes(32), [1, 1], t=1)


# -- masks -------------------------------------------------------------------------------
def test_distinct_keys_give_distinct_mask_streams() -> None:
    d = 64
    # seeds that Flower's 32-bit fold would map together: equal XOR of their 32-bit words
    a = bytes(32)
    b = (1).to_bytes(4, "big") * 2 + bytes(24)
    assert np.bitwise_xor.reduce(np.frombuffer(a, ">u4")) == np.bitwise_xor.reduce(np.frombuffer(b, ">u4"))
    streams = [mask_stream(a, d, 32), mask_stream(b, d, 32)]
    streams += [mask_stream(os.urandom(32), d, 32) for _ in range(500)]
    distinct = {s.tobytes() for s in streams}
    assert len(distinct) == len(streams)
    # and not merely distinct: coordinates agree only by chance (2^-32 each)
    assert (streams[0] == streams[1]).sum() == 0
    assert np.array_equal(mask_stream(a, d, 32), streams[0])  # deterministic


@pytest.mark.parametrize("bits", [8, 20, 32, 48, 64])
def test_mask_streams_fill_the_ring(bits: int) -> None:
    s = mask_stream(os.urandom(32), 20_000, bits)
    assert int(s.max()) < 2**bits
    assert int(s.max()) > 2**bits * 0.99 and int(s.min()) < 2**bits * 0.01


def test_one_masked_upload_is_indistinguishable_from_uniform_bytes() -> None:
    # a maximally structured input (every coordinate the same), one client's upload
    d, n = 50_000, 3
    inputs = {i: (np.full(d, 0.25), 7) for i in (1, 2, 3)}
    uploads: dict[int, np.ndarray] = {}

    def record(stage: str, requests: Mapping[int, Msg], replies: Mapping[int, Msg]) -> None:
        if stage == "masked-input":
            uploads.update({k: v.vector for k, v in replies.items() if v.vector is not None})

    res = run_local(SecAggParams(neighbours="all", max_weight=10), inputs, on_stage=record)
    assert res.weight == 7 * n
    counts = np.bincount(np.frombuffer(uploads[1].tobytes(), np.uint8), minlength=256)
    assert chisquare(counts).pvalue > 1e-4
    # the test has power: the unmasked encoding of the same input is nowhere near uniform
    plain = res.quantiser.encode(inputs[1][0], 7)[0]
    plain_counts = np.bincount(np.frombuffer(plain.tobytes(), np.uint8), minlength=256)
    assert chisquare(plain_counts).pvalue < 1e-100


# -- graph -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 10, 33, 100])
@pytest.mark.parametrize("spec", ["all", "log", 3, 6])
def test_the_graph_is_symmetric_regular_and_the_same_for_everyone(n: int, spec: int | str) -> None:
    ids = [10 * i + 3 for i in range(n)]
    k = neighbour_count(spec, n)
    g = neighbours(ids, k, seed=42)
    assert all(i not in g[i] and all(i in g[j] for j in g[i]) for i in ids)
    assert {len(v) for v in g.values()} == {k}
    assert neighbours(list(reversed(ids)), k, seed=42) == g
    if k < n - 1:
        assert neighbours(ids, k, seed=43) != g


def test_log_neighbours_grow_logarithmically_and_thresholds_round_up() -> None:
    assert [neighbour_count("log", n) for n in (10, 100, 1000)] == [8, 14, 20]
    assert threshold_for(0.6, 14) == 9 and threshold_for(0.5, 14) == 7 and threshold_for(3, 14) == 3
    with pytest.raises(ValueError, match="neighbours"):
        threshold_for(15, 14)
    with pytest.raises(ValueError, match="neighbours"):
        neighbour_count("some", 5)


def test_params_refuse_what_they_cannot_do() -> None:
    for bad in ({"key_agreement": "p384"}, {"threshold": 0.0}, {"threshold": 1.5},
                {"threshold": 0}, {"neighbours": 0}, {"max_weight": 0}, {"clip": -1.0},
                {"bits": 4}):
        with pytest.raises(ValueError):
            SecAggParams(**bad)
