"""Reports of a benchmark matrix: pure functions from per-cell metrics rows to files.

A bench (:mod:`simulations.bench`) runs one federation per *cell* of a matrix
``datasets x partitions x attacks x defenses x f x seeds`` and hands this module one
:class:`CellRecord` per cell: its coordinates, its status and the metrics rows of
:func:`simulations.engine.run_in_process` (``round`` 0 is the initial model; ``accuracy``,
``loss``, ``skipped`` and, when present, ``asr``, ``detection-precision``,
``detection-recall``, ``aggregation-seconds``, ``epsilon``).

Files (all written by :func:`write_reports`)
--------------------------------------------
``results.jsonl``
    One line per finished cell and round: the cell's coordinates and the metrics row.
``summary.csv``
    One line per cell (:data:`SUMMARY_COLUMNS`): final-round ``accuracy``, ``loss``, ``asr``
    (empty unless the attack is a backdoor) and ``epsilon``; the per-round means of
    ``detection_precision``, ``detection_recall`` and ``aggregation_seconds`` over the
    rounds ``>= 1`` that report them; ``status`` (``done``, ``failed``, ``pending``).
``summary.md``
    Per ``(dataset, partition, n, f)`` a table of defenses (rows) by attacks (columns) of
    the final accuracy, mean +- sample standard deviation over seeds
    ``s = sqrt(sum_i (a_i - mean)^2 / (k - 1))`` (the mean alone for one seed), the best
    defense per attack in bold, and per defense its *worst case*
    ``min_{attack != none} mean accuracy`` with the attack that achieves it. The ``none``
    column is the run without malicious clients (``f = 0``), shown in every panel.
``heatmap.png``
    Mean final accuracy, defense x attack, annotated; one panel per ``(dataset, partition,
    n, f)``.
``curves.png``
    Mean test accuracy over rounds, one line per defense, one panel per attack (a row of
    panels per ``(dataset, partition, n, f)``).

Everything here is plain Python and matplotlib (Agg backend); no federation is run, so the
tables are tested on hand-made rows.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "NO_ATTACK",
    "SUMMARY_COLUMNS",
    "Aggregate",
    "CellRecord",
    "Coordinates",
    "aggregate",
    "format_mean_std",
    "plot_curves",
    "plot_heatmap",
    "result_lines",
    "summary_markdown",
    "summary_row",
    "summary_rows",
    "worst_cases",
    "write_reports",
    "write_results_jsonl",
    "write_summary_csv",
]

NO_ATTACK = "none"
"""Name of the attack axis entry that runs without malicious clients (``f = 0``)."""

STATUSES = ("done", "failed", "pending")

SUMMARY_COLUMNS: tuple[str, ...] = (
    "cell",
    "dataset",
    "partition",
    "attack",
    "defense",
    "n",
    "f",
    "seed",
    "rounds",
    "accuracy",
    "loss",
    "asr",
    "detection_precision",
    "detection_recall",
    "aggregation_seconds",
    "epsilon",
    "seconds",
    "status",
    "error",
    "reference",
)
"""Columns of ``summary.csv``, in order (``reference``: empty for a defense, the
engine's reference run, e.g. ``honest-only``, for a reference row)."""

_PER_ROUND_MEANS = {
    "detection_precision": "detection-precision",
    "detection_recall": "detection-recall",
    "aggregation_seconds": "aggregation-seconds",
}
_FINAL = {"accuracy": "accuracy", "loss": "loss", "asr": "asr", "epsilon": "epsilon"}

PanelKey = tuple[str, str, int, int]  # (dataset, partition, n, f)


@dataclass(frozen=True)
class Coordinates:
    """Where a cell sits in the matrix.

    Attributes
    ----------
    dataset, partition, attack, defense
        Names of the axis entries (``attack == "none"`` means no malicious clients).
    n
        Number of clients (``num-clients``).
    f
        Number of malicious clients (``num-malicious``; 0 for ``none``).
    seed
        Root seed of the run.
    """

    dataset: str
    partition: str
    attack: str
    defense: str
    n: int
    f: int
    seed: int

    def label(self) -> str:
        """Short human-readable label: ``digits iid alie krum f=3 seed=0``."""
        return (
            f"{self.dataset} {self.partition} {self.attack} {self.defense} "
            f"f={self.f} seed={self.seed}"
        )


@dataclass(frozen=True)
class CellRecord:
    """One cell of a bench: its coordinates, its status and its metrics rows.

    Attributes
    ----------
    cell_id
        Stable id (folder name under ``DIR/cells``).
    coords
        The cell's coordinates.
    status
        ``"done"`` (``rows`` holds every round), ``"failed"`` (``error`` says why) or
        ``"pending"`` (not run yet, e.g. an interrupted bench).
    rows
        Metrics rows, one per round, round 0 first.
    error
        Error message of a failed cell.
    seconds
        Wall-clock seconds the cell took, or ``None``.

    Raises
    ------
    ValueError
        Unknown status, or a ``done`` cell without rows.
    """

    cell_id: str
    coords: Coordinates
    status: str
    rows: tuple[Mapping[str, Any], ...] = ()
    error: str = ""
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"cell status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "done" and not self.rows:
            raise ValueError(f"cell {self.cell_id!r} is done but has no metrics rows")


@dataclass(frozen=True)
class Aggregate:
    """Final-round metrics of one ``(dataset, partition, n, f, defense, attack)`` over seeds.

    ``*_std`` is the sample standard deviation (``k - 1`` in the denominator), ``None``
    for a single seed; ``*_mean`` is ``None`` when no finished seed reports the metric.
    ``seeds`` counts finished cells, ``failed`` failed ones.
    """

    dataset: str
    partition: str
    n: int
    f: int
    defense: str
    attack: str
    seeds: int
    failed: int
    accuracy_mean: float | None
    accuracy_std: float | None
    asr_mean: float | None = None
    asr_std: float | None = None
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def panel(self) -> PanelKey:
        """``(dataset, partition, n, f)``."""
        return (self.dataset, self.partition, self.n, self.f)


# ---------------------------------------------------------------------------------------
# per-cell values


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def summary_row(record: CellRecord) -> dict[str, Any]:
    """One ``summary.csv`` line for a cell: final-round values and per-round means.

    ``accuracy, loss, asr, epsilon`` are the values of the last round (highest ``round``);
    ``detection_precision, detection_recall, aggregation_seconds`` are means over the rounds
    ``>= 1`` that report a finite value. A metric no round reports is ``None`` (an empty
    CSV field).

    Returns
    -------
    dict
        Keys :data:`SUMMARY_COLUMNS`.

    Examples
    --------
    >>> c = Coordinates("digits", "iid", "none", "mean", 10, 0, 0)
    >>> rows = ({"round": 0, "accuracy": 0.1}, {"round": 1, "accuracy": 0.9,
    ...         "aggregation-seconds": 0.5})
    >>> r = summary_row(CellRecord("c", c, "done", rows))
    >>> r["accuracy"], r["asr"], r["aggregation_seconds"], r["rounds"]
    (0.9, None, 0.5, 1)
    """
    c = record.coords
    out: dict[str, Any] = {col: None for col in SUMMARY_COLUMNS}
    out.update(
        cell=record.cell_id, dataset=c.dataset, partition=c.partition, attack=c.attack,
        defense=c.defense, n=c.n, f=c.f, seed=c.seed, status=record.status,
        error=record.error or None,
        seconds=None if record.seconds is None else round(float(record.seconds), 3),
    )
    if record.rows:
        ordered = sorted(record.rows, key=lambda r: int(r["round"]))
        final = ordered[-1]
        out["rounds"] = int(final["round"])
        for col, key in _FINAL.items():
            out[col] = _finite(final.get(key))
        if isinstance(final.get("reference"), str):
            out["reference"] = final["reference"]
        for col, key in _PER_ROUND_MEANS.items():
            vals = [
                v for r in ordered if int(r["round"]) >= 1
                if (v := _finite(r.get(key))) is not None
            ]
            out[col] = statistics.fmean(vals) if vals else None
    return out


def summary_rows(records: Iterable[CellRecord]) -> list[dict[str, Any]]:
    """:func:`summary_row` of every record, in order."""
    return [summary_row(r) for r in records]


def result_lines(records: Iterable[CellRecord]) -> list[dict[str, Any]]:
    """The lines of ``results.jsonl``: ``{cell, dataset, ..., seed, **row}`` per done round."""
    out: list[dict[str, Any]] = []
    for rec in records:
        if rec.status != "done":
            continue
        head = {"cell": rec.cell_id, **asdict(rec.coords)}
        out.extend({**head, **row} for row in rec.rows)
    return out


# ---------------------------------------------------------------------------------------
# aggregation over seeds


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) >= 2 else None)


