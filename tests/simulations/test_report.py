"""Bench reports on hand-made rows: final values, means over rounds, mean ± std over seeds,
worst cases, the CSV and markdown layouts, and the plots' files."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulations.report import (
    SUMMARY_COLUMNS,
    CellRecord,
    Coordinates,
    aggregate,
    format_mean_std,
    plot_curves,
    plot_heatmap,
    result_lines,
    summary_markdown,
    summary_row,
    summary_rows,
    worst_cases,
    write_reports,
    write_summary_csv,
)

PNG = b"\x89PNG\r\n\x1a\n"


def rows(final_acc: float, rounds: int = 3, **extra: Any) -> tuple[dict[str, Any], ...]:
    """Accuracy rising linearly from 0.1 to ``final_acc``; ``extra`` keys on rounds >= 1."""
    out: list[dict[str, Any]] = [{"round": 0, "accuracy": 0.1, "loss": 2.3, "skipped": False}]
    for r in range(1, rounds + 1):
        acc = 0.1 + (final_acc - 0.1) * r / rounds
        out.append({"round": r, "accuracy": acc, "loss": 1.0 / r, "skipped": False, **extra})
    return tuple(out)


def rec(defense: str, attack: str, seed: int, acc: float, *, f: int = 3, status: str = "done",
        dataset: str = "digits", **extra: Any) -> CellRecord:
    f = 0 if attack == "none" else f
    coords = Coordinates(dataset, "iid", attack, defense, 10, f, seed)
    cid = f"{dataset}-{attack}-{defense}-f{f}-s{seed}"
    if status != "done":
        error = "ValueError: boom" if status == "failed" else ""
        return CellRecord(cid, coords, status, error=error)
    return CellRecord(cid, coords, "done", rows(acc, **extra), seconds=1.5)


# accuracies per (defense, attack) over seeds 0, 1
TABLE = {
    ("mean", "none"): (0.95, 0.93),
    ("mean", "alie"): (0.40, 0.50),
    ("mean", "ipm"): (0.10, 0.12),
    ("median", "none"): (0.94, 0.94),
    ("median", "alie"): (0.70, 0.80),
    ("median", "ipm"): (0.90, 0.92),
}


@pytest.fixture
def records() -> list[CellRecord]:
    return [
        rec(d, a, s, acc) for (d, a), accs in TABLE.items() for s, acc in enumerate(accs)
    ]


def test_summary_row_takes_final_round_and_means_over_rounds() -> None:
    coords = Coordinates("digits", "iid", "backdoor", "krum", 10, 2, 7)
    metrics = (
        {"round": 0, "accuracy": 0.1, "loss": 2.0},
        {"round": 2, "accuracy": 0.8, "loss": 0.5, "asr": 0.3, "epsilon": 2.5,
         "detection-precision": float("nan"), "detection-recall": 1.0,
         "aggregation-seconds": 0.3},
        {"round": 1, "accuracy": 0.5, "loss": 1.0, "asr": 0.6, "epsilon": 1.5,
         "detection-precision": 0.5, "detection-recall": 0.0, "aggregation-seconds": 0.1},
    )
    row = summary_row(CellRecord("c1", coords, "done", metrics, seconds=3.25))
    assert list(row) == list(SUMMARY_COLUMNS)
    # final = highest round, whatever the order of the rows
    assert (row["rounds"], row["accuracy"], row["loss"], row["asr"], row["epsilon"]) == (
        2, 0.8, 0.5, 0.3, 2.5
    )
    # means over rounds >= 1 of the finite values (the NaN precision is left out)
    assert row["detection_precision"] == 0.5
    assert row["detection_recall"] == 0.5
    assert row["aggregation_seconds"] == pytest.approx(0.2)
    assert (row["dataset"], row["attack"], row["defense"], row["n"], row["f"], row["seed"]) == (
        "digits", "backdoor", "krum", 10, 2, 7
    )
    assert row["status"] == "done" and row["error"] is None and row["seconds"] == 3.25


def test_summary_row_without_backdoor_or_dp_leaves_asr_and_epsilon_empty() -> None:
    row = summary_row(rec("mean", "alie", 0, 0.5))
    assert row["asr"] is None and row["epsilon"] is None and row["detection_precision"] is None
    failed = summary_row(rec("mean", "alie", 1, 0.0, status="failed"))
    assert failed["status"] == "failed" and failed["accuracy"] is None
    assert failed["error"] == "ValueError: boom"


def test_cell_record_checks_status_and_rows() -> None:
    coords = Coordinates("d", "p", "none", "mean", 10, 0, 0)
    with pytest.raises(ValueError, match="status"):
        CellRecord("c", coords, "finished", rows(0.5))
    with pytest.raises(ValueError, match="no metrics rows"):
        CellRecord("c", coords, "done")


def test_aggregate_mean_and_sample_std_over_seeds(records: list[CellRecord]) -> None:
    aggs = {(a.defense, a.attack): a for a in aggregate(summary_rows(records))}
    assert set(aggs) == set(TABLE)
    for key, accs in TABLE.items():
        a = aggs[key]
        assert a.seeds == 2 and a.failed == 0
        assert a.accuracy_mean == pytest.approx(statistics.fmean(accs))
        assert a.accuracy_std == pytest.approx(float(np.std(accs, ddof=1)))
        assert a.f == (0 if key[1] == "none" else 3)


def test_aggregate_excludes_failed_seeds_and_single_seed_has_no_std() -> None:
    summary = summary_rows([
        rec("mean", "alie", 0, 0.4), rec("mean", "alie", 1, 0.0, status="failed"),
        rec("mean", "alie", 2, 0.0, status="pending"),
    ])
    (a,) = aggregate(summary)
    assert (a.seeds, a.failed) == (1, 1)
    assert a.accuracy_mean == pytest.approx(0.4) and a.accuracy_std is None


def test_worst_case_is_min_over_attacks_excluding_none() -> None:
    recs = [
        rec("mean", "none", 0, 0.05),  # lower than every attack, yet not an attack
        rec("mean", "alie", 0, 0.6),
        rec("mean", "ipm", 0, 0.3),
        rec("median", "none", 0, 0.9),
        rec("median", "alie", 0, 0.7),
    ]
    worst = worst_cases(aggregate(summary_rows(recs)))
    panel = ("digits", "iid", 10, 3)
    assert worst[(panel, "mean")][0] == "ipm"
    assert worst[(panel, "mean")][1] == pytest.approx(0.3)
    assert worst[(panel, "median")][0] == "alie"
    assert worst[(panel, "median")][1] == pytest.approx(0.7)


def test_format_mean_std() -> None:
    assert format_mean_std(0.6, 0.1414213) == "0.600 ± 0.141"
    assert format_mean_std(0.6, None) == "0.600"
    assert format_mean_std(None, None) == "–"


def _table(markdown: str, heading: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = lines.index(heading) + 2
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    return table


def test_markdown_table_shows_mean_std_bold_best_and_worst_case(records: list[CellRecord]) -> None:
    md = summary_markdown(summary_rows(records), title="t")
    table = _table(md, "## digits, iid, n=10, f=3")
    assert table[0] == ["defense", "none", "alie", "ipm", "worst case"]
    assert table[1] == ["---"] * 5
    body = {r[0]: r[1:] for r in table[2:]}
    assert list(body) == ["mean", "median"]

    def sd(*xs: float) -> float:
        return float(np.std(xs, ddof=1))

    assert body["mean"][0] == f"**0.940 ± {sd(0.95, 0.93):.3f}**"  # best without attack
    assert body["mean"][1] == f"0.450 ± {sd(0.40, 0.50):.3f}"
    assert body["median"][1] == f"**0.750 ± {sd(0.70, 0.80):.3f}**"
    assert body["median"][2] == f"**0.910 ± {sd(0.90, 0.92):.3f}**"
    assert body["mean"][3] == "*0.110* (ipm)"
    assert body["median"][3] == "*0.750* (alie)"
    assert "Attack success rate" not in md and "Failed cells" not in md


def test_markdown_lists_failures_pending_and_backdoor_asr() -> None:
    recs = [
        rec("mean", "backdoor", 0, 0.9, asr=0.8),
        rec("median", "backdoor", 0, 0.9, asr=0.2),
        rec("krum", "backdoor", 0, 0.0, status="failed"),
        rec("krum", "none", 0, 0.0, status="pending"),
    ]
    md = summary_markdown(summary_rows(recs))
    acc = _table(md, "## digits, iid, n=10, f=3")
    assert acc[0] == ["defense", "none", "backdoor", "worst case"]
    assert {r[0]: r[2] for r in acc[2:]}["krum"] == "failed"
    asr_at = md.splitlines().index("Attack success rate of the backdoor (lower is better):")
    asr = [[c.strip() for c in ln.strip("|").split("|")]
           for ln in md.splitlines()[asr_at + 2:asr_at + 7] if ln.startswith("|")]
    assert asr[0] == ["defense", "backdoor"]
    assert {r[0]: r[1] for r in asr[2:]} == {
        "mean": "0.800", "median": "**0.200**", "krum": "failed"}
    assert "| digits-backdoor-krum-f3-s0 | ValueError: boom |" in md
    assert "1 cell(s) not run yet" in md


def test_markdown_has_a_detection_table_for_defenses_that_report_it() -> None:
    det = {"detection-precision": 0.75, "detection-recall": 0.5}
    recs = [
        rec("mean", "none", 0, 0.9),
        rec("flame", "none", 0, 0.9, **det),
        rec("mean", "alie", 0, 0.4),
        rec("flame", "alie", 0, 0.8, **det),
        rec("flame", "ipm", 0, 0.8, **{"detection-precision": 1.0, "detection-recall": 0.25}),
        rec("mean", "ipm", 0, 0.3),
    ]
    md = summary_markdown(summary_rows(recs))
    head = next(ln for ln in md.splitlines() if ln.startswith("Detection precision / recall"))
    table = _table(md, head)
    assert table[0] == ["defense", "alie", "ipm"]  # no attack-free column
    assert table[2:] == [["flame", "0.75 / 0.50", "1.00 / 0.25"]]  # mean reports nothing
    # a panel without detection metrics has no such table
    assert "Detection precision" not in summary_markdown(summary_rows(
        [rec("mean", "none", 0, 0.9), rec("mean", "alie", 0, 0.4)]))


def test_panels_per_dataset_and_f_share_the_none_baseline() -> None:
    recs = [
        rec("mean", "none", 0, 0.9),
        rec("mean", "ipm", 0, 0.1, f=2),
        rec("mean", "ipm", 0, 0.05, f=4),
        rec("mean", "none", 0, 0.8, dataset="other"),
        rec("mean", "ipm", 0, 0.2, f=2, dataset="other"),
    ]
    md = summary_markdown(summary_rows(recs))
    heads = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert heads == ["## digits, iid, n=10, f=2", "## digits, iid, n=10, f=4",
                     "## other, iid, n=10, f=2"]
    assert _table(md, "## digits, iid, n=10, f=4")[2] == [
        "mean", "**0.900**", "**0.050**", "*0.050* (ipm)"]
    assert _table(md, "## other, iid, n=10, f=2")[2] == [
        "mean", "**0.800**", "**0.200**", "*0.200* (ipm)"]


def test_summary_csv_columns_and_empty_fields(tmp_path: Path, records: list[CellRecord]) -> None:
    path = tmp_path / "summary.csv"
    write_summary_csv(summary_rows(records), path)
    with path.open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == SUMMARY_COLUMNS
        got = list(reader)
    assert len(got) == len(records)
    assert all(r["asr"] == "" and r["epsilon"] == "" and r["status"] == "done" for r in got)
    by_key = {(r["defense"], r["attack"], r["seed"]): float(r["accuracy"]) for r in got}
    assert by_key[("median", "alie", "1")] == pytest.approx(0.80)


def test_result_lines_one_per_done_cell_and_round(records: list[CellRecord]) -> None:
    recs = [*records, rec("krum", "ipm", 0, 0.0, status="failed")]
    lines = result_lines(recs)
    assert len(lines) == len(records) * 4  # rounds 0..3
    first = lines[0]
    assert {k: first[k] for k in ("dataset", "partition", "attack", "defense", "n", "f", "seed")} \
        == {"dataset": "digits", "partition": "iid", "attack": "none", "defense": "mean",
            "n": 10, "f": 0, "seed": 0}
    assert first["round"] == 0 and first["cell"] == records[0].cell_id


def test_write_reports_writes_every_file(tmp_path: Path, records: list[CellRecord]) -> None:
    md = write_reports(records, tmp_path, title="unit")
    assert (tmp_path / "summary.md").read_text() == md
    assert md.startswith("# unit: final test accuracy")
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(records) * 4 and json.loads(lines[-1])["round"] == 3
    for name in ("heatmap.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_plots_refuse_empty_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_heatmap([], tmp_path / "h.png")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_curves([rec("mean", "ipm", 0, 0.0, status="failed")], tmp_path / "c.png")


def test_dp_cells_show_epsilon_next_to_accuracy() -> None:
    from simulations.report import Aggregate, _cell_text

    a = Aggregate("d", "iid", 10, 0, "mean", "none", 2, 0, 0.5, 0.1, None, None,
                  extra={"epsilon": 19.93})
    assert _cell_text(a, "accuracy") == "0.500 ± 0.100 (ε=19.9)"
    b = Aggregate("d", "iid", 10, 0, "mean", "none", 2, 0, 0.5, 0.1, None, None)
    assert "ε" not in _cell_text(b, "accuracy")


def test_reference_rows_are_labelled_and_not_ranked(records: list[CellRecord]) -> None:
    # an honest-only reference beats every defense; the bold stays with the best defense
    recs = records + [
        rec("honest-only", a, s, 0.99, reference="honest-only")
        for a in ("none", "alie", "ipm") for s in (0, 1)
    ]
    summary = summary_rows(recs)
    assert {r["reference"] for r in summary if r["defense"] == "honest-only"} == {"honest-only"}
    assert {r["reference"] for r in summary if r["defense"] != "honest-only"} == {None}
    md = summary_markdown(summary)
    ref_line = next(x for x in md.splitlines() if x.startswith("| *honest-only* (reference) |"))
    assert "**" not in ref_line and "0.990" in ref_line
    median_line = next(x for x in md.splitlines() if x.startswith("| median |"))
    assert "**0.750 ± 0.071**" in median_line  # alie: the best defense, 0.70 and 0.80
    assert "*Reference* rows are not defenses" in md
    # without a reference nothing changes
    assert "(reference)" not in summary_markdown(summary_rows(records))
