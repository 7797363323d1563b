"""Per-round metrics as a component: ``metrics.jsonl``, ``audit.jsonl``, the log, a callback.

``metrics.jsonl`` has one row per round (round 0 is the initial model); ``audit.jsonl``
one report per round: who took part, who was kept, who was rejected at which stage and
why. Both are appended as each round finishes, before its checkpoint, so a crash loses
nothing. When a run (or a resume) publishes its first round ``r``, the rows of rounds
``>= r`` already in the files are dropped, since those rounds are running again; rows of
rounds the run does not rerun are never touched.

Strings that clients control (error reasons, partition ids in messages, metric values)
reach the files, the log and the callback only through :func:`safe_text`: characters that
are not printable (newlines, terminal escapes, bidirectional overrides) are escaped, and
each string is cut to :data:`MAX_TEXT` characters.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from .stages import Component, Plan

__all__ = ["FILES", "MAX_TEXT", "MetricsLog", "safe_text"]

log = logging.getLogger("fedshield.server")

FILES = ("metrics.jsonl", "audit.jsonl")
MAX_TEXT = 500
"""The longest string written to the log, the audit file or the metrics file."""


def safe_text(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` printable on one line: non-printable characters escaped, cut to ``limit``.

    Examples
    --------
    >>> safe_text("bad\\nline\\x1b[2J")
    'bad\\\\nline\\\\x1b[2J'
    >>> safe_text("x" * 8, limit=5)
    'xxxxx... [cut, 8 characters in all]'
    """
    if len(text) <= limit and text.isprintable():  # the common case, one C-level pass
        return text
    head = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    if len(text) <= limit and len(head) <= limit:
        return head
    return head[:limit] + f"... [cut, {len(text)} characters in all]"


_PLAIN = frozenset({int, float, bool, type(None)})
# key tuples already found safe (every key a str that safe_text leaves as it is): a
# report's thousand per-client entries share one; bounded, client text cannot grow it much
_SAFE_KEYS: set[tuple[str, ...]] = set()


def _safe(obj: Any) -> Any:
    """``obj`` with every string (keys too) passed through :func:`safe_text`."""
    if type(obj) in _PLAIN:  # the bulk of a report (a thousand clients' ids): as it is
        return obj
    if isinstance(obj, str):
        return safe_text(obj)
    if type(obj) is dict or isinstance(obj, Mapping):
        keys = tuple(obj)
        if keys in _SAFE_KEYS or _safe_keys(keys):
            if _PLAIN.issuperset(map(type, obj.values())):
                return dict(obj)
            return {k: v if type(v) in _PLAIN else _safe(v) for k, v in obj.items()}
        return {safe_text(str(k)): v if type(v) in _PLAIN else _safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        if obj and _uniform_plain_records(obj):  # a thousand clients' entries: as they are
            return list(obj)
        return [v if type(v) in _PLAIN else _safe(v) for v in obj]
    return obj


def _uniform_plain_records(items: Any) -> bool:
    """Whether every item is a dict with the first item's keys, already found safe, and
    only plain values (numbers, booleans, ``None``): nothing in them to sanitise."""
    first = next(iter(items))
    if type(first) is not dict:
        return False
    keys = tuple(first)
    if keys not in _SAFE_KEYS and not _safe_keys(keys):
        return False
    plain = _PLAIN.issuperset
    return all(type(e) is dict and tuple(e) == keys and plain(map(type, e.values()))
               for e in items)


def _safe_keys(keys: tuple[Any, ...]) -> bool:
    """Whether every key is a str that :func:`safe_text` leaves unchanged (remembered)."""
    if not all(type(k) is str and safe_text(k) == k for k in keys):
        return False
    if len(_SAFE_KEYS) < 256:
        _SAFE_KEYS.add(keys)
    return True


class MetricsLog(Component):
    """Publishes each finished round: files under ``out_dir`` (if any), log lines, callback.

    Parameters
    ----------
    out_dir
        Folder of ``metrics.jsonl`` and ``audit.jsonl``; ``""`` writes no files.
    on_round
        Called with each metrics row (progress bars, tests); its strings are safe to print.

    Raises
    ------
    ValueError
        Before round 1 (at ``configure``), if an existing file has a line that is not a
        JSON object with an integer ``round`` (a last line cut by a crash is dropped with
        a warning instead).
    """

    name = "metrics"

    def __init__(
        self, out_dir: str, *, on_round: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.out = Path(out_dir) if out_dir else None
        self.on_round = on_round
        self._earlier: dict[str, list[tuple[int, str]]] | None = None
        self._started = False

    def configure(self, plan: Plan) -> Plan:
        self._earlier = self._read_earlier()
        return plan

    def publish(
        self, rnd: int, row: Mapping[str, Any], report: Mapping[str, Any] | None, state: Any
    ) -> Any:
        if not self._started:
            self._start(rnd)
        safe_row = _safe(dict(row))
        if report is not None:
            safe_report = _safe(dict(report))
            _log_report(safe_report)
            self._write("audit.jsonl", safe_report)
        self._write("metrics.jsonl", safe_row)
        log.info("round %d: %s", rnd, {k: v for k, v in safe_row.items() if k != "round"})
        if self.on_round is not None:
            self.on_round(safe_row)
        return state

    def _read_earlier(self) -> dict[str, list[tuple[int, str]]]:
        """The ``(round, line)`` pairs already in each file."""
        out: dict[str, list[tuple[int, str]]] = {}
        if self.out is None:
            return out
        for name in FILES:
            path = self.out / name
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            lines = text.splitlines()
            out[name] = []
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                rnd = _round_of(line)
                if rnd is None and i == len(lines) - 1 and not text.endswith("\n"):
                    log.warning("%s: dropping its last line, cut short by a crash: %s",
                                path, safe_text(line, 80))
                    continue
                if rnd is None:
                    raise ValueError(
                        f"{path} line {i + 1} is not a JSON object with an integer 'round': "
                        "repair or delete the file, or choose another out-dir"
                    )
                out[name].append((rnd, line))
        return out

    def _start(self, first_round: int) -> None:
        """Drop the rows of rounds ``>= first_round``: they are running again."""
        self._started = True
        if self.out is None:
            return
        earlier = self._earlier if self._earlier is not None else self._read_earlier()
        self.out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            lines = earlier.get(name, [])
            kept = [line for rnd, line in lines if rnd < first_round]
            if len(kept) < len(lines):
                log.info("%s: replacing the rows of rounds >= %d, which run again",
                         self.out / name, first_round)
            path = self.out / name
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)

    def _write(self, name: str, row: Mapping[str, Any]) -> None:
        if self.out is None:
            return
        with (self.out / name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_finite(row), default=_json_default, allow_nan=False) + "\n")


def _round_of(line: str) -> int | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    rnd = obj.get("round") if isinstance(obj, dict) else None
    return rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None


def _log_report(report: Mapping[str, Any]) -> None:
    rnd = report["round"]
    for rej in report.get("rejected", ()):
        pid = rej["partition_id"]  # -1: a node on its own data, or no metrics (an error)
        log.info("round %s: rejected node %s (%s) [%s]: %s", rnd, rej["node_id"],
                 f"partition {pid}" if pid >= 0 else "no partition: own data or no metrics",
                 rej["stage"], rej["reason"])
    if report.get("skipped"):
        log.warning("round %s skipped: %s", rnd,
                    report.get("skipped_reason") or report.get("stopped"))
    else:
        log.info("round %s: kept %d of %d replies (%.3f s aggregation)", rnd,
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
    return safe_text(str(obj))
