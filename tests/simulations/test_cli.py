"""The `fedshield` command line: run reproduces from its saved config; errors are clear;
``--version``; the audit's defenses in the one spec grammar."""

from __future__ import annotations

import csv
import json
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import simulations
from runconfig.spec import parse_spec
from simulations.audit.defenses import make_defense
from simulations.cli import DEFAULT_AUDIT_DEFENSES, main

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert simulations.__version__ == metadata.version("fedshield") == pyproject
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"fedshield {pyproject}\n"


def test_version_falls_back_to_pyproject_when_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert simulations.version() == pyproject


def test_default_audit_defenses_parse_and_build() -> None:
    for text in DEFAULT_AUDIT_DEFENSES:
        spec = parse_spec(text)
        make_defense(spec.name, **spec.params)  # unknown names or parameters raise
    assert [parse_spec(t).name for t in DEFAULT_AUDIT_DEFENSES] == [
        "none", "clipping", "pruning", "local_dp", "dp_sgd", "secagg_sum"]


def test_audit_refuses_the_old_colon_syntax(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "inversion", "--defense", "secagg_sum:k=4",
                 "--out", str(tmp_path)]) == 2
    assert "cannot parse --defense" in capsys.readouterr().err


def _metrics(out: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["accuracy"], r["loss"]) for r in rows]


@pytest.mark.slow
def test_run_writes_config_metrics_audit_and_reproduces_from_saved_config(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["num-server-rounds=3", "aggregator=median", "num-malicious=2", "attack=alie"]
    assert main(["run", "--out", str(a), *args]) == 0
    assert {"config.toml", "metrics.jsonl", "audit.jsonl"} <= {p.name for p in a.iterdir()}
    assert main(["run", "--config", str(a / "config.toml"), "--out", str(b)]) == 0
    assert _metrics(a) == _metrics(b)
    audit = [json.loads(x) for x in (a / "audit.jsonl").read_text().splitlines()]
    assert [x["round"] for x in audit] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["num-malicous=2"], "did you mean 'num-malicious'"),
        (["aggregator=krumm"], "did you mean 'krum'"),
        (["aggregator=krum", "aggregator-params=f=2, q=1"], "unknown parameter"),
        (["num-clients=5", "num-malicious=6"], "num-malicious must be in [0, 5]"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["run", "--out", str(tmp_path), "num-server-rounds=1", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_audit_inversion_leaks_without_defense_and_not_under_dp_sgd(tmp_path: Path) -> None:
    assert main([
        "audit", "inversion", "--attack", "idlg", "--defense", "none",
        "--defense", "dp_sgd(noise_multiplier=0.5, max_grad_norm=1.0)",
        "--iterations", "150", "--out", str(tmp_path),
    ]) == 0
    with (tmp_path / "inversion.csv").open() as fh:
        rows = {r["defense"].split("(")[0]: float(r["psnr"]) for r in csv.DictReader(fh)}
    assert rows["none"] > 30.0
    assert rows["dp_sgd"] < 10.0
    assert (tmp_path / "inversion_idlg.png").stat().st_size > 1000


def test_cli_path_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert main(["run", "--config", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder: name a TOML file" in err
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert main(["run", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file: name a folder" in err


def test_run_writes_to_the_configs_out_dir_unless_out_says_otherwise(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``out-dir=`` given to ``fedshield run`` is where the run goes (it used to be dropped
    for the default ``--out``); an explicit ``--out`` wins and says so."""
    args = ["dataset=digits", "num-clients=3", "num-server-rounds=1", "model=logreg"]
    mine = tmp_path / "mine"
    assert main(["run", f"out-dir={mine}", *args]) == 0
    assert (mine / "metrics.jsonl").is_file()
    other = tmp_path / "other"
    assert main(["run", "--out", str(other), f"out-dir={tmp_path / 'x'}", *args]) == 0
    assert (other / "metrics.jsonl").is_file() and not (tmp_path / "x").exists()
    assert f"--out {other} replaces the config's out-dir={tmp_path / 'x'}" in capsys.readouterr().err
