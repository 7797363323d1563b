"""The bench's scenario language: matrix expansion, shorthands in the one spec grammar,
scenario checks, TOML round trip and the shipped scenarios."""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from simulations.config import DEFAULTS
from simulations.scenario import (
    check_cells,
    load_scenario,
    parse_entry,
    parse_scenario,
    shipped_scenarios,
)

MATRIX: dict[str, Any] = {
    "name": "unit",
    "fixed": {"num-clients": 10, "num-server-rounds": 3},
    "matrix": {
        "dataset": ["digits", {"name": "syn", "dataset": "synthetic", "model": "logreg"}],
        "partition": ["iid", "dirichlet(alpha=0.5)"],
        "attack": ["none", "alie", "ipm(epsilon=10.0)"],
        "defense": ["mean", "krum+bucketing(s=2)",
                    {"name": "cclip", "aggregator": "centered_clipping",
                     "aggregator-params": "tau=1.0"}],
        "malicious": [2, 3],
        "seed": [0, 1],
    },
}


# ---------------------------------------------------------------------------------------
# matrix expansion


def test_expansion_counts_and_none_is_not_multiplied_by_f() -> None:
    cells = parse_scenario(MATRIX).cells()
    d, p, defenses, seeds, fs, attacked = 2, 2, 3, 2, 2, 2
    assert len(cells) == d * p * defenses * seeds * (1 + attacked * fs)
    by_attack = Counter(c.coords.attack for c in cells)
    assert by_attack == {"none": d * p * defenses * seeds, "alie": d * p * defenses * seeds * fs,
                         "ipm(epsilon=10.0)": d * p * defenses * seeds * fs}
    assert {c.coords.f for c in cells if c.coords.attack == "none"} == {0}
    assert {c.coords.f for c in cells if c.coords.attack == "alie"} == {2, 3}
    assert len({c.cell_id for c in cells}) == len(cells)
    assert len({c.coords for c in cells}) == len(cells)
    for c in cells:
        cfg = c.config
        assert cfg["num-malicious"] == c.coords.f and cfg["seed"] == c.coords.seed
        assert cfg["num-clients"] == c.coords.n == 10 and cfg["num-server-rounds"] == 3
        assert set(cfg) == set(DEFAULTS)


def test_cell_configs_take_every_entry_key() -> None:
    cells = parse_scenario(MATRIX).cells()
    cell = next(
        c for c in cells
        if (c.coords.dataset, c.coords.partition, c.coords.attack, c.coords.defense, c.coords.f)
        == ("syn", "dirichlet(alpha=0.5)", "ipm(epsilon=10.0)", "krum+bucketing(s=2)", 3)
    )
    want = {"dataset": "synthetic", "model": "logreg", "partitioner": "dirichlet",
            "partitioner-params": "alpha=0.5", "attack": "ipm", "attack-params": "epsilon=10.0",
            "aggregator": "krum", "aggregator-params": "", "pre-aggregation": "bucketing(s=2)"}
    assert {k: cell.config[k] for k in want} == want
    cclip = next(c for c in cells if c.coords.defense == "cclip")
    assert cclip.config["aggregator"] == "centered_clipping"
    assert cclip.config["aggregator-params"] == "tau=1.0"


def test_cell_id_is_a_function_of_the_config() -> None:
    a = parse_scenario(MATRIX).cells()
    b = parse_scenario(MATRIX).cells()
    assert [c.cell_id for c in a] == [c.cell_id for c in b]
    changed = json.loads(json.dumps(MATRIX))
    changed["fixed"]["learning-rate"] = 0.1
    c = parse_scenario(changed).cells()
    assert all(x.cell_id != y.cell_id for x, y in zip(a, c, strict=True))
    assert all(x.cell_id.rsplit("-", 1)[0] == y.cell_id.rsplit("-", 1)[0]
               for x, y in zip(a, c, strict=True))  # same readable slug


def test_attack_entry_with_its_own_f_runs_once() -> None:
    s = parse_scenario({"matrix": {
        "attack": ["alie", {"name": "alie5", "attack": "alie", "num-malicious": 4}],
        "malicious": [1, 2, 3],
    }})
    fs = Counter((c.coords.attack, c.coords.f) for c in s.cells())
    assert fs == {("alie", 1): 1, ("alie", 2): 1, ("alie", 3): 1, ("alie5", 4): 1}


