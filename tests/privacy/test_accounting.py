"""Accounting: library values, the identities of composition, and the state round trip."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import gdp as gdp_analysis
from opacus.accountants.analysis import rdp as rdp_analysis

from privacy import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    PrivacyAccountant,
    epsilon_from_history,
    history_from_json,
    history_to_json,
    merge_history,
    noise_multiplier_for_epsilon,
)

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the", "ignore:GDP accounting")

Event = tuple[float, float, int]


def rdp_reference(history: list[Event], delta: float) -> float:
    """Epsilon straight from Opacus's RDP analysis over its default orders."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=s, orders=orders)
        for z, q, s in history
    )
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def prv_reference(history: list[Event], delta: float) -> float:
    acc = PRVAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def gdp_reference(z: float, q: float, steps: int, delta: float) -> float:
    return float(gdp_analysis.compute_eps_poisson(steps=steps, noise_multiplier=z,
                                                  sample_rate=q, delta=delta))


# --- the default and the reference values ---------------------------------------------------


def test_the_one_default_is_rdp() -> None:
    assert DEFAULT_ACCOUNTANT == "rdp" and ACCOUNTANTS == ("rdp", "prv", "gdp")
    assert PrivacyAccountant().accountant == "rdp"


def test_flower_notes_reference_values() -> None:
    # N = 100 clients, 10 per round (Poisson, q = 0.1), z = 1, 100 rounds, delta = 1e-3
    history = [(1.0, 0.1, 100)]
    assert epsilon_from_history(history, 1e-3, "rdp") == pytest.approx(5.64, abs=0.005)
    # PRV's upper bound carries eps_error = 0.01: 4.795 here
    assert epsilon_from_history(history, 1e-3, "prv") == pytest.approx(4.80, abs=0.01)


# --- library values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "q", "steps", "delta"),
    [(1.0, 0.1, 100, 1e-3), (0.8, 0.01, 1000, 1e-5), (2.0, 1.0, 10, 1e-5),
     (1.3, 0.05, 37, 1e-6)],
)
def test_rdp_epsilon_equals_opacus_analysis(z: float, q: float, steps: int, delta: float) -> None:
    acc = PrivacyAccountant("rdp")
    for _ in range(steps):
        acc.step(z, q)
    assert acc.history == [(z, q, steps)]
    assert acc.epsilon(delta) == pytest.approx(rdp_reference([(z, q, steps)], delta), abs=1e-9)


def test_heterogeneous_history_equals_library() -> None:
    history = [(1.0, 0.1, 50), (1.5, 0.2, 20), (0.9, 0.05, 10)]
    assert PrivacyAccountant("rdp", history).epsilon(1e-5) == pytest.approx(
        rdp_reference(history, 1e-5), abs=1e-9)
    assert PrivacyAccountant("prv", history).epsilon(1e-5) == pytest.approx(
        prv_reference(history, 1e-5), abs=1e-9)


@pytest.mark.parametrize(("z", "q", "steps"), [(1.0, 0.1, 100), (0.9, 0.02, 400)])
def test_gdp_equals_opacus_clt_and_sits_below_prv(z: float, q: float, steps: int) -> None:
    eps = epsilon_from_history([(z, q, steps)], 1e-5, "gdp")
    assert eps == pytest.approx(gdp_reference(z, q, steps, 1e-5), abs=1e-9)
    # the documented caveat: the CLT approximation reads below PRV's upper bound
    assert eps < prv_reference([(z, q, steps)], 1e-5)


def test_gdp_refuses_what_it_cannot_compose() -> None:
    with pytest.raises(ValueError, match="identical steps only"):
        epsilon_from_history([(1.0, 0.1, 5), (1.2, 0.1, 5)], 1e-5, "gdp")
    acc = PrivacyAccountant("gdp", [(1.0, 0.1, 5)])
    with pytest.raises(ValueError, match="rdp"):
        acc.step(1.0, 0.2)
    assert acc.history == [(1.0, 0.1, 5)]  # nothing was booked
    # identical events split by idle ones are one composition
    split = [(1.0, 0.1, 5), (3.0, 0.0, 2), (1.0, 0.1, 5)]
    assert epsilon_from_history(split, 1e-5, "gdp") == epsilon_from_history(
        [(1.0, 0.1, 10)], 1e-5, "gdp")


