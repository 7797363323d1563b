"""The simulation adversary: colluding malicious clients, and the attack's ground truth.

A round component (:class:`server.stages.Component`) that the run config names with the
key ``adversary`` (``simulations.adversary:build_adversary``). It acts at three stages, doing
what a simulation can and a deployment cannot:

- ``transform``: for omniscient model-poisoning attacks (ALIE, IPM, min-max, Fang, ...)
  the malicious clients train honestly and the adversary replaces their updates with
  crafted ones, computed from the honest updates (``attack-knowledge = "omniscient"``) or
  from the attackers' own honest updates only (``"own-data"``). An attack that needs the
  defense gets the server's own aggregator as an argument.
- ``evaluate``: the backdoor's attack success rate on the triggered test set, and the
  configured evasion and membership-inference metrics.
- ``record``: detection precision and recall of the defense against the known set of
  malicious clients, per round.

Its state is the list of rounds in which the attack could not be mounted.

Which clients are malicious is :func:`client.malicious.malicious_partitions` of the run's
seed, the same set the clients compute for themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from aggregation import Aggregator
from aggregation.registry import (
    derive_seed,
    make_generator,
    unknown_name_message,
)
from client.malicious import (
    BACKDOORS,
    DATA_ATTACKS,
    backdoor_trigger,
    data_attack_params,
    is_client_side_attack,
    malicious_partitions,
)
from client.poisoning import get_update_poisoning
from runconfig.config import RunConfig
from server.loop import client_ids
from server.rounds import ClientReply
from server.stages import Component, Round

from .attacks import AggregatorLike, Attack, RoundDefense, attack_names, get_attack
from .metrics import attack_success_rate, detection_scores

__all__ = ["Adversary", "all_attack_names", "build_adversary"]

log = logging.getLogger("fedshield.adversary")



def all_attack_names() -> list[str]:
    """Every attack a run config can name: client-side and omniscient."""
    from client.poisoning import update_poisoning_names

    return sorted({*update_poisoning_names(), *DATA_ATTACKS, *attack_names()})


@dataclass
class Adversary(Component):
    """The simulation adversary as a round component; see the module docstring."""

    attack_name: str
    malicious_count: int
    seed: int
    start_round: int
    knowledge: str
    attack: Attack | None
    aggregator: Aggregator | None
    test_data: tuple[Tensor, Tensor] | None
    backdoor: tuple[Any, int] | None  # (trigger, target)
    evaluators: tuple[Callable[[nn.Module], dict[str, float]], ...] = ()
    name: str = field(default="adversary", init=False)

    def init_state(self) -> dict[str, Any]:
        return {"failed_rounds": []}

    def malicious(self, replies: Sequence[ClientReply]) -> frozenset[int]:
        """The malicious partition ids, from the clients' reported number of partitions."""
        nums = {int(r.metrics.get("num-partitions", -1)) for r in replies} - {-1}
        if not nums:
            return frozenset()
        if len(nums) != 1:
            raise ValueError(f"clients disagree on num-partitions: {sorted(nums)}")
        return malicious_partitions(nums.pop(), self.malicious_count, self.seed)

    def transform(
        self, rnd: Round, updates: Tensor, weights: Tensor, state: dict[str, Any]
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        out, failure = self.mount(rnd.number, updates, rnd.accepted,
                                  server_update=rnd.server_update)
        if failure is not None:
            log.warning("round %d: attack %s not mounted: %s", rnd.number, self.attack_name,
                        failure)
            state = {**state, "failed_rounds": [*state["failed_rounds"], rnd.number]}
        return out, weights, state

    def mount(
        self, server_round: int, updates: Tensor, replies: Sequence[ClientReply], *,
        server_update: Tensor | None = None,
    ) -> tuple[Tensor, str | None]:
        """Replace the malicious rows of ``updates`` ``(n, d)`` with the crafted updates.

        Returns the new ``(n, d)`` updates and ``None``, or the unchanged updates and why
        the attack could not be mounted this round.
        """
        if self.attack is None or server_round < self.start_round:
            return updates, None
        try:
            bad = self.malicious(replies)
        except ValueError as exc:
            return updates, str(exc)
        mal_rows = [i for i, r in enumerate(replies) if r.partition_id in bad]
        if not mal_rows:
            return updates, None
        honest_rows = [i for i in range(len(replies)) if i not in set(mal_rows)]
        reference = updates[honest_rows] if self.knowledge == "omniscient" else updates[mal_rows]
        gen = make_generator(derive_seed(self.seed, "adversary", server_round))
        defense: AggregatorLike | None = self.aggregator
        if self.aggregator is not None and self.knowledge == "omniscient":
            order = honest_rows + mal_rows  # the attack stacks [honest; malicious]
            defense = RoundDefense(self.aggregator, reference=server_update, clients=client_ids(
                [replies[i].node_id for i in order], device=updates.device))
        try:
            crafted = self.attack(
                reference, f=len(mal_rows), generator=gen, aggregator=defense
            )
        except ValueError as exc:
            # e.g. ALIE needs two reference updates; the round goes on with honest updates
            return updates, str(exc)
        out = updates.clone()
        out[mal_rows] = crafted.to(dtype=updates.dtype, device=updates.device)
        return out, None

    def evaluate(self, rnd: int, model: nn.Module, state: Any = None) -> dict[str, float]:
        """``asr`` of a backdoor, plus the configured evasion / membership metrics."""
        out: dict[str, float] = {}
        if self.backdoor is not None and self.test_data is not None:
            trigger, target = self.backdoor
            x, y = self.test_data
            out["asr"] = attack_success_rate(model, x, y, trigger=trigger, target=target)
        for evaluate in self.evaluators:
            out.update(evaluate(model))
        return out

    def record(
        self, rnd: Round, row: Mapping[str, Any], report: Mapping[str, Any],
        state: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        return self.detection(report, set(state["failed_rounds"])), {}, state

    def detection(self, report: Mapping[str, Any], failed_rounds: set[int]) -> dict[str, float]:
        """Detection precision/recall of the defense this round (NaN when undefined)."""
        num = report.get("num_partitions")
        rnd = int(report["round"])
        if (self.malicious_count == 0 or rnd < self.start_round or report.get("skipped")
                or not report["participants"] or not isinstance(num, int)):
            return {}  # before the attack starts every client is honest: nothing to detect
        participants = [int(p["partition_id"]) for p in report["participants"]]
        kept = {int(p["partition_id"]) for p in report["kept"]}
        bad = malicious_partitions(num, self.malicious_count, self.seed)
        try:
            scores = detection_scores(kept, participants, set(bad))
        except ValueError as exc:  # e.g. two nodes claiming one partition id
            log.warning("round %d: detection scores not computed: %s", rnd, exc)
            return {}
        out = {
            "detection-precision": float(scores["precision"]),
            "detection-recall": float(scores["recall"]),
            "num-malicious-participants": float(len(set(participants) & bad)),
        }
        if self.attack is not None:
            out["attack-mounted"] = float(rnd not in failed_rounds)
        return out


def build_adversary(cfg: RunConfig) -> Adversary | None:
    """The adversary of this run, or ``None`` when nobody is malicious and no evaluation
    extra is asked for.

    Raises
    ------
    KeyError
        If ``attack`` names no registered attack.
    TypeError
        If ``attack-params`` holds a parameter the attack does not take.
    ValueError
        If the attack's parameters are out of range.
    """
    num_malicious = cfg.num_malicious
    evaluators = _evaluators(cfg)
    if num_malicious == 0:
        if not evaluators:
            return None
        return Adversary("", 0, cfg.seed, 1, "omniscient",
                         None, None, None, None, evaluators=evaluators)
    name, params = cfg.attack.name, dict(cfg.attack.params)
    knowledge = cfg.attack_knowledge
    seed = cfg.seed
    attack: Attack | None = None
    aggregator: Aggregator | None = None
    backdoor: tuple[Any, int] | None = None
    test_data: tuple[Tensor, Tensor] | None = None
    if name in attack_names():  # omniscient; names are disjoint from the client-side ones
        attack = get_attack(name, **params)
        if attack.needs_aggregator:
            from server.run import build_rule

            aggregator = build_rule(cfg)
    elif name in DATA_ATTACKS:
        p = data_attack_params(name, params)  # validates the parameters up front
        if name in BACKDOORS:
            from .task import build_task

            backdoor = (backdoor_trigger(p), int(p["target"]))
            test_data = build_task(cfg.flat).test_data()
    elif is_client_side_attack(name):
        get_update_poisoning(name, **params)  # validates the parameters up front
    else:
        raise KeyError(unknown_name_message("attack", name, all_attack_names()))
    return Adversary(
        attack_name=name,
        malicious_count=num_malicious,
        seed=seed,
        start_round=cfg.attack_start_round,
        knowledge=knowledge,
        attack=attack,
        aggregator=aggregator,
        test_data=test_data,
        backdoor=backdoor,
        evaluators=evaluators,
    )


def _evaluators(cfg: RunConfig) -> tuple[Callable[[nn.Module], dict[str, float]], ...]:
    """Per-round evaluation extras: evasion accuracy (FGSM/PGD) and membership-inference AUC."""
    from .audit.evasion import EVASION_ATTACKS, robust_accuracy
    from .audit.membership import membership_auc
    from .task import build_task

    out: list[Callable[[nn.Module], dict[str, float]]] = []
    steps = [(s.name, dict(s.params)) for s in cfg.eval_evasion]
    membership = cfg.eval_membership
    if not steps and not membership:
        return ()
    task = build_task(cfg.flat)
    x_test, y_test = task.test_data()
    seed = cfg.seed
    for attack, params in steps:
        EVASION_ATTACKS.build(attack, **params)  # refuses an unknown name or parameter, or no eps
        p = dict(params)
        eps = float(p.pop("eps"))
        key = f"{attack}-accuracy@{eps:g}"

        def run(model: nn.Module, attack: str = attack, eps: float = eps,
                p: dict[str, Any] = p, key: str = key) -> dict[str, float]:
            gen = make_generator(derive_seed(seed, "eval-evasion", key))
            return {key: robust_accuracy(model, x_test, y_test, attack=attack, eps=eps,
                                         generator=gen, **p)}

        out.append(run)
    if membership:
        ds = task.dataset
        k = min(ds.x_train.shape[0], x_test.shape[0])
        members = (ds.x_train[:k], ds.y_train[:k])

        def mia(model: nn.Module) -> dict[str, float]:
            return {"membership-auc": membership_auc(model, members, (x_test[:k], y_test[:k]))}

        out.append(mia)
    return tuple(out)

