"""FLTrust [Cao et al., NDSS 2021]: trust scores against the server's reference update.

Its defining behaviour on constructed inputs (an update opposite or orthogonal to the
reference gets no weight, scaling an update changes nothing), hand-computed numbers, a
numpy oracle of the paper's formula, the all-distrusted case, and the refusals.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import aggregation
from aggregation import trust
from aggregation.trust import fltrust

from ._cases import DEVICES

H, D = 8, 6  # honest clients, parameters


def honest(seed: int, ref: Tensor, n: int = H, spread: float = 0.3) -> Tensor:
    """``(n, D)`` updates around ``ref`` (all with positive cosine for small spread)."""
    g = aggregation.make_generator(seed)
    return ref + spread * torch.randn(n, ref.shape[0], generator=g, dtype=ref.dtype)


def reference(seed: int = 100, d: int = D) -> Tensor:
    return torch.randn(d, generator=aggregation.make_generator(seed), dtype=torch.float64)


def oracle(x: Tensor, ref: Tensor) -> np.ndarray:
    """The paper's formula, literally, in numpy float64."""
    a, r = x.double().numpy(), ref.double().numpy()
    norms, rnorm = np.linalg.norm(a, axis=1), np.linalg.norm(r)
    ts = np.maximum(0.0, a @ r / (norms * rnorm))
    rescaled = a * (rnorm / norms)[:, None]
    out: np.ndarray = (ts[:, None] * rescaled).sum(axis=0) / ts.sum()
    return out


# --------------------------------------------------------------------------- registration


def test_registered_with_a_reference_and_no_hyperparameters() -> None:
    rule = aggregation.get("fltrust")
    assert "fltrust" in aggregation.names()
    assert rule.needs_reference and not rule.random and not rule.stateful  # type: ignore[attr-defined]
    assert not rule.use_weights  # type: ignore[attr-defined]
    refusal = aggregation.central_dp_refusal("fltrust")
    assert refusal is not None and "C/m" in refusal
    with pytest.raises(TypeError, match="valid parameters"):
        aggregation.get("fltrust", f=1)


# --------------------------------------------------------------------------- hand numbers


def test_docstring_example() -> None:
    result = doctest.testmod(trust)
    assert result.attempted >= 4 and result.failed == 0


