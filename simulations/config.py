"""Run configuration: one flat ``key -> scalar`` mapping, defaults here, TOML + overrides.

The same keys form ``[tool.flwr.app.config]`` in ``pyproject.toml`` (a test keeps the two
identical), so ``flwr run . --run-config "k=v"`` and ``fedshield run key=value`` take the
same settings. Unknown keys and values of the wrong type are rejected, never dropped.
``key=value`` overrides are read by :func:`runconfig.overrides.parse_override` (re-exported
here), the one reader the deploy tools use too.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from runconfig.config import APP_KEYS
from runconfig.overrides import Scalar, parse_override

__all__ = [
    "APP_DEFAULTS",
    "DEFAULTS",
    "ENGINE_DEFAULTS",
    "Scalar",
    "load_config",
    "parse_override",
    "resolve_config",
    "save_config",
]

# Keys of the Flower app: identical to [tool.flwr.app.config] in pyproject.toml; the
# typed run config (runconfig.config.RunConfig) is their one definition.
APP_DEFAULTS: dict[str, Scalar] = dict(APP_KEYS)

# Keys only the in-process engine reads (Flower's own simulation takes the number of
# SuperNodes from --federation-config num-supernodes=N instead).
ENGINE_DEFAULTS: dict[str, Scalar] = {
    "num-clients": 10,
    "engine": "per-client",  # or "batched": a round's clients trained as one computation
    # or "honest-only": the malicious clients are never sent a train message (a perfect
    # filter from ground truth): the ceiling of any defense that removes attackers
    "reference": "none",
}

DEFAULTS: dict[str, Scalar] = {**APP_DEFAULTS, **ENGINE_DEFAULTS}


def _coerce(key: str, value: Any, defaults: Mapping[str, Scalar]) -> Scalar:
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(defaults)}")
    want = type(defaults[key])
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not want:
        raise TypeError(
            f"config key {key!r} must be {want.__name__} (default {defaults[key]!r}), "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def resolve_config(
    base: Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    defaults: Mapping[str, Scalar] = DEFAULTS,
) -> dict[str, Scalar]:
    """Defaults, then ``base`` (e.g. a TOML file's table), then ``overrides``; all checked."""
    cfg: dict[str, Scalar] = dict(defaults)
    for key, value in (base or {}).items():
        cfg[key] = _coerce(key, value, defaults)
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        cfg[key] = _coerce(key, value, defaults)
    return cfg


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, table: str | None = None
) -> dict[str, Scalar]:
    """Load a TOML run config (top-level keys, or the given ``table``) plus overrides."""
    base: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        if table is not None:
            if table not in data:
                raise KeyError(f"{path} has no [{table}] table")
            data = data[table]
        nested = [k for k, v in data.items() if isinstance(v, dict)]
        if nested:
            raise ValueError(
                f"{path}: unexpected tables {nested}; a run config is flat key = value pairs"
            )
        base = data
    return resolve_config(base, overrides)


def save_config(cfg: Mapping[str, Scalar], path: str | Path) -> None:
    """Write the fully resolved config as UTF-8 TOML (re-loadable with :func:`load_config`).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     save_config({"out-dir": "résultats/é", "seed": 1}, Path(tmp) / "c.toml")
    ...     print((Path(tmp) / "c.toml").read_text(encoding="utf-8"), end="")
    out-dir = "résultats/é"
    seed = 1
    """
    Path(path).write_text(tomli_w.dumps(dict(cfg)), encoding="utf-8")
