"""SecAgg+ end to end in one process: the sum, dropouts at every stage, tampering, lies."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from secagg import AuthenticationError, Msg, SecAggAbort, SecAggParams, run_local
from secagg.crypto import KEM_CIPHERTEXT_BYTES
from secagg.protocol import client_step

Inputs = dict[int, tuple[np.ndarray, int]]


def _inputs(n: int, d: int, seed: int, scale: float = 0.3) -> Inputs:
    rng = np.random.default_rng(seed)
    return {1000 + 7 * i: (rng.normal(0, scale, d), int(rng.integers(1, 200))) for i in range(n)}


def _plain_mean(inputs: Inputs, survivors: tuple[int, ...], clip: float) -> np.ndarray:
    w = np.array([inputs[i][1] for i in survivors], dtype=np.float64)
    x = np.stack([np.clip(inputs[i][0], -clip, clip) for i in survivors])
    out: np.ndarray = (w[:, None] * x).sum(0) / w.sum()
    return out


def _check_sum(params: SecAggParams, inputs: Inputs, **kw: object) -> tuple[int, ...]:
    res = run_local(params, inputs, **kw)  # type: ignore[arg-type]
    ref = _plain_mean(inputs, res.survivors, params.clip)
    err = np.abs(res.mean() - ref).max()
    assert err <= res.quantiser.error_bound * (1 + 1e-9) + 1e-12, (err, res.quantiser.error_bound)
    assert res.weight == sum(inputs[i][1] for i in res.survivors)
    clipped = sum(int((np.abs(inputs[i][0]) > params.clip).sum()) for i in res.survivors)
    assert res.clipped == clipped
    return res.survivors


@pytest.mark.parametrize("neighbours", ["all", "log", 4])
@pytest.mark.parametrize("bits", [16, 32, 48])
@pytest.mark.parametrize("seed", [0, 1])
def test_sum_equals_plaintext_within_the_quantisation_bound(
    neighbours: int | str, bits: int, seed: int
) -> None:
    n, d = 9, 257
    inputs = _inputs(n, d, seed, scale=0.6)  # some coordinates beyond clip=1 get clipped
    params = SecAggParams(neighbours=neighbours, bits=bits, max_weight=200)
    assert _check_sum(params, inputs) == tuple(sorted(inputs))


def test_hybrid_sum_with_dropouts_recovers_both_kem_directions() -> None:
    inputs = _inputs(6, 64, 3)
    ids = sorted(inputs)
    lost = ids[2]  # has lower and higher surviving neighbours: wrap and decapsulation paths
    params = SecAggParams(neighbours="all", key_agreement="hybrid", max_weight=200)
    survivors = _check_sum(params, inputs, drop=lambda st, n: st == "masked-input" and n == lost)
    assert survivors == tuple(i for i in ids if i != lost)


DROP_OK = [  # (stage, how many drop) that the round survives: n=7, all neighbours, t=ceil(0.6*6)=4
    ("advertise-keys", 2), ("share-keys", 2), ("masked-input", 2), ("unmask", 2),
]
DROP_FAIL = [  # and that it cannot: (stage, how many, the stage that reports it)
    ("advertise-keys", 6, "advertise-keys"),
    ("share-keys", 6, "share-keys"),
    ("masked-input", 4, "masked-input"),  # 3 survivors hold shares, threshold 4
    ("unmask", 4, "unmask"),  # 3 survivors return shares, threshold 4
]


def _drop_first(stage: str, count: int, ids: list[int]) -> Callable[[str, int], bool]:
    victims = set(ids[:count])
    return lambda st, n: st == stage and n in victims


@pytest.mark.parametrize("key_agreement", ["x25519", "hybrid"])
@pytest.mark.parametrize(("stage", "count"), DROP_OK)
def test_dropouts_up_to_the_threshold_complete_the_round(
    stage: str, count: int, key_agreement: str
) -> None:
    inputs = _inputs(7, 33, 5)
    ids = sorted(inputs)
    params = SecAggParams(neighbours="all", key_agreement=key_agreement, max_weight=200)
    survivors = _check_sum(params, inputs, drop=_drop_first(stage, count, ids))
    # a client that drops while unmasking has already sent its input: it is still summed
    expected = ids if stage == "unmask" else ids[count:]
    assert survivors == tuple(expected)


@pytest.mark.parametrize(("stage", "count", "reported"), DROP_FAIL)
def test_dropouts_below_the_threshold_fail_cleanly_naming_the_stage(
    stage: str, count: int, reported: str
) -> None:
    inputs = _inputs(7, 33, 6)
    params = SecAggParams(neighbours="all", max_weight=200)
    with pytest.raises(SecAggAbort) as info:
        run_local(params, inputs, drop=_drop_first(stage, count, sorted(inputs)))
    assert info.value.stage == reported
    assert "threshold" in info.value.reason or "fewer than" in info.value.reason


def test_log_neighbours_tolerate_a_dropout_after_sharing() -> None:
    inputs = _inputs(20, 16, 8)
    ids = sorted(inputs)
    params = SecAggParams(neighbours="log", max_weight=200)  # k = 10 of 19, t = 6
    survivors = _check_sum(params, inputs, drop=_drop_first("masked-input", 3, ids))
    assert survivors == tuple(ids[3:])


def test_a_client_whose_shares_too_few_hold_is_left_out_before_masking() -> None:
    inputs = _inputs(8, 16, 9)
    ids = sorted(inputs)
    # ring of k=2, t=2: losing one client at share-keys leaves its two neighbours with one
    # holder each; they are left out, and so on around the ring: the round fails there
    params = SecAggParams(neighbours=2, threshold=2, max_weight=200)
    with pytest.raises(SecAggAbort, match="share-keys"):
        run_local(params, inputs, drop=_drop_first("share-keys", 1, ids))
    # with t=1 the same loss costs only that client
    loose = dataclasses.replace(params, threshold=1)
    assert _check_sum(loose, inputs, drop=_drop_first("share-keys", 1, ids)) == tuple(ids[1:])


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1:]


def _tamper_first_share(offset: Callable[[int, int], int]) -> Callable[[str, int, Msg], Msg]:
    def tamper(stage: str, node: int, req: Msg) -> Msg:
        if stage != "masked-input":
            return req
        key = min(k for k in req.blobs if k.startswith("from:"))
        sender = int(key.split(":")[1])
        blobs = {**req.blobs, key: _flip(req.blobs[key], offset(sender, node))}
        return Msg(req.config, blobs, req.vector)
    return tamper


def test_hybrid_fails_loudly_on_a_tampered_channel_kem_ciphertext() -> None:
    params = SecAggParams(neighbours="all", key_agreement="hybrid", max_weight=200)
    with pytest.raises(AuthenticationError, match="failed authentication"):
        run_local(params, _inputs(4, 8, 1), tamper=_tamper_first_share(lambda s, r: 10))


def test_hybrid_fails_loudly_on_a_tampered_mask_kem_ciphertext() -> None:
    params = SecAggParams(neighbours="all", key_agreement="hybrid", max_weight=200)
    inputs = _inputs(4, 8, 2)
    # the mask ciphertext follows the channel one in blobs from a lower id to a higher id;
    # the highest id receives such blobs from everyone
    top = max(inputs)

    def tamper(stage: str, node: int, req: Msg) -> Msg:
        return _tamper_first_share(lambda s, r: KEM_CIPHERTEXT_BYTES + 5)(stage, node, req) \
            if node == top else req

    with pytest.raises(AuthenticationError, match="key confirmation"):
        run_local(params, inputs, tamper=tamper)


def test_x25519_fails_loudly_on_a_tampered_share() -> None:
    params = SecAggParams(neighbours="all", max_weight=200)
    with pytest.raises(AuthenticationError):
        run_local(params, _inputs(4, 8, 3), tamper=_tamper_first_share(lambda s, r: 3))


def test_an_honest_client_never_reveals_both_secrets_of_a_neighbour() -> None:
    inputs = _inputs(4, 8, 4)
    ids = sorted(inputs)

    def tamper(stage: str, node: int, req: Msg) -> Msg:
        if stage == "unmask":  # the server claims ids[1] both survived and dropped
            cfg = {**req.config, "dropped": str(ids[1])}
            return Msg(cfg, req.blobs, req.vector)
        return req

    with pytest.raises(ValueError, match="both survivors and dropped"):
        run_local(SecAggParams(neighbours="all", max_weight=200), inputs, tamper=tamper)


def test_a_client_answers_unmask_once() -> None:
    req = Msg({"stage": "unmask", "session": "1", "survivors": "1,2", "dropped": ""})
    with pytest.raises(ValueError, match="after unmask"):
        client_step(req, {"session": "1", "done": "unmask"}, me=1,
                    train=lambda: (np.zeros(1), 1))


def test_a_client_checks_its_neighbours_itself() -> None:
    inputs = _inputs(5, 8, 5)

    def tamper(stage: str, node: int, req: Msg) -> Msg:
        if stage == "share-keys":  # the server hides one neighbour's keys
            blobs = dict(req.blobs)
            blobs.pop(min(blobs))
            return Msg(req.config, blobs, req.vector)
        return req

    with pytest.raises(ValueError, match="neighbours are"):
        run_local(SecAggParams(neighbours="all", max_weight=200), inputs, tamper=tamper)


def test_a_weight_above_max_weight_is_refused_not_clamped() -> None:
    inputs = {1: (np.zeros(4), 5), 2: (np.zeros(4), 500), 3: (np.zeros(4), 1)}
    with pytest.raises(ValueError, match="max_weight"):
        run_local(SecAggParams(neighbours="all", max_weight=100), inputs)
