"""The bench's scenario language: a matrix of federations in one TOML file.

A *scenario* (``simulations/scenarios/*.toml`` ship with fedshield; a bare name such as
``quick`` resolves to one of them) is::

    name = "quick"
    description = "free text"
    [fixed]                      # run-config keys applied to every cell
    num-clients = 10
    num-server-rounds = 15
    [matrix]
    dataset = ["digits"]
    partition = ["iid", {name = "dir0.5", partitioner = "dirichlet",
                         partitioner-params = "alpha=0.5"}]
    attack = ["none", "alie", "sign_flip(scale=4.0)"]
    defense = ["mean", "median", "krum+bucketing(s=2)",
               {name = "cclip", aggregator = "centered_clipping", aggregator-params = "tau=1.0"}]
    malicious = [3]              # values of num-malicious (f) for the attacks
    seed = [0, 1]

:func:`parse_scenario` checks it into a :class:`Scenario`, :meth:`Scenario.cells` expands
the matrix into :class:`Cell` objects (one resolved run config each) and
:func:`check_cells` checks the registered names before anything runs. Running the cells is
:mod:`simulations.bench`; the command line is ``fedshield bench`` (:mod:`simulations.cli`).

Axis entries
------------
Each of ``dataset``, ``partition``, ``attack`` and ``defense`` is a list of entries, and an
entry is either a table ``{name = ..., <run-config keys>}`` (any keys of
:data:`simulations.config.DEFAULTS`, checked by :func:`simulations.config.resolve_config`:
an unknown key raises with the closest valid one) or a string shorthand:

================  =======================================  ===============================
axis              shorthand                                 run-config keys it sets
================  =======================================  ===============================
``dataset``       ``"digits"``, ``"npz:PATH"``              ``dataset`` (name ``npz:<stem>``)
``partition``     ``"dirichlet(alpha=0.5)"``                ``partitioner``,
                                                            ``partitioner-params``
``attack``        ``"ipm(epsilon=10)"``; ``"none"``         ``attack``, ``attack-params``;
                                                            ``num-malicious = 0``
``defense``       ``"krum(f=3)+bucketing(s=2)"``            ``aggregator``,
                                                            ``aggregator-params``,
                                                            ``pre-aggregation``
================  =======================================  ===============================

A shorthand is written in the one component-spec grammar, ``name(key=value, ...)``
(:func:`runconfig.spec.parse_spec`); its parameters are stored in the run config in
canonical form (:func:`runconfig.spec.format_params`: ``alpha=0.5``, ``mode='reverse'``). A
defense shorthand is the rule first, then ``+STEP(params)`` pre-aggregation steps, applied
to the updates in the order written, before the rule. A shorthand's name is the string
itself. Names must be unique within an axis.

Cells
-----
One cell per ``dataset x partition x f x attack x defense x seed``, with the run config
``DEFAULTS <- [fixed] <- the cell's entries <- {num-malicious = f, seed}``. Rules:

- ``malicious`` lists the values of ``f``; the attack ``none`` (no malicious clients) runs
  once per ``(dataset, partition, defense, seed)``, not once per ``f``, and so does an
  attack entry that sets ``num-malicious`` itself. ``f = 0`` is the attack ``none``.
- Entries may not set ``seed``, ``out-dir`` or ``resume``; only attack entries set
  ``num-malicious``. Two entries of one cell that set the same key to different values
  raise. ``[fixed] seed`` / ``num-malicious`` are the ``seed`` / ``malicious`` axis when
  that axis is absent (giving both raises).
- A missing ``dataset`` / ``partition`` / ``defense`` axis is the fixed (or default)
  ``dataset`` / ``partitioner`` / ``aggregator``; a missing ``attack`` axis is ``["none"]``.
- The defense's ``f`` defaults to the cell's ``num-malicious`` (so under ``none`` a robust
  rule assumes ``f = 0``); pin it with ``aggregator-params = "f=3"``.

Examples
--------
>>> s = parse_scenario({"fixed": {"num-clients": 10},
...                     "matrix": {"attack": ["none", "alie"], "defense": ["mean", "median"],
...                                "malicious": [2, 3], "seed": [0, 1]}})
>>> len(s.cells())   # none: 2 defenses x 2 seeds; alie: 2 f x 2 defenses x 2 seeds
12
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from runconfig.config import RunConfig
from runconfig.spec import (
    format_params,
    parse_spec,
    split_top_level,
)

from .config import Scalar, resolve_config
from .report import NO_ATTACK, Coordinates

__all__ = [
    "AXES",
    "MATRIX_KEYS",
    "Cell",
    "Entry",
    "Scenario",
    "check_cells",
    "load_scenario",
    "parse_entry",
    "parse_scenario",
    "read_scenario_data",
    "shipped_scenarios",
]

AXES: tuple[str, ...] = ("dataset", "partition", "attack", "defense")
"""The named axes of a matrix; ``malicious`` and ``seed`` are the two integer axes."""

MATRIX_KEYS: tuple[str, ...] = (*AXES, "malicious", "seed")
"""The keys of ``[matrix]``."""
_TOP_KEYS = ("name", "description", "fixed", "matrix")
# keys the bench sets per cell; never in [fixed] or an entry
_BENCH_OWNED = ("out-dir", "resume")
# keys whose value decides the axes' defaults
_AXIS_DEFAULT_KEY = {"dataset": "dataset", "partition": "partitioner", "defense": "aggregator"}


# ---------------------------------------------------------------------------------------
# entries and shorthands


@dataclass(frozen=True)
class Entry:
    """One value of a named axis: a unique ``name`` and the run-config keys it sets.

    Examples
    --------
    >>> parse_entry("defense", "krum+bucketing(s=2)").as_dict()["pre-aggregation"]
    'bucketing(s=2)'
    """

    name: str
    keys: tuple[tuple[str, Scalar], ...]

    def as_dict(self) -> dict[str, Scalar]:
        """The run-config keys, in order."""
        return dict(self.keys)

    def to_table(self) -> dict[str, Scalar]:
        """``{name, **keys}``: the entry as written in a resolved scenario."""
        return {"name": self.name, **self.as_dict()}


def _shorthand(axis: str, text: str) -> tuple[str, dict[str, Scalar]]:
    """``(name, run-config keys)`` of a string entry of ``axis``."""
    text = text.strip()
    if not text:
        raise ValueError(f"empty {axis} name")
    if axis == "dataset":
        name = f"npz:{Path(text[4:]).stem}" if text.startswith("npz:") else text
        return name, {"dataset": text}
    if axis == "partition":
        spec = parse_spec(text, what="partition")
        return text, {"partitioner": spec.name, "partitioner-params": format_params(spec.params)}
    if axis == "attack":
        if text == NO_ATTACK:
            return text, {"num-malicious": 0}
        spec = parse_spec(text, what="attack")
        return text, {"attack": spec.name, "attack-params": format_params(spec.params)}
    if axis == "defense":
        rule, *steps = [
            parse_spec(part, what="pre-aggregation step" if i else "aggregation rule")
            for i, part in enumerate(split_top_level(text, "+"))
        ]
        return text, {
            "aggregator": rule.name,
            "aggregator-params": format_params(rule.params),
            "pre-aggregation": "; ".join(str(step) for step in steps),
        }
    raise ValueError(f"unknown axis {axis!r}; axes: {', '.join(AXES)}")


def parse_entry(axis: str, raw: str | Mapping[str, Any]) -> Entry:
    """Parse one entry of ``axis`` from a string shorthand or a ``{name, keys...}`` table.

    Raises
    ------
    KeyError
        An unknown run-config key (with the closest valid key).
    TypeError
        A value of the wrong type.
    ValueError
        A missing or empty ``name``; a key the bench owns (``seed``, ``out-dir``,
        ``resume``, and ``num-malicious`` outside attack entries); ``none`` with malicious
        clients, or another attack with none.

    Examples
    --------
    >>> parse_entry("attack", "none").as_dict()
    {'num-malicious': 0}
    >>> parse_entry("partition", {"name": "dir", "partitioner": "dirichlet",
    ...                           "partitioner-params": "alpha=0.5"}).name
    'dir'
    """
    if isinstance(raw, str):
        name, keys = _shorthand(axis, raw)
    elif isinstance(raw, Mapping):
        if "name" not in raw or not isinstance(raw["name"], str) or not raw["name"].strip():
            raise ValueError(
                f"{axis} entry {dict(raw)!r} needs a non-empty string 'name', e.g. "
                f"{{name = \"mine\", ...}}"
            )
        name = raw["name"].strip()
        keys = {k: v for k, v in raw.items() if k != "name"}
        if axis == "attack" and name == NO_ATTACK:
            keys.setdefault("num-malicious", 0)
    else:
        raise TypeError(f"{axis} entry must be a string or a table, got {raw!r}")
    where = f"{axis} entry {name!r}"
    for key in ("seed", *_BENCH_OWNED):
        if key in keys:
            raise ValueError(
                f"{where} sets {key!r}, which the bench sets per cell: use the 'seed' axis"
                if key == "seed" else f"{where} sets {key!r}, which the bench sets per cell"
            )
    if "num-malicious" in keys and axis != "attack":
        raise ValueError(
            f"{where} sets 'num-malicious': only attack entries may (use the 'malicious' axis)"
        )
    checked = resolve_config(None, keys)  # unknown keys and wrong types raise here
    coerced = {k: checked[k] for k in keys}
    if axis == "attack":
        f = coerced.get("num-malicious")
        if name == NO_ATTACK and f != 0:
            raise ValueError(f"attack {NO_ATTACK!r} means num-malicious=0, got {f}")
        if name != NO_ATTACK and f == 0:
            raise ValueError(
                f"{where} sets num-malicious=0; a run without malicious clients is the "
                f"attack {NO_ATTACK!r}"
            )
    return Entry(name, tuple(coerced.items()))


# ---------------------------------------------------------------------------------------
# scenario


@dataclass(frozen=True)
class _CellEntries:
    """Internal: the entries of one cell before resolution."""

    dataset: Entry
    partition: Entry
    attack: Entry
    defense: Entry


_LATER_KEYS = {"reference": "none", "batch-order": "generator"}
"""Keys added after cells were first run, with the value every earlier cell had: left out
of the config hash at that value, so earlier results keep their cell ids and resume."""


@dataclass(frozen=True)
class Cell:
    """One federation of the matrix: its coordinates and fully resolved run config."""

    coords: Coordinates
    config: Mapping[str, Scalar]

    @property
    def config_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the run config without ``out-dir``."""
        cfg = {k: v for k, v in self.config.items() if k != "out-dir"}
        for key, default in _LATER_KEYS.items():  # earlier cells keep their ids
            if cfg.get(key) == default:
                del cfg[key]
        blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def cell_id(self) -> str:
        """``<slug>-<10 hex digits of config_hash>``, e.g. ``digits-iid-alie-krum-f3-s0-...``."""
        c = self.coords
        parts = [c.dataset, c.partition, c.attack, c.defense, f"f{c.f}", f"s{c.seed}"]
        slug = "-".join(re.sub(r"[^A-Za-z0-9.+=]+", "_", p).strip("_.") for p in parts)
        return f"{slug[:90]}-{self.config_hash[:10]}"


