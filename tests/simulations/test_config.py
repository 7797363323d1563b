"""Run configuration: defaults equal pyproject's Flower app config; bad input is refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from simulations.config import (
    APP_DEFAULTS,
    DEFAULTS,
    load_config,
    parse_override,
    resolve_config,
    save_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_app_config_equals_code_defaults() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_cfg = data["tool"]["flwr"]["app"]["config"]
    assert app_cfg == APP_DEFAULTS
    assert list(app_cfg) == list(APP_DEFAULTS)
    assert data["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "server.app:app",
        "clientapp": "client.app:app",
    }


def test_overrides_are_typed() -> None:
    cfg = resolve_config(None, ["num-malicious=3", "aggregator=krum", "learning-rate=1", "resume=true"])
    assert cfg["num-malicious"] == 3
    assert cfg["aggregator"] == "krum"
    assert cfg["learning-rate"] == 1.0 and isinstance(cfg["learning-rate"], float)
    assert cfg["resume"] is True
    assert parse_override("aggregator-params=f=2, m=3") == ("aggregator-params", "f=2, m=3")


def test_unknown_key_is_refused_with_close_match() -> None:
    with pytest.raises(KeyError, match="did you mean 'num-malicious'"):
        resolve_config(None, ["num-malicous=3"])


@pytest.mark.parametrize("override", ["num-malicious=2.5", "num-malicious=true", "aggregator=3", "resume=1"])
def test_wrong_type_is_refused(override: str) -> None:
    with pytest.raises(TypeError, match="must be"):
        resolve_config(None, [override])


def test_not_key_value_is_refused() -> None:
    with pytest.raises(ValueError, match="not key=value"):
        resolve_config(None, ["krum"])


def test_saved_config_reloads_identically(tmp_path: Path) -> None:
    cfg = resolve_config(None, ["aggregator=trimmed_mean", "aggregator-params=f=2", 'out-dir=a "b"'])
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg
    assert set(cfg) == set(DEFAULTS)


def test_toml_with_nested_table_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("seed = 1\n[extra]\nx = 1\n")
    with pytest.raises(ValueError, match="flat key = value"):
        load_config(tmp_path / "c.toml")


def test_saved_config_round_trips_a_non_ascii_path(tmp_path: Path) -> None:
    out = tmp_path / "résultats" / "Ωmega ü"
    cfg = resolve_config(None, [f"out-dir={out}", "aggregator-params=f=2, mode='x'"])
    save_config(cfg, tmp_path / "c.toml")
    raw = (tmp_path / "c.toml").read_bytes()
    assert "résultats/Ωmega ü".encode() in raw  # UTF-8 text, not escapes
    assert tomllib.loads(raw.decode("utf-8")) == cfg
    assert load_config(tmp_path / "c.toml") == cfg
    assert load_config(tmp_path / "c.toml")["out-dir"] == str(out)


def test_overrides_read_toml_then_python_literals_then_bare_text() -> None:
    assert parse_override("learning-rate=1e-3") == ("learning-rate", 0.001)
    assert parse_override("learning-rate=.5") == ("learning-rate", 0.5)  # Python only
    assert parse_override("out-dir='C:\\new'") == ("out-dir", "C:\\new")  # TOML literal
    assert parse_override("out-dir=/tmp/a b") == ("out-dir", "/tmp/a b")
    assert parse_override("resume=FALSE") == ("resume", False)
    assert parse_override("dataset=[1, 2]") == ("dataset", "[1, 2]")  # not a scalar: text