def aggregate(summary: Iterable[Mapping[str, Any]]) -> list[Aggregate]:
    """Mean and sample std over seeds per ``(dataset, partition, n, f, defense, attack)``.

    Groups keep the order in which they first appear. Failed and pending cells count in
    ``failed`` (failed only) and are excluded from the statistics.

    Parameters
    ----------
    summary
        Rows of :func:`summary_rows`.

    Returns
    -------
    list of Aggregate

    Examples
    --------
    >>> rows = [{"dataset": "d", "partition": "p", "n": 10, "f": 3, "defense": "mean",
    ...          "attack": "alie", "seed": s, "accuracy": a, "asr": None,
    ...          "status": "done"} for s, a in ((0, 0.5), (1, 0.7))]
    >>> g = aggregate(rows)[0]
    >>> round(g.accuracy_mean, 6), round(g.accuracy_std, 6), g.seeds
    (0.6, 0.141421, 2)
    """
    groups: dict[tuple[str, str, int, int, str, str], list[Mapping[str, Any]]] = {}
    for row in summary:
        key = (
            str(row["dataset"]), str(row["partition"]), int(row["n"]), int(row["f"]),
            str(row["defense"]), str(row["attack"]),
        )
        groups.setdefault(key, []).append(row)
    out: list[Aggregate] = []
    for (dataset, partition, n, f, defense, attack), rows in groups.items():
        done = [r for r in rows if r["status"] == "done"]
        acc = [v for r in done if (v := _finite(r.get("accuracy"))) is not None]
        asr = [v for r in done if (v := _finite(r.get("asr"))) is not None]
        extra: dict[str, float] = {}
        for col in ("detection_precision", "detection_recall", "aggregation_seconds", "epsilon"):
            vals = [v for r in done if (v := _finite(r.get(col))) is not None]
            if vals:
                extra[col] = statistics.fmean(vals)
        acc_mean, acc_std = _mean_std(acc)
        asr_mean, asr_std = _mean_std(asr)
        out.append(
            Aggregate(
                dataset, partition, n, f, defense, attack,
                seeds=len(done), failed=sum(r["status"] == "failed" for r in rows),
                accuracy_mean=acc_mean, accuracy_std=acc_std,
                asr_mean=asr_mean, asr_std=asr_std, extra=extra,
            )
        )
    return out