def test_missing_axes_come_from_fixed_keys() -> None:
    s = parse_scenario({"fixed": {"aggregator": "median", "seed": 5, "num-malicious": 2,
                                  "attack": "gaussian"}})
    (cell,) = s.cells()
    assert (cell.coords.dataset, cell.coords.partition, cell.coords.attack,
            cell.coords.defense, cell.coords.f, cell.coords.seed) == (
        "digits", "iid", "none", "median", 0, 5)
    assert s.malicious == (2,)


def test_shorthands() -> None:
    d = parse_entry("defense", "krum(f=2)+bucketing(s=2)+norm_clip(max_norm=5)")
    assert d.name == "krum(f=2)+bucketing(s=2)+norm_clip(max_norm=5)"
    assert d.as_dict() == {"aggregator": "krum", "aggregator-params": "f=2",
                           "pre-aggregation": "bucketing(s=2); norm_clip(max_norm=5)"}
    assert parse_entry("dataset", "npz:/data/x/mnist.npz").to_table() == {
        "name": "npz:mnist", "dataset": "npz:/data/x/mnist.npz"}
    assert parse_entry("attack", "none").as_dict() == {"num-malicious": 0}
    assert parse_entry("partition", "shards(shards_per_client=1)").as_dict() == {
        "partitioner": "shards", "partitioner-params": "shards_per_client=1"}


def test_shorthand_parameters_are_stored_in_canonical_form() -> None:
    # the one grammar of runconfig.spec: spacing and spelling do not change the run config
    a = parse_entry("defense", "krum( f = 2 ) + bucketing(s=2)")
    b = parse_entry("defense", "krum(f=2)+bucketing(s=2)")
    assert a.name != b.name and a.keys == b.keys
    assert parse_entry("attack", "ipm(epsilon=1e-1)").as_dict() == {
        "attack": "ipm", "attack-params": "epsilon=0.1"}
    assert parse_entry("attack", "label_flip(mode=reverse)").as_dict()["attack-params"] == (
        "mode='reverse'")
    assert parse_entry("partition", "dirichlet(alpha=0.5, min_size=2)").as_dict()[
        "partitioner-params"] == "alpha=0.5, min_size=2"


@pytest.mark.parametrize(
    ("axis", "text", "match"),
    [
        ("attack", "ipm(epsilon)", "cannot parse"),
        ("attack", "ipm(epsilon=1, epsilon=2)", "twice"),
        ("partition", "dirichlet(alpha=0.5", "cannot parse"),
        ("defense", "krum++bucketing(s=2)", "empty item"),
        ("defense", "krum+bucketing(s=2", "unbalanced"),
        ("defense", "krum+(s=2)", "cannot parse pre-aggregation step"),
    ],
)
def test_malformed_shorthands_are_refused(axis: str, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_entry(axis, text)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"matrix": {"defense": ["mean", {"name": "mean", "aggregator": "median"}]}},
         ValueError, "defense names must be unique, repeated: mean"),
        ({"fixed": {"num-client": 3}}, KeyError, "did you mean 'num-clients'"),
        ({"matrix": {"attacks": ["alie"]}}, KeyError, "did you mean 'attack'"),
        ({"matrics": {}}, KeyError, "did you mean 'matrix'"),
        ({"matrix": {"defense": [{"name": "x", "agregator": "krum"}]}}, KeyError,
         "did you mean 'aggregator'"),
        ({"matrix": {"defense": [{"aggregator": "krum"}]}}, ValueError, "needs a non-empty"),
        ({"matrix": {"defense": [{"name": "x", "num-malicious": 2}]}}, ValueError,
         "only attack entries"),
        ({"matrix": {"attack": [{"name": "a", "attack": "alie", "seed": 1}]}}, ValueError,
         "seed"),
        ({"matrix": {"attack": [{"name": "none", "num-malicious": 2}]}}, ValueError,
         "num-malicious=0"),
        ({"matrix": {"malicious": [0, 2]}}, ValueError, "values >= 1"),
        ({"matrix": {"seed": [0, 0]}}, ValueError, "repeated"),
        ({"matrix": {"seed": 0}}, TypeError, "list of integers"),
        ({"fixed": {"seed": 1}, "matrix": {"seed": [0]}}, ValueError, "keep one"),
        ({"fixed": {"out-dir": "x"}}, ValueError, "sets per cell"),
        ({"fixed": {"num-clients": "ten"}}, TypeError, "must be int"),
        ({"matrix": {"attack": ["alie"]}}, ValueError, "needs malicious clients"),
        ({"matrix": {"attack": ["alie"], "malicious": [10]}}, ValueError, "f must be in"),
        ({"matrix": {"dataset": [{"name": "a", "model": "cnn"}],
                     "defense": [{"name": "b", "model": "mlp"}]}},
         ValueError, "sets model='mlp' but dataset entry 'a' sets model='cnn'"),
    ],
)
def test_bad_scenarios_are_refused(change: dict[str, Any], error: type[Exception],
                                   match: str) -> None:
    with pytest.raises(error, match=match):
        parse_scenario(change).cells()


