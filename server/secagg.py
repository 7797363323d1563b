"""Secure aggregation as a round component: it owns the round's exchanges (and, ungrouped,
the aggregation).

The run config's ``secagg`` key switches it on (``""`` = off; else ``key=value`` settings,
:data:`SECAGG_KEYS`). Each round it runs the four stages of :mod:`secagg.protocol` as
``query`` messages whose ``secagg`` config record names the stage; the ``masked-input``
request also carries the model, and the client trains before it masks its update
(:mod:`client.secagg`). The server never sees an individual update: it learns the sum of
the survivors' quantised, weighted updates and their total weight, and decodes the
weighted mean (within :attr:`secagg.Quantiser.error_bound` of the plaintext mean of the
clipped updates).

Two modes:

- **secure mean** (``groups=0``): the component owns aggregation and returns the mean.
  The loop still validates and stacks replies: it gets one stand-in reply per survivor,
  each holding the global model plus the mean (node id = the survivor's), so the round's
  counts are the survivors.
- **grouped** (``groups=G``): the sampled clients are split into ``G`` groups, fixed for
  ``group_rounds`` rounds; each group's mean is computed securely, and the run's rule
  (any registered one, robust or not) aggregates the ``G`` group means, weighted by the
  groups' total weights. A stand-in reply per group carries its mean, under node id
  ``-1 - g``. ``f`` attackers spoil at most ``f`` group means.

A round whose secure aggregation fails (too few clients left at some stage) keeps the
model; the row's and the report's ``skipped_reason`` name the stage and why.

**Distributed DP** (``central-dp`` set too; ``docs/secagg.md``): the clients clip to
``clipping_norm`` and add their share of the discrete Gaussian noise before masking
(:mod:`secagg.ddp`); the secure mean is the noised sum over ``m = clients-per-round``, as
DP-FedAvg's; :class:`server.privacy.CentralDP` (``distributed=True``) books the rounds.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aggregation import AggregationResult
from aggregation.registry import derive_seed
from runconfig.config import SECAGG_KEYS
from secagg import Msg, SecAggAbort, SecAggParams, SecAggResult, ServerSession
from secagg.protocol import STAGES
from secagg.quantise import ring_dtype

from .rounds import Payload, Reply, expand_replies
from .stages import Component, Round, Transport

__all__ = ["SECAGG_KEYS", "SecureAggregation", "decode_vector", "encode_blobs"]

log = logging.getLogger("fedshield.secagg")

PROTOCOL_KEYS = ("threshold", "neighbours", "clip", "bits", "key_agreement", "max_weight")

State = dict[str, Any]


def encode_blobs(blobs: Mapping[str, bytes]) -> dict[str, Tensor]:
    """Byte strings as ``uint8`` tensors (what an ``ArrayRecord`` carries)."""
    return {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in blobs.items()}


def decode_vector(t: Tensor, bits: int) -> np.ndarray:
    """A masked input sent as a signed tensor, back to the ring's unsigned dtype."""
    return np.ascontiguousarray(t.numpy()).view(ring_dtype(bits))


def _advance(
    s: ServerSession, stage: str, replies: Mapping[int, Msg | str]
) -> dict[int, Msg] | SecAggResult:
    """The server's step after the replies to ``stage``."""
    if stage == "advertise-keys":
        return s.share_keys(replies)
    if stage == "share-keys":
        return s.masked_input(replies)
    if stage == "masked-input":
        return s.unmask(replies)
    return s.result(replies)


