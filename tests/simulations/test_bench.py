"""``fedshield bench``: CLI overrides, resume after an interrupt, failures, and two small
real benches (digits; the bucketing-MNIST scenario on a generated npz). The scenario
language itself is tested in ``test_scenario.py``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulations.bench import DONE, ScenarioMismatchError, run_bench
from simulations.cli import add_bench_arguments, build_parser, scenario_from_args
from simulations.cli import main as cli_main
from simulations.config import resolve_config
from simulations.scenario import load_scenario, parse_scenario
from tests.simulations.test_scenario import MATRIX


def main(argv: list[str]) -> int:
    """``fedshield bench ARGV``."""
    return cli_main(["bench", *argv])


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(list(argv))


# ---------------------------------------------------------------------------------------
# command line


def test_cli_flags_override_the_toml(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(parse_scenario(MATRIX).to_toml())
    base = scenario_from_args(_args(str(path)))
    assert base == parse_scenario(MATRIX)
    s = scenario_from_args(_args(
        str(path), "--attacks", "none,ipm(epsilon=10.0),sign_flip(scale=4.0)",
        "--defenses", "cclip,median", "--dataset", "digits", "--partition", "iid",
        "--clients", "12", "--malicious", "4", "--rounds", "7", "--seeds", "3,4",
        "--set", "learning-rate=0.1", "--set", "model=logreg",
    ))
    assert [e.name for e in s.attacks] == ["none", "ipm(epsilon=10.0)", "sign_flip(scale=4.0)"]
    # a name of the TOML selects its entry (with its parameters); others are shorthands
    assert s.defenses[0] == base.defenses[2]
    assert s.defenses[1].as_dict()["aggregator"] == "median"
    assert [e.name for e in s.datasets] == ["digits"] and s.malicious == (4,)
    assert s.seeds == (3, 4)
    assert (s.fixed["num-clients"], s.fixed["num-server-rounds"], s.fixed["learning-rate"],
            s.fixed["model"]) == (12, 7, 0.1, "logreg")
    assert len(s.cells()) == 2 * (1 + 2) * 2


def test_cli_without_scenario_and_set_of_axis_keys() -> None:
    s = scenario_from_args(_args(
        "--dataset", "digits", "--attacks", "alie,ipm", "--defenses", "mean,krum,median",
        "--clients", "25", "--malicious", "5", "--rounds", "30", "--seeds", "0,1",
        "--partition", "iid", "--set", "num-malicious=6", "--set", "seed=9",
    ))
    assert s.name == "bench" and s.malicious == (6,) and s.seeds == (9,)
    assert len(s.cells()) == 2 * 3
    assert {c.config["aggregator"] for c in s.cells()} == {"mean", "krum", "median"}



def test_cli_lists_are_split_outside_parentheses() -> None:
    s = scenario_from_args(_args("--attacks", "alie(z=1.0), ipm(epsilon=0.5)", "--defenses",
                                 "krum(f=2)+bucketing(s=2),median", "--malicious", "2"))
    assert [e.name for e in s.attacks] == ["alie(z=1.0)", "ipm(epsilon=0.5)"]
    assert s.defenses[0].as_dict() == {"aggregator": "krum", "aggregator-params": "f=2",
                                       "pre-aggregation": "bucketing(s=2)"}
    with pytest.raises(ValueError, match="unbalanced"):
        scenario_from_args(_args("--attacks", "alie(z=1.0,ipm", "--malicious", "2"))


# ---------------------------------------------------------------------------------------
# running with a fake federation: resume, failures, scenario mismatch


class FakeRunner:
    """Rows from the config alone (mean under attack collapses), logging every call.

    Each call appends ``<out-dir name> start`` and, when it returns, ``... done`` to
    ``log``; ``interrupt_at`` raises KeyboardInterrupt on that call number (counted from
    the log), ``fail`` raises ValueError for configs with that defense.
    """

    def __init__(self, log: Path, *, interrupt_at: int = 0, fail: str = "") -> None:
        self.log, self.interrupt_at, self.fail = str(log), interrupt_at, fail

    def __call__(self, cfg: dict[str, Any]) -> list[dict[str, Any]]:
        name = Path(str(cfg["out-dir"])).name
        with open(self.log, "a") as fh:
            fh.write(f"{name} start\n")
        calls = sum(1 for ln in Path(self.log).read_text().splitlines() if ln.endswith("start"))
        if calls == self.interrupt_at:
            raise KeyboardInterrupt
        if self.fail and cfg["aggregator"] == self.fail:
            raise ValueError(f"{self.fail} exploded")
        broken = cfg["aggregator"] == "mean" and int(cfg["num-malicious"]) > 0
        final = 0.1 if broken else 0.9 + 0.01 * int(cfg["seed"])
        rounds = int(cfg["num-server-rounds"])
        rows = [{"round": r, "accuracy": 0.1 + (final - 0.1) * r / rounds, "loss": 1.0,
                 "skipped": False, "aggregation-seconds": 0.01} for r in range(rounds + 1)]
        with open(self.log, "a") as fh:
            fh.write(f"{name} done\n")
        return rows


SMALL = {"name": "small", "fixed": {"num-server-rounds": 2},
         "matrix": {"attack": ["none", "ipm"], "defense": ["mean", "median"],
                    "malicious": [3], "seed": [0, 1]}}


def _log(path: Path, what: str) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(ln.split()[0] for ln in path.read_text().splitlines() if ln.endswith(what))


def _summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_interrupted_bench_resumes_without_redoing_finished_cells(tmp_path: Path) -> None:
    s = parse_scenario(SMALL)
    cells = s.cells()
    out, log = tmp_path / "bench", tmp_path / "calls.log"
    with pytest.raises(KeyboardInterrupt):
        run_bench(s, out, jobs=0, runner=FakeRunner(log, interrupt_at=4), quiet=True,
                  plots=False)
    done = sorted(p.parent.name for p in out.glob(f"cells/*/{DONE}"))
    assert len(done) == 3 and _log(log, "done") == dict.fromkeys(done, 1)
    interrupted = cells[3].cell_id
    assert (out / "cells" / interrupted).is_dir() and interrupted not in done
    stamps = {d: os.stat(out / "cells" / d / DONE).st_mtime_ns for d in done}

    result = run_bench(s, out, jobs=0, runner=FakeRunner(log), quiet=True, plots=False)
    assert result.exit_code == 0
    assert _log(log, "done") == dict.fromkeys((c.cell_id for c in cells), 1)  # once each
    assert _log(log, "start")[interrupted] == 2
    assert {d: os.stat(out / "cells" / d / DONE).st_mtime_ns for d in done} == stamps
    summary = _summary(out)
    assert [r["cell"] for r in summary] == [c.cell_id for c in cells]
    assert {r["status"] for r in summary} == {"done"}
    acc = {(r["defense"], r["attack"], r["seed"]): float(r["accuracy"]) for r in summary}
    assert acc[("mean", "ipm", "1")] == pytest.approx(0.1)
    assert acc[("median", "ipm", "1")] == pytest.approx(0.91)

    # a folder without DONE (killed mid-cell) is rerun from scratch; others are kept
    victim = out / "cells" / cells[1].cell_id
    (victim / DONE).unlink()
    (victim / "junk").write_text("half-written")
    run_bench(s, out, jobs=0, runner=FakeRunner(log), quiet=True, plots=False)
    assert _log(log, "done")[cells[1].cell_id] == 2
    assert sum(_log(log, "done").values()) == len(cells) + 1
    assert not (victim / "junk").exists() and (victim / DONE).exists()
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(cells) * 3


def test_pool_records_failures_and_goes_on(tmp_path: Path) -> None:
    s = parse_scenario(SMALL)
    out, log = tmp_path / "bench", tmp_path / "calls.log"
    lines: list[str] = []
    result = run_bench(s, out, jobs=2, runner=FakeRunner(log, fail="median"),
                       echo=lines.append, plots=False)
    assert result.exit_code == 1
    failed = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failed) == 4 and {f["defense"] for f in failed} == {"median"}
    assert all("ValueError: median exploded" in f["error"] for f in failed)
    status = {(r["defense"], r["attack"], r["seed"]): r["status"] for r in _summary(out)}
    assert status == {(d, a, sd): "failed" if d == "median" else "done"
                      for d in ("mean", "median") for a in ("none", "ipm") for sd in ("0", "1")}
    assert "## Failed cells" in result.markdown
    progress = [ln for ln in lines if ln.startswith("[")]
    assert len(progress) == 8 and sum("FAILED" in ln for ln in progress) == 4
    # the rerun retries only the failed cells
    again = run_bench(s, out, jobs=0, runner=FakeRunner(log), quiet=True, plots=False)
    assert again.exit_code == 0
    assert _log(log, "done") == {c.cell_id: 1 for c in s.cells()}
    assert (out / "failures.jsonl").read_text() == ""


def test_interrupt_inside_a_worker_process_resumes(tmp_path: Path) -> None:
    s = parse_scenario(SMALL)
    out, log = tmp_path / "bench", tmp_path / "calls.log"
    with pytest.raises(KeyboardInterrupt):
        run_bench(s, out, jobs=1, runner=FakeRunner(log, interrupt_at=3), quiet=True,
                  plots=False)
    first = _log(log, "done")
    assert 2 <= sum(first.values()) < len(s.cells())
    run_bench(s, out, jobs=0, runner=FakeRunner(log), quiet=True, plots=False)
    assert _log(log, "done") == {c.cell_id: 1 for c in s.cells()}


class SlowRunner(FakeRunner):
    """A FakeRunner that takes ``delay`` seconds per cell and logs its process id."""

    def __init__(self, log: Path, delay: float) -> None:
        super().__init__(log)
        self.delay = delay

    def __call__(self, cfg: dict[str, Any]) -> list[dict[str, Any]]:
        import time

        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()} pid\n")
        time.sleep(self.delay)
        return super().__call__(cfg)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_bench_stops_its_workers_and_resumes(tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    s = parse_scenario(SMALL)
    out, log = tmp_path / "bench", tmp_path / "calls.log"
    code = (
        "import json, sys; from pathlib import Path;"
        "from simulations.bench import run_bench; from simulations.scenario import parse_scenario;"
        "from tests.simulations.test_bench import SlowRunner;"
        f"run_bench(parse_scenario(json.loads({json.dumps(json.dumps(SMALL))})), "
        f"{str(out)!r}, jobs=2, runner=SlowRunner(Path({str(log)!r}), 0.4), quiet=True)"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob(f"cells/*/{DONE}"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "bench did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    workers = {int(ln.split()[0]) for ln in log.read_text().splitlines() if ln.endswith("pid")}
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers):  # orphaned workers notice and leave
        assert time.monotonic() < deadline, "orphaned workers kept running"
        time.sleep(0.2)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob(f"cells/*/{DONE}")}
    assert 2 <= len(finished) < len(s.cells())
    result = run_bench(s, out, jobs=0, runner=FakeRunner(log), quiet=True, plots=False)
    assert result.exit_code == 0 and {r.status for r in result.records} == {"done"}
    runs = _log(log, "done")
    for cell in s.cells():  # finished cells were not rerun; the others ran to the end
        assert runs[cell.cell_id] == 1 if cell.cell_id in finished else runs[cell.cell_id] >= 1
    assert {d: (out / "cells" / d / DONE).stat().st_mtime_ns for d in finished} == finished


def test_different_scenario_in_same_dir_is_refused_unless_forced(tmp_path: Path) -> None:
    out, log = tmp_path / "bench", tmp_path / "calls.log"
    run_bench(parse_scenario(SMALL), out, jobs=0, runner=FakeRunner(log), quiet=True,
              plots=False)
    saved = load_scenario(out / "scenario.toml")
    assert saved == parse_scenario(SMALL)
    bigger = json.loads(json.dumps(SMALL))
    bigger["matrix"]["seed"] = [0, 1, 2]
    with pytest.raises(ScenarioMismatchError, match="matrix seed differs.*--force"):
        run_bench(parse_scenario(bigger), out, jobs=0, runner=FakeRunner(log), quiet=True)
    assert main([str(out / "scenario.toml"), "--seeds", "0,1,2", "--out", str(out),
                 "--dry-run"]) == 0
    result = run_bench(parse_scenario(bigger), out, jobs=0, runner=FakeRunner(log),
                       force=True, quiet=True, plots=False)
    assert len(result.records) == 12
    assert sum(_log(log, "done").values()) == 12  # the 8 old cells were reused
    assert load_scenario(out / "scenario.toml") == parse_scenario(bigger)


def test_bench_subcommand_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["bench", "quick", "--dry-run", "--seeds", "0,1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith(f"{2 * len(load_scenario('quick').cells())} cells -> ")


def test_main_reports_bad_input_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--defenses", "krun", "--dry-run"]) == 2
    assert "did you mean 'krum'" in capsys.readouterr().err
    assert main(["--list"]) == 0
    assert "bucketing-mnist" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# real federations


@pytest.mark.slow
def test_digits_bench_ipm_breaks_fedavg_and_median_holds(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    code = main(["--dataset", "digits", "--attacks", "none,ipm(epsilon=10.0)",
                 "--defenses", "mean,median", "--malicious", "3", "--rounds", "8",
                 "--clients", "10", "--seeds", "0", "--jobs", "1", "--quiet", "--out", str(out)])
    assert code == 0
    summary = _summary(out)
    acc = {(r["attack"], r["defense"]): float(r["accuracy"]) for r in summary}
    assert set(acc) == {(a, d) for a in ("none", "ipm(epsilon=10.0)") for d in ("mean", "median")}
    assert {(r["n"], r["f"]) for r in summary if r["attack"] != "none"} == {("10", "3")}
    assert acc[("none", "mean")] >= 0.85
    assert acc[("ipm(epsilon=10.0)", "mean")] <= 0.25  # FedAvg broken
    assert acc[("ipm(epsilon=10.0)", "median")] >= acc[("none", "median")] - 0.08  # holds
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 9 and {r["round"] for r in rows} == set(range(9))
    md = (out / "summary.md").read_text()
    assert "| mean |" in md and "(ipm(epsilon=10.0))" in md
    assert (out / "heatmap.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    # the per-round aggregation time is averaged into the summary
    mean_ipm = next(
        r for r in summary if (r["attack"], r["defense"]) == ("ipm(epsilon=10.0)", "mean")
    )
    assert mean_ipm["aggregation_seconds"] != ""


def _blobs_npz(path: Path, *, n_train: int, n_test: int, seed: int) -> None:
    """28x28 images of 10 classes: class k is a bright 6x6 blob at its own place + noise."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n)
        x = rng.uniform(0, 60, size=(n, 28, 28))
        for i, k in enumerate(y):
            r, c = 2 + 8 * (k // 4), 2 + 6 * (k % 4)
            x[i, r:r + 6, c:c + 6] += 180
        return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


@pytest.mark.slow
def test_bucketing_mnist_scenario_runs_on_a_generated_npz(tmp_path: Path) -> None:
    npz = tmp_path / "blobs.npz"
    _blobs_npz(npz, n_train=1000, n_test=300, seed=0)
    out = tmp_path / "bm"
    code = main(["bucketing-mnist", "--dataset", f"npz:{npz}", "--attacks", "none,ipm",
                 "--defenses", "rfa,krum+bucketing", "--rounds", "5", "--seeds", "0",
                 "--jobs", "0", "--quiet", "--no-plots", "--out", str(out)])
    assert code == 0
    summary = _summary(out)
    assert len(summary) == 4 and {r["dataset"] for r in summary} == {"npz:blobs"}
    assert {r["status"] for r in summary} == {"done"}
    assert {(r["n"], r["f"]) for r in summary if r["attack"] != "none"} == {("25", "5")}
    cfgs = {}
    for r in summary:
        with (out / "cells" / r["cell"] / "config.toml").open("rb") as fh:
            cfgs[(r["defense"], r["attack"])] = tomllib.load(fh)
    bucketed = cfgs[("krum+bucketing", "ipm")]
    assert (bucketed["aggregator"], bucketed["aggregator-params"], bucketed["pre-aggregation"],
            bucketed["attack"], bucketed["attack-params"]) == (
        "krum", "f=5", "bucketing(s=2)", "ipm", "epsilon=0.1")
    assert cfgs[("rfa", "ipm")]["aggregator"] == "geometric_median"
    assert cfgs[("rfa", "ipm")]["pre-aggregation"] == ""
    assert {c["partitioner"] for c in cfgs.values()} == {"shards"}
    # the saved config is a valid run config: the cell is reproducible with fedshield run
    resolve_config(cfgs[("rfa", "ipm")])
    acc = {(r["defense"], r["attack"]): float(r["accuracy"]) for r in summary}
    assert acc[("rfa", "none")] > 0.8  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_digits_bench_alie_defeats_fedavg_while_median_and_cclip_hold(tmp_path: Path) -> None:
    """ALIE (Baruch et al., 2019) with z = 20: FedAvg breaks, the robust rules do not.

    With the paper's z_max (0.52 for n=10, f=3) ALIE moves nothing on IID digits; it is
    built to slip past robust rules, so the shift must be large to hurt even the mean.
    """
    out = tmp_path / "alie"
    code = main(["--dataset", "digits", "--attacks", "alie(z=20.0)",
                 "--defenses", "mean,median,centered_clipping(tau=1.0)", "--malicious", "3",
                 "--rounds", "10", "--clients", "10", "--seeds", "0", "--jobs", "1", "--quiet",
                 "--no-plots", "--out", str(out)])
    assert code == 0
    acc = {r["defense"]: float(r["accuracy"]) for r in _summary(out)}
    assert acc["mean"] <= 0.25
    assert acc["median"] >= 0.85
    assert acc["centered_clipping(tau=1.0)"] >= 0.85