def test_hand_computed_example() -> None:
    # g0 = (3, 4), ||g0|| = 5. g1 = 2 g0: cos 1, rescaled to (3, 4). g2 = (4, -3) is
    # orthogonal: trust 0. g3 = (0, 1): cos 4/5, rescaled to (0, 5).
    # g = (1 (3, 4) + 0.8 (0, 5)) / 1.8 = (5/3, 40/9)
    x = torch.tensor([[6.0, 8.0], [4.0, -3.0], [0.0, 1.0]], dtype=torch.float64)
    res = fltrust(x, reference=torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(res.update, torch.tensor([5 / 3, 40 / 9], dtype=torch.float64))
    torch.testing.assert_close(res.info["trust"], torch.tensor([1.0, 0.0, 0.8],
                                                               dtype=torch.float64))
    torch.testing.assert_close(res.info["weights"], torch.tensor([1 / 1.8, 0.0, 0.8 / 1.8],
                                                                 dtype=torch.float64))
    assert res.kept.tolist() == [0, 2]
    assert float(res.info["reference_norm"]) == 5.0
    assert int(res.info["trusted"]) == 2 and float(res.info["all_distrusted"]) == 0.0


def test_a_single_trusted_update_is_rescaled_to_the_reference_norm() -> None:
    # cos((-6, 8), (3, 4)) = (-18 + 32) / 50 = 0.28 > 0: the update keeps its direction
    # and takes the reference's norm 5
    res = fltrust(torch.tensor([[-6.0, 8.0]]), reference=torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(res.update, torch.tensor([-3.0, 4.0]))
    torch.testing.assert_close(res.info["cosine"], torch.tensor([0.28]))


@pytest.mark.parametrize("seed", range(10))
def test_matches_the_papers_formula(seed: int) -> None:
    g = aggregation.make_generator(seed)
    x = torch.randn(12, 9, generator=g, dtype=torch.float64)
    ref = torch.randn(9, generator=g, dtype=torch.float64)
    res = fltrust(x, reference=ref)
    torch.testing.assert_close(res.update, torch.from_numpy(oracle(x, ref)),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the defense


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("factor", [0.01, 1.0, 1e6])
def test_an_update_opposite_to_the_reference_gets_no_weight(seed: int, factor: float) -> None:
    ref = reference(seed)
    x = honest(seed, ref)
    attacked = torch.cat([x, -factor * ref[None, :]])
    res = fltrust(attacked, reference=ref)
    assert float(res.info["trust"][H]) == 0.0 and float(res.info["weights"][H]) == 0.0
    assert H not in res.kept.tolist()
    torch.testing.assert_close(res.update, fltrust(x, reference=ref).update,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_updates_orthogonal_to_the_reference_get_no_weight(seed: int) -> None:
    # reference along the first axes, attackers along the others: exactly orthogonal
    ref = torch.zeros(D, dtype=torch.float64)
    ref[:3] = torch.tensor([1.0, 2.0, -0.5])
    x = torch.zeros(H, D, dtype=torch.float64)
    x[:, :3] = ref[:3] + 0.2 * torch.randn(H, 3, generator=aggregation.make_generator(seed),
                                           dtype=torch.float64)
    bad = torch.zeros(3, D, dtype=torch.float64)
    bad[:, 3:] = 50.0 * torch.randn(3, D - 3, generator=aggregation.make_generator(seed + 1),
                                    dtype=torch.float64)
    res = fltrust(torch.cat([x, bad]), reference=ref)
    assert res.info["trust"][H:].tolist() == [0.0, 0.0, 0.0]
    assert res.kept.tolist() == list(range(H))
    assert bool((res.update[3:] == 0).all())


@settings(max_examples=60, deadline=None)
@given(row=st.integers(0, H), log_scale=st.floats(-6.0, 12.0), seed=st.integers(0, 10**6))
def test_scaling_an_update_does_not_change_its_influence(
    row: int, log_scale: float, seed: int
) -> None:
    ref = reference(seed % 97)
    x = torch.cat([honest(seed, ref), reference(seed % 89)[None, :]])  # one arbitrary update
    scaled = x.clone()
    scaled[row] *= 10.0 ** log_scale
    a, b = fltrust(x, reference=ref), fltrust(scaled, reference=ref)
    torch.testing.assert_close(b.update, a.update, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.info["weights"], a.info["weights"], rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 12), log_scale=st.floats(-30.0, 30.0))
def test_the_result_is_never_longer_than_the_reference(
    seed: int, n: int, log_scale: float
) -> None:
    g = aggregation.make_generator(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * 10.0 ** log_scale
    ref = torch.randn(D, generator=g, dtype=torch.float64)
    res = fltrust(x, reference=ref)
    assert float(res.update.norm()) <= float(ref.norm()) * (1 + 1e-12)


def test_permuting_the_clients_permutes_nothing_but_the_diagnostics() -> None:
    ref = reference(3)
    x = torch.cat([honest(3, ref), -ref[None, :], torch.zeros(1, D, dtype=torch.float64)])
    perm = torch.randperm(x.shape[0], generator=aggregation.make_generator(4))
    a, b = fltrust(x, reference=ref), fltrust(x[perm], reference=ref)
    torch.testing.assert_close(b.update, a.update, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.info["trust"], a.info["trust"][perm])


def test_a_zero_update_has_no_direction_and_no_trust() -> None:
    ref = reference(5)
    x = torch.cat([honest(5, ref), torch.zeros(1, D, dtype=torch.float64)])
    res = fltrust(x, reference=ref)
    assert float(res.info["trust"][H]) == 0.0 and H not in res.kept.tolist()


def test_weights_are_ignored() -> None:
    rule = aggregation.get("fltrust")
    ref = reference(6)
    x = honest(6, ref)
    w = torch.arange(1.0, H + 1, dtype=torch.float64)
    torch.testing.assert_close(rule(x, w, reference=ref).update,
                               rule(x, reference=ref).update, rtol=0, atol=0)


# --------------------------------------------------------------------------- all distrusted


def test_all_distrusted_gives_the_zero_update_and_says_so() -> None:
    ref = reference(7)
    x = -honest(7, ref, spread=0.01)  # every update opposite to the reference
    res = fltrust(x, reference=ref)
    assert bool((res.update == 0).all()) and res.update.shape == (D,)
    assert res.kept.numel() == 0
    assert float(res.info["all_distrusted"]) == 1.0 and int(res.info["trusted"]) == 0
    assert bool((res.info["weights"] == 0).all())


def test_a_zero_reference_distrusts_everyone() -> None:
    res = fltrust(honest(8, reference(8)), reference=torch.zeros(D, dtype=torch.float64))
    assert bool((res.update == 0).all()) and res.kept.numel() == 0
    assert float(res.info["all_distrusted"]) == 1.0 and float(res.info["reference_norm"]) == 0.0


# --------------------------------------------------------------------------- numerics


def test_updates_near_the_float32_maximum_keep_their_direction() -> None:
    ref = reference(9).float()
    x = honest(9, reference(9)).float()
    huge = x * 1e37  # plain norms would overflow float32
    res = fltrust(huge, reference=ref)
    assert bool(torch.isfinite(res.update).all())
    torch.testing.assert_close(res.update, fltrust(x, reference=ref).update,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_keeps_dtype_and_device(dtype: torch.dtype, device: str) -> None:
    ref64 = reference(10)
    x = honest(10, ref64).to(dtype=dtype, device=device)
    ref = ref64.to(dtype=dtype, device=device)
    res = aggregation.get("fltrust")(x, reference=ref)
    assert res.update.dtype == dtype and res.update.device == x.device
    assert res.kept.device == x.device
    expected = torch.from_numpy(oracle(x.double().cpu(), ref.double().cpu()))
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(res.update.double().cpu(), expected, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- refusals


def test_refuses_a_missing_reference() -> None:
    x = honest(11, reference(11))
    with pytest.raises(ValueError, match="fltrust needs the server's reference update"):
        aggregation.get("fltrust")(x)
    with pytest.raises(ValueError, match="fltrust needs the server's reference update"):
        fltrust(x, reference=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(D + 1, dtype=torch.float64), "shape \\(d,\\) = \\(6,\\)"),
    (torch.zeros(1, D, dtype=torch.float64), "shape \\(d,\\) = \\(6,\\)"),
    (torch.zeros(D, dtype=torch.float32), "dtype torch.float64"),
    ([0.0] * D, "must be a torch.Tensor"),
    (torch.full((D,), float("nan"), dtype=torch.float64), "NaN or Inf"),
    (torch.tensor([float("inf")] + [0.0] * (D - 1), dtype=torch.float64), "NaN or Inf"),
])
def test_refuses_a_bad_reference(bad: object, match: str) -> None:
    x = honest(12, reference(12))
    with pytest.raises(ValueError, match=match):
        aggregation.get("fltrust")(x, reference=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        fltrust(x, reference=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1.0, float("nan")]], dtype=torch.float64), "NaN or Inf in rows \\[0\\]"),
    (torch.zeros(3, dtype=torch.float64), "must be 2-D"),
    (torch.zeros(3, 2, dtype=torch.int64), "floating-point"),
])
def test_refuses_bad_updates(bad: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fltrust(bad, reference=torch.ones(2, dtype=torch.float64))
