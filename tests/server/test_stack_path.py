"""The server's validate -> stack path against the straightforward algorithm it replaced.

``validate_replies`` and ``stack_updates`` fill one float64 buffer in place and check
finiteness by a min/max reduction; the references below are the earlier code (per-reply
float64 flat copies, ``torch.stack``, ``stack - g``, ``isfinite(t).all()``). Every result
must be bit-identical and every refusal the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest
import torch
from torch import Tensor

from server.rounds import ClientReply, ModelSpec, Rejection, stack_updates, validate_replies

SHAPES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "conv.weight": ((4, 3, 3), torch.float32),
    "conv.bias": ((4,), torch.float32),
    "scale": ((), torch.float32),  # 0-dim entry
    "empty": ((0, 5), torch.float32),  # no parameters
    "head.weight": ((7, 5), torch.float64),
    "half": ((6, 2), torch.float16),
    "brain": ((9,), torch.bfloat16),
    "tail": ((300,), torch.float32),  # long enough for vectorised reductions
}


def _global(gen: torch.Generator) -> dict[str, Tensor]:
    state = {k: (torch.randn(s, generator=gen) * 3).to(dt) for k, (s, dt) in SHAPES.items()}
    state["num_batches_tracked"] = torch.tensor(7)  # a non-floating entry the server keeps
    return state


def _reply(node: int, state: Mapping[str, Tensor], gen: torch.Generator) -> ClientReply:
    new: dict[str, Tensor] = {}
    for k, v in state.items():
        if not v.is_floating_point():
            new[k] = v.clone()
            continue
        u = (torch.randn(v.shape, generator=gen) * 1e-3).to(v.dtype)
        w = v + u
        if w.dim() == 2:  # a non-contiguous tensor of the same values, as a transpose view
            w = w.t().contiguous().t()
        new[k] = w
    n_ex = float(torch.randint(1, 1000, (1,), generator=gen))
    return ClientReply(node, new, n_ex, partition_id=node)


def _reference_check(spec: ModelSpec, state: Mapping[str, Tensor]) -> str | None:
    missing = [k for k in spec.keys if k not in state]
    if missing:
        return f"missing arrays {missing[:5]}"
    extra = sorted(set(state) - set(spec.keys) - set(spec.other_keys))
    if extra:
        return f"unexpected arrays {extra[:5]}"
    for k, shape, dtype in zip(spec.keys, spec.shapes, spec.dtypes, strict=True):
        t = state[k]
        if t.dtype != dtype:
            return f"array {k!r} has dtype {t.dtype}, expected {dtype}"
        if tuple(t.shape) != shape:
            return f"array {k!r} has shape {tuple(t.shape)}, expected {shape}"
        if not bool(torch.isfinite(t).all()):
            return f"array {k!r} contains NaN or Inf"
    return None


def _reference_validate(
    replies: Sequence[ClientReply], spec: ModelSpec
) -> tuple[list[ClientReply], list[Rejection]]:
    accepted: list[ClientReply] = []
    rejected: list[Rejection] = []
    seen: set[int] = set()
    for r in replies:
        reason = r.error
        if reason is None and r.state is None:
            reason = "reply carried no arrays"
        if reason is None and r.node_id in seen:
            reason = "second reply from the same node in one round"
        if reason is None:
            assert r.state is not None
            reason = _reference_check(spec, r.state)
        if reason is None:
            n_ex = r.num_examples
            if n_ex is None or not math.isfinite(n_ex) or n_ex <= 0:
                reason = f"num-examples must be a positive finite number, got {n_ex!r}"
        if reason is None:
            accepted.append(r)
            seen.add(r.node_id)
        else:
            rejected.append(Rejection(r.node_id, r.partition_id, "invalid", reason))
    return accepted, rejected


def _reference_stack(
    accepted: Sequence[ClientReply], g: Tensor, spec: ModelSpec
) -> tuple[Tensor, Tensor]:
    def flatten(state: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([state[k].reshape(-1).to(torch.float64) for k in spec.keys])

    if accepted:
        stack = torch.stack([flatten(r.state).to(g.device) for r in accepted])  # type: ignore[arg-type]
        updates = stack - g
    else:
        updates = torch.zeros((0, g.numel()), dtype=g.dtype, device=g.device)
    weights = torch.tensor(
        [float(r.num_examples) for r in accepted], dtype=updates.dtype, device=g.device  # type: ignore[arg-type]
    )
    return updates, weights


@pytest.mark.parametrize("n", [0, 1, 5, 23])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stack_equals_reference_bit_for_bit(n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    state = _global(gen)
    spec = ModelSpec.from_state(state)
    g = spec.flatten(state)
    replies = [_reply(i, state, gen) for i in range(n)]
    accepted, rejected = validate_replies(replies, spec)
    assert len(accepted) == n and not rejected
    updates, weights = stack_updates(accepted, g, spec)
    ref_updates, ref_weights = _reference_stack(accepted, g, spec)
    assert updates.dtype == ref_updates.dtype == torch.float64
    assert updates.shape == (n, spec.dim) and updates.is_contiguous()
    assert torch.equal(updates, ref_updates)
    assert torch.equal(weights, ref_weights)
    if n:  # the updates are not all zero, so equality above is not vacuous
        assert bool(updates.abs().sum() > 0)


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])
def test_stack_is_the_same_for_any_block_size(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small entries are stacked a block of replies at a time, large ones row by row: the
    block size (1: every entry row by row; 7: some of each, partial last blocks) changes
    no bit."""
    import server.rounds

    gen = torch.Generator().manual_seed(4)
    state = _global(gen)
    spec = ModelSpec.from_state(state)
    g = spec.flatten(state)
    accepted = [_reply(i, state, gen) for i in range(9)]
    if block == 7:  # both paths and partial blocks are taken
        assert min(spec.sizes) <= 3 and max(spec.sizes) > 3
    monkeypatch.setattr(server.rounds, "_STACK_BLOCK", block)
    updates, _ = stack_updates(accepted, g, spec)
    ref, _ = _reference_stack(accepted, g, spec)
    assert torch.equal(updates, ref)


