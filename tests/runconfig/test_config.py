"""The run config is parsed once into a typed value; every cross-key check lives there."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from runconfig.config import APP_KEYS, RunConfig
from runconfig.spec import Spec

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**changes: Any) -> RunConfig:
    return RunConfig.from_flat({**APP_KEYS, **{k.replace("_", "-"): v for k, v in changes.items()}})


def test_app_keys_are_pyprojects_flower_config() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == APP_KEYS


def test_defaults_parse_into_typed_fields() -> None:
    cfg = _cfg()
    assert cfg.rule == Spec("mean", {}) and cfg.pre_aggregation == ()
    assert cfg.attack == Spec("sign_flip", {}) and cfg.num_rounds == 20
    assert cfg.as_flat() == APP_KEYS


def test_specs_are_parsed_once_with_the_one_grammar() -> None:
    cfg = _cfg(aggregator="krum", aggregator_params="f=2",
               pre_aggregation="norm_clip(max_norm=5); bucketing(s=2)",
               eval_evasion="fgsm(eps=0.1); pgd(eps=0.2, steps=3)")
    assert cfg.rule == Spec("krum", {"f": 2})
    assert [str(s) for s in cfg.pre_aggregation] == ["norm_clip(max_norm=5)", "bucketing(s=2)"]
    assert cfg.eval_evasion[1] == Spec("pgd", {"eps": 0.2, "steps": 3})


def test_unknown_and_missing_keys() -> None:
    with pytest.raises(KeyError, match="did you mean 'num-malicious'"):
        RunConfig.from_flat({**APP_KEYS, "num-malicous": 1})
    flat = dict(APP_KEYS)
    del flat["seed"]
    with pytest.raises(KeyError, match="no key .*seed"):
        RunConfig.from_flat(flat)


@pytest.mark.parametrize(("key", "value", "error", "match"), [
    ("num-server-rounds", "3", TypeError, "must be int"),
    ("num-server-rounds", True, TypeError, "must be int"),
    ("learning-rate", float("nan"), ValueError, "finite"),
    ("round-timeout", float("inf"), ValueError, "finite"),
    ("num-server-rounds", 0, ValueError, ">= 1"),
    ("round-timeout", 0.0, ValueError, "> 0"),
    ("node-wait-timeout", -1.0, ValueError, ">= 0"),
    ("num-malicious", -1, ValueError, ">= 0"),
    ("attack-knowledge", "psychic", ValueError, "omniscient, own-data"),
    ("dp-sgd", "bogus=1", TypeError, "bogus"),
    ("local-dp", "noise_std=0.1", ValueError, "clipping_norm"),
    ("local-dp", "clipping_norm=1.0", ValueError, "exactly one"),
    ("dp-sgd", "max_grad_norm=1.0", ValueError, "exactly one"),
    ("aggregator", " ", ValueError, "empty"),
    ("pre-aggregation", "bucketing(s=2", ValueError, "unbalanced"),
])
def test_bad_values_are_refused(key: str, value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RunConfig.from_flat({**APP_KEYS, key: value})


def test_cross_key_checks() -> None:
    with pytest.raises(ValueError, match="below min-clients"):
        _cfg(clients_per_round=1, min_clients=2)
    dp = "noise_multiplier=1.0, clipping_norm=1.0"
    with pytest.raises(ValueError, match="clients-per-round >= 1"):
        _cfg(central_dp=dp)
    with pytest.raises(ValueError, match="pre-aggregation"):
        _cfg(central_dp=dp, clients_per_round=5, pre_aggregation="bucketing")
    with pytest.raises(ValueError, match="aggregator='krum'"):
        _cfg(central_dp=dp, clients_per_round=5, aggregator="krum", aggregator_params="f=1")
    # with central DP, min-clients above clients-per-round is not an error (DP releases
    # every round whoever replies)
    assert _cfg(central_dp=dp, clients_per_round=1, min_clients=5).central_dp["noise_multiplier"] == 1.0


def test_replace_reparses() -> None:
    cfg = _cfg().replace(**{"aggregator": "median", "num-server-rounds": 3})
    assert cfg.rule.name == "median" and cfg.num_rounds == 3
    with pytest.raises(ValueError, match=">= 1"):
        _cfg().replace(**{"num-server-rounds": 0})
