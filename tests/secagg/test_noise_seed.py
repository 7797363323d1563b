"""Where distributed DP noise comes from: a client secret by default, the run seed on request."""

from __future__ import annotations

import pytest

from runconfig.config import APP_KEYS, RunConfig

DP = "noise_multiplier=1.0, clipping_norm=1.0"


def _cfg(secagg: str, central_dp: str = DP) -> RunConfig:
    return RunConfig.from_flat({**APP_KEYS, "secagg": secagg, "central-dp": central_dp,
                                "min-clients": 2, "clients-per-round": 4})


@pytest.mark.parametrize("value", ["secret", "run"])
def test_noise_seed_values_are_accepted(value: str) -> None:
    assert _cfg(f"noise_seed='{value}'").secagg["noise_seed"] == value


def test_an_unknown_noise_seed_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"noise_seed must be one of \['secret', 'run'\]"):
        _cfg("noise_seed='fixed'")


def test_noise_seed_without_distributed_dp_is_refused() -> None:
    with pytest.raises(ValueError, match="noise_seed is for distributed DP"):
        _cfg("noise_seed='run'", central_dp="")