def _panels(aggs: Sequence[Aggregate]) -> list[PanelKey]:
    """Panels ``(dataset, partition, n, f)`` with ``f > 0``; ``f = 0`` alone if no attack."""
    attacked = list(dict.fromkeys(a.panel for a in aggs if a.f > 0))
    if attacked:
        return attacked
    return list(dict.fromkeys(a.panel for a in aggs))


def _panel_cells(
    aggs: Sequence[Aggregate], panel: PanelKey
) -> tuple[list[str], list[str], dict[tuple[str, str], Aggregate]]:
    """Defenses, attacks (``none`` first) and the ``(defense, attack) -> Aggregate`` map.

    The ``none`` column is the ``f = 0`` run of the same dataset, partition and ``n``.
    """
    dataset, partition, n, f = panel
    cells: dict[tuple[str, str], Aggregate] = {}
    for a in aggs:
        same = (a.dataset, a.partition, a.n) == (dataset, partition, n)
        if same and (a.f == f or (a.attack == NO_ATTACK and a.f == 0)):
            cells[(a.defense, a.attack)] = a
    defenses = list(dict.fromkeys(d for d, _ in cells))
    attacks = list(dict.fromkeys(at for _, at in cells))
    attacks.sort(key=lambda at: at != NO_ATTACK)  # stable: none first
    return defenses, attacks, cells


def worst_cases(aggs: Sequence[Aggregate]) -> dict[tuple[PanelKey, str], tuple[str, float]]:
    """Per panel and defense, the attack with the lowest mean final accuracy.

    ``worst(defense) = argmin_{attack != none} mean_seeds accuracy(defense, attack)``, over
    the attacks of the panel's ``f`` whose accuracy is known.

    Returns
    -------
    dict
        ``{((dataset, partition, n, f), defense): (attack, mean accuracy)}``; a defense
        with no attacked result is absent.

    Examples
    --------
    >>> mk = lambda d, at, acc: Aggregate("x", "iid", 10, 0 if at == "none" else 3, d, at,
    ...                                   1, 0, acc, None)
    >>> w = worst_cases([mk("mean", "none", 0.9), mk("mean", "alie", 0.4),
    ...                  mk("mean", "ipm", 0.1)])
    >>> w[(("x", "iid", 10, 3), "mean")]
    ('ipm', 0.1)
    """
    out: dict[tuple[PanelKey, str], tuple[str, float]] = {}
    for panel in _panels(aggs):
        defenses, attacks, cells = _panel_cells(aggs, panel)
        for d in defenses:
            scored = [
                (acc, at) for at in attacks
                if at != NO_ATTACK and (d, at) in cells
                and (acc := cells[(d, at)].accuracy_mean) is not None
            ]
            if scored:
                acc, at = min(scored, key=lambda t: t[0])
                out[(panel, d)] = (at, acc)
    return out


