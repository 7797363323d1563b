"""Per-round metrics as a component: ``metrics.jsonl``, ``audit.jsonl``, the log, a callback.

``metrics.jsonl`` has one row per round (round 0 is the initial model); ``audit.jsonl``
one report per round: who took part, who was kept, who was rejected at which stage and
why. Both are appended as each round finishes, before its checkpoint, so a crash loses
nothing: a resume drops the rows after the checkpoint's round and runs them again.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from .stages import Component

__all__ = ["MetricsLog"]

log = logging.getLogger("fedshield.server")


class MetricsLog(Component):
    """Publishes each finished round: files under ``out_dir`` (if any), log lines, callback.

    Parameters
    ----------
    out_dir
        Folder of ``metrics.jsonl`` and ``audit.jsonl``; ``""`` writes no files.
    keep_through_round
        ``None`` starts both files afresh; a round number (resume) keeps their rows up to
        and including it and drops the later ones.
    on_round
        Called with each metrics row (progress bars, tests).
    """

    name = "metrics"

    def __init__(
        self, out_dir: str, *, keep_through_round: int | None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.out = Path(out_dir) if out_dir else None
        self.on_round = on_round
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "audit.jsonl"):
            path = self.out / name
            if keep_through_round is None:
                path.write_text("")
            elif path.exists():  # resume: drop rounds after the checkpoint
                lines = [
                    ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["round"] <= keep_through_round
                ]
                path.write_text("".join(ln + "\n" for ln in lines))

    def publish(
        self, rnd: int, row: Mapping[str, Any], report: Mapping[str, Any] | None, state: Any
    ) -> Any:
        if report is not None:
            _log_report(report)
            self._write("audit.jsonl", report)
        self._write("metrics.jsonl", row)
        log.info("round %d: %s", rnd, {k: v for k, v in row.items() if k != "round"})
        if self.on_round is not None:
            self.on_round(dict(row))
        return state

    def _write(self, name: str, row: Mapping[str, Any]) -> None:
        if self.out is None:
            return
        with (self.out / name).open("a") as fh:
            fh.write(json.dumps(_finite(row), default=_json_default, allow_nan=False) + "\n")


def _log_report(report: Mapping[str, Any]) -> None:
    rnd = report["round"]
    for rej in report.get("rejected", ()):
        log.info("round %d: rejected node %d (partition %d) [%s]: %s",
                 rnd, rej["node_id"], rej["partition_id"], rej["stage"], rej["reason"])
    if report.get("skipped"):
        log.warning("round %d skipped: %s", rnd,
                    report.get("skipped_reason") or report.get("stopped"))
    else:
        log.info("round %d: kept %d of %d replies (%.3f s aggregation)", rnd,
                 len(report["kept"]), len(report["participants"]),
                 report["aggregation_seconds"])


def _finite(obj: Any) -> Any:
    """NaN/inf (e.g. precision with nothing rejected) as JSON null / strings, not invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: object) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)
