"""Regressions for defects found in review: each misconfiguration fails loudly, and
stateful runs resume only when that is sound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import handle_train
from server.app import run_server
from simulations.cli import main
from simulations.config import resolve_config
from simulations.engine import ENGINE_KEYS, InProcessGrid, run_in_process

pytestmark = pytest.mark.slow

BASE = ["num-clients=4", "num-server-rounds=2", "model=logreg"]


def _run(*overrides: str) -> list[dict]:  # type: ignore[type-arg]
    return run_in_process(resolve_config(None, [*BASE, *overrides]))


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (["clients-per-round=6"], ValueError, "exceeds num-clients=4"),
        (["num-malicious=2", "attack=sing_flip"], KeyError, "did you mean 'sign_flip'"),
        (["num-malicious=2", "attack=alie", "adversary="], ValueError, "attack-free"),
        (["local-dp=epsilon=2.0"], ValueError, "clipping_norm"),
        (["dp-sgd=max_grad_norm=1.0"], ValueError, "noise_multiplier or target_epsilon"),
        (["optimizer=adam", "momentum=0.9"], ValueError, "no effect with optimizer='adam'"),
        (["clients-per-round=3", "central-dp=noise_multiplier=1.0, clipping_norm=1.0, sampling=none"],
         ValueError, "every node takes part"),
        (["clients-per-round=2", "pre-aggregation=norm_clip(max_norm=5)",
          "central-dp=noise_multiplier=1.0, clipping_norm=1.0"], ValueError, "pre-aggregation"),
        (["clients-per-round=2", "aggregator-params=bogus=1",
          "central-dp=noise_multiplier=1.0, clipping_norm=1.0"], ValueError, "aggregator-params"),
    ],
)
def test_misconfiguration_fails_before_round_one(
    overrides: list[str], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        _run(*overrides)


def test_resume_with_a_changed_config_is_refused(tmp_path: Path) -> None:
    _run("aggregator=centered_clipping", "aggregator-params=tau=1.0", f"out-dir={tmp_path}")
    with pytest.raises(ValueError, match=r"seed: 0 -> 7"):
        _run("num-server-rounds=4", "aggregator=centered_clipping", "aggregator-params=tau=1.0",
             f"out-dir={tmp_path}", "resume=true", "seed=7")


def test_resume_with_dp_sgd_is_refused(tmp_path: Path) -> None:
    dp = "dp-sgd=noise_multiplier=1.0, max_grad_norm=1.0"
    _run("num-server-rounds=1", dp, f"out-dir={tmp_path}")
    with pytest.raises(ValueError, match="epsilon would restart"):
        _run(dp, f"out-dir={tmp_path}", "resume=true")


def test_dropout_runs_are_reproducible_in_one_process() -> None:
    a = _run("model=mlp", "model-params=dropout=0.5")
    b = _run("model=mlp", "model-params=dropout=0.5")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_poisoned_metrics_are_rejected_not_a_crash(tmp_path: Path) -> None:
    bad = ClientApp()

    @bad.train()
    def _train(msg: Message, ctx: Context) -> Message:
        reply = handle_train(msg, ctx)
        pid = int(ctx.node_config["partition-id"])
        if pid == 0:
            reply.content["metrics"]["partition-id"] = float("nan")
        if pid == 1:
            reply.content["metrics"]["num-partitions"] = float("inf")
        if pid == 2:
            reply.content["metrics"]["dp-epsilon"] = [1.0, 2.0]
        return reply

    cfg = resolve_config(None, [*BASE, "num-clients=6", f"out-dir={tmp_path}", "aggregator=median"])
    rows = run_server(InProcessGrid(bad, cfg, 6), {k: v for k, v in cfg.items() if k not in ENGINE_KEYS})
    assert rows[-1]["num-kept"] == 3 and not rows[-1]["skipped"]
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    reasons = " | ".join(r["reason"] for r in audit[0]["rejected"])
    assert "'partition-id' must be a finite number" in reasons
    assert "'num-partitions' must be a finite number" in reasons
    assert "'dp-epsilon' must be a number" in reasons


def test_no_detection_scores_before_the_attack_starts() -> None:
    rows = _run("num-clients=10", "num-server-rounds=3", "num-malicious=3", "attack=alie",
                "attack-start-round=3", "aggregator=krum")
    assert "detection-recall" not in rows[1] and "detection-recall" not in rows[2]
    assert "detection-recall" in rows[3] and rows[3]["attack-mounted"] == 1.0


def test_cli_refuses_a_defense_that_cannot_run_before_round_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--out", str(tmp_path), *BASE, "aggregator=krum", "aggregator-params=f=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot run with n=" in err and "krum" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_exits_nonzero_when_every_round_was_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # settings are checked before round 1, so only run-time causes remain (e.g. every node
    # lost in a deployment): stand in for such a run
    import simulations.cli as cli

    def skipped_run(cfg: object, out: Path, *, quiet: bool = False) -> list[dict[str, object]]:
        return [{"round": 0, "accuracy": 0.1, "skipped": False},
                {"round": 1, "accuracy": 0.1, "skipped": True, "skipped_reason": "nodes lost"}]

    monkeypatch.setattr(cli, "run_one", skipped_run)
    assert main(["run", "--out", str(tmp_path), *BASE]) == 1
    assert "every round was skipped: nodes lost" in capsys.readouterr().err
