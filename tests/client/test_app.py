"""The ClientApp's train handler: roles, poisoning, DP state across rounds, local DP."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants import RDPAccountant

from client.app import handle_train
from client.malicious import malicious_partitions
from runconfig.config import RunConfig
from simulations.config import APP_DEFAULTS, resolve_config
from simulations.engine import ENGINE_KEYS, _set_task_identity
from simulations.task import build_task


def _ctx(pid: int, *overrides: str) -> Context:
    cfg = {k: v for k, v in resolve_config(None, ["model=logreg", *overrides]).items() if k not in ENGINE_KEYS}
    return Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": 10},
                   state=RecordDict(), run_config=cfg)


def _msg(ctx: Context, rnd: int = 1) -> tuple[Message, dict[str, torch.Tensor]]:
    _set_task_identity(1)
    model = build_task(ctx.run_config).build_model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": rnd})})
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=ctx.node_id), state


def _reply(ctx: Context, rnd: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
    msg, g = _msg(ctx, rnd)
    out = handle_train(msg, ctx)
    return out.content["arrays"].to_torch_state_dict(), dict(out.content["metrics"]), g


def _update(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(new[k] - old[k]).reshape(-1) for k in old])


def test_honest_reply_reports_true_counts_and_ids() -> None:
    state, metrics, _ = _reply(_ctx(3))
    task = build_task(_ctx(3).run_config)
    x, _ = task.train_data({"partition-id": 3, "num-partitions": 10})
    assert metrics["num-examples"] == x.shape[0]
    assert metrics["partition-id"] == 3 and metrics["num-partitions"] == 10


def test_same_config_same_update() -> None:
    a, _, _ = _reply(_ctx(2))
    b, _, _ = _reply(_ctx(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _malicious_pid(num: int, seed: int = 0) -> tuple[int, int]:
    bad = sorted(malicious_partitions(10, num, seed))
    good = next(i for i in range(10) if i not in bad)
    return bad[0], good


def test_sign_flip_client_sends_minus_scale_times_its_honest_update() -> None:
    bad, _ = _malicious_pid(3)
    honest, _, g = _reply(_ctx(bad))
    flipped, _, _ = _reply(_ctx(bad, "num-malicious=3", "attack=sign_flip", "attack-params=scale=4.0"))
    torch.testing.assert_close(_update(flipped, g), -4.0 * _update(honest, g), rtol=1e-5, atol=1e-6)


def test_inflate_examples_reports_a_forged_count_and_honest_clients_do_not() -> None:
    bad, good = _malicious_pid(2)
    _, m_bad, _ = _reply(_ctx(bad, "num-malicious=2", "attack=inflate_examples", "attack-params=factor=1000"))
    _, m_true, _ = _reply(_ctx(bad))
    _, m_good, _ = _reply(_ctx(good, "num-malicious=2", "attack=inflate_examples", "attack-params=factor=1000"))
    assert m_bad["num-examples"] == 1000 * m_true["num-examples"]
    assert m_good["num-examples"] == _reply(_ctx(good))[1]["num-examples"]


def test_unknown_data_attack_param_is_refused() -> None:
    bad, _ = _malicious_pid(2)
    with pytest.raises(TypeError, match="fractoin"):
        _reply(_ctx(bad, "num-malicious=2", "attack=backdoor", "attack-params=fractoin=0.5"))


def test_dp_sgd_history_persists_in_context_state_across_rounds() -> None:
    ctx = _ctx(1, "dp-sgd=noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5", "local-epochs=1")
    _, m1, _ = _reply(ctx, 1)
    _, m2, _ = _reply(ctx, 2)
    assert "dp-sgd" in ctx.state
    n = build_task(ctx.run_config).train_data(ctx.node_config)[0].shape[0]
    # Opacus: sample rate 1 / (batches per epoch), one epoch of that many steps per round
    steps_per_round = -(-n // 32)
    q = 1 / steps_per_round
    ref = RDPAccountant()  # the default accountant (privacy.DEFAULT_ACCOUNTANT)
    ref.history = [(1.0, q, 2 * steps_per_round)]
    assert m2["dp-epsilon"] > m1["dp-epsilon"]
    assert m2["dp-epsilon"] == pytest.approx(ref.get_epsilon(1e-5), rel=1e-3)


def test_local_dp_update_is_clipped_and_noised() -> None:
    ctx = _ctx(4, "local-dp=clipping_norm=0.5, noise_std=0.0001")
    noised, _, g = _reply(ctx)
    plain, _, _ = _reply(_ctx(4))
    u_noised, u_plain = _update(noised, g), _update(plain, g)
    clipped = u_plain * min(1.0, 0.5 / float(u_plain.norm()))
    assert float((u_noised - clipped).std()) == pytest.approx(1e-4, rel=0.1)


@pytest.mark.parametrize("key", ["dp-sgd", "local-dp", "adversarial-training"])
def test_unknown_defense_parameters_are_refused(key: str) -> None:
    cfg = resolve_config(None, [f"{key}=bogus=1"])
    with pytest.raises(TypeError, match="bogus"):
        RunConfig.from_flat({k: v for k, v in cfg.items() if k in APP_DEFAULTS})


# --------------------------------------------------------------------------- backdoors


def _train_on(ctx: Context, rnd: int, global_state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The update ``(d,)`` the client sends in round ``rnd`` from ``global_state``."""
    _set_task_identity(1)
    content = RecordDict({"arrays": ArrayRecord(global_state),
                          "config": ConfigRecord({"server-round": rnd})})
    msg = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=ctx.node_id)
    out = handle_train(msg, ctx).content["arrays"].to_torch_state_dict()
    return _update(out, global_state)


