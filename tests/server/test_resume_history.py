"""Rules with a per-client history (FoolsGold, FLDetector) resume bit for bit: their state,
a table that grows with the clients seen, goes through the checkpoint exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.checkpoint import load_checkpoint

from .test_checkpoint import _exact, _file_rows, _run

pytestmark = pytest.mark.slow

# clients-per-round < num-clients: some clients sit out rounds and must keep their history
HISTORY = {
    "foolsgold": ["aggregator=foolsgold", "clients-per-round=4", "num-malicious=1",
                  "attack=sign_flip"],
    "fldetector": ["aggregator=fldetector", "clients-per-round=4", "num-malicious=1",
                   "attack=sign_flip"],
}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b)


@pytest.mark.parametrize("rule", sorted(HISTORY))
def test_a_history_rule_resumes_bit_for_bit(tmp_path: Path, rule: str) -> None:
    extra = HISTORY[rule]
    full = _run(tmp_path / "full", 5, *extra)
    _run(tmp_path / "resumed", 2, *extra)
    rest = _run(tmp_path / "resumed", 5, *extra, resume=True)
    assert [r["round"] for r in rest] == [3, 4, 5]
    assert _exact(rest) == _exact(full[3:])
    assert _exact(_file_rows(tmp_path / "resumed")) == _exact(_file_rows(tmp_path / "full"))
    a = load_checkpoint(tmp_path / "full" / "checkpoint")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint")
    assert a is not None and b is not None
    assert a.extra["rule_state"] is not None  # the history is really in the checkpoint
    assert _equal(a.extra["rule_state"], b.extra["rule_state"])
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