def test_check_cells_refuses_unknown_names_and_missing_files(tmp_path: Path) -> None:
    for matrix, error, match in [
        ({"defense": ["krun"]}, KeyError, "did you mean 'krum'"),
        ({"defense": ["krum(g=1)"]}, TypeError, "unknown parameter"),
        ({"defense": ["mean+buckets(s=2)"]}, KeyError, "did you mean 'bucketing'"),
        ({"attack": ["alee"], "malicious": [2]}, KeyError, "did you mean 'alie'"),
        ({"partition": ["dirichlet2"]}, KeyError, "did you mean 'dirichlet'"),
        ({"dataset": [f"npz:{tmp_path}/missing.npz"]}, FileNotFoundError, "missing.npz"),
    ]:
        with pytest.raises(error, match=match):
            check_cells(parse_scenario({"matrix": matrix}).cells())


def test_resolved_scenario_round_trips_through_toml() -> None:
    s = parse_scenario(MATRIX)
    again = parse_scenario(tomllib.loads(s.to_toml()))
    assert again == s and again.digest() == s.digest()
    assert [c.cell_id for c in again.cells()] == [c.cell_id for c in s.cells()]
    renamed = parse_scenario({**MATRIX, "name": "other"})
    assert renamed.digest() == s.digest()  # the name does not change results


def test_every_shipped_scenario_loads_and_its_names_are_registered() -> None:
    shipped = shipped_scenarios()
    assert {"quick", "bucketing-mnist"} <= set(shipped)
    for name, description in shipped.items():
        assert description, f"scenario {name} has no description"
        s = load_scenario(name)
        assert s.name == name
        check_cells(s.cells())
    quick = load_scenario("quick").cells()
    assert len(quick) == 24  # 4 defenses x (none + 5 attacks x one f) x one seed
    assert {c.config["dataset"] for c in quick} == {"digits"}
    with pytest.raises(FileNotFoundError, match="did you mean 'quick'"):
        load_scenario("quik")


def test_bucketing_mnist_follows_the_paper_setup() -> None:
    s = load_scenario("bucketing-mnist")
    cells = s.cells()
    assert {(c.coords.n, c.coords.f) for c in cells if c.coords.attack != "none"} == {(25, 5)}
    assert {c.config["partitioner"] for c in cells} == {"shards"}
    rules = {e.as_dict()["aggregator"] for e in s.defenses}
    assert {"krum", "centered_clipping", "geometric_median", "trimmed_mean", "median"} <= rules
    for rule in rules:  # each rule with and without bucketing(s=2)
        pre = sorted(str(e.as_dict().get("pre-aggregation", "")) for e in s.defenses
                     if e.as_dict()["aggregator"] == rule)
        assert pre == ["", "bucketing(s=2)"], rule
    attacks = {str(e.as_dict().get("attack", "")) for e in s.attacks}
    assert {"alie", "ipm", "label_flip"} <= attacks
    assert attacks & {"sign_flip", "bit_flip"}



def test_later_keys_at_their_old_value_keep_the_cell_ids_of_configs_without_them() -> None:
    import dataclasses
    import hashlib

    cell = parse_scenario(MATRIX).cells()[0]
    assert cell.config["reference"] == "none"
    assert cell.config["batch-order"] == "generator"
    # the id of the same config as it was before the keys existed
    before = {k: v for k, v in cell.config.items()
              if k not in ("out-dir", "reference", "batch-order")}
    blob = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert cell.config_hash == hashlib.sha256(blob.encode()).hexdigest()
    honest = dataclasses.replace(cell, config={**cell.config, "reference": "honest-only"})
    assert honest.config_hash != cell.config_hash
    hashed = dataclasses.replace(cell, config={**cell.config, "batch-order": "hashed"})
    assert hashed.config_hash != cell.config_hash


def test_a_bad_reference_is_refused_before_any_cell_runs() -> None:
    bad = json.loads(json.dumps(MATRIX))
    bad["fixed"]["reference"] = "oracle"
    with pytest.raises(ValueError, match="cell .*reference must be one of none, honest-only"):
        check_cells(parse_scenario(bad).cells())
