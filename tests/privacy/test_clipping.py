"""Per-row L2 clipping: the bound holds exactly, directions and short rows are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from privacy import check_updates, clip_updates

_floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
_stacks = hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1,
                                                  max_side=16), elements=_floats)


@settings(max_examples=80, deadline=None)
@given(x=_stacks, c=st.floats(1e-4, 1e4),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_clipped_norms_never_exceed_c(x: np.ndarray, c: float, dtype: torch.dtype) -> None:
    updates = torch.from_numpy(x).to(dtype)
    clipped, norms, was = clip_updates(updates, c)
    assert clipped.dtype == dtype and clipped.shape == updates.shape
    assert norms.dtype == dtype and norms.shape == (updates.shape[0],) and was.dtype == torch.bool
    exact = torch.linalg.vector_norm(updates.double(), dim=1)
    after = torch.linalg.vector_norm(clipped.double(), dim=1)
    assert bool((after <= c).all())
    assert torch.allclose(norms.double(), exact, rtol=1e-6)
    # unclipped rows untouched; clipped rows are positive multiples with norm ~ C
    assert torch.equal(clipped[~was], updates[~was])
    assert bool((exact[was] > c * (1 - 1e-5)).all())
    assert bool((exact[~was] <= c).all())
    if bool(was.any()):
        assert torch.allclose(after[was], torch.full_like(after[was], c), rtol=1e-5)
        scale = (torch.full_like(exact[was], c) / exact[was]).unsqueeze(1)  # (k, 1)
        big = updates[was].double().abs() * scale > 1e3 * torch.finfo(dtype).tiny  # no underflow
        ratio = clipped[was].double()[big] / updates[was].double()[big]
        assert torch.allclose(ratio, scale.expand_as(big)[big], rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(x=_stacks, c=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_each_row_is_clipped_on_its_own(x: np.ndarray, c: float, seed: int) -> None:
    # permuting the rows permutes the result; a row alone is clipped as in the stack
    updates = torch.from_numpy(x)
    perm = torch.randperm(updates.shape[0], generator=torch.Generator().manual_seed(seed))
    clipped, norms, was = clip_updates(updates, c)
    p_clipped, p_norms, p_was = clip_updates(updates[perm], c)
    assert torch.equal(p_clipped, clipped[perm]) and torch.equal(p_was, was[perm])
    assert torch.equal(p_norms, norms[perm])
    assert torch.equal(clip_updates(updates[:1], c)[0], clipped[:1])


def test_clipping_twice_moves_a_clipped_row_by_the_margin_only() -> None:
    x = torch.tensor([[30.0, 40.0], [0.3, 0.4]])
    once, _, _ = clip_updates(x, 1.0)
    twice, _, _ = clip_updates(once, 1.0)
    assert torch.allclose(twice, once, rtol=1e-6, atol=0)
    assert torch.equal(twice[1], x[1])


def test_exact_values_and_empty_stack() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]], dtype=torch.float64)
    clipped, norms, was = clip_updates(x, 1.0)
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.3, 0.4]],
                                                dtype=torch.float64), rtol=1e-12)
    assert norms.tolist() == [5.0, 0.0, 0.5] and was.tolist() == [True, False, False]
    empty, e_norms, e_was = clip_updates(torch.zeros(0, 4), 2.0)
    assert empty.shape == (0, 4) and e_norms.shape == (0,) and e_was.shape == (0,)


def test_clip_updates_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"NaN or Inf in rows \[1\]"):
        clip_updates(torch.tensor([[1.0, 2.0], [1.0, float("nan")]]), 1.0)
    with pytest.raises(ValueError, match="clipping_norm"):
        clip_updates(torch.ones(2, 3), 0.0)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        clip_updates(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="floating-point"):
        check_updates("x", torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="torch.Tensor"):
        check_updates("x", [[1.0]])