def format_mean_std(mean: float | None, std: float | None, *, digits: int = 3) -> str:
    """``"0.912 ± 0.013"``; the mean alone when ``std`` is ``None``; ``"–"`` when unknown.

    Examples
    --------
    >>> format_mean_std(0.91234, 0.0129), format_mean_std(0.5, None), format_mean_std(None, None)
    ('0.912 ± 0.013', '0.500', '–')
    """
    if mean is None:
        return "–"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell_text(a: Aggregate | None, metric: str) -> str:
    if a is None:
        return ""
    if metric == "accuracy":
        mean, std = a.accuracy_mean, a.accuracy_std
    else:
        mean, std = a.asr_mean, a.asr_std
    if a.seeds == 0:
        return "failed" if a.failed else "pending"
    text = format_mean_std(mean, std)
    if metric == "accuracy" and "epsilon" in a.extra:
        # a DP run: its privacy cost stands next to its accuracy
        text += f" (ε={a.extra['epsilon']:.3g})"
    if a.failed:
        text += f" ({a.failed} failed)"
    return text


def _panel_title(panel: PanelKey) -> str:
    dataset, partition, n, f = panel
    return f"{dataset}, {partition}, n={n}, f={f}"


def summary_markdown(summary: Sequence[Mapping[str, Any]], *, title: str = "") -> str:
    """The ``summary.md`` text: per panel a defense x attack table and the worst cases.

    Each table cell is the final accuracy, mean ± sample std over seeds; the best mean
    of each attack column is bold; the last column is the defense's worst case over the
    attacks (``none`` excluded). Panels with backdoor attacks get a second table of the
    attack success rate (lower is better), panels whose defenses report whom they removed
    a third of detection precision / recall. Failed cells are listed at the end.

    Parameters
    ----------
    summary
        Rows of :func:`summary_rows`.
    title
        Heading (e.g. the scenario name).

    Returns
    -------
    str
        Markdown, ending with a newline.
    """
    aggs = aggregate(summary)
    worst = worst_cases(aggs)
    refs = {str(r["defense"]) for r in summary if r.get("reference")}
    seeds = sorted({int(r["seed"]) for r in summary})
    lines = [f"# {title or 'Benchmark'}: final test accuracy", ""]
    lines.append(
        f"Mean ± sample std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}). "
        "**Bold**: the best defense against each attack. *Worst case*: the lowest mean "
        f"accuracy over the attacks other than `{NO_ATTACK}` (the run without malicious "
        "clients, f=0)."
        + (" *Reference* rows are not defenses (e.g. honest-only: the malicious clients "
           "never train, the ceiling of a defense that removes them) and are not ranked."
           if refs else "")
    )
    for panel in _panels(aggs):
        defenses, attacks, cells = _panel_cells(aggs, panel)
        lines += ["", f"## {_panel_title(panel)}", ""]
        lines += _table(defenses, attacks, cells, "accuracy", worst, panel,
                        higher_is_better=True, refs=refs)
        backdoored = [at for at in attacks if any(
            cells.get((d, at)) is not None and cells[(d, at)].asr_mean is not None
            for d in defenses
        )]
        if backdoored:
            lines += ["", "Attack success rate of the backdoor (lower is better):", ""]
            lines += _table(defenses, backdoored, cells, "asr", None, panel,
                            higher_is_better=False, refs=refs)
        lines += _detection_table(defenses, attacks, cells)
    failed = [r for r in summary if r["status"] == "failed"]
    pending = [r for r in summary if r["status"] == "pending"]
    if failed:
        lines += ["", "## Failed cells", "", "| cell | error |", "|---|---|"]
        for r in failed:
            err = str(r.get("error") or "").strip().splitlines()
            msg = (err[-1] if err else "").replace("|", "\\|")[:200]
            lines.append(f"| {r['cell']} | {msg} |")
    if pending:
        lines += ["", f"{len(pending)} cell(s) not run yet: rerun the bench to finish them."]
    return "\n".join(lines) + "\n"


