"""How components are registered: one function, one registration line next to it.

A registry entry is a :class:`Factory`: called with a component's hyperparameters as
keywords (through :meth:`~aggregation.registry.Registry.build`), it checks them and returns
the component with them bound. It is built from the component's own function, so adding a
component is writing that function and one decorator above it:

- :func:`register_rule` / :func:`register_pre` for aggregation rules
  (:mod:`aggregation.rules`) and pre-aggregation steps (:mod:`aggregation.pre`), which also
  declare their guarantees;
- :func:`register_function` for a function whose keyword-only parameters are its
  hyperparameters (partitioners, models, evasion attacks): ``build`` returns the function
  with them bound;
- the attack registries in ``client.poisoning`` and ``simulations.attacks`` use
  :class:`Factory` the same way.

The rule objects (:class:`Rule`, :class:`PreStep`) validate the input and call the
registered function, which then skips its own check of the same tensors (see
:func:`~aggregation._checks.checked`); they hold no maths.

Declared properties (used by the contract tests, by :func:`aggregation.compose` and by
central DP):

``equivariances``
    ``"translation"``: ``A(x + t) = A(x) + t``; ``"scale"``: ``A(c x) = c A(x)`` for
    ``c > 0``.
``properties`` (rules)
    ``"permutation_invariant"``: reordering the clients (and their weights) leaves the
    result unchanged; ``"unanimous"``: ``n`` identical updates give that update;
    ``"within_bounds"``: every coordinate of the result lies within that coordinate's
    min/max over the inputs.
``preserves`` (pre-aggregation steps)
    The same names, meaning the step keeps the property of whatever rule follows it
    (``"permutation_invariant"``: the step commutes with reordering the clients).
``dp_compatible`` / ``why_not_dp``
    Whether the central-DP calibration (noise for the sensitivity ``C / m`` of the
    unweighted mean of clipped updates) covers the rule or step, and if not why: see
    :func:`central_dp_refusal`. A component that does not declare it is refused.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from ._checks import check_inputs, check_int, check_real, checked
from ._types import AggregationResult, Aggregator, PreAggregator, PreAggResult
from .registry import Registry

__all__ = [
    "PRE_AGGREGATORS",
    "RULES",
    "Check",
    "Factory",
    "PreStep",
    "Rule",
    "Traits",
    "boolean",
    "central_dp_refusal",
    "check_clients",
    "check_generator",
    "check_reference",
    "dp_compatible_steps",
    "get",
    "get_pre",
    "integer",
    "names",
    "optional",
    "pre_names",
    "real",
    "register_function",
    "register_pre",
    "register_rule",
]

C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., Any])

Check = Callable[[str, str, Any], Any]
"""``check(component, param, value)`` returns the value to bind, or raises ``TypeError`` /
``ValueError`` naming the component, the parameter and the value."""

TS = frozenset({"translation", "scale"})
ALL = frozenset({"permutation_invariant", "unanimous", "within_bounds"})


# ---------------------------------------------------------------------------------------
# hyperparameter checks


def integer(minimum: int) -> Check:
    """An int (not a bool) ``>= minimum``."""
    def check(component: str, param: str, value: Any) -> int:
        return check_int(component, param, value, minimum=minimum)
    return check


def real(minimum: float = -math.inf, *, strict: bool = False) -> Check:
    """A finite real ``>= minimum`` (``>`` if ``strict``), bound as a float."""
    def check(component: str, param: str, value: Any) -> float:
        return check_real(component, param, value, minimum=minimum, strict=strict)
    return check


def optional(inner: Check) -> Check:
    """``None``, or a value that passes ``inner``."""
    def check(component: str, param: str, value: Any) -> Any:
        return None if value is None else inner(component, param, value)
    return check


def boolean(component: str, param: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0 / 1)."""
    if not isinstance(value, bool):
        raise TypeError(f"{component}: {param} must be True or False, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# the registry entry


@dataclass(frozen=True)
class Traits:
    """What a registered rule or pre-aggregation step declares about itself.

    Attributes
    ----------
    equivariances
        See :mod:`aggregation.catalog`.
    properties
        For a rule, the properties it has; for a step, those it preserves.
    dp_compatible
        Whether the central-DP calibration for the unweighted mean of clipped updates
        covers it.
    why_not_dp
        Why not, when it does not (empty when it does).
    """

    equivariances: frozenset[str]
    properties: frozenset[str]
    dp_compatible: bool = False
    why_not_dp: str = ""


class Factory(Generic[C]):
    """A registry entry: called with a component's hyperparameters, returns the component.

    The hyperparameters are ``fn``'s keyword-only parameters except the ``runtime`` ones
    (supplied on every call, e.g. ``generator``), with ``fn``'s defaults, followed by
    ``extra`` (parameters of the component that ``fn`` does not take, e.g.
    ``use_weights``). ``inspect.signature(factory)`` shows exactly these, so
    :meth:`~aggregation.registry.Registry.build` refuses an unknown or a missing one. On a
    call every value (given or default) passes its check from ``params``, then ``validate``
    sees them all, then ``make`` builds the component from them.

    Parameters
    ----------
    name
        Registered name, used in error messages.
    fn
        The component's function.
    make
        ``make(params) -> component`` with the checked hyperparameters, in signature order.
    params
        A check per hyperparameter (those without one are bound as given).
    runtime
        Keyword-only parameters of ``fn`` that are not hyperparameters.
    extra
        Keyword-only :class:`inspect.Parameter` s appended to the hyperparameters.
    validate
        A check across several hyperparameters (e.g. "not both").
    traits
        Declared properties (rules and pre-aggregation steps).

    Raises
    ------
    ValueError
        If ``params`` checks a parameter that is not a hyperparameter (a registration bug).

    Examples
    --------
    >>> def scale(x: float, *, by: float = 2.0) -> float:
    ...     return by * x
    >>> factory = Factory("scale", scale, lambda p: functools.partial(scale, **p),
    ...                   params={"by": real(0.0, strict=True)})
    >>> inspect.signature(factory)
    <Signature (*, by: 'float' = 2.0)>
    >>> factory(by=3)(1.5)
    4.5
    >>> factory(by=0)
    Traceback (most recent call last):
    ...
    ValueError: scale: by must be > 0, got by=0
    """

    def __init__(self, name: str, fn: Callable[..., Any], make: Callable[[dict[str, Any]], C],
                 *, params: Mapping[str, Check] | None = None, runtime: Collection[str] = (),
                 extra: Sequence[inspect.Parameter] = (),
                 validate: Callable[[Mapping[str, Any]], None] | None = None,
                 traits: Traits | None = None) -> None:
        keyword_only = inspect.Parameter.KEYWORD_ONLY
        hyper = [p for p in inspect.signature(fn).parameters.values()
                 if p.kind is keyword_only and p.name not in runtime]
        self.__signature__ = inspect.Signature([*hyper, *extra])
        checks = dict(params or {})
        stray = sorted(set(checks) - set(self.__signature__.parameters))
        if stray:
            raise ValueError(
                f"{name}: checks given for {stray}, which are not hyperparameters of "
                f"{getattr(fn, '__name__', fn)!r}; its hyperparameters: "
                f"{', '.join(self.__signature__.parameters) or '(none)'}"
            )
        self.name = name
        self.fn = fn
        self.traits = traits
        self.checks: Mapping[str, Check] = MappingProxyType(checks)
        self._make = make
        self._validate = validate

    @property
    def hyperparameters(self) -> list[str]:
        """Names of the hyperparameters, in order."""
        return list(self.__signature__.parameters)

    def __call__(self, **params: Any) -> C:
        """The component with hyperparameters ``params`` (defaults for the others).

        Raises
        ------
        TypeError
            Unknown or missing hyperparameter, or one of the wrong type.
        ValueError
            A hyperparameter out of range.
        """
        try:
            self.__signature__.bind(**params)
        except TypeError as exc:
            raise TypeError(
                f"{self.name}: {exc}; valid parameters: {', '.join(self.hyperparameters)}"
            ) from None
        bound: dict[str, Any] = {}
        for p in self.__signature__.parameters.values():
            value = params.get(p.name, p.default)
            check = self.checks.get(p.name)
            bound[p.name] = value if check is None else check(self.name, p.name, value)
        if self._validate is not None:
            self._validate(bound)
        return self._make(bound)

    def __repr__(self) -> str:
        return f"Factory({self.name!r}{str(self.__signature__)})"


def register_function(registry: Registry[Factory[Callable[..., Any]]], name: str, *,
                      params: Mapping[str, Check] | None = None,
                      runtime: Collection[str] = ()) -> Callable[[F], F]:
    """Register the decorated function so that ``registry.build(name, **hyper)`` returns it
    with its keyword-only hyperparameters bound (a :func:`functools.partial`).

    The function itself is returned unchanged, so it can still be called directly.

    Examples
    --------
    >>> reg: Registry[Factory[Callable[..., Any]]] = Registry("kernel")
    >>> @register_function(reg, "power")
    ... def power(x: float, /, *, p: int = 2) -> float:
    ...     return x ** p
    >>> reg.build("power", p=3)(2.0)
    8.0
    >>> power(3.0)
    9.0
    """
    def decorator(fn: F) -> F:
        registry.register(name)(Factory(name, fn, lambda p: functools.partial(fn, **p),
                                        params=params, runtime=runtime))
        return fn
    return decorator


# ---------------------------------------------------------------------------------------
# rules and pre-aggregation steps


RUNTIME = ("generator", "clients", "reference")
"""Keyword-only parameters of a rule's function that are not hyperparameters but this
round's context, passed on every call to the functions that declare them (see
:class:`Rule`)."""


class Rule:
    """A registered aggregation rule with its hyperparameters bound.

    Not constructed directly: use :func:`aggregation.get`; registered with
    :func:`register_rule`.

    Besides the updates and weights, a call may carry the round's context; each piece
    reaches the rule's function only if the function declares it as a keyword-only
    parameter (rules that do not declare one accept it and ignore it):

    ``generator``
        A ``torch.Generator`` for rules that draw random numbers (``random``).
    ``clients``
        ``(n,)`` int64 stable client identities, one per row of ``updates``, unique (the
        node id in a deployment, ``1000 + partition`` in the in-process engine), for rules
        that key a history by client (``needs_clients``).
    ``reference``
        ``(d,)`` the server's own update on its root dataset, same dtype and device as the
        updates, finite, for rules that need it (``needs_reference``).

    Attributes
    ----------
    name
        Registered name.
    params
        Read-only mapping of the hyperparameters passed to the rule's function.
    use_weights
        Whether client weights reach the function (otherwise they are validated, then
        ignored).
    stateful
        Whether the rule carries state between rounds.
    random, needs_clients, needs_reference
        Whether the rule requires ``generator``, ``clients``, ``reference`` on every call.
    equivariances, properties
        Declared guarantees (see :mod:`aggregation.catalog`).
    """

    __slots__ = ("_fn", "_init", "_state_arg", "equivariances", "name", "needs_clients",
                 "needs_reference", "params", "properties", "random", "use_weights")

    def __init__(self, name: str, fn: Callable[..., AggregationResult],
                 params: Mapping[str, Any], *, use_weights: bool,
                 equivariances: frozenset[str], properties: frozenset[str],
                 state_arg: str | None = None,
                 init: Callable[..., Any] | None = None,
                 random: bool = False, needs_clients: bool = False,
                 needs_reference: bool = False) -> None:
        self.name = name
        self.params: Mapping[str, Any] = MappingProxyType(dict(params))
        self.use_weights = use_weights
        self.equivariances = equivariances
        self.properties = properties
        self.random = random
        self.needs_clients = needs_clients
        self.needs_reference = needs_reference
        self._fn = fn
        self._state_arg = state_arg
        self._init = init

    @property
    def stateful(self) -> bool:
        """Whether the rule carries state between rounds."""
        return self._state_arg is not None

    def init_state(self, d: int, *, dtype: torch.dtype,
                   device: torch.device | str) -> object | None:
        """Initial state for ``d`` parameters; ``None`` for stateless rules."""
        if self._init is None:
            return None
        # an init that declares a hyperparameter (fldetector's window) gets its value
        declared = inspect.signature(self._init).parameters
        hyper = {k: v for k, v in self.params.items() if k in declared}
        state: object = self._init(check_int(self.name, "d", d, minimum=1), dtype, device,
                                   **hyper)
        return state

    def __call__(self, updates: Tensor, weights: Tensor | None = None, *,
                 state: object | None = None,
                 generator: torch.Generator | None = None,
                 clients: Tensor | None = None,
                 reference: Tensor | None = None) -> AggregationResult:
        """Aggregate ``updates`` ``(n, d)`` with this round's context (see the class).

        Raises
        ------
        ValueError
            Bad input, a failed precondition, a state given to a stateless rule, or a
            context the rule needs missing or malformed (the message says how to pass it).
        TypeError
            ``generator`` is not a ``torch.Generator`` (for a random rule).
        """
        updates, weights = check_inputs(self.name, updates, weights)
        kwargs = dict(self.params)
        if self._state_arg is not None:
            if state is None:
                state = self.init_state(updates.shape[1], dtype=updates.dtype,
                                        device=updates.device)
            kwargs[self._state_arg] = state
        elif state is not None:
            raise ValueError(
                f"{self.name} is stateless but got state={type(state).__name__}: pass "
                "state=None (only rules with stateful=True take a state)"
            )
        if self.random:
            kwargs["generator"] = check_generator(self.name, generator)
        if self.needs_clients:
            kwargs["clients"] = check_clients(self.name, clients, updates)
        if self.needs_reference:
            kwargs["reference"] = check_reference(self.name, reference, updates)
        with checked(updates, weights):  # the function does not check them again
            return self._fn(updates, weights if self.use_weights else None, **kwargs)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"Rule({self.name!r}, {shown}{', ' if shown else ''}use_weights={self.use_weights})"


def check_generator(rule: str, generator: object) -> torch.Generator:
    """``generator``, checked for a rule that draws random numbers.

    Raises
    ------
    ValueError
        ``generator`` is ``None``.
    TypeError
        ``generator`` is not a ``torch.Generator``.
    """
    if generator is None:
        raise ValueError(
            f"{rule} draws random numbers: pass generator=aggregation.make_generator(seed) "
            "(the server derives one per round from the run's seed)"
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{rule}: generator must be a torch.Generator, got {type(generator).__name__}"
        )
    return generator


def check_clients(rule: str, clients: object, updates: Tensor) -> Tensor:
    """``clients`` checked against ``updates`` ``(n, d)``: ``(n,)`` int64, unique; returned on
    the updates' device.

    Raises
    ------
    ValueError
        ``clients`` missing, of the wrong type, shape or dtype, or with a repeated id.
    """
    n = updates.shape[0]
    if clients is None:
        raise ValueError(
            f"{rule} keys its history by client: pass clients=(n,) int64 ids, one stable id "
            f"per row of updates (got none for n={n} rows; the server passes the node ids)"
        )
    if not isinstance(clients, Tensor):
        raise ValueError(
            f"{rule}: clients must be a torch.Tensor of (n,) int64 ids, got "
            f"{type(clients).__name__}"
        )
    if clients.dtype != torch.int64 or tuple(clients.shape) != (n,):
        raise ValueError(
            f"{rule}: clients must be (n,) = ({n},) int64 ids, one per row of updates, got "
            f"shape {tuple(clients.shape)} and dtype {clients.dtype}"
        )
    if torch.unique(clients).numel() != n:
        ids, counts = torch.unique(clients, return_counts=True)
        raise ValueError(
            f"{rule}: clients must be unique (one row per client), got repeated ids "
            f"{ids[counts > 1].tolist()}"
        )
    return clients.to(updates.device)


def check_reference(rule: str, reference: object, updates: Tensor) -> Tensor:
    """``reference`` checked against ``updates`` ``(n, d)``: ``(d,)``, same dtype and device,
    finite.

    Raises
    ------
    ValueError
        ``reference`` missing, of the wrong type, shape, dtype or device, or not finite.
    """
    d = updates.shape[1]
    if reference is None:
        raise ValueError(
            f"{rule} needs the server's reference update on its root dataset: pass "
            f"reference=(d,) = ({d},) in the updates' dtype and device (a server component "
            "must compute it each round)"
        )
    if not isinstance(reference, Tensor):
        raise ValueError(
            f"{rule}: reference must be a torch.Tensor of shape (d,), got "
            f"{type(reference).__name__}"
        )
    if (tuple(reference.shape) != (d,) or reference.dtype != updates.dtype
            or reference.device != updates.device):
        raise ValueError(
            f"{rule}: reference must have shape (d,) = ({d},), dtype {updates.dtype} and "
            f"device {updates.device} like the updates, got shape {tuple(reference.shape)}, "
            f"dtype {reference.dtype}, device {reference.device}"
        )
    if not bool(torch.isfinite(reference).all()):
        raise ValueError(f"{rule}: reference has NaN or Inf entries")
    return reference


class PreStep:
    """A registered pre-aggregation step with its hyperparameters bound.

    Not constructed directly: use :func:`aggregation.get_pre`; registered with
    :func:`register_pre`.

    Attributes
    ----------
    name
        Registered name.
    params
        Read-only mapping of the hyperparameters.
    random
        Whether the step draws from the ``generator`` (which it then requires).
    rowwise
        Whether output row ``i`` depends on input row ``i`` alone (one row per client, in
        order, no mixing): only then may a rule that keys a history by client follow it.
    equivariances, preserves
        Declared guarantees (see :mod:`aggregation.catalog`).
    """

    __slots__ = ("_fn", "equivariances", "name", "params", "preserves", "random", "rowwise")

    def __init__(self, name: str, fn: Callable[..., PreAggResult], params: Mapping[str, Any],
                 *, random: bool, equivariances: frozenset[str],
                 preserves: frozenset[str], rowwise: bool = False) -> None:
        self.name = name
        self.params: Mapping[str, Any] = MappingProxyType(dict(params))
        self.random = random
        self.rowwise = rowwise
        self.equivariances = equivariances
        self.preserves = preserves
        self._fn = fn

    def __call__(self, updates: Tensor, weights: Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> PreAggResult:
        """Transform ``updates`` ``(n, d)``; deterministic steps ignore ``generator``."""
        kwargs = dict(self.params)
        if self.random:
            kwargs["generator"] = generator
        return self._fn(updates, weights, **kwargs)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"PreStep({self.name!r}{', ' if shown else ''}{shown})"


RULES: Registry[Factory[Rule]] = Registry("aggregator")
PRE_AGGREGATORS: Registry[Factory[PreStep]] = Registry("pre-aggregator")

StateInit = Callable[..., Any]
"""``init(d, dtype, device, **hyper)``: the first state of a stateful rule (tensors, numbers
and dicts / lists of them, so that a checkpoint stores it exactly); ``hyper`` holds the
rule's hyperparameters that ``init`` declares as keyword-only parameters."""


def _traits(name: str, equivariances: frozenset[str], properties: frozenset[str],
            dp_compatible: bool, why_not_dp: str) -> Traits:
    if dp_compatible and why_not_dp:
        raise ValueError(f"{name}: why_not_dp is for components that are not dp_compatible")
    if not dp_compatible and not why_not_dp:
        why_not_dp = f"{name} has no sensitivity analysis here"
    return Traits(frozenset(equivariances), frozenset(properties), dp_compatible, why_not_dp)


def _all_checked(name: str, factory: Factory[Any], skip: Collection[str] = ()) -> None:
    unchecked = [p for p in factory.hyperparameters if p not in factory.checks and p not in skip]
    if unchecked:
        raise ValueError(
            f"{name}: declare a check for hyperparameter(s) {unchecked} (e.g. "
            f"params={{{unchecked[0]!r}: integer(0)}}) so that a bad value fails when the "
            "rule is built, not in the middle of a round"
        )


def register_rule(name: str, *, params: Mapping[str, Check] | None = None,
                  use_weights: bool | None = None,
                  state: tuple[str, StateInit] | None = None,
                  validate: Callable[[Mapping[str, Any]], None] | None = None,
                  equivariances: frozenset[str], properties: frozenset[str],
                  dp_compatible: bool = False, why_not_dp: str = "") -> Callable[[F], F]:
    """Register the decorated function ``fn(updates, weights=None, *, hyper...)`` as the
    aggregation rule ``name``; the function is returned unchanged.

    ``aggregation.get(name, **hyper)`` then returns a :class:`Rule` with the
    hyperparameters (``fn``'s keyword-only parameters) checked and bound. Keyword-only
    parameters named ``generator``, ``clients`` or ``reference`` are not hyperparameters
    but the round's context (:data:`RUNTIME`): the rule is then ``random``,
    ``needs_clients`` or ``needs_reference``, and :class:`Rule` passes them on every call,
    refusing a call without them.

    Parameters
    ----------
    name
        The name configs use.
    params
        A check for every hyperparameter (:func:`integer`, :func:`real`, :func:`optional`,
        ...), so a bad value fails when the rule is built.
    use_weights
        ``None``: the rule has no weighted form (weights are validated, then ignored, and
        there is no ``use_weights`` hyperparameter). ``True`` / ``False``: the default of
        the ``use_weights`` hyperparameter, which decides whether weights reach ``fn``.
    state
        ``(arg, init)`` for a stateful rule: ``fn``'s keyword that receives the state and
        ``init(d, dtype, device, **hyper)`` giving the first one (``hyper``: the
        hyperparameters ``init`` declares as keyword-only parameters).
    validate
        A check across several hyperparameters, run when the rule is built.
    equivariances, properties
        Declared guarantees, checked by the contract tests (see the module docstring).
    dp_compatible, why_not_dp
        Whether central DP's calibration covers the rule, and if not why (one sentence,
        shown to the user).

    Raises
    ------
    ValueError
        At registration: a duplicate name, a hyperparameter without a check, or
        inconsistent declarations.
    """
    def decorator(fn: F) -> F:
        keyword_only = inspect.Parameter.KEYWORD_ONLY
        declared = {p.name for p in inspect.signature(fn).parameters.values()
                    if p.kind is keyword_only and p.name in RUNTIME}
        runtime = tuple(sorted(declared)) + (() if state is None else (state[0],))
        state_arg, init = (None, None) if state is None else state
        extra = [] if use_weights is None else [
            inspect.Parameter("use_weights", inspect.Parameter.KEYWORD_ONLY,
                              default=use_weights, annotation="bool")]
        traits = _traits(name, equivariances, properties, dp_compatible, why_not_dp)

        def make(p: dict[str, Any]) -> Rule:
            weighted = bool(p.pop("use_weights", False))
            return Rule(name, fn, p, use_weights=weighted, equivariances=traits.equivariances,
                        properties=traits.properties, state_arg=state_arg, init=init,
                        random="generator" in declared, needs_clients="clients" in declared,
                        needs_reference="reference" in declared)

        checks = dict(params or {})
        if use_weights is not None:
            checks["use_weights"] = boolean
        factory = Factory(name, fn, make, params=checks, runtime=runtime, extra=extra,
                          validate=validate, traits=traits)
        _all_checked(name, factory)
        RULES.register(name)(factory)
        return fn
    return decorator


def register_pre(name: str, *, params: Mapping[str, Check] | None = None,
                 equivariances: frozenset[str], preserves: frozenset[str],
                 rowwise: bool = False,
                 dp_compatible: bool = False, why_not_dp: str = "") -> Callable[[F], F]:
    """Register the decorated function ``fn(updates, weights=None, *, hyper...)`` as the
    pre-aggregation step ``name``; the function is returned unchanged.

    A function with a keyword-only ``generator`` is random: the step passes the generator
    it is called with.

    Parameters
    ----------
    params
        A check for every hyperparameter.
    equivariances, preserves
        Declared guarantees (see the module docstring).
    rowwise
        Whether output row ``i`` depends on input row ``i`` alone (``norm_clip``: yes;
        ``bucketing``, ``nnm``: no). :func:`aggregation.compose` refuses a rule that keys
        a history by client after a step that is not rowwise.
    dp_compatible, why_not_dp
        As for :func:`register_rule`: whether central DP may run after this step.
    """
    def decorator(fn: F) -> F:
        random = "generator" in inspect.signature(fn).parameters
        traits = _traits(name, equivariances, preserves, dp_compatible, why_not_dp)

        def make(p: dict[str, Any]) -> PreStep:
            return PreStep(name, fn, p, random=random, equivariances=traits.equivariances,
                           preserves=traits.properties, rowwise=rowwise)

        factory = Factory(name, fn, make, params=params,
                          runtime=("generator",) if random else (), traits=traits)
        _all_checked(name, factory)
        PRE_AGGREGATORS.register(name)(factory)
        return fn
    return decorator


def names() -> list[str]:
    """Sorted names of the registered aggregation rules."""
    return RULES.names()


def pre_names() -> list[str]:
    """Sorted names of the registered pre-aggregation steps."""
    return PRE_AGGREGATORS.names()


def get(name: str, **params: Any) -> Aggregator:
    """The aggregation rule ``name`` with hyperparameters ``params``.

    Raises
    ------
    KeyError
        Unknown name (the message lists the valid names and the closest match).
    TypeError
        Unknown or missing hyperparameter, or one of the wrong type.
    ValueError
        A hyperparameter out of range.

    Examples
    --------
    >>> import aggregation
    >>> aggregation.get("krum", f=1)
    Rule('krum', f=1, use_weights=False)
    """
    rule: Aggregator = RULES.build(name, **params)
    return rule


def get_pre(name: str, **params: Any) -> PreAggregator:
    """The pre-aggregation step ``name`` with hyperparameters ``params``.

    Raises
    ------
    KeyError
        Unknown name (the message lists the valid names and the closest match).
    TypeError
        Unknown or missing hyperparameter, or one of the wrong type.
    ValueError
        A hyperparameter out of range.

    Examples
    --------
    >>> import aggregation
    >>> aggregation.get_pre("bucketing", s=2)
    PreStep('bucketing', s=2)
    """
    step: PreAggregator = PRE_AGGREGATORS.build(name, **params)
    return step


def _declared(factory: Factory[Any]) -> Traits:
    if factory.traits is None:  # every rule and step is registered with traits
        raise RuntimeError(f"{factory.name} was registered without traits")
    return factory.traits


def central_dp_refusal(rule: str) -> str | None:
    """Why central DP's calibration does not cover the rule ``rule``; ``None`` if it does.

    Raises
    ------
    KeyError
        Unknown rule (the message lists the valid names and the closest match).

    Examples
    --------
    >>> central_dp_refusal("mean") is None
    True
    >>> print(central_dp_refusal("krum"))
    Krum selects one client's update: ...
    """
    traits = _declared(RULES.get(rule))
    return None if traits.dp_compatible else traits.why_not_dp


def dp_compatible_steps() -> list[str]:
    """Sorted names of the pre-aggregation steps central DP may follow.

    Examples
    --------
    >>> dp_compatible_steps()
    ['norm_clip']
    """
    return [n for n in PRE_AGGREGATORS.names() if _declared(PRE_AGGREGATORS.get(n)).dp_compatible]
