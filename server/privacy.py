"""Central DP as a round component: budget check, clipping and noise, booking.

The guarantee: client-level (epsilon, delta)-DP of the sequence of global models, for the
unweighted mean of clipped updates with Gaussian noise ``N(0, (z C / m)^2)`` [McMahan et
al., 2018], amplified by sampling only when clients are Poisson-sampled (``sampling =
"poisson"``, rate ``q = m / N``). Robust rules are refused with central DP
(:func:`server.dp.check_rule_compatible` explains why). The accountant is Opacus's, fed one
event per released round; a round is released (and booked) however many clients reply,
since skipping depending on who replied would itself leak.

The component acts at four stages:

- ``configure``: the sampling the accounting assumes, and no minimum number of replies;
- ``admit``: a round whose node count does not fit the calibration is not released, and
  the run stops before a round that would take epsilon past ``max_epsilon``;
- ``aggregate`` (it owns aggregation): DP-FedAvg, clip, sum, add noise, divide by ``m``;
- ``record``: the released round is booked; the row shows epsilon and delta.

Its state (the clipping norm, which adaptive clipping moves, and the accountant's
history) is a plain dict, checkpointed with every other component's.

With secure aggregation (``distributed=True``) the clients clip and add the noise
themselves before masking (:mod:`secagg.ddp`, ``docs/secagg.md``): this component then
does not aggregate; it keeps the sampling, the budget check and the booking, and books the
same ``(z, q)``, the noise any threshold number of survivors guarantees.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from aggregation import AggregationResult
from privacy.accounting import PrivacyAccountant

from .dp import CentralDPConfig, CentralDPState, DPFedAvg, check_rule_compatible
from .stages import Component, Plan, Round, Verdict

__all__ = ["CentralDP"]

log = logging.getLogger("fedshield.server")

_SAMPLING = {"poisson": "poisson", "fixed": "fixed", "none": "all"}


class CentralDP(Component):
    """DP-FedAvg with a privacy accountant, as a component (see the module docstring)."""

    name = "central-dp"
    owns_aggregation = True
    critical = True  # a released round that cannot be booked must end the run

    def __init__(self, config: CentralDPConfig, clients_per_round: int, *,
                 distributed: bool = False) -> None:
        if distributed and config.adaptive:
            raise ValueError("distributed DP (secagg) cannot use adaptive clipping: it needs a "
                             "noised count of clipped clients; use a fixed clipping_norm")
        self.config = config
        self.mechanism = DPFedAvg(config, clients_per_round)
        self.distributed = distributed
        self.owns_aggregation = not distributed  # secagg's clients add the noise

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], *, rule: str, clients_per_round: int,
        distributed: bool = False,
    ) -> CentralDP:
        """Build from the ``central-dp`` run-config parameters, refusing what is unsound."""
        config = CentralDPConfig.from_dict(params)
        check_rule_compatible(rule, pre=[])
        return cls(config, clients_per_round, distributed=distributed)

    def init_state(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism.init().to_dict(),
            "accountant": PrivacyAccountant(self.config.accountant).to_dict(),
        }

    def configure(self, plan: Plan) -> Plan:
        if plan.min_clients:
            log.info("central DP: min-clients=%d is not used: a DP round is released (and "
                     "booked) however many clients reply", plan.min_clients)
        log.info("central DP: %s", self.config)
        return replace(plan, sampling=_SAMPLING[self.config.sampling], min_clients=0)

    def check_nodes(self, num_nodes: int) -> None:
        """Raise ``ValueError`` when ``num_nodes`` does not fit the calibration (N < m, or
        m != N with ``sampling="none"``): such a round must not be released."""
        self.mechanism.accounting_event(num_nodes)

    def admit(self, rnd: Round, state: dict[str, Any]) -> tuple[Verdict | None, dict[str, Any]]:
        # the checks use the N that is sampled from and booked, after the node wait
        num_nodes = len(rnd.nodes)
        try:
            z, q = self.mechanism.accounting_event(num_nodes)
        except ValueError as exc:  # too few nodes for the DP calibration: no release
            return Verdict("skip", f"central DP round not released: {exc}"), state
        cap = self.config.max_epsilon
        accountant = PrivacyAccountant.from_dict(state["accountant"])
        if cap is not None and accountant.would_exceed(z, q, self.config.delta, cap):
            return Verdict("stop", (
                f"one more round (z={z}, q={q:.4g}) would take epsilon past max_epsilon="
                f"{cap} at delta={self.config.delta} (now "
                f"{accountant.epsilon(self.config.delta):.4g}); training stops and the last "
                "model is kept"
            )), state
        return None, state

    def aggregate(
        self, rnd: Round, updates: Tensor, weights: Tensor, generator: torch.Generator,
        state: dict[str, Any],
    ) -> tuple[AggregationResult, dict[str, Any]]:
        """DP-FedAvg on the ``(n, d)`` updates; weights are ignored (the calibration is for
        the unweighted mean)."""
        result, mech = self.mechanism.apply(
            CentralDPState.from_dict(state["mechanism"]), updates, generator=generator
        )
        kept = torch.arange(updates.shape[0], device=updates.device)
        info = {
            "clipping-norm": torch.tensor(result.clipping_norm),
            "noise-std": torch.tensor(result.noise_std),
            "num-clipped": torch.tensor(result.num_clipped),
        }
        return AggregationResult(result.update, kept, None, info), {
            **state, "mechanism": mech.to_dict()}

    def record(
        self, rnd: Round, row: Mapping[str, Any], report: Mapping[str, Any],
        state: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        accountant = PrivacyAccountant.from_dict(state["accountant"])
        if rnd.new_global is not None:  # released, so booked
            z, q = self.mechanism.accounting_event(len(rnd.nodes))
            accountant.step(z, q)
            state = {**state, "accountant": accountant.to_dict()}
        eps = float(accountant.epsilon(self.config.delta))
        return {"epsilon": eps, "delta": self.config.delta}, {"epsilon": eps}, state
