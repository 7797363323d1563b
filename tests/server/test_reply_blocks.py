"""Replies that come as one block (the batched engine) are checked and stacked as one reply
each would be: the same decoded values, the same refusals with the same reasons, and the
same ``(n, d)`` updates bit for bit, in the order the replies came."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from server.rounds import (
    ClientReply,
    ModelSpec,
    Reply,
    ReplyBlock,
    StackedArrays,
    StackRow,
    decode_train_replies,
    decode_train_reply,
    expand_replies,
    stack_updates,
    validate_replies,
)
from tests.server.test_stack_path import _global, _reference_stack, _reference_validate, _reply


def _metrics(i: int, n_ex: float) -> dict[str, Any]:
    return {"num-examples": int(n_ex), "train-loss": 0.5 + i, "train-seconds": 0.01,
            "partition-id": i, "num-partitions": 50}


def _block(states: Sequence[Mapping[str, Tensor]], metrics: Sequence[Mapping[str, Any]],
           nodes: Sequence[int], rows: Sequence[int] | None = None) -> ReplyBlock:
    stack = StackedArrays({k: torch.stack([s[k] for s in states]) for k in states[0]})
    rows = list(range(len(states))) if rows is None else list(rows)
    cols = {k: [metrics[r][k] for r in rows] for k in metrics[0]}
    return ReplyBlock(tuple(nodes), stack, tuple(rows), cols)


def _fields(r: ClientReply) -> tuple[Any, ...]:
    return (r.node_id, r.num_examples, r.partition_id, dict(r.metrics), r.error)


def _setup(n: int, seed: int = 0) -> tuple[ModelSpec, Tensor, list[dict[str, Tensor]],
                                           list[dict[str, Any]]]:
    gen = torch.Generator().manual_seed(seed)
    state = _global(gen)
    spec = ModelSpec.from_state(state)
    states, metrics = [], []
    for i in range(n):
        r = _reply(i, state, gen)
        assert r.state is not None and r.num_examples is not None
        states.append({k: v.contiguous() for k, v in r.state.items()})
        metrics.append(_metrics(i, r.num_examples))
    return spec, spec.flatten(state), states, metrics


def _one_by_one(raw: Sequence[Reply | ReplyBlock]) -> list[ClientReply]:
    """The reference: every reply decoded alone, its arrays copied out of the block."""
    out = []
    for r in expand_replies(raw):
        arrays = {k: {n: t.clone() for n, t in v.items()} for k, v in r.arrays.items()}
        out.append(decode_train_reply(Reply(r.node_id, arrays, r.metrics, r.configs, r.error)))
    return out


def _check_same(raw: Sequence[Reply | ReplyBlock], spec: ModelSpec, g: Tensor) -> None:
    got = decode_train_replies(raw)
    ref = _one_by_one(raw)
    assert [_fields(r) for r in got] == [_fields(r) for r in ref]
    accepted, rejected = validate_replies(got, spec)
    ref_accepted, ref_rejected = _reference_validate(ref, spec)
    assert rejected == ref_rejected
    assert [r.node_id for r in accepted] == [r.node_id for r in ref_accepted]
    updates, weights = stack_updates(accepted, g, spec)
    ref_updates, ref_weights = _reference_stack(ref_accepted, g, spec)
    assert torch.equal(updates, ref_updates) and torch.equal(weights, ref_weights)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_block_decodes_checks_and_stacks_as_its_replies(seed: int) -> None:
    spec, g, states, metrics = _setup(12, seed)
    raw = [_block(states, metrics, range(100, 112))]
    got = decode_train_replies(raw)
    assert all(isinstance(r.state, StackRow) for r in got)  # no copies
    _check_same(raw, spec, g)


def test_blocks_mixed_with_single_replies_keep_the_order() -> None:
    spec, g, states, metrics = _setup(10)
    single = [Reply(200 + i, arrays={"arrays": states[i]}, metrics={"metrics": metrics[i]})
              for i in (3, 7)]
    raw: list[Reply | ReplyBlock] = [
        _block(states, metrics, [100, 101, 102], rows=[0, 1, 2]),
        single[0],
        _block(states, metrics, [104, 105], rows=[9, 4]),  # rows out of order
        Reply(300, error="client error 500: boom"),
        single[1],
        _block(states, metrics, [108], rows=[8]),
    ]
    got = decode_train_replies(raw)
    assert [r.node_id for r in got] == [100, 101, 102, 203, 104, 105, 300, 207, 108]
    _check_same(raw, spec, g)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("key", "index"), [("conv.weight", 5), ("scale", 0), ("half", 3),
                                            ("brain", 8), ("tail", 299)])
def test_a_non_finite_row_is_refused_alone(value: float, key: str, index: int) -> None:
    spec, g, states, metrics = _setup(6)
    t = states[4][key].clone()
    t.view(-1)[index] = value
    states[4] = {**states[4], key: t}
    raw = [_block(states, metrics, range(100, 106))]
    _check_same(raw, spec, g)
    _, rejected = validate_replies(decode_train_replies(raw), spec)
    assert [(r.node_id, r.reason) for r in rejected] == [
        (104, f"array {key!r} contains NaN or Inf")]


def test_finite_rows_whose_sum_overflows_are_kept() -> None:
    """The row-sum shortcut must not refuse finite values that add up past the dtype."""
    spec, g, states, metrics = _setup(3)
    big = torch.full_like(states[1]["half"], 60000.0)  # float16 max is 65504; the sum is not
    assert not bool(big.sum().isfinite())
    states[1] = {**states[1], "half": big}
    raw = [_block(states, metrics, range(100, 103))]
    accepted, rejected = validate_replies(decode_train_replies(raw), spec)
    assert not rejected and len(accepted) == 3
    _check_same(raw, spec, g)


@pytest.mark.parametrize("change", ["dtype", "shape", "missing", "extra"])
def test_a_block_that_does_not_fit_the_spec_is_refused_row_by_row(change: str) -> None:
    spec, g, states, metrics = _setup(4)
    for i, s in enumerate(states):
        s = dict(s)
        if change == "dtype":
            s["tail"] = s["tail"].double()
        elif change == "shape":
            s["tail"] = s["tail"][:-1]
        elif change == "missing":
            del s["tail"]
        else:
            s["surplus"] = torch.zeros(2)
        states[i] = s
    raw = [_block(states, metrics, range(100, 104))]
    _check_same(raw, spec, g)
    accepted, rejected = validate_replies(decode_train_replies(raw), spec)
    assert not accepted and len(rejected) == 4


@pytest.mark.parametrize(("key", "value"), [
    ("num-examples", 0), ("num-examples", 2.5), ("num-examples", 2**41), ("num-examples", "7"),
    ("num-examples", True), ("partition-id", -2), ("train-seconds", math.nan),
    ("train-seconds", math.inf), ("num-partitions", 2**70), ("train-loss", "x"),
])
def test_bad_metrics_in_a_block_get_the_one_reply_reason(key: str, value: Any) -> None:
    spec, g, states, metrics = _setup(5)
    metrics[2] = {**metrics[2], key: value}
    raw = [_block(states, metrics, range(100, 105))]
    got = decode_train_replies(raw)
    ref = _one_by_one(raw)
    assert [_fields(r) for r in got] == [_fields(r) for r in ref]
    if key != "train-loss":  # train-loss is not a metric the server checks
        assert got[2].error is not None and got[2].state is None
    assert all(r.error is None for i, r in enumerate(got) if i != 2)
    _check_same(raw, spec, g)


def test_a_block_without_num_examples_is_refused_as_one_reply_would_be() -> None:
    spec, g, states, metrics = _setup(2)
    metrics = [{k: v for k, v in m.items() if k != "num-examples"} for m in metrics]
    got = decode_train_replies([_block(states, metrics, [1, 2])])
    assert [r.error for r in got] == ["missing numeric num-examples"] * 2


def test_inconsistent_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="same length K"):
        StackedArrays({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="leading client axis"):
        StackedArrays({"a": torch.tensor(1.0)})
    stack = StackedArrays({"a": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="needs 2 rows"):
        ReplyBlock((1, 2), stack, (0,), {})
    with pytest.raises(ValueError, match="2 values per metric"):
        ReplyBlock((1, 2), stack, (0, 1), {"num-examples": [1]})
    with pytest.raises(IndexError):
        stack.row(3)


def test_a_block_naming_rows_outside_its_stack_is_refused() -> None:
    stack = StackedArrays({"a": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"rows \[3\] of a stack of 3"):
        ReplyBlock((1,), stack, (3,), {})