# --- identities -----------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_sampling_rate_zero_gives_zero_epsilon(accountant: str) -> None:
    assert epsilon_from_history([(1.0, 0.0, 1000)], 1e-5, accountant) == 0.0
    assert epsilon_from_history([(0.0, 0.0, 5)], 1e-5, accountant) == 0.0
    assert epsilon_from_history([], 1e-5, accountant) == 0.0
    assert not PrivacyAccountant(accountant).would_exceed(0.0, 0.0, 1e-5, 1e-9)  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_zero_noise_gives_infinite_epsilon(accountant: str) -> None:
    assert epsilon_from_history([(0.0, 0.1, 1)], 1e-5, accountant) == math.inf
    assert PrivacyAccountant(accountant).would_exceed(0.0, 0.1, 1e-5, 1e9)  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_composing_the_same_event_six_ways_gives_one_answer(accountant: str) -> None:
    z, q, total, delta = 1.1, 0.05, 120, 1e-5
    one = epsilon_from_history([(z, q, total)], delta, accountant)
    stepwise = PrivacyAccountant(accountant)  # type: ignore[arg-type]
    for _ in range(total):
        stepwise.step(z, q)
    at_once = PrivacyAccountant(accountant)  # type: ignore[arg-type]
    at_once.step(z, q, steps=total)
    chunks = [(z, q, 1)] * 4 + [(z, q, 30), (z, q, 86)]
    idle = [(z, q, 60), (z, 0.0, 25), (2.0, 0.0, 1), (z, q, 60)]
    first = PrivacyAccountant(accountant, [(z, q, 45)])  # type: ignore[arg-type]
    restored = PrivacyAccountant.from_json(json.dumps(json.loads(first.to_json())))
    restored.step(z, q, steps=total - 45)
    ways = [
        stepwise.epsilon(delta),
        at_once.epsilon(delta),
        epsilon_from_history(chunks, delta, accountant),
        epsilon_from_history(idle, delta, accountant),
        restored.epsilon(delta),
        epsilon_from_history(history_from_json(history_to_json(chunks)), delta, accountant),
    ]
    assert ways == [one] * 6
    assert one > 0


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_epsilon_is_monotone_in_steps(accountant: str) -> None:
    eps = [epsilon_from_history([(1.0, 0.1, t)], 1e-5, accountant) for t in (1, 5, 20, 80, 320)]
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False)), eps


def test_epsilon_is_monotone_in_noise_rate_and_delta() -> None:
    def eps(z: float, q: float, delta: float = 1e-5) -> float:
        return epsilon_from_history([(z, q, 20)], delta)

    assert eps(2.0, 0.1) < eps(1.0, 0.1) < eps(0.7, 0.1)
    assert eps(1.0, 0.01) < eps(1.0, 0.1) < eps(1.0, 1.0)
    assert eps(1.0, 0.1, 1e-3) < eps(1.0, 0.1, 1e-5) < eps(1.0, 0.1, 1e-7)


def test_rdp_composition_is_additive_across_different_events() -> None:
    a, b = (1.0, 0.1, 40), (2.0, 0.3, 7)
    assert epsilon_from_history([a, b, a], 1e-5) == pytest.approx(
        rdp_reference([a, b, a], 1e-5), abs=1e-9)
    assert epsilon_from_history([a, b, a], 1e-5) == pytest.approx(
        epsilon_from_history([b, (1.0, 0.1, 80)], 1e-5), rel=1e-12)


def test_would_exceed_is_epsilon_of_the_planned_history() -> None:
    acc = PrivacyAccountant("rdp", [(1.0, 0.1, 50)])
    after = epsilon_from_history([(1.0, 0.1, 53)], 1e-5)
    assert acc.planned(1.0, 0.1, 3) == [(1.0, 0.1, 53)]
    assert acc.would_exceed(1.0, 0.1, 1e-5, after - 1e-9, steps=3)
    assert not acc.would_exceed(1.0, 0.1, 1e-5, after + 1e-9, steps=3)
    assert acc.history == [(1.0, 0.1, 50)]  # asking does not book
    with pytest.raises(ValueError, match="max_epsilon"):
        acc.would_exceed(1.0, 0.1, 1e-5, 0.0)