class SecureAggregation(Component):
    """Secure (grouped) weighted mean; see the module docstring.

    Parameters
    ----------
    params
        The protocol's parameters.
    seed
        The run's seed (neighbour graphs and groups derive from it).
    min_clients
        Fewer survivors than this (in a group, in grouped mode: 2) abort the aggregation.
    groups
        ``0``: one secure mean; ``G >= 2``: ``G`` secure group means for the rule.
    group_rounds
        Rounds for which the grouping stays fixed.
    dp_clients
        Distributed DP (``params.noise_multiplier > 0``): ``m``, the denominator of the
        mean (DP-FedAvg's expected number of clients).
    """

    name = "secagg"
    owns_exchange = True

    def __init__(self, params: SecAggParams, *, seed: int, min_clients: int, groups: int = 0,
                 group_rounds: int = 1, dp_clients: int = 0) -> None:
        if params.dp and (groups or dp_clients < 1):
            raise ValueError(f"distributed DP needs groups=0 and dp_clients >= 1 (the m of the "
                             f"mean), got groups={groups}, dp_clients={dp_clients}")
        if groups == 1 or groups < 0:
            raise ValueError(f"secagg groups must be 0 (no groups) or >= 2, got {groups}")
        if group_rounds < 1:
            raise ValueError(f"secagg group_rounds must be >= 1, got {group_rounds}")
        self.params = params
        self.seed = seed
        self.min_clients = min_clients
        self.groups = groups
        self.group_rounds = group_rounds
        self.owns_aggregation = groups == 0
        self.dp_clients = dp_clients

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, seed: int, min_clients: int,
                    central_dp: Mapping[str, Any] | None = None, clients_per_round: int = 0,
                    ) -> SecureAggregation:
        """From the run config's ``secagg`` settings; with ``central_dp`` (its settings),
        distributed DP: ``clip`` is its ``clipping_norm``, noise its ``noise_multiplier``,
        the mean's denominator ``clients_per_round``.

        Raises
        ------
        TypeError
            An unknown setting (the valid ones are named).
        ValueError
            A setting out of range.
        """
        unknown = sorted(set(params) - set(SECAGG_KEYS))
        if unknown:
            raise TypeError(f"secagg got unknown setting(s) {unknown}; valid: {', '.join(SECAGG_KEYS)}")
        kwargs = {k: params[k] for k in PROTOCOL_KEYS if k in params}
        if central_dp:
            dp = {k.replace("-", "_"): v for k, v in central_dp.items()}
            kwargs.update(clip=float(dp["clipping_norm"]), max_weight=1,
                          noise_multiplier=float(dp["noise_multiplier"]))
        return cls(SecAggParams(**kwargs), seed=seed, min_clients=min_clients,
                   groups=int(params.get("groups", 0)),
                   group_rounds=int(params.get("group_rounds", 1)),
                   dp_clients=clients_per_round if central_dp else 0)

    def init_state(self) -> State:
        return {"epoch": -1, "assignment": [], "pending": None, "last": None}

    # -- groups ---------------------------------------------------------------------------
    def _assign(self, rnd: Round, state: State) -> tuple[dict[int, int], State]:
        """``node -> group`` for this round's epoch (fixed for ``group_rounds`` rounds)."""
        epoch = (rnd.number - 1) // self.group_rounds

        def rank(node: int) -> bytes:
            return hashlib.sha256(f"{self.seed}:{epoch}:{node}".encode()).digest()

        if state["epoch"] != epoch:
            order = sorted(rnd.nodes, key=rank)
            state = {**state, "epoch": epoch,
                     "assignment": [[n, p % self.groups] for p, n in enumerate(order)]}
        table = {int(n): int(g) for n, g in state["assignment"]}
        for n in rnd.sampled:  # joined during the epoch: a fixed, seeded group
            table.setdefault(n, int.from_bytes(rank(n)[:8], "big") % self.groups)
        return table, state

    # -- the exchange ---------------------------------------------------------------------
    def exchange(
        self, rnd: Round, transport: Transport, payload: Payload, timeout: float, state: State
    ) -> tuple[list[Reply], State]:
        if self.groups:
            table, state = self._assign(rnd, state)
            members: dict[int, list[int]] = {}
            for n in rnd.sampled:
                members.setdefault(table[n], []).append(n)
        else:
            members = {0: list(rnd.sampled)}
        d = rnd.global_flat.numel()
        sessions: dict[int, ServerSession] = {}
        failures: dict[int, str] = {}
        min_survivors = 2 if self.groups else self.min_clients
        for g, nodes in sorted(members.items()):
            try:
                sessions[g] = ServerSession(
                    self.params, nodes, session=f"{rnd.number}/{g}", dim=d,
                    graph_seed=derive_seed(self.seed, "secagg-graph", rnd.number, g),
                    min_survivors=min_survivors)
            except SecAggAbort as exc:
                failures[g] = str(exc)
        started = dict(sessions)
        requests = {g: s.advertise() for g, s in sessions.items()}
        results: dict[int, SecAggResult] = {}
        for stage in STAGES:
            sent = {n: self._payload(msg, stage, rnd, payload)
                    for reqs in requests.values() for n, msg in reqs.items()}
            got = {r.node_id: self._msg(r)
                   for r in expand_replies(transport.send("query", sent, timeout=timeout))}
            for g, s in list(sessions.items()):
                replies = {n: got[n] for n in requests[g] if n in got}
                try:
                    out = _advance(s, stage, replies)
                except SecAggAbort as exc:
                    failures[g] = str(exc)
                    del sessions[g], requests[g]
                    continue
                if isinstance(out, SecAggResult):
                    results[g] = out
                else:
                    requests[g] = out
        for g, why in failures.items():
            log.warning("round %d: %s%s; the global model is unchanged", rnd.number,
                        f"group {g}: " if self.groups else "", why)
        last: dict[str, Any] = {
            "failures": {str(g): w for g, w in failures.items()},
            "survivors": sum(len(r.survivors) for r in results.values()),
            "clipped": sum(r.clipped for r in results.values()),
            "error-bound": max((self._error_bound(r) for r in results.values()), default=0.0),
            "dropped": {s: {str(n): w for x in started.values() for n, w in x.dropped[s].items()}
                        for s in STAGES},
            "groups": {str(g): list(map(int, r.survivors)) for g, r in results.items()},
        }
        for r in results.values():
            if r.dp is not None:  # std of the noise on the mean: guaranteed (t), present (n_s)
                booked = r.dp.sigma * r.dp.step / self.dp_clients
                last["noise-std-threshold"] = booked
                last["noise-std"] = booked * (len(r.survivors) / r.threshold) ** 0.5
                last["threshold"] = r.threshold
        if results and (total := sum(r.clipped for r in results.values())):
            log.warning("round %d: secagg clipped %d coordinates to [-%g, %g]; raise clip if "
                        "that is not intended", rnd.number, total, self.params.clip,
                        self.params.clip)
        state = {**state, "last": last, "pending": None}
        stand_ins, state = self._stand_ins(rnd, payload, results, state)
        summed = {n for r in results.values() for n in r.survivors}
        return stand_ins + self._lost(members, started, failures, summed), state

    def _lost(self, members: Mapping[int, list[int]], started: Mapping[int, ServerSession],
              failures: Mapping[int, str], summed: set[int]) -> list[Reply]:
        """An error reply for each node that is not in a secure sum, naming the stage it
        dropped at and why (or the aggregation's failure): the round's audit shows that
        instead of a generic "no reply". (A node lost at unmask is in the sum: none.)"""
        out = []
        for g, nodes in sorted(members.items()):
            where = f"group {g}'s " if self.groups else ""
            lost: dict[int, str] = {}
            if g in started:
                for stage in STAGES:
                    for n, why in started[g].dropped[stage].items():
                        lost.setdefault(n, f"secure aggregation: dropped at stage {stage}: {why}")
            if g in failures:
                for n in nodes:
                    lost.setdefault(n, f"{where}{failures[g]}")
            out += [Reply(n, error=why) for n, why in sorted(lost.items()) if n not in summed]
        return out

    def _error_bound(self, r: SecAggResult) -> float:
        """Largest coordinate error of the mean from quantisation (noise aside)."""
        if r.dp is not None:
            return r.dp.error_bound(len(r.survivors)) / self.dp_clients
        return r.quantiser.error_bound

    def _payload(self, msg: Msg, stage: str, rnd: Round, model: Payload) -> Payload:
        configs: dict[str, Mapping[str, bool | int | float | str]] = {
            "secagg": msg.config, "config": {"server-round": rnd.number}}
        arrays: dict[str, Mapping[str, Tensor]] = {"secagg-blobs": encode_blobs(msg.blobs)}
        if stage == "masked-input":
            arrays["arrays"] = model.arrays["arrays"]
        return Payload(arrays=arrays, configs=configs)

    def _msg(self, reply: Reply) -> Msg | str:
        """A reply as a protocol message, or why it is unusable."""
        if reply.error is not None:
            return reply.error
        blobs = {k: bytes(t.numpy().tobytes()) for k, t in reply.arrays.get("secagg-blobs", {}).items()}
        vector = None
        masked = reply.arrays.get("secagg-vector", {}).get("masked")
        if masked is not None:
            vector = decode_vector(masked, self.params.bits)
        return Msg(dict(reply.configs.get("secagg", {})), blobs, vector)

    def _stand_ins(self, rnd: Round, payload: Payload, results: Mapping[int, SecAggResult],
                   state: State) -> tuple[list[Reply], State]:
        """The replies the loop validates and stacks in place of the individual updates."""
        template = payload.arrays["arrays"]
        sizes = [t.numel() for t in template.values()]
        g = rnd.global_flat.to(torch.float64)

        def model_with(mean: Tensor) -> dict[str, Tensor]:
            parts = torch.split(g + mean, sizes)
            return {k: p.reshape(t.shape).to(t.dtype)
                    for (k, t), p in zip(template.items(), parts, strict=True)}

        means = {k: torch.from_numpy(r.noised_sum() / self.dp_clients if r.dp is not None
                                     else r.mean()) for k, r in results.items()}
        if self.groups:
            return [Reply(-1 - k, arrays={"arrays": model_with(means[k])},
                          metrics={"metrics": {"num-examples": int(r.weight)}})
                    for k, r in sorted(results.items())], state
        if not results:
            return [], state
        (res,) = results.values()
        arrays = {"arrays": model_with(means[0])}
        # aggregate() uses the secure total weight; the stand-ins' own weights are unused
        replies = [Reply(n, arrays=arrays, metrics={"metrics": {"num-examples": 1}})
                   for n in res.survivors]
        return replies, {**state, "pending": {"mean": means[0], "weight": res.weight}}

    # -- aggregation (secure mean only) -----------------------------------------------------
    def aggregate(
        self, rnd: Round, updates: Tensor, weights: Tensor, generator: torch.Generator,
        state: State,
    ) -> tuple[AggregationResult, State]:
        pending = state["pending"]
        if pending is None:
            raise RuntimeError("secagg aggregate() without a secure sum: the exchange did not "
                               "run or failed, so the loop should have skipped the round")
        mean = pending["mean"].to(dtype=updates.dtype, device=updates.device)
        # the stand-ins hold global + mean in the model's dtype: rows equal, and equal to the
        # mean up to that dtype's rounding (float32: 2^-23 relative)
        tol = 2.0**-22 * (1.0 + float(rnd.global_flat.abs().max()) + float(mean.abs().max()))
        if updates.shape[0] and not (
                bool((updates == updates[:1]).all())
                and float((updates[0] - mean).abs().max()) <= tol):
            raise ValueError(
                "a component changed the stacked updates at the transform stage, but under "
                "secure aggregation the server holds no individual update: omniscient "
                "simulation attacks cannot run with secagg (use a client-side attack)")
        n = updates.shape[0]
        result = AggregationResult(
            update=mean, kept=torch.arange(n, device=updates.device),
            info={"secagg-weight": torch.tensor(float(pending["weight"]))})
        return result, {**state, "pending": None}

    def record(
        self, rnd: Round, row: Mapping[str, Any], report: Mapping[str, Any], state: State
    ) -> tuple[dict[str, Any], dict[str, Any], State]:
        last = state["last"]
        if last is None:
            return {}, {}, state
        row_fields: dict[str, Any] = {
            "secagg-survivors": float(last["survivors"]),
            "secagg-clipped": float(last["clipped"]),
            "secagg-error-bound": float(last["error-bound"]),
            **{f"secagg-dropped-{s}": float(len(last["dropped"][s])) for s in STAGES},
        }
        if "noise-std" in last:
            row_fields.update({"secagg-noise-std": float(last["noise-std"]),
                               "secagg-noise-std-threshold": float(last["noise-std-threshold"]),
                               "secagg-threshold": float(last["threshold"])})
        report_fields: dict[str, Any] = {"secagg": last}
        failures: dict[str, str] = last["failures"]
        if failures and not self.groups:
            report_fields["skipped_reason"] = f"{failures['0']}; the global model is unchanged"
        elif failures:
            row_fields["secagg-failed-groups"] = float(len(failures))
            if not last["groups"]:
                report_fields["skipped_reason"] = (
                    "every group's secure aggregation failed: "
                    + "; ".join(f"group {g}: {w}" for g, w in sorted(failures.items()))
                    + "; the global model is unchanged")
        return row_fields, report_fields, {**state, "last": None}

