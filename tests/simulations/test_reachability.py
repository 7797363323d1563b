"""Every registered attack and defense can be named in a run config and in a bench scenario.

For each name in the registries (client-side update and data attacks, omniscient attacks,
evasion attacks, aggregation rules, pre-aggregation steps) a run config naming it passes
:func:`simulations.engine.validate` and builds the object the run would use (the server's
aggregator, the simulation adversary, the client's poisoning); the same name written as a
bench scenario entry parses to run-config keys that do the same. A component registered
tomorrow is in these lists the moment it is registered. No training runs here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

import aggregation
from aggregation.registry import make_generator
from client.malicious import MaliciousRole, data_attack_params, is_client_side_attack
from client.poisoning import DATA_ATTACKS, UPDATE_POISONINGS
from runconfig.config import APP_KEYS, RunConfig, Scalar
from runconfig.spec import Spec, format_params
from server.run import build_rule
from simulations.adversary import all_attack_names, build_adversary
from simulations.attacks import ATTACKS
from simulations.audit.evasion import EVASION_ATTACKS
from simulations.engine import validate
from simulations.scenario import parse_entry  # the bench's entry parser

# 20 clients: enough for every rule with f=3 (Bulyan needs n >= 4f + 3 = 15), which the
# engine now checks before round 1
NUM_CLIENTS, NUM_MALICIOUS = 20, 3

# Values for hyperparameters that have no default. The run config gives rules and steps
# ``f`` (= num-malicious), so it needs no value here. A component with another required
# hyperparameter fails loudly until a value is added.
REQUIRED: dict[str, Any] = {"tau": 1.0, "max_norm": 5.0, "eps": 0.1}
FILLED_BY_RUN_CONFIG = frozenset({"f"})


def _required(kind: str, name: str, factory: Callable[..., Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for p in inspect.signature(factory).parameters.values():
        if p.default is not inspect.Parameter.empty or p.name in FILLED_BY_RUN_CONFIG:
            continue
        if p.name not in REQUIRED:
            pytest.fail(f"{kind} {name!r} requires {p.name!r}: add a value to REQUIRED in "
                        "tests/simulations/test_reachability.py")
        params[p.name] = REQUIRED[p.name]
    return params


def _spec(kind: str, name: str, factory: Callable[..., Any]) -> Spec:
    return Spec(name, _required(kind, name, factory))


def _config(keys: Mapping[str, Scalar]) -> dict[str, Scalar]:
    return {**APP_KEYS, **keys}


def _validated(flat: Mapping[str, Scalar]) -> RunConfig:
    return validate(flat, NUM_CLIENTS)


CLIENT_ATTACKS = sorted({*UPDATE_POISONINGS, *DATA_ATTACKS})
OMNISCIENT_ATTACKS = ATTACKS.names()


def _attack_factory(name: str) -> Callable[..., Any]:
    for registry in (UPDATE_POISONINGS, DATA_ATTACKS, ATTACKS):
        if name in registry:
            factory: Callable[..., Any] = registry.get(name)
            return factory
    raise AssertionError(f"{name!r} is in no attack registry")


def test_attack_names_are_one_namespace() -> None:
    """The client and simulation attack registries share no name, and the adversary knows
    every one of them (nothing is shadowed)."""
    assert set(CLIENT_ATTACKS) & set(OMNISCIENT_ATTACKS) == set()
    assert set(UPDATE_POISONINGS) & set(DATA_ATTACKS) == set()
    assert sorted(all_attack_names()) == sorted([*CLIENT_ATTACKS, *OMNISCIENT_ATTACKS])


def _check_attack_config(name: str, flat: Mapping[str, Scalar]) -> None:
    cfg = _validated(flat)
    assert cfg.attack.name == name and cfg.num_malicious == NUM_MALICIOUS
    adversary = build_adversary(cfg)
    assert adversary is not None and adversary.attack_name == name
    if name in ATTACKS:
        assert not is_client_side_attack(name)
        assert adversary.attack is not None and adversary.attack.name == name
        assert (adversary.aggregator is not None) == adversary.attack.needs_aggregator
        return
    assert is_client_side_attack(name) and adversary.attack is None
    role = MaliciousRole(cfg.attack.name, cfg.attack.params)
    update = torch.ones(4)
    sent = role.poison_update(update, 1, generator=make_generator(0))
    if name in UPDATE_POISONINGS:  # the client itself replaces its update
        assert not torch.equal(sent, update)
    else:  # a data attack: the update goes out as trained, the data was poisoned
        assert sent is update
        assert set(data_attack_params(name, cfg.attack.params)) == set(
            inspect.signature(DATA_ATTACKS.get(name)).parameters)


@pytest.mark.parametrize("name", [*CLIENT_ATTACKS, *OMNISCIENT_ATTACKS])
def test_every_attack_is_reachable_from_a_run_config(name: str) -> None:
    spec = _spec("attack", name, _attack_factory(name))
    _check_attack_config(name, _config({
        "num-malicious": NUM_MALICIOUS, "attack": name, "attack-params": format_params(spec.params),
    }))


@pytest.mark.parametrize("name", [*CLIENT_ATTACKS, *OMNISCIENT_ATTACKS])
def test_every_attack_is_reachable_from_a_bench_scenario(name: str) -> None:
    entry = parse_entry("attack", str(_spec("attack", name, _attack_factory(name))))
    keys = entry.as_dict()
    assert keys["attack"] == name
    _check_attack_config(name, _config({"num-malicious": NUM_MALICIOUS, **keys}))


@pytest.mark.parametrize("name", EVASION_ATTACKS.names())
def test_every_evasion_attack_is_reachable_from_a_run_config(name: str) -> None:
    spec = _spec("evasion attack", name, EVASION_ATTACKS.get(name))
    cfg = _validated(_config({"eval-evasion": str(spec)}))
    assert [s.name for s in cfg.eval_evasion] == [name]
    adversary = build_adversary(cfg)
    assert adversary is not None and len(adversary.evaluators) == 1


def _defense_specs(rule: str | None, step: str | None) -> tuple[Spec, list[Spec]]:
    if rule is None:
        rule = "mean"
    rule_spec = _spec("aggregator", rule, aggregation.RULES.get(rule))
    steps = [] if step is None else [
        _spec("pre-aggregator", step, aggregation.PRE_AGGREGATORS.get(step))]
    return rule_spec, steps


DEFENSES = [(r, None) for r in aggregation.names()] + [(None, s) for s in aggregation.pre_names()]
DEFENSE_IDS = [r or f"mean+{s}" for r, s in DEFENSES]


def _root(rule: str | None) -> dict[str, Scalar]:
    """A root dataset for the rules that weigh updates against the server's root update."""
    needs = rule is not None and "reference" in inspect.signature(
        aggregation.RULES.get(rule).fn).parameters
    return {"root-dataset": "held-out(size=100)"} if needs else {}


