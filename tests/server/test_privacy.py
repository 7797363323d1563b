"""Central DP end to end: the epsilon a run prints is the accountant library's value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from aggregation.registry import derive_seed, make_generator
from simulations.config import resolve_config
from simulations.engine import run_in_process

pytestmark = pytest.mark.slow

BASE = ["num-clients=10", "num-server-rounds=4", "clients-per-round=5", "model=logreg"]


def test_central_dp_epsilon_per_round_matches_opacus(tmp_path: Path) -> None:
    z, q, delta = 0.8, 0.5, 1e-5
    rows = run_in_process(resolve_config(None, [
        *BASE, f"central-dp=noise_multiplier={z}, clipping_norm=1.0, sampling=poisson, delta={delta}",
        f"out-dir={tmp_path}",
    ]))
    for r in rows[1:]:
        ref = RDPAccountant()
        ref.history = [(z, q, r["round"])]
        assert r["epsilon"] == pytest.approx(ref.get_epsilon(delta), abs=1e-6)
        assert r["noise-std"] == pytest.approx(z * 1.0 / 5)
    eps = [r["epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and eps[0] > 0
    # Poisson sampling: each of the N = 10 nodes joins with q = 0.5 on the round's own
    # generator (seed 0, label "sample"), so the sample sizes are known in advance
    expected = [
        int((torch.rand(10, generator=make_generator(derive_seed(0, "sample", r["round"])),
                        dtype=torch.float64) < q).sum())
        for r in rows[1:]
    ]
    assert [r["num-sampled"] for r in rows[1:]] == expected
    assert len(set(expected)) > 1  # the sizes vary, unlike a fixed-size sample of m = 5


def test_budget_stops_training_and_keeps_last_model(tmp_path: Path) -> None:
    rows = run_in_process(resolve_config(None, [
        *BASE, "num-server-rounds=10",
        "central-dp=noise_multiplier=0.8, clipping_norm=1.0, sampling=poisson, max_epsilon=12.0",
        f"out-dir={tmp_path}",
    ]))
    last = rows[-1]
    assert "stopped" in last and "max_epsilon=12.0" in last["stopped"]
    assert all(r["epsilon"] <= 12.0 for r in rows[1:])
    assert last["accuracy"] == rows[-2]["accuracy"]  # no round ran after the stop
    # exactly the rounds that fit: eps(T rounds of (z=0.8, q=0.5)) <= 12 < eps(T + 1)
    fits = 0
    while True:
        ref = RDPAccountant()
        ref.history = [(0.8, 0.5, fits + 1)]
        if ref.get_epsilon(1e-5) > 12.0:
            break
        fits += 1
    assert fits == 5 and len(rows) - 2 == fits
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "stopped" in json.loads(lines[-1])


def test_central_dp_resume_restores_the_accountant(tmp_path: Path) -> None:
    cdp = "central-dp=noise_multiplier=1.0, clipping_norm=1.0, sampling=poisson"
    full = run_in_process(resolve_config(None, [*BASE, cdp, f"out-dir={tmp_path / 'a'}"]))
    run_in_process(resolve_config(None, [*BASE, "num-server-rounds=2", cdp, f"out-dir={tmp_path / 'b'}"]))
    rest = run_in_process(resolve_config(None, [*BASE, cdp, f"out-dir={tmp_path / 'b'}", "resume=true"]))
    assert [r["epsilon"] for r in rest] == pytest.approx([r["epsilon"] for r in full[3:]])
    assert [r["accuracy"] for r in rest] == pytest.approx([r["accuracy"] for r in full[3:]])


@pytest.mark.parametrize("rule", ["krum", "median", "trimmed_mean"])
def test_central_dp_with_a_robust_rule_is_refused(rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        run_in_process(resolve_config(None, [
            *BASE, f"aggregator={rule}", "aggregator-params=f=1",
            "central-dp=noise_multiplier=1.0, clipping_norm=1.0",
        ]))
