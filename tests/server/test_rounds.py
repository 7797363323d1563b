"""The framework-free round: validation of replies, updates, skipping, reports."""

from __future__ import annotations

import pytest
import torch

import aggregation
from aggregation.registry import make_generator
from server.rounds import ClientReply, ModelSpec, aggregate_round

SPEC_STATE = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def _spec() -> ModelSpec:
    return ModelSpec.from_state(SPEC_STATE)


def _reply(node: int, w: torch.Tensor, b: torch.Tensor, n: float = 10.0, **kw: object) -> ClientReply:
    return ClientReply(node, {"w": w, "b": b}, n, partition_id=node, **kw)  # type: ignore[arg-type]


def _round(replies: list[ClientReply], rule: str = "mean", *, min_clients: int = 1,
           global_flat: torch.Tensor | None = None, **params: object):  # type: ignore[no-untyped-def]
    spec = _spec()
    g = torch.zeros(spec.dim, dtype=torch.float64) if global_flat is None else global_flat
    return aggregate_round(
        1, g, replies, spec, aggregation.get(rule, **params), None,
        min_clients=min_clients, generator=make_generator(0),
    )


def test_spec_flatten_unflatten_roundtrip() -> None:
    spec = _spec()
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0, 8.0, 9.0])}
    flat = spec.flatten(state)
    assert flat.shape == (9,)
    back = spec.unflatten(flat)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert back["w"].dtype == torch.float32


def test_mean_of_updates_equals_weighted_mean_of_weights() -> None:
    gen = torch.Generator().manual_seed(44)
    g = torch.randn(9, dtype=torch.float64, generator=gen)
    spec = _spec()
    ws = [torch.randn(9, dtype=torch.float64, generator=gen) for _ in range(3)]
    replies = [
        ClientReply(i, spec.unflatten(w), float(i + 1), partition_id=i) for i, w in enumerate(ws)
    ]
    out = _round(replies, global_flat=g)
    # float32 transport: client weights were rounded to float32 by unflatten
    w32 = torch.stack([spec.flatten(r.state) for r in replies])  # type: ignore[arg-type]
    expect = (w32 * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[:, None]).sum(0) / 6.0
    assert out.new_global is not None
    torch.testing.assert_close(out.new_global, expect)
    assert out.kept_nodes == (0, 1, 2)
    assert not out.rejections


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda: _reply(9, torch.full((2, 3), float("nan")), torch.zeros(3)), "NaN or Inf"),
        (lambda: _reply(9, torch.full((2, 3), float("inf")), torch.zeros(3)), "NaN or Inf"),
        (lambda: _reply(9, torch.zeros(3, 2), torch.zeros(3)), "has shape (3, 2)"),
        (lambda: _reply(9, torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3)),
         "dtype torch.int64, expected torch.float32"),
        # float64 for a float32 parameter: values beyond float32's range would make it Inf
        (lambda: _reply(9, torch.full((2, 3), 1e300, dtype=torch.float64), torch.zeros(3)),
         "dtype torch.float64, expected torch.float32"),
        (lambda: ClientReply(9, {"w": torch.zeros(2, 3)}, 5.0), "missing arrays ['b']"),
        (lambda: ClientReply(9, {**SPEC_STATE, "x": torch.zeros(1)}, 5.0), "unexpected arrays"),
        (lambda: ClientReply(9, {**SPEC_STATE, "n": torch.zeros(1, dtype=torch.int64)}, 5.0),
         "unexpected arrays"),
        (lambda: _reply(9, torch.zeros(2, 3), torch.zeros(3), n=-1.0), "num-examples"),
        (lambda: _reply(9, torch.zeros(2, 3), torch.zeros(3), n=float("nan")), "num-examples"),
        (lambda: ClientReply(9, None, None, error="client error 500: boom"), "boom"),
        (lambda: ClientReply(9, None, 3.0), "no arrays"),
    ],
)
def test_malformed_reply_is_rejected_with_reason_and_round_goes_on(bad, reason) -> None:  # type: ignore[no-untyped-def]
    good = [_reply(i, torch.full((2, 3), float(i)), torch.zeros(3)) for i in range(3)]
    out = _round([*good, bad()], min_clients=2)
    assert out.new_global is not None, out.skipped_reason
    assert [r.node_id for r in out.rejections] == [9]
    assert out.rejections[0].stage == "invalid"
    assert reason in out.rejections[0].reason
    # the bad reply did not enter the mean: mean of 0, 1, 2
    torch.testing.assert_close(out.new_global[:6], torch.full((6,), 1.0, dtype=torch.float64))