def _detection_table(
    defenses: Sequence[str], attacks: Sequence[str],
    cells: Mapping[tuple[str, str], Aggregate],
) -> list[str]:
    """Detection precision / recall of the defenses that report whom they removed, per
    attack (the attack-free column left out: with no attacker there is nothing to find);
    ``[]`` when no cell of the panel reports it."""
    attacked = [at for at in attacks if at != NO_ATTACK]

    def text(d: str, at: str) -> str | None:
        a = cells.get((d, at))
        if a is None or "detection_precision" not in a.extra:
            return None
        return (f"{a.extra['detection_precision']:.2f} / "
                f"{a.extra.get('detection_recall', math.nan):.2f}")

    rows = [(d, [text(d, at) for at in attacked]) for d in defenses]
    rows = [(d, vals) for d, vals in rows if any(v is not None for v in vals)]
    if not rows or not attacked:
        return []
    lines = ["", "Detection precision / recall (mean over rounds; precision: the share of "
             "removed clients that were malicious, recall: the share of malicious clients "
             "removed), for the defenses that report whom they removed:", ""]
    lines += ["| defense | " + " | ".join(attacked) + " |", "|" + "---|" * (len(attacked) + 1)]
    for d, vals in rows:
        lines.append("| " + " | ".join([d, *(v if v is not None else "–" for v in vals)]) + " |")
    return lines


