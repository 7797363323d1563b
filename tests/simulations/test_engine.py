"""End-to-end federations on digits through the real ServerApp logic and ClientApp.

Seeded; the pinned numbers are the acceptance criteria of the core issue.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from flwr.app import Context, Message
from sklearn.metrics import roc_auc_score

from client.app import handle_train
from server.checkpoint import load_checkpoint
from simulations.config import resolve_config
from simulations.engine import ENGINE_KEYS, InProcessGrid, run_in_process
from simulations.task import build_task

pytestmark = pytest.mark.slow

BASE = ["dataset=digits", "num-clients=10", "num-server-rounds=20", "seed=0"]


def _run(*overrides: str, **kw: Any) -> list[dict[str, Any]]:
    return run_in_process(resolve_config(None, [*BASE, *overrides]), **kw)


@pytest.fixture(scope="module")
def clean_fedavg() -> list[dict[str, Any]]:
    return _run("aggregator=mean")


def test_fedavg_on_iid_digits_reaches_90_percent(clean_fedavg: list[dict[str, Any]]) -> None:
    assert clean_fedavg[0]["round"] == 0
    assert clean_fedavg[0]["accuracy"] < 0.3  # the initial model knows nothing
    assert clean_fedavg[-1]["round"] == 20
    assert clean_fedavg[-1]["accuracy"] >= 0.90


ATTACK = ["num-malicious=3", "attack=sign_flip", "attack-params=scale=4.0"]


def test_fedavg_breaks_and_median_trimmed_mean_hold_under_30pct_sign_flip(
    clean_fedavg: list[dict[str, Any]],
) -> None:
    clean = clean_fedavg[-1]["accuracy"]
    broken = _run("aggregator=mean", *ATTACK)[-1]["accuracy"]
    median = _run("aggregator=median", *ATTACK)[-1]["accuracy"]
    trimmed = _run("aggregator=trimmed_mean", *ATTACK)[-1]["accuracy"]
    assert broken <= 0.25, f"FedAvg under attack should be near chance (0.1), got {broken}"
    assert median >= clean - 0.05, (median, clean)
    assert trimmed >= clean - 0.05, (trimmed, clean)


def test_same_seed_same_run_different_seed_different_run() -> None:
    a = _run("num-server-rounds=3", "aggregator=trimmed_mean", "num-malicious=2", "attack=gaussian")
    b = _run("num-server-rounds=3", "aggregator=trimmed_mean", "num-malicious=2", "attack=gaussian")
    c = _run("num-server-rounds=3", "aggregator=trimmed_mean", "num-malicious=2", "attack=gaussian", "seed=1")

    def strip(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(r["round"], r["accuracy"], r["loss"]) for r in rows]

    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path: Path) -> None:
    """Stateful defense (centered clipping) + checkpoint: 3 rounds, restart, 3 more."""
    common = ["aggregator=centered_clipping", "aggregator-params=tau=1.0", "num-malicious=2", "attack=gaussian"]
    full = _run("num-server-rounds=6", *common, f"out-dir={tmp_path / 'full'}")
    out = tmp_path / "resumed"
    _run("num-server-rounds=3", *common, f"out-dir={out}")
    rest = _run("num-server-rounds=6", *common, f"out-dir={out}", "resume=true")
    assert [r["round"] for r in rest] == [4, 5, 6]
    assert [r["loss"] for r in rest] == pytest.approx([r["loss"] for r in full[4:]], rel=1e-6)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2, 3, 4, 5, 6]


def test_crashing_and_malformed_clients_are_rejected_and_logged(tmp_path: Path) -> None:
    def fault(pid: int, msg: Message) -> bool:
        if pid == 0:
            raise RuntimeError("simulated crash")
        return pid == 1  # partition 1 never answers

    from flwr.clientapp import ClientApp

    bad = ClientApp()
    poisoned: list[str] = []  # the array partition 2 fills with NaN

    @bad.train()  # type: ignore[untyped-decorator]
    def _train(msg: Message, ctx: Context) -> Message:
        reply = handle_train(msg, ctx)
        if int(ctx.node_config["partition-id"]) == 2:
            arrays = reply.content["arrays"]
            key = next(iter(arrays.keys()))
            t = arrays[key].numpy().copy()
            t.flat[0] = float("nan")
            from flwr.app import Array

            arrays[key] = Array(t)
            poisoned.append(key)
        return reply

    cfg = resolve_config(None, [*BASE, "num-server-rounds=2", f"out-dir={tmp_path}", "aggregator=median"])
    from server.app import run_server

    grid = InProcessGrid(bad, cfg, 10, fault=fault)
    rows = run_server(grid, {k: v for k, v in cfg.items() if k not in ENGINE_KEYS})
    assert not rows[-1]["skipped"] and rows[-1]["num-kept"] == 7
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [record["round"] for record in audit] == [1, 2]
    assert len(set(poisoned)) == 1
    node = grid.node_ids  # node id of each partition
    for record in audit:  # each round: exactly the three faulty nodes, each for its fault
        assert sorted(p["partition_id"] for p in record["kept"]) == list(range(3, 10))
        rejected = {r["node_id"]: r for r in record["rejected"]}
        assert sorted(rejected) == [node[0], node[1], node[2]]
        crash, silent, nan = rejected[node[0]], rejected[node[1]], rejected[node[2]]
        # a node that crashed or kept silent reported no partition id
        assert (crash["partition_id"], crash["stage"]) == (-1, "invalid")
        assert "RuntimeError: simulated crash" in crash["reason"]
        assert (silent["partition_id"], silent["stage"]) == (-1, "timeout")
        assert (nan["partition_id"], nan["stage"]) == (2, "invalid")
        assert f"{poisoned[0]!r} contains NaN or Inf" in nan["reason"]


def test_too_few_clients_skips_rounds_and_keeps_model(tmp_path: Path) -> None:
    cfg = resolve_config(None, [*BASE, "num-server-rounds=2", "min-clients=5"])
    from flwr.clientapp import ClientApp

    from server.app import run_server

    grid = InProcessGrid(ClientApp(), cfg, 10, fault=lambda pid, m: pid >= 3)  # 3 answer
    # the empty ClientApp has no train handler: the 3 that answer reply with an error
    rows = run_server(grid, {k: v for k, v in cfg.items() if k not in ENGINE_KEYS})
    assert all(r["skipped"] for r in rows[1:])
    assert len({r["accuracy"] for r in rows}) == 1


def test_evaluation_extras_report_evasion_and_membership(tmp_path: Path) -> None:
    rows = _run(
        "num-server-rounds=4", "eval-evasion=fgsm(eps=0.15); pgd(eps=0.15, steps=10)",
        "eval-membership=true", f"out-dir={tmp_path}",
    )
    last = rows[-1]
    assert last["fgsm-accuracy@0.15"] < last["accuracy"]
    assert last["pgd-accuracy@0.15"] < last["accuracy"]
    # the loss-threshold attack on the final model, recomputed independently: members are
    # the first k training examples, non-members the first k test examples
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    assert ckpt is not None and ckpt.server_round == 4
    task = build_task(resolve_config(None, BASE))
    model = task.build_model()
    model.load_state_dict(ckpt.model)
    model.eval()
    x_test, y_test = task.test_data()
    k = min(task.dataset.x_train.shape[0], x_test.shape[0])
    with torch.no_grad():
        member_loss = F.cross_entropy(model(task.dataset.x_train[:k]), task.dataset.y_train[:k],
                                      reduction="none")
        other_loss = F.cross_entropy(model(x_test[:k]), y_test[:k], reduction="none")
    labels = [1] * k + [0] * k
    expected = roc_auc_score(labels, torch.cat([-member_loss, -other_loss]).numpy())
    assert last["membership-auc"] == pytest.approx(expected, abs=1e-4)
    assert last["membership-auc"] > 0.5  # trained on the members: they fit better
    assert "detection-precision" not in last  # nobody is malicious
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN literals
        assert "NaN" not in line


@pytest.mark.parametrize("attack", [["attack=sign_flip"], ["attack=ipm"], ["attack=backdoor"]])
def test_honest_only_reference_never_trains_the_malicious_clients(attack: list[str]) -> None:
    from client.malicious import malicious_partitions

    trained: list[int] = []

    def spy(pid: int, message: Message) -> bool:  # sees each message the engine sends
        if message.metadata.message_type == "train":
            trained.append(pid)
        return False

    rows = _run("num-server-rounds=2", "num-malicious=3", *attack, "reference=honest-only",
                "engine=batched", fault=spy)
    bad = malicious_partitions(10, 3, 0)
    honest = sorted(set(range(10)) - bad)
    # every round trained exactly the seven honest clients, and aggregated them
    assert sorted(trained) == sorted(honest * 2)
    assert [r["num-kept"] for r in rows[1:]] == [7, 7]
    # the attack never reached the model: the run equals the honest-only run of another
    # attack (the malicious clients are the same partitions, and none of them answered)
    other = _run("num-server-rounds=2", "num-malicious=3", "attack=gaussian",
                 "reference=honest-only", "engine=batched")
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in other]


def test_reference_is_checked() -> None:
    with pytest.raises(ValueError, match="reference must be one of none, honest-only"):
        _run("num-server-rounds=1", "reference=oracle")


def test_the_engine_leaves_the_garbage_collector_as_it_found_it() -> None:
    """The engine freezes what exists after round 1 (full collections skip it) and undoes
    that at the end; objects the caller froze stay frozen, and the engine does not touch
    the freeze then."""
    import gc

    flat = resolve_config(None, [*BASE, "num-server-rounds=2", "num-clients=4"])
    assert gc.get_freeze_count() == 0
    seen: list[int] = []
    run_in_process(flat, on_round=lambda row: seen.append(gc.get_freeze_count()))
    assert seen[0] == 0 and seen[-1] > 0  # frozen from the first trained round on
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        run_in_process(flat)
        # neither unfrozen nor frozen more (frozen objects that die leave the count)
        assert 0 < gc.get_freeze_count() <= mine
    finally:
        gc.unfreeze()


def test_keep_freed_memory_says_whether_it_applied() -> None:
    import platform

    from simulations.engine import keep_freed_memory

    applied = keep_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