@dataclass(frozen=True)
class Scenario:
    """A benchmark matrix; build with :func:`parse_scenario` or :func:`load_scenario`.

    Attributes
    ----------
    name, description
        Free text; ``name`` names the default output folder.
    fixed
        Every run-config key except ``seed``, ``num-malicious``, ``out-dir``, ``resume``
        (resolved: defaults included).
    datasets, partitions, attacks, defenses
        The axis entries.
    malicious
        Values of ``f`` for the attacks other than ``none``.
    seeds
        Root seeds.
    """

    name: str
    fixed: Mapping[str, Scalar]
    datasets: tuple[Entry, ...]
    partitions: tuple[Entry, ...]
    attacks: tuple[Entry, ...]
    defenses: tuple[Entry, ...]
    malicious: tuple[int, ...]
    seeds: tuple[int, ...]
    description: str = ""
    _axes: Mapping[str, tuple[Entry, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_axes", {
            "dataset": self.datasets, "partition": self.partitions,
            "attack": self.attacks, "defense": self.defenses,
        })

    def axis(self, name: str) -> tuple[Entry, ...]:
        """Entries of the axis ``name`` (one of :data:`AXES`)."""
        return self._axes[name]

    def to_dict(self) -> dict[str, Any]:
        """The resolved scenario as TOML-shaped data (re-parsed by :func:`parse_scenario`)."""
        matrix: dict[str, Any] = {a: [e.to_table() for e in self.axis(a)] for a in AXES}
        matrix["malicious"] = list(self.malicious)
        matrix["seed"] = list(self.seeds)
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["fixed"] = dict(self.fixed)
        out["matrix"] = matrix
        return out

    def digest(self) -> str:
        """SHA-256 of everything that decides the results (``name`` and ``description``
        excluded)."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("name", "description")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def to_toml(self) -> str:
        """The resolved scenario as TOML text."""
        d = self.to_dict()
        lines = [f"# fedshield bench scenario, fully resolved; digest {self.digest()}"]
        lines.append(f"name = {_toml_scalar(d['name'])}")
        if "description" in d:
            lines.append(f"description = {_toml_scalar(d['description'])}")
        lines += ["", "[fixed]"]
        lines += [f"{_toml_key(k)} = {_toml_scalar(v)}" for k, v in d["fixed"].items()]
        lines += ["", "[matrix]"]
        for axis in AXES:
            lines.append(f"{axis} = [")
            for table in d["matrix"][axis]:
                inner = ", ".join(f"{_toml_key(k)} = {_toml_scalar(v)}" for k, v in table.items())
                lines.append(f"    {{{inner}}},")
            lines.append("]")
        for key in ("malicious", "seed"):
            lines.append(f"{key} = [{', '.join(str(v) for v in d['matrix'][key])}]")
        return "\n".join(lines) + "\n"

    def cells(self) -> list[Cell]:
        """Expand the matrix; see the module docstring for the rules.

        Returns
        -------
        list of Cell
            In the order dataset, partition, f, attack, defense, seed (outermost first),
            each coordinate once.

        Raises
        ------
        ValueError
            Two entries of one cell set a key to different values; an attack needs ``f``
            but ``malicious`` is empty; ``f >= n``.
        """
        out: dict[Coordinates, Cell] = {}
        f_values: Sequence[int | None] = self.malicious or (None,)
        for ds, part, f, att, dfn in itertools.product(
            self.datasets, self.partitions, f_values, self.attacks, self.defenses
        ):
            own_f = att.as_dict().get("num-malicious")
            cell_f = int(own_f) if own_f is not None else f
            if cell_f is None:
                raise ValueError(
                    f"attack {att.name!r} needs malicious clients: give "
                    "malicious = [f, ...] in [matrix] or --malicious F"
                )
            merged = _merge_entries(_CellEntries(ds, part, att, dfn))
            for seed in self.seeds:
                cfg = resolve_config(self.fixed, {**merged, "num-malicious": cell_f, "seed": seed})
                n = int(cfg["num-clients"])
                if not 0 <= cell_f < n:
                    raise ValueError(
                        f"f must be in [0, n), got f={cell_f} malicious of n={n} clients "
                        f"(attack {att.name!r}): lower 'malicious' or raise num-clients"
                    )
                coords = Coordinates(ds.name, part.name, att.name, dfn.name, n, cell_f, seed)
                out.setdefault(coords, Cell(coords, cfg))
        return list(out.values())


def _merge_entries(c: _CellEntries) -> dict[str, Scalar]:
    merged: dict[str, Scalar] = {}
    owner: dict[str, str] = {}
    for axis, entry in (("dataset", c.dataset), ("partition", c.partition),
                        ("attack", c.attack), ("defense", c.defense)):
        for key, value in entry.keys:
            if key in merged and merged[key] != value:
                raise ValueError(
                    f"{axis} entry {entry.name!r} sets {key}={value!r} but {owner[key]} sets "
                    f"{key}={merged[key]!r}: set each key in one axis (or in [fixed])"
                )
            merged[key] = value
            owner[key] = f"{axis} entry {entry.name!r}"
    return merged


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_scalar(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v == v and v not in (float("inf"), float("-inf")) else str(v).lower()
    if isinstance(v, int):
        return str(v)
    return json.dumps(v, ensure_ascii=False)


def _int_list(where: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise TypeError(f"{where} must be a list of integers, e.g. [0, 1], got {raw!r}")
    bad = [v for v in raw if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise TypeError(f"{where} must hold integers, got {bad!r}")
    if len(set(raw)) != len(raw):
        raise ValueError(f"{where} has repeated values: {raw!r}")
    return tuple(raw)


def _unknown(kind: str, keys: Iterable[str], valid: Sequence[str]) -> None:
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown {kind} {key!r}{hint}; valid: {', '.join(valid)}")


def parse_scenario(data: Mapping[str, Any], *, origin: str = "scenario") -> Scenario:
    """Build a :class:`Scenario` from TOML-shaped data; check every key and name.

    Parameters
    ----------
    data
        ``{name, description, fixed: {...}, matrix: {...}}`` (see the module docstring).
    origin
        Where the data came from, for error messages.

    Raises
    ------
    KeyError
        Unknown top-level, matrix or run-config key (with the closest valid key).
    TypeError
        A value of the wrong type.
    ValueError
        Repeated names in an axis, an empty axis, ``malicious`` with 0 or both
        ``[fixed] num-malicious`` and ``malicious``, and the errors of :func:`parse_entry`.

    Examples
    --------
    >>> s = parse_scenario({"matrix": {"defense": ["mean", "mean"]}})
    Traceback (most recent call last):
    ...
    ValueError: scenario: defense names must be unique, repeated: mean
    """
    _unknown(f"top-level key in {origin}", data, _TOP_KEYS)
    fixed_raw = dict(data.get("fixed", {}))
    matrix = dict(data.get("matrix", {}))
    _unknown(f"[matrix] key in {origin}", matrix, MATRIX_KEYS)
    nested = [k for k, v in fixed_raw.items() if isinstance(v, (dict, list))]
    if nested:
        raise ValueError(f"{origin}: [fixed] holds run-config scalars, got tables/lists {nested}")
    for key in _BENCH_OWNED:
        if key in fixed_raw:
            raise ValueError(f"{origin}: [fixed] sets {key!r}, which the bench sets per cell")
    for key, axis in (("seed", "seed"), ("num-malicious", "malicious")):
        if key in fixed_raw and axis in matrix:
            raise ValueError(
                f"{origin}: both [fixed] {key} and [matrix] {axis} are given; keep one"
            )
    base = resolve_config(fixed_raw)
    seeds = _int_list(f"{origin}: [matrix] seed", matrix.get("seed", [base["seed"]]))
    f_default = int(base["num-malicious"])
    malicious = _int_list(
        f"{origin}: [matrix] malicious",
        matrix.get("malicious", [f_default] if f_default > 0 else []),
    )
    if any(f < 1 for f in malicious):
        raise ValueError(
            f"{origin}: [matrix] malicious must hold values >= 1, got {list(malicious)}; a run "
            f"without malicious clients is the attack {NO_ATTACK!r}"
        )
    if not seeds:
        raise ValueError(f"{origin}: [matrix] seed is empty")
    axes: dict[str, tuple[Entry, ...]] = {}
    for axis in AXES:
        if axis in matrix:
            raw = matrix[axis]
            if not isinstance(raw, list) or not raw:
                raise ValueError(
                    f"{origin}: [matrix] {axis} must be a non-empty list, got {raw!r}"
                )
        elif axis == "attack":
            raw = [NO_ATTACK]
        else:
            raw = [str(base[_AXIS_DEFAULT_KEY[axis]])]
        entries = tuple(parse_entry(axis, item) for item in raw)
        names = [e.name for e in entries]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"{origin}: {axis} names must be unique, repeated: {', '.join(repeated)}"
            )
        axes[axis] = entries
    fixed = {k: v for k, v in base.items() if k not in ("seed", "num-malicious", *_BENCH_OWNED)}
    name = data.get("name", "bench")
    description = data.get("description", "")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise ValueError(f"{origin}: name must be a word of letters, digits, ._+-, got {name!r}")
    if not isinstance(description, str):
        raise TypeError(f"{origin}: description must be a string, got {description!r}")
    return Scenario(
        name, fixed, axes["dataset"], axes["partition"], axes["attack"], axes["defense"],
        malicious, seeds, description,
    )


# ---------------------------------------------------------------------------------------
# shipped scenarios and files


def shipped_scenarios() -> dict[str, str]:
    """``{name: description}`` of the scenarios shipped in ``simulations/scenarios``."""
    out: dict[str, str] = {}
    for item in sorted(resources.files("simulations.scenarios").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            data = tomllib.loads(item.read_text())
            out[item.name[: -len(".toml")]] = str(data.get("description", ""))
    return out


def read_scenario_data(ref: str) -> tuple[dict[str, Any], str]:
    """The TOML data of a scenario file or shipped scenario, and where it came from.

    Raises
    ------
    FileNotFoundError
        Neither a file nor a shipped name (the message lists the shipped ones).
    """
    path = Path(ref)
    if path.is_file():
        return tomllib.loads(path.read_text()), str(path)
    stem = ref[: -len(".toml")] if ref.endswith(".toml") else ref
    shipped = shipped_scenarios()
    if "/" not in ref and stem in shipped:
        item = resources.files("simulations.scenarios") / f"{stem}.toml"
        return tomllib.loads(item.read_text()), f"shipped scenario {stem!r}"
    close = difflib.get_close_matches(stem, list(shipped), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise FileNotFoundError(
        f"no scenario file {ref!r} and no shipped scenario of that name{hint}; shipped: "
        f"{', '.join(shipped)}"
    )


def load_scenario(ref: str | os.PathLike[str]) -> Scenario:
    """Load a scenario from a TOML path or the name of a shipped scenario (``"quick"``).

    Raises
    ------
    FileNotFoundError
        Neither a file nor a shipped name (the message lists the shipped ones).
    """
    data, origin = read_scenario_data(str(ref))
    return parse_scenario(data, origin=origin)


# ---------------------------------------------------------------------------------------
# validation before running


def check_cells(cells: Sequence[Cell]) -> None:
    """Fail fast, before any cell runs, on settings the runs would reject: every cell's
    config is parsed (:meth:`runconfig.config.RunConfig.from_flat`) and every component it
    names is checked against its registry (:func:`simulations.engine.check_names`).

    Raises
    ------
    KeyError
        An unknown registered name (with the closest valid one).
    FileNotFoundError
        An ``npz:PATH`` dataset whose file does not exist.
    TypeError, ValueError
        Bad parameters or contradicting settings; the message names the cell.
    """
    from .engine import ENGINE_KEYS, check_engine_keys, check_names

    for cell in cells:
        flat = {k: v for k, v in cell.config.items() if k not in ENGINE_KEYS}
        try:
            check_engine_keys(cell.config)
            check_names(RunConfig.from_flat(flat))
        except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            raise type(exc)(f"cell {cell.coords.label()!r}: {message}") from exc