def test_stack_from_float32_global_promotes_like_before() -> None:
    gen = torch.Generator().manual_seed(3)
    state = _global(gen)
    spec = ModelSpec.from_state(state)
    g32 = spec.flatten(state).to(torch.float32)
    accepted = [_reply(i, state, gen) for i in range(4)]
    updates, _ = stack_updates(accepted, g32, spec)
    ref, _ = _reference_stack(accepted, g32, spec)
    assert updates.dtype == ref.dtype == torch.float64
    assert torch.equal(updates, ref)


def _poison(state: Mapping[str, Tensor], key: str, index: int, value: float) -> dict[str, Tensor]:
    new = dict(state)
    t = state[key].contiguous().clone()  # contiguous, so the view below writes into t
    t.view(-1)[index] = value
    new[key] = t
    return new


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("key", "index"), [
    ("conv.weight", 0), ("conv.weight", 35), ("scale", 0), ("head.weight", 17),
    ("half", 11), ("brain", 4), ("tail", 0), ("tail", 150), ("tail", 299),
])
def test_non_finite_reply_refused_as_before(value: float, key: str, index: int) -> None:
    gen = torch.Generator().manual_seed(4)
    state = _global(gen)
    spec = ModelSpec.from_state(state)
    replies = [_reply(i, state, gen) for i in range(4)]
    bad = replies[2]
    assert bad.state is not None
    replies[2] = ClientReply(bad.node_id, _poison(bad.state, key, index, value),
                             bad.num_examples, bad.partition_id)
    accepted, rejected = validate_replies(replies, spec)
    ref_accepted, ref_rejected = _reference_validate(replies, spec)
    assert rejected == ref_rejected
    assert rejected == [Rejection(2, 2, "invalid", f"array {key!r} contains NaN or Inf")]
    assert [r.node_id for r in accepted] == [r.node_id for r in ref_accepted] == [0, 1, 3]


def _malformed(state: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    def edit(**changes: Tensor | None) -> dict[str, Tensor]:
        new = dict(state)
        for k, v in changes.items():
            if v is None:
                del new[k]
            else:
                new[k] = v
        return new

    return [
        edit(**{"conv.bias": torch.zeros(5)}),  # wrong shape
        edit(**{"conv.bias": torch.zeros(4, dtype=torch.float64)}),  # wrong dtype
        edit(**{"half": torch.zeros((6, 2), dtype=torch.float32)}),  # wider dtype
        edit(**{"empty": torch.zeros((5, 0))}),  # same numel, other shape
        edit(**{"tail": None}),  # missing
        edit(stray=torch.zeros(2)),  # unexpected
    ]


def test_malformed_replies_refused_as_before() -> None:
    gen = torch.Generator().manual_seed(5)
    state = _global(gen)
    spec = ModelSpec.from_state(state)
    good = [_reply(i, state, gen) for i in range(3)]
    base = good[0].state
    assert base is not None
    replies = list(good)
    for j, s in enumerate(_malformed(base)):
        replies.append(ClientReply(10 + j, s, 5.0, 10 + j))
    replies.append(ClientReply(1, good[1].state, 5.0, 1))  # second reply from node 1
    replies.append(ClientReply(30, base, math.nan, 30))  # bad num-examples
    replies.append(ClientReply(31, None, None, 31, error="client crashed"))
    replies.append(ClientReply(32, None, 1.0, 32))  # no arrays
    accepted, rejected = validate_replies(replies, spec)
    ref_accepted, ref_rejected = _reference_validate(replies, spec)
    assert rejected == ref_rejected
    assert len(rejected) == len(replies) - 3
    assert [r.node_id for r in accepted] == [r.node_id for r in ref_accepted] == [0, 1, 2]


def test_finiteness_check_matches_isfinite_on_random_placements() -> None:
    gen = torch.Generator().manual_seed(6)
    spec = ModelSpec(keys=("x",), shapes=((1000,),), dtypes=(torch.float32,))
    for trial in range(60):
        x = torch.randn(1000, generator=gen)
        k = int(torch.randint(0, 4, (1,), generator=gen))
        idx = torch.randint(0, 1000, (k,), generator=gen)
        choices = torch.tensor([math.nan, math.inf, -math.inf])
        x[idx] = choices[torch.randint(0, 3, (k,), generator=gen)]
        assert spec.check({"x": x}) == _reference_check(spec, {"x": x}), trial
