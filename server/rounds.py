"""The pieces of a round, framework-free: decode and validate replies, stack the updates,
apply the rule, report.

The Flower adapter (``transport.py``) turns messages into :class:`Reply` values; the round
loop (``loop.py``) decodes them with :func:`decode_train_reply`, checks them with
:func:`validate_replies`, stacks them with :func:`stack_updates` and aggregates with
:func:`apply_rule`; :func:`aggregate_round` is the same sequence without components, for
tests and tools. No maths lives here: the rule comes from ``aggregation``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from aggregation import AggregationResult, Aggregator, PreconditionError

__all__ = [
    "ClientReply",
    "ModelSpec",
    "Payload",
    "Rejection",
    "Reply",
    "ReplyBlock",
    "RoundOutcome",
    "StackRow",
    "StackedArrays",
    "UpdateHook",
    "aggregate_round",
    "decode_train_replies",
    "decode_train_reply",
    "expand_replies",
    "stack_updates",
    "validate_replies",
]


@dataclass(frozen=True)
class ModelSpec:
    """Names, shapes and dtypes of the aggregated (floating-point) tensors, in order."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    # non-floating entries (e.g. counters): a reply may carry them; the server keeps its own
    other_keys: tuple[str, ...] = ()

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> ModelSpec:
        """Spec of the floating-point entries of a state dict."""
        items = [(k, v) for k, v in state.items() if v.is_floating_point()]
        if not items:
            raise ValueError("the model has no floating-point parameters to aggregate")
        return cls(
            keys=tuple(k for k, _ in items),
            shapes=tuple(tuple(v.shape) for _, v in items),
            dtypes=tuple(v.dtype for _, v in items),
            other_keys=tuple(k for k, v in state.items() if not v.is_floating_point()),
        )

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def dim(self) -> int:
        """``d``, the number of aggregated parameters."""
        return sum(self.sizes)

    def flatten(self, state: Mapping[str, Tensor]) -> Tensor:
        """Concatenate the spec's entries of ``state`` into a float64 ``(d,)`` vector."""
        return torch.cat([state[k].reshape(-1).to(torch.float64) for k in self.keys])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a ``(d,)`` vector back into tensors of the spec's shapes and dtypes."""
        parts = torch.split(flat, self.sizes)
        return {
            k: p.reshape(s).to(dt)
            for k, p, s, dt in zip(self.keys, parts, self.shapes, self.dtypes, strict=True)
        }

    def check(self, state: Mapping[str, Tensor]) -> str | None:
        """Why ``state`` does not fit the spec, or ``None`` when it does."""
        if isinstance(state, StackRow):  # checked with its stack, once for all rows
            return state.stack.problems(self)[state.i]
        reason = self.check_keys(state)
        if reason is not None:
            return reason
        for k, shape, dtype in zip(self.keys, self.shapes, self.dtypes, strict=True):
            t = state[k]
            reason = _array_problem(k, t.dtype, tuple(t.shape), dtype, shape)
            if reason is None and not _all_finite(t):
                reason = f"array {k!r} contains NaN or Inf"
            if reason is not None:
                return reason
        return None

    def check_keys(self, state: Mapping[str, Any]) -> str | None:
        """Why the names of ``state``'s entries do not fit the spec, or ``None``."""
        missing = [k for k in self.keys if k not in state]
        if missing:
            return f"missing arrays {missing[:5]}"
        extra = sorted(set(state) - set(self.keys) - set(self.other_keys))
        if extra:
            return f"unexpected arrays {extra[:5]}"
        return None



def _array_problem(
    key: str, dtype: torch.dtype, shape: tuple[int, ...], want_dtype: torch.dtype,
    want_shape: tuple[int, ...],
) -> str | None:
    """Why an entry ``key`` of this dtype and shape is not the spec's, or ``None``."""
    if dtype != want_dtype:  # float64 for float32 would overflow the model silently
        return f"array {key!r} has dtype {dtype}, expected {want_dtype}"
    if shape != want_shape:
        return f"array {key!r} has shape {shape}, expected {want_shape}"
    return None