def _two_globals(ctx: Context) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Round 1's global model and round 2's, changed by a seeded random step."""
    _, g1 = _msg(ctx)
    gen = torch.Generator().manual_seed(7)
    g2 = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in g1.items()}
    return g1, g2


def test_neurotoxin_masks_the_top_k_coordinates_of_the_global_change(
        caplog: pytest.LogCaptureFixture) -> None:
    bad, _ = _malicious_pid(3)
    attack = ["num-malicious=3", "attack=neurotoxin", "attack-params=boost=3.0, top_k=0.1"]
    ctx = _ctx(bad, *attack)
    g1, g2 = _two_globals(ctx)
    backdoor = ["num-malicious=3", "attack=backdoor", "attack-params=boost=3.0"]
    with caplog.at_level("INFO", logger="fedshield.client"):
        first = _train_on(ctx, 1, g1)
    assert "neurotoxin has no earlier global model" in caplog.text
    assert torch.equal(first, _train_on(_ctx(bad, *backdoor), 1, g1))  # the plain boosted one
    second = _train_on(ctx, 2, g2)
    plain = _train_on(_ctx(bad, *backdoor), 2, g2)
    change = _update(g2, g1)  # global_2 - global_1
    k = math.ceil(0.1 * change.numel())
    top = torch.sort(change.abs(), descending=True, stable=True).indices[:k]
    rest = torch.ones_like(change, dtype=torch.bool)
    rest[top] = False
    assert bool((second[top] == 0).all())
    assert torch.equal(second[rest], plain[rest])
    assert float(plain[top].abs().sum()) > 0  # the backdoor did write there
    assert "neurotoxin" in ctx.state


def test_neurotoxin_keeps_the_global_model_before_the_attack_starts() -> None:
    bad, _ = _malicious_pid(3)
    ctx = _ctx(bad, "num-malicious=3", "attack=neurotoxin", "attack-params=top_k=0.2",
               "attack-start-round=2")
    g1, g2 = _two_globals(ctx)
    assert torch.equal(_train_on(ctx, 1, g1), _train_on(_ctx(bad), 1, g1))  # honest in round 1
    second = _train_on(ctx, 2, g2)
    change = _update(g2, g1)
    top = torch.sort(change.abs(), descending=True, stable=True).indices[
        :math.ceil(0.2 * change.numel())]
    assert bool((second[top] == 0).all())
    assert float(second.abs().sum()) > 0


def test_constrain_and_scale_sends_an_update_of_norm_max_norm() -> None:
    bad, _ = _malicious_pid(3)
    _, g = _msg(_ctx(bad))
    plain = _train_on(_ctx(bad, "num-malicious=3", "attack=backdoor"), 1, g)
    norm = float(plain.norm())
    bound = 4.0 * norm  # the boosted update (10 x) is longer
    sent = _train_on(_ctx(bad, "num-malicious=3", "attack=backdoor",
                          f"attack-params=boost=10.0, max_norm={bound!r}"), 1, g)
    assert float(sent.double().norm()) == pytest.approx(bound, rel=1e-5)
    torch.testing.assert_close(sent, 4.0 * plain, rtol=1e-5, atol=1e-7)
    loose = _train_on(_ctx(bad, "num-malicious=3", "attack=backdoor",
                           f"attack-params=boost=10.0, max_norm={20 * norm!r}"), 1, g)
    torch.testing.assert_close(loose, 10.0 * plain, rtol=1e-5, atol=1e-7)


def test_bad_backdoor_params_are_refused_with_the_rule() -> None:
    bad, _ = _malicious_pid(3)
    with pytest.raises(ValueError, match="neurotoxin: max_norm must be finite and > 0"):
        _reply(_ctx(bad, "num-malicious=3", "attack=neurotoxin", "attack-params=max_norm=-1.0"))
