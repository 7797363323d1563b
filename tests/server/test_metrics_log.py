"""The metrics log: what clients write reaches the files and the log escaped and capped,
tracebacks stay at debug level, and only the rows of rounds that run again are replaced."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from client.app import app as client_app
from server.app import run_server
from server.metrics_log import MAX_TEXT, MetricsLog, safe_text
from server.stages import Plan
from simulations.config import resolve_config
from simulations.engine import ENGINE_KEYS, InProcessGrid

SUFFIX = len("... [cut, 1000000000 characters in all]")
HOSTILE = ("boom\nINFO fedshield.server: round 9: kept 10 of 10 replies\r\x1b[2J\x00"
           "\u202eevil\u2028" + "x" * 10_000)


def test_safe_text_escapes_what_is_not_printable() -> None:
    assert safe_text("a\nb\r\tc\x1b[31m\x00") == "a\\nb\\r\\tc\\x1b[31m\\x00"
    assert safe_text("\u202eevil\u2028") == "\\u202eevil\\u2028"
    assert safe_text("naïve résumé, 数据 ok") == "naïve résumé, 数据 ok"  # printable stays


def test_safe_text_caps_the_length_and_says_so() -> None:
    assert safe_text("y" * MAX_TEXT) == "y" * MAX_TEXT
    cut = safe_text("y" * (MAX_TEXT + 1))
    assert cut == "y" * MAX_TEXT + f"... [cut, {MAX_TEXT + 1} characters in all]"
    # escapes count toward the cap: 500 newlines become 1000 characters, cut to 500
    assert safe_text("\n" * MAX_TEXT).startswith("\\n" * (MAX_TEXT // 2) + "...")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2 * MAX_TEXT))
def test_safe_text_is_one_printable_bounded_line(text: str) -> None:
    out = safe_text(text)
    assert out.isprintable()  # no newline, no control, no bidirectional override
    assert len(out) <= MAX_TEXT + SUFFIX
    if text.isprintable() and len(text) <= MAX_TEXT:
        assert out == text


def _report(rnd: int, reason: str) -> dict[str, Any]:
    return {"round": rnd, "skipped": False, "participants": [{"node_id": 7, "partition_id": 0}],
            "kept": [], "rejected": [{"node_id": 7, "partition_id": 0, "stage": "invalid",
                                      "reason": reason}],
            "aggregation_seconds": 0.0}


def test_client_strings_reach_files_log_and_callback_escaped_and_capped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[dict[str, Any]] = []
    metrics = MetricsLog(str(tmp_path), on_round=seen.append)
    metrics.configure(Plan("fixed", 0, 0, 1.0, 1.0))
    caplog.set_level(logging.INFO, logger="fedshield.server")
    metrics.publish(0, {"round": 0, "accuracy": 0.5}, None, None)
    metrics.publish(1, {"round": 1, "accuracy": 0.6, "client-note": HOSTILE},
                    _report(1, f"client error 500: {HOSTILE}"), None)
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(audit) == 1 and len(rows) == 2
    reason = audit[0]["rejected"][0]["reason"]
    for text in (reason, rows[1]["client-note"], seen[1]["client-note"]):
        assert text.isprintable() and len(text) <= MAX_TEXT + SUFFIX
        assert "characters in all]" in text
    assert reason.startswith("client error 500: boom\\nINFO fedshield.server: round 9")
    assert rows[1]["accuracy"] == 0.6  # numbers are untouched
    for record in caplog.records:
        message = record.getMessage()
        assert "\n" not in message and "\x1b" not in message and "\u202e" not in message
    assert any("rejected node 7 (partition 0) [invalid]: client error 500: boom\\n" in r.getMessage()
               for r in caplog.records)


def test_a_rejection_without_a_partition_says_so_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = MetricsLog(str(tmp_path))
    metrics.configure(Plan("fixed", 0, 0, 1.0, 1.0))
    caplog.set_level(logging.INFO, logger="fedshield.server")
    report = _report(1, "client error 500: boom")
    report["rejected"][0]["partition_id"] = -1  # an error reply carries no metrics
    metrics.publish(1, {"round": 1, "accuracy": 0.6}, report, None)
    lines = [r.getMessage() for r in caplog.records if "rejected node 7" in r.getMessage()]
    assert lines == ["round 1: rejected node 7 (no partition: own data or no metrics) [invalid]: "
                     "client error 500: boom"]


def _lines(rounds: range) -> str:
    return "".join(json.dumps({"round": r, "accuracy": 0.1}) + "\n" for r in rounds)


def test_a_resume_replaces_only_the_rows_of_rounds_that_run_again(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(_lines(range(0, 6)))
    (tmp_path / "audit.jsonl").write_text(_lines(range(1, 6)))
    metrics = MetricsLog(str(tmp_path))
    metrics.configure(Plan("fixed", 0, 0, 1.0, 1.0))
    # nothing is dropped until a round is published
    assert (tmp_path / "metrics.jsonl").read_text() == _lines(range(0, 6))
    metrics.publish(3, {"round": 3, "accuracy": 0.9}, _report(3, "r"), None)
    metrics.publish(4, {"round": 4, "accuracy": 0.9}, _report(4, "r"), None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["accuracy"]) for r in rows] == [
        (0, 0.1), (1, 0.1), (2, 0.1), (3, 0.9), (4, 0.9)]
    audit = [json.loads(x)["round"] for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit == [1, 2, 3, 4]


def test_a_line_cut_by_a_crash_is_dropped_and_any_other_bad_line_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "metrics.jsonl").write_text(_lines(range(0, 3)) + '{"round": 3, "accu')
    metrics = MetricsLog(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fedshield.server"):
        metrics.configure(Plan("fixed", 0, 0, 1.0, 1.0))
    assert any("cut short by a crash" in r.getMessage() for r in caplog.records)
    metrics.publish(3, {"round": 3, "accuracy": 0.9}, None, None)
    rounds = [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]

    for bad in ("not json", '{"accuracy": 1}', '{"round": "2"}', "[1]"):
        (tmp_path / "metrics.jsonl").write_text(_lines(range(0, 2)) + bad + "\n" + _lines(range(2, 3)))
        with pytest.raises(ValueError, match="metrics.jsonl line 3 is not a JSON object"):
            MetricsLog(str(tmp_path)).configure(Plan("fixed", 0, 0, 1.0, 1.0))


def test_a_crashing_client_leaves_its_error_not_its_traceback_in_the_audit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def fault(pid: int, msg: Message) -> bool:
        if pid == 0:
            raise RuntimeError("simulated crash\nsecond line")
        return False

    cfg = resolve_config(None, ["num-clients=4", "num-server-rounds=1", "model=logreg",
                                "local-epochs=1", "aggregator=median", f"out-dir={tmp_path}"])
    app_cfg = {k: v for k, v in cfg.items() if k not in ENGINE_KEYS}
    grid = InProcessGrid(client_app, app_cfg, 4, fault=fault)
    with caplog.at_level(logging.DEBUG, logger="fedshield.engine"):
        run_server(grid, app_cfg)
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    (crash,) = [r for r in audit[0]["rejected"] if r["node_id"] == grid.node_ids[0]]
    assert crash["reason"] == "client error 500: RuntimeError: simulated crash\\nsecond line"
    debug = [r for r in caplog.records if r.name == "fedshield.engine"]
    assert len(debug) == 1 and debug[0].levelno == logging.DEBUG
    assert debug[0].exc_info is not None and debug[0].exc_info[0] is RuntimeError


def test_the_sanitiser_fast_paths_change_nothing_it_must_escape() -> None:
    """Entries with checked keys and plain values go through as they are; a string value,
    an unsafe key or a non-uniform entry among a thousand still gets escaped."""
    from server.metrics_log import _safe

    rows = [{"node_id": 1000 + i, "partition_id": i} for i in range(1000)]
    assert _safe({"kept": rows}) == {"kept": rows}
    mixed = [*rows, {"node_id": 1, "reason": "bad\nline"}]
    assert _safe(mixed)[-1] == {"node_id": 1, "reason": "bad\\nline"}
    assert _safe([*rows, {"bad\x1bkey": 1}])[-1] == {"bad\\x1bkey": 1}
    assert _safe([{"node_id": "x\ty"}] * 3) == [{"node_id": "x\\ty"}] * 3
    assert _safe({"a\nb": rows[:2]}) == {"a\\nb": rows[:2]}