def _all_finite(t: Tensor) -> bool:
    """Whether every entry of floating-point ``t`` is finite.

    One reduction pass and no ``t``-sized temporary (``isfinite(t).all()`` builds a bool
    copy): the minimum and maximum are NaN when any entry is NaN (both propagate it) and
    infinite when any entry is infinite.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    # two Python floats: cheaper than two torch.isfinite calls on 0-d tensors, which
    # dominated the check of a thousand small replies
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


@dataclass(frozen=True)
class Payload:
    """What one message carries: named tensor maps and named config maps."""

    arrays: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)
    configs: Mapping[str, Mapping[str, bool | int | float | str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """One node's answer to a message, decoded from the transport.

    ``node_id`` is the node the answered message was sent to. ``error`` is set when the
    node replied with an error or the reply could not be decoded.
    """

    node_id: int
    arrays: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    error: str | None = None


class StackedArrays:
    """The arrays of K replies, stacked: ``name -> (K, *shape)`` (one ``ArrayRecord`` each).

    What the batched engine's training produces (:mod:`simulations.batched`); the rows are
    checked (:func:`validate_replies`) and stacked (:func:`stack_updates`) with one tensor
    operation per entry for all K, not one per reply. The tensors are read, never changed.

    Raises
    ------
    ValueError
        No entries, or entries that disagree on K.
    """

    __slots__ = ("arrays", "k", "_checked")

    def __init__(self, arrays: Mapping[str, Tensor]) -> None:
        ks = {int(t.shape[0]) if t.dim() else -1 for t in arrays.values()}
        if len(ks) != 1 or -1 in ks:
            raise ValueError(
                f"stacked arrays need one leading client axis of the same length K, got "
                f"{ {k: tuple(t.shape) for k, t in arrays.items()} }")
        self.arrays = dict(arrays)
        self.k = ks.pop()
        self._checked: tuple[ModelSpec, list[str | None]] | None = None

    def row(self, i: int) -> StackRow:
        return StackRow(self, i)

    def problems(self, spec: ModelSpec) -> list[str | None]:
        """For each row, what :meth:`ModelSpec.check` says of it (computed once, for the
        spec it is asked about: every row of a round asks with the round's spec)."""
        if self._checked is None or (self._checked[0] is not spec and self._checked[0] != spec):
            self._checked = (spec, self._check(spec))
        return self._checked[1]

    def _check(self, spec: ModelSpec) -> list[str | None]:
        reason = spec.check_keys(self.arrays)
        out: list[str | None] = [reason] * self.k
        if reason is not None:
            return out
        for key, shape, dtype in zip(spec.keys, spec.shapes, spec.dtypes, strict=True):
            t = self.arrays[key]
            reason = _array_problem(key, t.dtype, tuple(t.shape[1:]), dtype, shape)
            if reason is not None:  # every row fails here (those still fine)
                return [r if r is not None else reason for r in out]
            if t.numel() == 0:
                continue
            rows = t.reshape(self.k, -1)
            # a finite row sum means no NaN or Inf in the row (both propagate through a
            # sum); a sum that is not finite may be an overflow of finite entries: those
            # rows are checked entry by entry
            maybe = (~rows.sum(1).isfinite()).nonzero().flatten().tolist()
            for i in maybe:
                if out[i] is None and not _all_finite(rows[i]):
                    out[i] = f"array {key!r} contains NaN or Inf"
        return out


class StackRow(Mapping[str, Tensor]):
    """Row ``i`` of a :class:`StackedArrays`: one reply's arrays, read as a mapping."""

    __slots__ = ("stack", "i")

    def __init__(self, stack: StackedArrays, i: int) -> None:
        if not 0 <= i < stack.k:
            raise IndexError(f"row {i} of a stack of {stack.k}")
        self.stack = stack
        self.i = i

    def __getitem__(self, key: str) -> Tensor:
        return self.stack.arrays[key][self.i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stack.arrays)

    def __len__(self) -> int:
        return len(self.stack.arrays)


@dataclass(frozen=True)
class ReplyBlock:
    """Train replies of several nodes at once, whose arrays are rows of one stack.

    ``node_ids[j]``'s reply holds the arrays ``stack.row(rows[j])`` and the metrics
    ``{key: metrics[key][j]}`` (one ``MetricRecord``, as columns). A transport that trains
    clients together (the batched engine) returns these; :func:`decode_train_replies`
    checks them as it checks one reply each, with one operation per column.

    Raises
    ------
    ValueError
        ``node_ids``, ``rows`` and the metric columns of different lengths.
    """

    node_ids: tuple[int, ...]
    stack: StackedArrays
    rows: tuple[int, ...]
    metrics: Mapping[str, Sequence[Any]]

    def __post_init__(self) -> None:
        n = len(self.node_ids)
        lens = {len(self.rows), *(len(v) for v in self.metrics.values())}
        if lens != {n}:
            raise ValueError(
                f"a reply block of {n} nodes needs {n} rows and {n} values per metric, got "
                f"{len(self.rows)} rows and {({k: len(v) for k, v in self.metrics.items()})}")
        bad = [r for r in self.rows if not 0 <= r < self.stack.k]
        if bad:
            raise ValueError(f"a reply block names rows {bad[:5]} of a stack of "
                             f"{self.stack.k}: rows are 0 .. {self.stack.k - 1}")

    def replies(self) -> list[Reply]:
        """The block as one :class:`Reply` per node, in order."""
        keys = list(self.metrics)
        return [
            Reply(node, arrays={"arrays": self.stack.row(r)},
                  metrics={"metrics": {k: self.metrics[k][j] for k in keys}})
            for j, (node, r) in enumerate(zip(self.node_ids, self.rows, strict=True))
        ]


def expand_replies(replies: Sequence[Reply | ReplyBlock]) -> list[Reply]:
    """Every reply of ``replies`` as a :class:`Reply`, blocks expanded, order kept."""
    out: list[Reply] = []
    for r in replies:
        out.extend(r.replies() if isinstance(r, ReplyBlock) else (r,))
    return out


@dataclass(frozen=True)
class ClientReply:
    """One client's reply, already decoded from the transport.

    ``state`` is ``None`` when the reply carried an error or could not be decoded; then
    ``error`` says why.
    """

    node_id: int
    state: Mapping[str, Tensor] | None
    num_examples: float | None
    partition_id: int = -1
    metrics: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Rejection:
    """A client left out of the round and the reason."""

    node_id: int
    partition_id: int
    stage: str  # "invalid" (malformed reply) or "rule" (the robust rule did not keep it)
    reason: str


# Applied to validated updates before aggregation: (round, updates (n, d), replies) -> (n, d).
# The simulation adversary (omniscient attacks) and similar wrappers plug in here.
UpdateHook = Callable[[int, Tensor, Sequence[ClientReply]], Tensor]


@dataclass(frozen=True)
class RoundOutcome:
    """What a round produced. ``new_global`` is ``None`` when the round was skipped."""

    server_round: int
    new_global: Tensor | None
    state: Any
    accepted: tuple[ClientReply, ...]
    kept_nodes: tuple[int, ...]
    rejections: tuple[Rejection, ...]
    skipped_reason: str | None
    seconds: float
    update_norm: float | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return self.new_global is None

    def report(self) -> dict[str, Any]:
        """A JSON-serialisable summary for the audit log."""
        nums = {int(r.metrics.get("num-partitions", -1)) for r in self.accepted} - {-1}
        kept = set(self.kept_nodes)
        return {
            "round": self.server_round,
            "skipped": self.skipped,
            "num_partitions": nums.pop() if len(nums) == 1 else None,
            "skipped_reason": self.skipped_reason,
            "participants": [
                {"node_id": r.node_id, "partition_id": r.partition_id} for r in self.accepted
            ],
            "kept": [
                {"node_id": r.node_id, "partition_id": r.partition_id}
                for r in self.accepted
                if r.node_id in kept
            ],
            "rejected": [
                {
                    "node_id": r.node_id,
                    "partition_id": r.partition_id,
                    "stage": r.stage,
                    "reason": r.reason,
                }
                for r in self.rejections
            ],
            "aggregation_seconds": self.seconds,
            "update_norm": self.update_norm,
            **{k: v for k, v in self.info.items()},
        }


# metrics the server reads from a reply, and the closed range each must lie in; a client
# controls them. num-examples is capped so that n weights sum without overflow and a
# forged count cannot take the whole weight through float rounding (2**40 ~ 1.1e12).
MAX_NUM_EXAMPLES = 2**40
_METRIC_RANGES: dict[str, tuple[float, float, bool]] = {  # key: (low, high, integer)
    "partition-id": (-1, 2**31 - 1, True),  # -1: a node with its own data file
    "num-partitions": (-1, 2**31 - 1, True),
    "num-examples": (1, MAX_NUM_EXAMPLES, True),
    "dp-epsilon": (0.0, math.inf, False),  # inf: a client without DP noise
    # the client's own training time, for the round's profile (loop.py); finite
    "train-seconds": (0.0, 1e9, False),
}


def _bad_metrics(m: Mapping[str, Any]) -> str | None:
    """Why the reply's metrics cannot be used, or ``None``."""
    for key, (low, high, integer) in _METRIC_RANGES.items():
        if key not in m:
            continue
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"metric {key!r} must be a number, got {type(v).__name__} {str(v)[:40]!r}"
        if math.isnan(v) or (integer and not math.isfinite(v)):
            return f"metric {key!r} must be a finite number, got {v}"
        if integer and float(v) != int(v):
            return f"metric {key!r} must be an integer, got {v}"
        if not low <= v <= high:
            return f"metric {key!r} must be in [{low}, {high}], got {v}"
    return None


def decode_train_reply(reply: Reply) -> ClientReply:
    """A train reply as a :class:`ClientReply`; never raises on bad content (``error`` says)."""
    node = reply.node_id
    if reply.error is not None:
        return ClientReply(node, None, None, error=reply.error)
    if len(reply.arrays) != 1:
        return ClientReply(node, None, None, error=f"expected one ArrayRecord, got {len(reply.arrays)}")
    if len(reply.metrics) != 1:
        return ClientReply(node, None, None, error=f"expected one MetricRecord, got {len(reply.metrics)}")
    m = dict(next(iter(reply.metrics.values())))
    bad = _bad_metrics(m)
    pid = int(m["partition-id"]) if "partition-id" in m and not bad else -1
    if bad:
        return ClientReply(node, None, None, pid, {}, error=bad)
    n_ex = m.get("num-examples")
    if n_ex is None:
        return ClientReply(node, None, None, pid, m, error="missing numeric num-examples")
    return ClientReply(node, next(iter(reply.arrays.values())), float(n_ex), pid, m)


def decode_train_replies(replies: Sequence[Reply | ReplyBlock]) -> list[ClientReply]:
    """:func:`decode_train_reply` of every reply, blocks row by row; order kept.

    A block's metric columns are checked with one tensor operation each; a row they flag
    gets :func:`decode_train_reply`'s reason from the same check made on that row alone.
    """
    out: list[ClientReply] = []
    for r in replies:
        if isinstance(r, ReplyBlock):
            out.extend(_decode_block(r))
        else:
            out.append(decode_train_reply(r))
    return out


def _decode_block(block: ReplyBlock) -> list[ClientReply]:
    cols = block.metrics
    keys = list(cols)
    suspect = _suspect_rows(cols)
    ex = cols.get("num-examples")
    pids = cols.get("partition-id")
    stack = block.stack
    # ReplyBlock checked that every column has one value per node
    rows = (zip(*cols.values(), strict=True) if keys
            else itertools.repeat((), len(block.node_ids)))
    out = []
    for j, (node, row, values) in enumerate(zip(block.node_ids, block.rows, rows, strict=True)):
        m = dict(zip(keys, values, strict=True))
        if ex is None or suspect is None or j in suspect:  # the one-reply path says why
            out.append(decode_train_reply(Reply(node, arrays={"arrays": stack.row(row)},
                                                metrics={"metrics": m})))
        else:
            out.append(ClientReply(node, StackRow(stack, row), float(ex[j]),
                                   int(pids[j]) if pids is not None else -1, m))
    return out


def _suspect_rows(cols: Mapping[str, Sequence[Any]]) -> set[int] | None:
    """Rows whose metrics :func:`_bad_metrics` may refuse (a superset), or ``None`` when a
    column is not all numbers (then every row is checked alone)."""
    suspect: set[int] = set()
    for key, (low, high, integer) in _METRIC_RANGES.items():
        col = cols.get(key)
        if col is None:
            continue
        kinds = set(map(type, col))
        if not kinds <= {int, float}:  # bool, str, numpy scalars: each row alone
            return None
        if not col:
            continue
        if int in kinds and not -(2**62) <= min(col) <= max(col) <= 2**62:
            return None  # beyond what float64 holds exactly enough to judge
        if (kinds == {int} or math.isfinite(sum(col))) and not (integer and float in kinds) \
                and low <= min(col) and max(col) <= high:
            continue  # no NaN or Inf (a finite sum has none), in range, integers: all fine
        t = torch.tensor(col, dtype=torch.float64)
        bad = t.isnan() | (t < low) | (t > high)
        if integer:
            bad |= ~t.isfinite() | (t != t.trunc())
        suspect.update(bad.nonzero().flatten().tolist())
    return suspect


def validate_replies(
    replies: Sequence[ClientReply], spec: ModelSpec
) -> tuple[list[ClientReply], list[Rejection]]:
    """Split ``replies`` into those :func:`stack_updates` can use and rejections with reasons.

    A reply is refused when it carried an error or no arrays, repeats a node already
    accepted this round, does not fit ``spec`` (:meth:`ModelSpec.check`: names, dtypes,
    shapes, finiteness) or reports no positive finite num-examples. Order is kept.
    """
    accepted: list[ClientReply] = []
    rejected: list[Rejection] = []
    seen: set[int] = set()
    for r in replies:
        reason = r.error
        if reason is None and r.state is None:
            reason = "reply carried no arrays"
        if reason is None and r.node_id in seen:
            reason = "second reply from the same node in one round"
        if reason is None:
            assert r.state is not None
            reason = spec.check(r.state)
        if reason is None:
            n_ex = r.num_examples
            if n_ex is None or not math.isfinite(n_ex) or n_ex <= 0:
                reason = f"num-examples must be a positive finite number, got {n_ex!r}"
        if reason is None:
            accepted.append(r)
            seen.add(r.node_id)
        else:
            rejected.append(Rejection(r.node_id, r.partition_id, "invalid", reason))
    return accepted, rejected


def aggregate_round(
    server_round: int,
    global_flat: Tensor,
    replies: Sequence[ClientReply],
    spec: ModelSpec,
    aggregator: Aggregator,
    state: Any,
    *,
    min_clients: int,
    generator: torch.Generator,
    hooks: Sequence[UpdateHook] = (),
    device: torch.device | None = None,
) -> RoundOutcome:
    """Validate ``replies``, stack their updates, aggregate, and return the new global vector.

    Parameters
    ----------
    server_round
        The round number (for the report and hooks).
    global_flat
        ``(d,)`` global parameters the clients started from.
    replies
        Decoded client replies.
    spec
        What a valid reply holds.
    aggregator
        A rule from :func:`aggregation.get` (possibly composed with pre-aggregation).
    state
        The rule's state (``None`` for stateless rules).
    min_clients
        Fewer valid replies than this and the round is skipped, model unchanged.
    generator
        Randomness for stochastic rules (bucketing).
    hooks
        Transformations of the ``(n, d)`` updates applied before the rule.
    device
        Where to aggregate (defaults to ``global_flat``'s device).

    Returns
    -------
    RoundOutcome
        ``new_global`` ``(d,)`` or ``None`` when skipped (too few valid replies, or the
        rule's precondition failed), with who was kept and who was rejected and why.
    """
    t0 = time.perf_counter()
    device = device or global_flat.device
    accepted, rejections = validate_replies(replies, spec)

    def skip(reason: str) -> RoundOutcome:
        return RoundOutcome(
            server_round, None, state, tuple(accepted), (), tuple(rejections), reason,
            time.perf_counter() - t0,
        )

    if len(accepted) < min_clients:
        return skip(too_few_message(len(accepted), min_clients))
    g = global_flat.to(device=device, dtype=torch.float64)
    updates, weights = stack_updates(accepted, g, spec)
    for hook in hooks:
        updates = hook(server_round, updates, accepted)
    try:
        result = aggregator(updates, weights, state=state, generator=generator)
    except PreconditionError as exc:  # too few clients this round for the rule
        return skip(f"{exc}; the global model is unchanged")
    rejections += rule_rejections(accepted, result, aggregator.name)
    update = result.update
    return RoundOutcome(
        server_round,
        (g + update).to(global_flat.device),
        result.state,
        tuple(accepted),
        tuple(accepted[int(i)].node_id for i in result.kept.tolist()),
        tuple(rejections),
        None,
        time.perf_counter() - t0,
        update_norm=float(update.norm()),
        info=round_info(result, accepted),
    )


def too_few_message(num_valid: int, min_clients: int) -> str:
    """Why a round with too few valid replies is skipped."""
    return (
        f"only {num_valid} valid replies, fewer than min-clients={min_clients}; "
        "the global model is unchanged"
    )


def stack_updates(
    accepted: Sequence[ClientReply], global_flat: Tensor, spec: ModelSpec
) -> tuple[Tensor, Tensor]:
    """The ``(n, d)`` updates (each reply's weights minus ``global_flat``) and ``(n,)`` weights.

    ``global_flat`` is float64 on the aggregation device: small updates stay exact relative
    to large weights.
    """
    g = global_flat.to(torch.float64)  # no copy when it is already float64, as it should be
    n = len(accepted)
    updates = torch.empty((n, g.numel()), dtype=torch.float64, device=g.device)
    # rows of a stack (the batched engine's replies) go a stack at a time: one subtraction
    # per entry for all of them; the other replies one by one (below)
    stacks: dict[int, tuple[StackedArrays, list[int], list[int]]] = {}
    single: list[int] = []
    for i, r in enumerate(accepted):
        assert r.state is not None  # validate_replies accepted it
        if isinstance(r.state, StackRow):
            entry = stacks.setdefault(id(r.state.stack), (r.state.stack, [], []))
            entry[1].append(i)
            entry[2].append(r.state.i)
        else:
            single.append(i)
    for stack, positions, rows in stacks.values():
        _stack_rows(updates, positions, stack, rows, g, spec)
    if len(single) == n:
        _stack_states(updates, [accepted[i].state for i in single], g, spec)  # type: ignore[misc]
    elif single:  # a mix: the single replies in a buffer of their own, then in place
        part = torch.empty((len(single), g.numel()), dtype=torch.float64, device=g.device)
        _stack_states(part, [accepted[i].state for i in single], g, spec)  # type: ignore[misc]
        updates[torch.tensor(single, device=g.device)] = part
    weights = torch.tensor(
        [float(r.num_examples) for r in accepted], dtype=updates.dtype, device=g.device  # type: ignore[arg-type]
    )
    return updates, weights


def _stack_rows(
    updates: Tensor, positions: list[int], stack: StackedArrays, rows: list[int], g: Tensor,
    spec: ModelSpec,
) -> None:
    """``updates[positions[j]] = float64(stack row rows[j]) - g``, an entry at a time."""
    everything = positions == list(range(updates.shape[0]))
    same_rows = rows == list(range(stack.k))
    pos_t = None if everything else torch.tensor(positions, device=g.device)
    rows_t = None if same_rows else torch.tensor(rows, device=stack.arrays[spec.keys[0]].device)
    lo = 0
    for k, size in zip(spec.keys, spec.sizes, strict=True):
        hi = lo + size
        src = stack.arrays[k].reshape(stack.k, -1)
        src = _on(src if rows_t is None else src.index_select(0, rows_t), g.device)
        if pos_t is None:  # the exact float64 values, then one subtraction for all below
            updates[:, lo:hi].copy_(src)
        else:
            updates[pos_t, lo:hi] = torch.sub(src, g[lo:hi])
        lo = hi
    if pos_t is None:  # the same arithmetic as above, float64(reply) - g, on one buffer
        updates.sub_(g)


def _stack_states(
    updates: Tensor, states: Sequence[Mapping[str, Tensor]], g: Tensor, spec: ModelSpec
) -> None:
    """``updates[i] = float64(flat(states[i])) - g`` for every ``i``."""
    # One float64 (n, d) buffer written in place: row i, slice of entry k, is
    # float64(reply_i[k]) - g[slice], computed by one fused sub per entry (the float32 ->
    # float64 conversion is exact, then one float64 subtraction: the same arithmetic as
    # stack - g). Peak memory is the replies plus this buffer: no per-reply flat copies, no
    # second (n, d). n = 0 only happens with min_clients=0 (central DP releases every round).
    #
    # Small entries (a bias, a small model's layers) are stacked first, a block of replies
    # at a time, and subtracted in one call: a thousand one-row subtractions of a few
    # hundred values cost more in call overhead than in arithmetic. The block is at most
    # _STACK_BLOCK elements, so this adds at most that much memory; entries too large for
    # two rows in a block go row by row as above. Same values either way.
    n = len(states)
    lo = 0
    for k, size in zip(spec.keys, spec.sizes, strict=True):
        hi = lo + size
        step = _STACK_BLOCK // max(size, 1)
        if step >= 2:
            for a in range(0, n, step):
                rows = [_on(s[k].reshape(-1), g.device) for s in states[a:a + step]]
                torch.sub(torch.stack(rows), g[lo:hi], out=updates[a:a + len(rows), lo:hi])
        else:
            for i, s in enumerate(states):
                # a view unless the reply's tensor is strided
                torch.sub(_on(s[k].reshape(-1), g.device), g[lo:hi], out=updates[i, lo:hi])
        lo = hi


_STACK_BLOCK = 1 << 20
"""Elements of the largest temporary :func:`stack_updates` makes (4 MiB of float32)."""


def _on(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device)


def rule_rejections(
    accepted: Sequence[ClientReply], result: AggregationResult, rule_name: str
) -> list[Rejection]:
    """A rejection for each accepted reply the rule did not keep."""
    kept = {int(i) for i in result.kept.tolist()}
    return [
        Rejection(r.node_id, r.partition_id, "rule", f"not selected by {rule_name}")
        for i, r in enumerate(accepted) if i not in kept
    ]


def round_info(result: AggregationResult, accepted: Sequence[ClientReply]) -> dict[str, float]:
    """The rule's scalar diagnostics, and the largest epsilon a DP-SGD client reported."""
    info = {k: float(v) for k, v in result.info.items() if v.numel() == 1}
    client_eps = [float(r.metrics["dp-epsilon"]) for r in accepted if "dp-epsilon" in r.metrics]
    if client_eps:
        info["client-epsilon-max"] = max(client_eps)
    return info