def test_duplicate_node_reply_rejected() -> None:
    a = _reply(1, torch.ones(2, 3), torch.zeros(3))
    out = _round([a, a, _reply(2, torch.ones(2, 3), torch.zeros(3))])
    assert [r.reason for r in out.rejections] == ["second reply from the same node in one round"]


def test_too_few_valid_replies_skips_round_and_keeps_model() -> None:
    good = [_reply(0, torch.ones(2, 3), torch.zeros(3))]
    bad = ClientReply(5, None, None, error="client error 500: crash")
    out = _round([*good, bad], min_clients=2)
    assert out.skipped and out.new_global is None
    assert "only 1 valid replies, fewer than min-clients=2" in str(out.skipped_reason)


def test_rule_precondition_failure_skips_round_with_the_rules_message() -> None:
    gen = torch.Generator().manual_seed(103)
    replies = [_reply(i, torch.randn(2, 3, generator=gen), torch.randn(3, generator=gen))
               for i in range(4)]
    out = _round(replies, "krum", f=1)
    assert out.skipped
    assert "krum" in str(out.skipped_reason) and "n >= 2f + 3" in str(out.skipped_reason)


def test_krum_rejections_are_reported_per_client() -> None:
    gen = torch.Generator().manual_seed(0)
    replies = [_reply(i, 0.01 * torch.randn(2, 3, generator=gen), torch.zeros(3)) for i in range(6)]
    replies.append(_reply(99, torch.full((2, 3), 50.0), torch.zeros(3)))
    out = _round(replies, "krum", f=1)
    assert out.new_global is not None
    assert len(out.kept_nodes) == 1 and 99 not in out.kept_nodes
    rule_rejected = {r.node_id for r in out.rejections if r.stage == "rule"}
    assert 99 in rule_rejected and len(rule_rejected) == 6
    report = out.report()
    assert {r["node_id"] for r in report["rejected"]} == rule_rejected


def test_krum_on_updates_picks_right_client_at_update_scale_1e5() -> None:
    """Weights of scale 1, updates of scale 1e-5: the adapter works on float64 updates.

    Flower's Krum computes |x|^2 + |y|^2 - 2xy on full float32 models; at this scale those
    distances are dominated by rounding (FLOWER_NOTES: 10-40x errors, negative values).
    Honest clients cluster around a common update; client 3 sits a little further off, and
    the client closest to the cluster centre must be chosen.
    """
    gen = torch.Generator().manual_seed(1)
    spec = _spec()
    g32 = torch.randn(spec.dim, generator=gen).float()  # global weights, scale 1
    base = 1e-5 * torch.randn(spec.dim, generator=gen)
    offsets = 1e-6 * torch.randn(7, spec.dim, generator=gen)
    offsets[0] *= 0.05  # client 0 is nearest the centre of the honest cluster
    offsets[3] = 2e-5 * torch.sign(torch.randn(spec.dim, generator=gen))  # farther away
    replies = []
    for i in range(7):
        w = (g32.double() + base + offsets[i]).float()  # float32 transport
        replies.append(ClientReply(i, spec.unflatten(w.double()), 1.0, partition_id=i))
    out = _round(replies, "krum", global_flat=g32.double(), f=1)
    # oracle: brute-force Krum on the exact float32 updates in float64
    updates = torch.stack([spec.flatten(r.state) for r in replies]) - g32.double()  # type: ignore[arg-type]
    d2 = torch.cdist(updates, updates) ** 2
    scores = torch.sort(d2, dim=1).values[:, 1 : 7 - 1 - 2 + 1].sum(1)
    assert out.kept_nodes == (int(scores.argmin()),)
    assert out.kept_nodes != (3,)
