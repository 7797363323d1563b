"""Composition of pre-aggregation steps in front of an aggregation rule."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_inputs, checked
from ._types import AggregationResult, Aggregator, PreAggregator

__all__ = ["Composed", "compose"]


def _declared(obj: object, attr: str) -> frozenset[str]:
    value: object = getattr(obj, attr, frozenset())
    return frozenset(value) if isinstance(value, (set, frozenset)) else frozenset()


class Composed:
    """An aggregation rule run on the output of pre-aggregation steps.

    Built by :func:`compose`. ``kept`` is mapped back to the original clients through the
    steps' ``members``; ``info["members"]`` ``(n', n)`` holds the composed membership and
    the rule's own ``info`` (about the ``n'`` rows) is passed on.
    """

    __slots__ = ("pre", "rule")

    def __init__(self, rule: Aggregator, pre: tuple[PreAggregator, ...]) -> None:
        self.rule = rule
        self.pre = pre

    @property
    def name(self) -> str:
        """``rule+step+step``: the rule, then its steps in the order they run."""
        return "+".join([self.rule.name] + [p.name for p in self.pre])

    @property
    def stateful(self) -> bool:
        """The rule's."""
        return self.rule.stateful

    @property
    def random(self) -> bool:
        """Whether the rule or a step draws random numbers (a generator is then required)."""
        return bool(getattr(self.rule, "random", False)) or any(
            bool(getattr(p, "random", False)) for p in self.pre)

    @property
    def needs_clients(self) -> bool:
        """The rule's (only possible behind rowwise steps, see :func:`compose`)."""
        return bool(getattr(self.rule, "needs_clients", False))

    @property
    def needs_reference(self) -> bool:
        """The rule's."""
        return bool(getattr(self.rule, "needs_reference", False))

    @property
    def equivariances(self) -> frozenset[str]:
        """Those declared by the rule and every step."""
        out = _declared(self.rule, "equivariances")
        for p in self.pre:
            out &= _declared(p, "equivariances")
        return out

    @property
    def properties(self) -> frozenset[str]:
        """Those the rule declares and every step preserves."""
        out = _declared(self.rule, "properties")
        for p in self.pre:
            out &= _declared(p, "preserves")
        return out

    def init_state(self, d: int, *, dtype: torch.dtype,
                   device: torch.device | str) -> object | None:
        """The rule's initial state."""
        return self.rule.init_state(d, dtype=dtype, device=device)

    def __call__(self, updates: Tensor, weights: Tensor | None = None, *,
                 state: object | None = None,
                 generator: torch.Generator | None = None,
                 clients: Tensor | None = None,
                 reference: Tensor | None = None) -> AggregationResult:
        """Run the steps in order, then the rule; ``generator`` reaches every step and the
        rule, ``reference`` the rule unchanged, ``clients`` the rule when every step is
        rowwise (it is dropped otherwise: :func:`compose` refused the rules that need it).

        Raises
        ------
        ValueError
            Bad input, or a step's or the rule's precondition (the message then says how
            many rows the steps left).
        """
        updates, weights = check_inputs(self.name, updates, weights)
        n = updates.shape[0]
        # the first step (or the rule) gets the validated tensors and does not check again
        with checked(updates, weights):
            members = torch.eye(n, dtype=torch.bool, device=updates.device)  # (rows, n)
            x, w = updates, weights
            for step in self.pre:
                out = step(x, w, generator=generator)
                rows = out.updates.shape[0]
                if out.members.shape != (rows, x.shape[0]) or out.members.dtype != torch.bool:
                    raise ValueError(
                        f"pre-aggregation step {step.name!r} returned members of shape "
                        f"{tuple(out.members.shape)} and dtype {out.members.dtype}, expected "
                        f"bool ({rows}, {x.shape[0]})"
                    )
                members = (out.members.float() @ members.float()) > 0
                x, w = out.updates, out.weights
            rowwise = all(bool(getattr(p, "rowwise", False)) for p in self.pre)
            try:
                res = self.rule(x, w, state=state, generator=generator,
                                clients=clients if rowwise else None, reference=reference)
            except ValueError as err:
                steps = "+".join(p.name for p in self.pre)
                raise ValueError(
                    f"{err} (the rule ran on the output of {steps}: {n} clients became "
                    f"{x.shape[0]} rows)"
                ) from err
        kept = members[res.kept].any(dim=0).nonzero().flatten()
        info = dict(res.info)
        info["members"] = members
        return AggregationResult(update=res.update, kept=kept, state=res.state, info=info)

    def __repr__(self) -> str:
        return f"compose({self.rule!r}, {list(self.pre)!r})"


def compose(rule: Aggregator, pre: Sequence[PreAggregator]) -> Aggregator:
    """Run the pre-aggregation steps ``pre`` (in order) in front of ``rule``.

    The result is an :class:`Aggregator` named ``rule+step+...`` (the way configs and the
    bench write it, e.g. ``krum+bucketing``): its ``stateful`` and ``init_state`` are the
    rule's, its ``kept`` are the *original* client indices behind the rows the rule kept
    (the union of those rows' ``members``, sorted), and it declares the equivariances and
    properties that the rule declares and every step preserves. With an empty ``pre`` the
    rule itself is returned.

    The round's context is passed on: ``generator`` to every step and the rule,
    ``reference`` to the rule unchanged, ``clients`` to the rule only when every step is
    ``rowwise`` (row ``i`` still belongs to client ``i`` alone).

    Parameters
    ----------
    rule
        From :func:`aggregation.get`.
    pre
        A sequence of steps from :func:`aggregation.get_pre`.

    Returns
    -------
    Aggregator

    Raises
    ------
    TypeError
        If ``pre`` is not a sequence of callables (a single step must go in a list).
    ValueError
        If the rule keys a history by client (``needs_clients``) and a step mixes rows
        (``bucketing``, ``nnm``, any step not declared ``rowwise``): the rows it sees no
        longer belong to one client each.

    Examples
    --------
    >>> import aggregation, torch
    >>> agg = aggregation.compose(aggregation.get("krum", f=1),
    ...                           [aggregation.get_pre("bucketing", s=2)])
    >>> g = aggregation.make_generator(0)
    >>> res = agg(torch.randn(14, 3, generator=g), generator=g)
    >>> agg.name, len(res.kept)
    ('krum+bucketing', 2)
    """
    if not isinstance(pre, Sequence) or isinstance(pre, (str, bytes)):
        raise TypeError(
            f"compose: pre must be a sequence of pre-aggregation steps, got "
            f"{type(pre).__name__}: wrap a single step in a list"
        )
    if not callable(rule):
        raise TypeError(f"compose: rule must be an Aggregator, got {type(rule).__name__}")
    for step in pre:
        if not callable(step):
            raise TypeError(
                f"compose: every pre-aggregation step must be callable, got "
                f"{type(step).__name__}"
            )
    if not pre:
        return rule
    mixing = [str(getattr(p, "name", p)) for p in pre if not getattr(p, "rowwise", False)]
    if getattr(rule, "needs_clients", False) and mixing:
        raise ValueError(
            f"compose: {rule.name} keys its history by client, but the step(s) "
            f"{', '.join(mixing)} mix clients' rows (a row no longer belongs to one client): "
            f"put {rule.name} after rowwise steps only (e.g. norm_clip), or drop "
            f"{', '.join(mixing)}"
        )
    return Composed(rule, tuple(pre))