def _check_defense_config(flat: Mapping[str, Scalar], expected: str) -> None:
    cfg = _validated(flat)
    agg = build_rule(cfg)
    assert agg.name == expected


@pytest.mark.parametrize(("rule", "step"), DEFENSES, ids=DEFENSE_IDS)
def test_every_defense_is_reachable_from_a_run_config(rule: str | None, step: str | None) -> None:
    rule_spec, steps = _defense_specs(rule, step)
    flat = _config({
        "num-malicious": NUM_MALICIOUS,
        "aggregator": rule_spec.name,
        "aggregator-params": format_params(rule_spec.params),
        "pre-aggregation": "; ".join(str(s) for s in steps),
        **_root(rule),
    })
    _check_defense_config(flat, "+".join([rule_spec.name, *(s.name for s in steps)]))


@pytest.mark.parametrize(("rule", "step"), DEFENSES, ids=DEFENSE_IDS)
def test_every_defense_is_reachable_from_a_bench_scenario(rule: str | None,
                                                          step: str | None) -> None:
    rule_spec, steps = _defense_specs(rule, step)
    text = "+".join(str(s) for s in [rule_spec, *steps])  # the bench writes rule+step
    keys = parse_entry("defense", text).as_dict()
    assert keys["aggregator"] == rule_spec.name
    _check_defense_config(_config({"num-malicious": NUM_MALICIOUS, **keys, **_root(rule)}),
                          "+".join([rule_spec.name, *(s.name for s in steps)]))


def test_a_name_in_no_registry_is_refused_by_validate() -> None:
    with pytest.raises(KeyError, match="did you mean 'sign_flip_mean'"):
        _validated(_config({"num-malicious": NUM_MALICIOUS, "attack": "sign_flip_men"}))
