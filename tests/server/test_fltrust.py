"""FLTrust end to end: the root dataset, the server's root update, the rule, resume.

Small federations in process (digits, 6 clients, 2-3 rounds); the maths of the rule is
tested in ``tests/aggregation/test_trust.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from aggregation.registry import derive_seed, make_generator
from client.malicious import malicious_partitions
from runconfig.config import APP_KEYS, RunConfig
from server.checkpoint import load_checkpoint
from server.fltrust import RootTask, RootUpdate, check_root_dataset
from server.rounds import ModelSpec
from server.run import build_components, build_rule
from server.stages import Round
from simulations.config import resolve_config
from simulations.engine import ENGINE_KEYS, check_names, run_in_process
from simulations.partition import partition
from simulations.task import build_task

pytestmark = pytest.mark.slow

N = 6
BASE = [f"num-clients={N}", "num-server-rounds=3", "model=logreg", "local-epochs=1"]
FLTRUST = ["aggregator=fltrust", "root-dataset=held-out(size=100)"]
ATTACK = ["num-malicious=2", "attack=sign_flip", "attack-params=scale=4.0"]


def _cfg(*overrides: str) -> dict[str, Any]:
    return resolve_config(None, [*BASE, *overrides])


def _app(*overrides: str) -> RunConfig:
    return RunConfig.from_flat({k: v for k, v in _cfg(*overrides).items() if k not in ENGINE_KEYS})


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # timings


def _audit(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / "audit.jsonl").read_text().splitlines()]


def _digits_npz(path: Path, rows: slice, *, shape: tuple[int, ...] = (8, 8),
                label_shift: int = 0) -> Path:
    ds = build_task(_app().flat).dataset
    x = ds.x_train[rows].numpy().reshape(-1, *shape)
    y = ds.y_train[rows].numpy() + label_shift
    np.savez(path, x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    return path


# --------------------------------------------------------------------------- the defense


@pytest.fixture(scope="module")
def clean_accuracy() -> float:
    """FedAvg without attackers after 4 rounds (0.88 on digits)."""
    return float(run_in_process(_cfg("num-server-rounds=4"))[-1]["accuracy"])


def test_fltrust_keeps_accuracy_under_sign_flip_and_records_trust(
    tmp_path: Path, clean_accuracy: float
) -> None:
    fedavg = run_in_process(_cfg(*ATTACK, "num-server-rounds=4"))
    rows = run_in_process(_cfg(*FLTRUST, *ATTACK, "num-server-rounds=4",
                               f"out-dir={tmp_path}"))
    assert fedavg[-1]["accuracy"] < clean_accuracy - 0.5  # the attack breaks FedAvg
    assert rows[-1]["accuracy"] > clean_accuracy - 0.03  # and not FLTrust
    bad = malicious_partitions(N, 2, 0)
    for row, record in zip(rows[1:], _audit(tmp_path), strict=True):
        assert not row["skipped"] and row["trusted"] == row["num-kept"] == N - 2
        assert row["all_distrusted"] == 0.0 and row["root-train-loss"] > 0
        assert {k["partition_id"] for k in record["kept"]} == set(range(N)) - bad
        trust = {t["partition_id"]: t["trust"] for t in record["trust"]}
        assert sorted(trust) == list(range(N))
        assert all(trust[p] == 0.0 for p in bad)
        assert all(trust[p] > 0.3 for p in set(range(N)) - bad)  # measured 0.44-0.72
        assert row["detection-precision"] == row["detection-recall"] == 1.0


def test_a_boosted_update_has_no_more_influence_than_an_honest_one(
    clean_accuracy: float
) -> None:
    # scaling: the attackers send 10 x the honest mean (model replacement's boost); FLTrust
    # trusts its direction but rescales it to the root update's norm
    rows = run_in_process(_cfg(*FLTRUST, "num-malicious=2", "attack=scaling",
                               "num-server-rounds=4"))
    assert all(r["trusted"] == N for r in rows[1:])
    assert rows[-1]["accuracy"] > clean_accuracy - 0.03


def test_resume_through_a_checkpoint_is_exact(tmp_path: Path) -> None:
    whole = run_in_process(_cfg(*FLTRUST, *ATTACK, f"out-dir={tmp_path / 'whole'}"))
    part = tmp_path / "part"
    first = run_in_process(_cfg(*FLTRUST, *ATTACK, f"out-dir={part}", "num-server-rounds=2"))
    rest = run_in_process(_cfg(*FLTRUST, *ATTACK, f"out-dir={part}", "resume=true"))
    assert _strip(first + rest) == _strip(whole)
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint"), load_checkpoint(part / "checkpoint")
    assert a is not None and b is not None
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k
    state = b.extra["components"]["fltrust"]
    assert state == a.extra["components"]["fltrust"]
    assert state["root_examples"] == 100 and isinstance(state["train_loss"], float)


def test_a_root_dataset_from_a_file(tmp_path: Path) -> None:
    path = _digits_npz(tmp_path / "root.npz", slice(0, 80))
    rows = run_in_process(_cfg(f"root-dataset=file(path={path})", "aggregator=fltrust",
                               "num-server-rounds=2", *ATTACK))
    assert [r["skipped"] for r in rows[1:]] == [False, False]
    assert all(r["trusted"] == N - 2 for r in rows[1:])
    # a file takes nothing from the clients: their partitions are those of a run without it
    with_file = build_task(_app(f"root-dataset=file(path={path})").flat)
    assert all(torch.equal(a, b) for a, b in zip(
        with_file.partition_indices(N), build_task(_app().flat).partition_indices(N),
        strict=True))
    x, y = with_file.root_data(_app(f"root-dataset=file(path={path})").root_dataset)  # type: ignore[arg-type]
    ds = with_file.dataset
    assert torch.equal(x, ds.x_train[:80]) and torch.equal(y, ds.y_train[:80])


# --------------------------------------------------------------------------- the root data


def test_held_out_examples_leave_the_partitions_only_when_set() -> None:
    plain = build_task(_app().flat)
    ds = plain.dataset
    gen = make_generator(derive_seed(0, "partition", "iid", N))
    expected = partition("iid", ds.y_train, N, generator=gen)
    assert all(torch.equal(a, b) for a, b in
               zip(plain.partition_indices(N), expected, strict=True))  # bit-identical
    cfg = _app(*FLTRUST)
    task = build_task(cfg.flat)
    assert cfg.root_dataset is not None
    x, y = task.root_data(cfg.root_dataset)
    parts = torch.cat(task.partition_indices(N))
    assert x.shape == (100, 1, 8, 8) and y.shape == (100,)
    root = [i for i in range(ds.num_train) if i not in set(parts.tolist())]
    assert len(root) == 100 and parts.numel() == ds.num_train - 100
    assert torch.equal(x, ds.x_train[root]) and torch.equal(y, ds.y_train[root])
    assert len(set(y.tolist())) == 10  # a uniform draw of 100 digits has every class
    other = build_task(_app(*FLTRUST, "seed=1").flat)
    assert not torch.equal(other.root_data(cfg.root_dataset)[1], y)  # drawn from the seed


def test_the_root_update_is_the_task_training_the_global_model() -> None:
    cfg = _app(*FLTRUST)
    task = build_task(cfg.flat)
    assert isinstance(task, RootTask)
    comp = RootUpdate(task, cfg, torch.device("cpu"))
    model = task.build_model()
    spec = ModelSpec.from_state(model.state_dict())
    g = spec.flatten(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update, state = comp.server_update(Round(2, g), model, comp.init_state())
    assert update is not None and update.dtype == torch.float64 and update.shape == (spec.dim,)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    assert state is not None
    expected = task.build_model()
    assert cfg.root_dataset is not None
    metrics = task.train_on(expected, *task.root_data(cfg.root_dataset), cfg=cfg,
                            server_round=2, device=torch.device("cpu"))
    torch.testing.assert_close(update, spec.flatten(expected.state_dict()) - g, rtol=0, atol=0)
    assert state["train_loss"] == metrics["train-loss"]
    again, _ = comp.server_update(Round(3, g), model, state)
    assert again is not None and not torch.equal(again, update)  # another batch order


def test_a_changed_root_file_stops_a_resumed_run(tmp_path: Path) -> None:
    path = _digits_npz(tmp_path / "root.npz", slice(0, 50))
    cfg = _app("aggregator=fltrust", f"root-dataset=file(path={path})")
    saved = RootUpdate(build_task(cfg.flat), cfg, torch.device("cpu")).init_state()
    _digits_npz(path, slice(50, 100))
    comp = RootUpdate(build_task(cfg.flat), cfg, torch.device("cpu"))
    g = torch.zeros(1, dtype=torch.float64)
    verdict, _ = comp.admit(Round(1, g), saved)
    assert verdict is not None and verdict.action == "stop" and "differs" in verdict.reason
    assert comp.admit(Round(1, g), comp.init_state())[0] is None


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("value, error, match", [
    ("held-out", TypeError, "exactly one parameter, size"),
    ("held-out(size=0)", ValueError, "size >= 1"),
    ("held-out(size=True)", ValueError, "int size"),
    ("held-out(n=5)", TypeError, "exactly one parameter, size"),
    ("file", TypeError, "exactly one parameter, path"),
    ("file(path='')", ValueError, "needs a path"),
    ("server(size=3)", ValueError, "source 'server' is unknown"),
])
def test_the_run_config_refuses_a_malformed_root_dataset(
    value: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        RunConfig.from_flat({**APP_KEYS, "root-dataset": value})


def test_fltrust_without_a_root_dataset_and_a_root_dataset_without_fltrust() -> None:
    with pytest.raises(ValueError, match="aggregator='fltrust' .* root-dataset is empty"):
        check_names(_app("aggregator=fltrust"))
    with pytest.raises(ValueError, match="aggregator='median' takes no server-side reference"):
        check_names(_app("aggregator=median", "root-dataset=held-out(size=10)"))
    cfg = _app("aggregator=fltrust")
    with pytest.raises(ValueError, match="root-dataset is empty"):
        build_components(cfg, build_task(cfg.flat))
    check_root_dataset(_app(*FLTRUST), build_rule(_app(*FLTRUST)))  # the pair is fine


@pytest.mark.parametrize("overrides, error, match", [
    (["root-dataset=held-out(size=1438)"], ValueError, "1 <= size < 1438"),
    (["root-dataset=file(path=/nonexistent/root.npz)"], FileNotFoundError, "no such file"),
])
def test_root_data_that_cannot_be_had_is_refused_before_round_1(
    overrides: list[str], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        run_in_process(_cfg("aggregator=fltrust", *overrides))


def test_a_root_file_that_does_not_fit_the_task_is_refused(tmp_path: Path) -> None:
    flat = _digits_npz(tmp_path / "flat.npz", slice(0, 20), shape=(64,))
    with pytest.raises(ValueError, match="samples have shape \\(64,\\).*has \\(1, 8, 8\\)"):
        run_in_process(_cfg("aggregator=fltrust", f"root-dataset=file(path={flat})"))
    labels = _digits_npz(tmp_path / "labels.npz", slice(0, 20), label_shift=5)
    with pytest.raises(ValueError, match="outside the 10 classes"):
        run_in_process(_cfg("aggregator=fltrust", f"root-dataset=file(path={labels})"))


class _NoRootTask:
    """A task with a model and test data but no root dataset."""

    def build_model(self) -> nn.Module:
        return nn.Linear(2, 2)

    def test_data(self) -> tuple[Tensor, Tensor]:
        return torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64)


def test_a_task_without_root_data_is_refused() -> None:
    cfg = _app(*FLTRUST)
    with pytest.raises(ValueError, match="has no root_data\\(\\) and train_on\\(\\)"):
        build_components(cfg, _NoRootTask())