def test_noise_for_a_target_reaches_it_within_tolerance() -> None:
    q, steps, target = 0.1, 100, 3.0
    z = noise_multiplier_for_epsilon(target, 1e-5, q, steps)
    spent = epsilon_from_history([(z, q, steps)], 1e-5)
    assert target - 0.01 <= spent <= target
    assert epsilon_from_history([(z * 0.99, q, steps)], 1e-5) > spent
    with pytest.raises(ValueError, match="sample_rate must be > 0"):
        noise_multiplier_for_epsilon(target, 1e-5, 0.0, steps)


# --- the state: history, merge, dict and JSON round trip ---------------------------------------


def test_merge_joins_consecutive_equal_events_only() -> None:
    assert merge_history([(1.0, 0.1, 2), (1, 0.1, 3), (2.0, 0.1, 1), (1.0, 0.1, 1)]) == [
        (1.0, 0.1, 5), (2.0, 0.1, 1), (1.0, 0.1, 1)]
    assert merge_history([]) == []


def test_state_round_trips_through_dict_and_json_exactly() -> None:
    history = [(1 / 3, 0.1 + 0.2, 7), (math.pi, 1e-300, 1), (0.7, 1.0, 12345)]
    acc = PrivacyAccountant("prv", history)
    data = acc.to_dict()
    assert data == {"accountant": "prv", "history": [list(e) for e in history]}
    for back in (PrivacyAccountant.from_dict(data),
                 PrivacyAccountant.from_dict(json.loads(json.dumps(data))),
                 PrivacyAccountant.from_json(acc.to_json())):
        assert back.accountant == "prv" and back.history == history
        assert back.to_json() == acc.to_json()
    assert history_from_json(history_to_json(history)) == history
    assert history_from_json("") == []


def test_save_restore_equals_uninterrupted() -> None:
    schedule = [(1.0, 0.1)] * 30 + [(1.2, 0.1)] * 5 + [(1.0, 0.1)] * 15
    whole = PrivacyAccountant()
    for z, q in schedule:
        whole.step(z, q)
    first = PrivacyAccountant()
    for z, q in schedule[:20]:
        first.step(z, q)
    restored = PrivacyAccountant.from_json(first.to_json())
    for z, q in schedule[20:]:
        restored.step(z, q)
    assert restored.history == whole.history == [(1.0, 0.1, 30), (1.2, 0.1, 5), (1.0, 0.1, 15)]
    assert restored.steps == 50
    assert restored.epsilon(1e-5) == whole.epsilon(1e-5)


@pytest.mark.parametrize("event", [(-1.0, 0.1, 1), (1.0, 1.5, 1), (1.0, 0.1, 0),
                                   (float("nan"), 0.1, 1), (1.0, 0.1, 2.5), (True, 0.1, 1)])
def test_accountant_rejects_malformed_events(event: Event) -> None:
    with pytest.raises(ValueError):
        PrivacyAccountant().step(*event)
    with pytest.raises(ValueError):
        PrivacyAccountant("rdp", [event])
    with pytest.raises(ValueError):
        history_to_json([event])


def test_accountant_rejects_bad_state_and_names() -> None:
    with pytest.raises(ValueError, match="unknown accountant 'pld'; valid: rdp, prv, gdp"):
        PrivacyAccountant("pld")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown accountant"):
        epsilon_from_history([(1.0, 0.1, 1)], 1e-5, "moments")
    with pytest.raises(ValueError, match="exactly the keys"):
        PrivacyAccountant.from_dict({"accountant": "rdp", "history": [], "extra": 1})
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant("rdp", [(1.0, 0.1, 1)]).epsilon(0.0)
    with pytest.raises(ValueError, match="list of"):
        history_from_json('{"z": 1}')
    with pytest.raises(ValueError, match="sample_rate"):
        history_from_json("[[1.0, 2.0, 3]]")
    with pytest.raises(ValueError, match="noise_multiplier, sample_rate, steps"):
        history_from_json("[[1.0, 0.5]]")
