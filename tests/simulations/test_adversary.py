"""The simulation adversary: crafted updates replace exactly the malicious rows."""

from __future__ import annotations

import pytest
import torch

import aggregation
from client.malicious import malicious_partitions
from runconfig.config import RunConfig
from server.rounds import ClientReply
from simulations.adversary import all_attack_names, build_adversary
from simulations.attacks import alie, alie_z_max, get_attack
from simulations.config import resolve_config
from simulations.engine import ENGINE_KEYS


def _replies(n: int) -> list[ClientReply]:
    return [
        ClientReply(100 + i, {}, 1.0, partition_id=i, metrics={"num-partitions": n})
        for i in range(n)
    ]


def _adv(*overrides: str):  # type: ignore[no-untyped-def]
    flat = resolve_config(None, ["num-clients=10", *overrides])
    return build_adversary(RunConfig.from_flat({k: v for k, v in flat.items() if k not in ENGINE_KEYS}))


def _mount(adv, server_round: int, updates: torch.Tensor, replies: list[ClientReply]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out, failure = adv.mount(server_round, updates, replies)
    assert failure is None, failure
    return out


def test_no_malicious_no_adversary() -> None:
    assert _adv("num-malicious=0", "attack=alie") is None


def test_alie_replaces_exactly_the_malicious_rows_with_mean_minus_z_std() -> None:
    adv = _adv("num-malicious=3", "attack=alie", "seed=4")
    assert adv is not None
    updates = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = _mount(adv, 1, updates, _replies(10))
    bad = sorted(malicious_partitions(10, 3, 4))
    honest = [i for i in range(10) if i not in bad]
    torch.testing.assert_close(out[honest], updates[honest])
    mu, sd = updates[honest].mean(0), updates[honest].std(0)
    z = alie_z_max(10, 3)
    for i in bad:
        torch.testing.assert_close(out[i], mu - z * sd)
    torch.testing.assert_close(
        out[bad], alie(updates[honest], f=3), msg="agrees with the attack function"
    )


def test_own_data_knowledge_uses_only_the_attackers_updates() -> None:
    adv = _adv("num-malicious=3", "attack=ipm", "attack-params=epsilon=2.0", "attack-knowledge=own-data")
    assert adv is not None
    updates = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bad = sorted(malicious_partitions(10, 3, 0))
    out = _mount(adv, 1, updates, _replies(10))
    for i in bad:
        torch.testing.assert_close(out[i], -2.0 * updates[bad].mean(0))


def test_attack_waits_for_start_round() -> None:
    late = _adv("num-malicious=3", "attack=alie", "attack-start-round=3")
    now = _adv("num-malicious=3", "attack=alie")
    assert late is not None and now is not None
    updates = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    replies = _replies(10)
    assert not torch.equal(_mount(now, 1, updates, replies), updates)  # it does mount
    for server_round in (1, 2):
        assert torch.equal(_mount(late, server_round, updates, replies), updates)
    for server_round in (3, 4):  # from the start round on, the same attack as from round 1
        assert torch.equal(
            _mount(late, server_round, updates, replies),
            _mount(now, server_round, updates, replies),
        )


def test_detection_scores_from_a_round_report() -> None:
    adv = _adv("num-malicious=3", "attack=alie")
    assert adv is not None
    bad = sorted(malicious_partitions(10, 3, 0))
    good = [i for i in range(10) if i not in bad]
    report = {
        "round": 1,
        "num_partitions": 10,
        "skipped": False,
        "participants": [{"partition_id": i} for i in range(10)],
        # the rule rejected two attackers and one honest client
        "kept": [{"partition_id": i} for i in good[1:] + bad[2:]],
    }
    scores = adv.detection(report, set())
    assert scores["detection-precision"] == pytest.approx(2 / 3)
    assert scores["detection-recall"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("attack=alie_typo", KeyError, "did you mean 'alie'"),
        ("attack-params=zz=1", TypeError, "zz"),
        ("attack-knowledge=partial", ValueError, "attack-knowledge"),
    ],
)
def test_bad_attack_configs_are_refused(override: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _adv("num-malicious=2", "attack=alie", override)


# Every attack a run config can name, by where it acts. Adding or renaming an attack must
# update these sets: the test then checks the new attack is wired where it belongs.
OMNISCIENT = {"alie", "alie_adaptive", "ipm_adaptive", "fang_krum", "fang_trimmed_mean", "gaussian_noise", "ipm", "mimic",
              "min_max", "min_sum", "scaling", "sign_flip_mean"}
CLIENT_SIDE = {"gaussian", "sign_flip", "inflate_examples", "label_flip", "backdoor", "dba",
               "neurotoxin"}
BACKDOORS = {"backdoor", "dba", "neurotoxin"}
DEFENSE_AWARE = {"fang_krum", "alie_adaptive", "ipm_adaptive"}


def test_every_attack_name_builds_and_defense_aware_ones_get_the_aggregator() -> None:
    names = all_attack_names()
    assert names == sorted(OMNISCIENT | CLIENT_SIDE)
    for name in names:
        adv = _adv("num-malicious=2", f"attack={name}", "aggregator=krum")
        assert adv is not None and adv.attack_name == name
        if name in OMNISCIENT:
            assert adv.attack is not None and adv.attack.name == name
            assert adv.attack.needs_aggregator == (name in DEFENSE_AWARE), name
        else:  # the malicious clients act themselves; the server mounts nothing
            assert adv.attack is None, name
        assert (adv.aggregator is not None) == (name in DEFENSE_AWARE), name
        assert (adv.backdoor is not None) == (name in BACKDOORS), name
        assert (adv.test_data is not None) == (name in BACKDOORS), name  # for the ASR


@pytest.mark.parametrize("aggregator", ["krum", "median"])
def test_defense_aware_attack_crafts_against_the_configured_aggregator(aggregator: str) -> None:
    """fang_krum's updates are the ones crafted against the run's own rule (here f=2)."""
    adv = _adv("num-malicious=2", "attack=fang_krum", f"aggregator={aggregator}")
    assert adv is not None and adv.aggregator is not None
    assert adv.aggregator.name == aggregator
    updates = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = _mount(adv, 1, updates, _replies(10))
    bad = sorted(malicious_partitions(10, 2, 0))
    honest = [i for i in range(10) if i not in bad]
    torch.testing.assert_close(out[honest], updates[honest])
    rule = aggregation.get(aggregator, f=2) if aggregator == "krum" else aggregation.get(aggregator)
    expected = get_attack("fang_krum")(
        updates[honest], f=2, generator=torch.Generator().manual_seed(0), aggregator=rule
    )
    torch.testing.assert_close(out[bad], expected)
    other = aggregation.get("median") if aggregator == "krum" else aggregation.get("krum", f=2)
    against_other = get_attack("fang_krum")(
        updates[honest], f=2, generator=torch.Generator().manual_seed(0), aggregator=other
    )
    assert not torch.allclose(out[bad], against_other)  # the rule matters