def _table(
    defenses: Sequence[str],
    attacks: Sequence[str],
    cells: Mapping[tuple[str, str], Aggregate],
    metric: str,
    worst: Mapping[tuple[PanelKey, str], tuple[str, float]] | None,
    panel: PanelKey,
    *,
    higher_is_better: bool,
    refs: frozenset[str] | set[str] = frozenset(),
) -> list[str]:
    """One Markdown table; the best value per column in bold, reference rows (``refs``)
    labelled and left out of the ranking."""

    def value(d: str, at: str) -> float | None:
        a = cells.get((d, at))
        if a is None:
            return None
        return a.accuracy_mean if metric == "accuracy" else a.asr_mean

    best: dict[str, float] = {}
    for at in attacks:
        vals = [v for d in defenses if d not in refs and (v := value(d, at)) is not None]
        if vals:
            best[at] = max(vals) if higher_is_better else min(vals)
    head = ["defense", *attacks] + (["worst case"] if worst is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in defenses:
        row = [f"*{d}* (reference)" if d in refs else d]
        for at in attacks:
            text = _cell_text(cells.get((d, at)), metric)
            v = value(d, at)
            if (d not in refs and v is not None and at in best
                    and math.isclose(v, best[at], abs_tol=5e-4)):
                text = f"**{text}**"
            row.append(text)
        if worst is not None:
            w = worst.get((panel, d))
            row.append(f"*{w[1]:.3f}* ({w[0]})" if w else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines


# ---------------------------------------------------------------------------------------
# files


def write_results_jsonl(records: Iterable[CellRecord], path: str | Path) -> None:
    """Write ``results.jsonl`` (:func:`result_lines`)."""
    text = "".join(json.dumps(line, default=str) + "\n" for line in result_lines(records))
    Path(path).write_text(text)


def write_summary_csv(summary: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    """Write ``summary.csv``: columns :data:`SUMMARY_COLUMNS`, ``None`` as an empty field."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in summary:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in SUMMARY_COLUMNS})


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(
    summary: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = ""
) -> None:
    """Mean final accuracy, defense (rows) x attack (columns), one panel per
    ``(dataset, partition, n, f)``, annotated with the values; missing cells are blank."""
    import numpy as np

    plt = _pyplot()
    aggs = aggregate(summary)
    panels = _panels(aggs)
    if not panels:
        raise ValueError("nothing to plot: the summary has no cells")
    layouts = [_panel_cells(aggs, p) for p in panels]
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    width = max(len(at) for _, at, _ in layouts)
    height = max(len(d) for d, _, _ in layouts)
    fig, axes = plt.subplots(
        nrows, ncols, squeeze=False,
        figsize=(ncols * (1.6 + 0.9 * width), nrows * (1.2 + 0.45 * height) + 0.4),
    )
    image = None
    for ax, panel, (defenses, attacks, cells) in zip(axes.flat, panels, layouts, strict=False):
        grid = np.full((len(defenses), len(attacks)), np.nan)
        for i, d in enumerate(defenses):
            for j, at in enumerate(attacks):
                a = cells.get((d, at))
                if a is not None and a.accuracy_mean is not None:
                    grid[i, j] = a.accuracy_mean
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i in range(len(defenses)):
            for j in range(len(attacks)):
                if not math.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(defenses)), defenses, fontsize=8)
        ax.set_title(_panel_title(panel), fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="final test accuracy")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _mean_curve(records: Sequence[CellRecord]) -> tuple[list[int], list[float]]:
    by_round: dict[int, list[float]] = {}
    for rec in records:
        for row in rec.rows:
            v = _finite(row.get("accuracy"))
            if v is not None:
                by_round.setdefault(int(row["round"]), []).append(v)
    rounds = sorted(by_round)
    return rounds, [statistics.fmean(by_round[r]) for r in rounds]


def plot_curves(
    records: Sequence[CellRecord], path: str | Path, *, title: str = "", max_cols: int = 4
) -> None:
    """Mean test accuracy (over seeds) per round, one line per defense, one panel per
    attack; the panels of each ``(dataset, partition, n, f)`` start a new row and wrap after
    ``max_cols``."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    done = [r for r in records if r.status == "done"]
    if not done:
        raise ValueError("nothing to plot: no finished cell")
    aggs = aggregate(summary_rows(done))
    panels = _panels(aggs)
    layouts = [_panel_cells(aggs, p) for p in panels]
    ncols = min(max(len(at) for _, at, _ in layouts), max_cols)
    # one (panel, attack) per subplot; each panel's attacks fill whole rows
    slots: list[tuple[PanelKey, str, list[str]] | None] = []
    for panel, (defenses, attacks, _) in zip(panels, layouts, strict=True):
        group: list[tuple[PanelKey, str, list[str]] | None] = [
            (panel, at, defenses) for at in attacks
        ]
        group += [None] * (-len(group) % ncols)
        slots += group
    nrows = len(slots) // ncols
    fig, axes = plt.subplots(
        nrows, ncols, squeeze=False, sharey=True, figsize=(3.4 * ncols, 2.5 * nrows + 0.8),
    )
    defenses_all = list(dict.fromkeys(r.coords.defense for r in done))
    cmap = plt.get_cmap("tab10" if len(defenses_all) <= 10 else "tab20")
    color = {d: cmap(i % cmap.N) for i, d in enumerate(defenses_all)}
    for ax, slot in zip(axes.flat, slots, strict=True):
        if slot is None:
            ax.axis("off")
            continue
        (dataset, partition, n, f), at, defenses = slot
        want_f = 0 if at == NO_ATTACK else f
        for d in defenses:
            recs = [
                r for r in done
                if (r.coords.dataset, r.coords.partition, r.coords.n, r.coords.f,
                    r.coords.defense, r.coords.attack) == (dataset, partition, n, want_f, d, at)
            ]
            if recs:
                xs, ys = _mean_curve(recs)
                ax.plot(xs, ys, label=d, color=color[d], linewidth=1.2)
        sub = "" if len(panels) == 1 else f"\n{_panel_title((dataset, partition, n, f))}"
        ax.set_title(f"{at}{sub}", fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("round", fontsize=8)
    for row in axes:
        row[0].set_ylabel("test accuracy", fontsize=8)
    handles = [plt.Line2D([], [], color=color[d], label=d) for d in defenses_all]
    legend_rows = math.ceil(len(handles) / 5)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0.0, min(0.3, 0.35 * legend_rows / fig.get_figheight()), 1.0, 1.0))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(
    records: Sequence[CellRecord], out: str | Path, *, title: str = "", plots: bool = True
) -> str:
    """Write every report under ``out`` and return the markdown summary.

    Writes ``results.jsonl``, ``summary.csv`` and ``summary.md`` always, and
    ``heatmap.png`` and ``curves.png`` when ``plots`` is true and at least one cell has
    finished.

    Raises
    ------
    ValueError
        If ``records`` is empty.
    """
    if not records:
        raise ValueError("no cells to report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_rows(records)
    write_results_jsonl(records, out / "results.jsonl")
    write_summary_csv(summary, out / "summary.csv")
    text = summary_markdown(summary, title=title)
    (out / "summary.md").write_text(text)
    if plots and any(r.status == "done" for r in records):
        plot_heatmap(summary, out / "heatmap.png", title=title)
        plot_curves(records, out / "curves.png", title=title)
    return text
