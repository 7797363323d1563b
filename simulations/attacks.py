"""Omniscient model-poisoning attacks: colluding attackers who see the honest updates.

Every attack maps the stack of honest updates ``(h, d)`` to the ``f`` malicious updates
``(f, d)`` sent by the colluding Byzantine clients, in the same dtype and on the same
device. An update is the local weights minus the global weights, so the global model
the attackers received, ``w_Re`` in [Fang et al., 2020], is the origin here. ``n = h + f``
clients take part in the round.

Attacks are registered by name in :data:`ATTACKS`, each by the :func:`register_attack`
line above its function; build one with :func:`get_attack`::

    attack = get_attack("alie")
    malicious = attack(honest, f=3, generator=make_generator(0))   # (3, d)

An attack that needs to know the defense (``needs_aggregator=True``: ``fang_krum``, and
``alie_adaptive`` / ``ipm_adaptive``, which search their strength against it) receives it
as the ``aggregator`` argument: any object called as
``aggregator(updates, weights, generator=...)`` that returns a result with ``.update`` and
``.kept``, e.g. ``aggregation.get("krum", f=f)``. No attack inspects the defense's class
or name. A rule that needs the round's context (FLTrust's reference update, the client
identities of a history-keeping rule) is handed over as a :class:`RoundDefense`, which
binds that context to every call.

The maths lives in module-level functions (:func:`alie`, :func:`min_max`, ...) that can be
used directly; the registry only binds their hyperparameters. The names are distinct from
the client-side attacks' (``client.poisoning``): the omniscient sign flip is
``sign_flip_mean`` and the omniscient noise ``gaussian_noise``, while ``sign_flip`` and
``gaussian`` are what one client does with its own update.
"""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

from aggregation.catalog import Check, Factory, optional
from aggregation.registry import Registry, make_generator

__all__ = [
    "ATTACKS",
    "AggregationResultLike",
    "AggregatorLike",
    "Attack",
    "FangKrumResult",
    "RoundDefense",
    "RoundRuleLike",
    "StrengthSearch",
    "alie",
    "alie_adaptive",
    "alie_search",
    "alie_z_max",
    "attack_names",
    "fang_krum",
    "fang_krum_search",
    "fang_trimmed_mean",
    "gaussian_noise",
    "get_attack",
    "ipm",
    "ipm_adaptive",
    "ipm_search",
    "mimic",
    "mimic_index",
    "min_max",
    "min_max_gamma",
    "min_sum",
    "min_sum_gamma",
    "perturbation_vector",
    "register_attack",
    "scaling",
    "sign_flip_mean",
    "strength_search",
]

F = TypeVar("F", bound=Callable[..., Any])
Perturbation = Literal["unit", "std", "sign"]
_PERTURBATIONS: tuple[str, ...] = ("unit", "std", "sign")


class AggregationResultLike(Protocol):
    """What an attack reads from an aggregator's result (``aggregation.AggregationResult``)."""

    @property
    def update(self) -> Tensor: ...  # (d,)

    @property
    def kept(self) -> Tensor: ...  # (k,) int64 indices into the n stacked updates


class AggregatorLike(Protocol):
    """The defense as an attack sees it: a callable over an ``(n, d)`` stack."""

    def __call__(
        self,
        updates: Tensor,
        weights: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> AggregationResultLike: ...


class RoundRuleLike(Protocol):
    """The defense as the server calls it, with a round's context (``aggregation.Aggregator``)."""

    def __call__(
        self,
        updates: Tensor,
        weights: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        clients: Tensor | None = None,
        reference: Tensor | None = None,
    ) -> AggregationResultLike: ...


@dataclass(frozen=True)
class RoundDefense:
    """The defense with this round's context bound, as a defense-aware attack calls it.

    A defense-aware attack (``alie_adaptive``, ``ipm_adaptive``, ``fang_krum``) calls the
    defense on its candidate stacks ``[honest; malicious]`` ``(h + f, d)``; the server calls
    it with the round's client weights, client identities (FoolsGold's and FLDetector's
    history) and its reference update (FLTrust). Bound here, the search runs against the
    defense the server will apply, not one that refuses for want of its context. The
    rule's state across rounds is the server's and is not bound: a stateful rule is
    evaluated from its initial state.

    Parameters
    ----------
    rule
        The defense, called as ``rule(updates, weights, generator=..., clients=...,
        reference=...)``.
    weights
        ``(h + f,)`` the clients' weights in the stack's row order, or ``None``.
    clients
        ``(h + f,)`` int64 client identities in the stack's row order (honest first, then
        the attackers), or ``None``.
    reference
        ``(d,)`` the server's own update this round, or ``None``.

    Examples
    --------
    >>> import aggregation
    >>> defense = RoundDefense(aggregation.get("mean"), weights=torch.tensor([3.0, 1.0]))
    >>> defense(torch.tensor([[0.0], [4.0]])).update   # weights bound, none passed
    tensor([1.])
    """

    rule: RoundRuleLike
    weights: Tensor | None = None
    clients: Tensor | None = None
    reference: Tensor | None = None

    def __call__(self, updates: Tensor, weights: Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> AggregationResultLike:
        """``rule`` on ``updates`` ``(h + f, d)`` with the bound context.

        Raises
        ------
        ValueError
            If ``updates`` has another number of rows than the bound weights or clients
            (an internal error: the stack is not the round's), or the rule refuses.
        """
        n = updates.shape[0]
        for what, bound in (("weights", self.weights), ("clients", self.clients)):
            if bound is not None and bound.shape[0] != n:
                raise ValueError(
                    f"RoundDefense: {what} bound for {bound.shape[0]} clients, the stack has "
                    f"{n} rows: bind the round's clients in the stack's row order"
                )
        return self.rule(updates, self.weights if weights is None else weights,
                         generator=generator, clients=self.clients, reference=self.reference)


AttackFn = Callable[[Tensor, int, torch.Generator, "AggregatorLike | None"], Tensor]


@dataclass(frozen=True)
class Attack:
    """An omniscient attack with its hyperparameters bound; build with :func:`get_attack`.

    Calling it checks the inputs and returns the ``f`` malicious updates.

    Parameters
    ----------
    name
        Registered name.
    needs_aggregator
        Whether the attack must be given the defense as ``aggregator``.
    params
        The bound hyperparameters, for logging.
    fn
        ``fn(honest, f, generator, aggregator) -> (f, d)``; inputs are already checked.

    Examples
    --------
    >>> from aggregation.registry import make_generator
    >>> attack = get_attack("ipm", epsilon=0.5)
    >>> attack(torch.ones(4, 2), f=1, generator=make_generator(0))
    tensor([[-0.5000, -0.5000]])
    """

    name: str
    needs_aggregator: bool
    params: Mapping[str, Any]
    fn: AttackFn = field(repr=False, compare=False)

    def __call__(
        self,
        honest: Tensor,
        *,
        f: int,
        generator: torch.Generator,
        aggregator: AggregatorLike | None = None,
    ) -> Tensor:
        """Return the ``(f, d)`` malicious updates crafted from ``honest`` ``(h, d)``.

        Raises
        ------
        ValueError
            If ``honest`` is not a non-empty finite floating ``(h, d)`` tensor, ``f < 1``,
            or the attack needs an aggregator and none was given.
        TypeError
            If ``f`` is not an int or ``generator`` is not a ``torch.Generator``.
        """
        _check_inputs(self.name, honest, f, generator)
        if self.needs_aggregator and aggregator is None:
            raise ValueError(
                f"attack {self.name!r} needs the defense: pass aggregator=..., "
                f"e.g. aggregation.get('krum', f={f})"
            )
        out = self.fn(honest, f, generator, aggregator)
        if out.shape != (f, honest.shape[1]):  # an internal invariant, not a user error
            raise RuntimeError(
                f"attack {self.name!r} returned shape {tuple(out.shape)}, "
                f"expected {(f, honest.shape[1])}"
            )
        return out


ATTACKS: Registry[Factory[Attack]] = Registry("attack")


def register_attack(name: str, *, params: Mapping[str, Check] | None = None,
                    validate: Callable[[Mapping[str, Any]], None] | None = None
                    ) -> Callable[[F], F]:
    """Register the decorated ``fn(honest, f, *, hyper..., generator?, aggregator?)`` as the
    omniscient attack ``name``; the function is returned unchanged.

    ``params`` checks each hyperparameter (``fn``'s other keyword-only parameters) when the
    attack is built, ``validate`` all of them together. A function with a keyword-only ``generator`` gets the attack's
    generator; one with ``aggregator`` gets the defense and needs it (``needs_aggregator``).
    """
    def decorator(fn: F) -> F:
        takes = inspect.signature(fn).parameters
        random, needs_aggregator = "generator" in takes, "aggregator" in takes

        def make(p: dict[str, Any]) -> Attack:
            def run(hon: Tensor, f: int, gen: torch.Generator,
                    agg: AggregatorLike | None) -> Tensor:
                extra: dict[str, Any] = {}
                if random:
                    extra["generator"] = gen
                if needs_aggregator:
                    extra["aggregator"] = agg
                out: Tensor = fn(hon, f, **p, **extra)
                return out
            return Attack(name, needs_aggregator, p, run)

        ATTACKS.register(name)(Factory(name, fn, make, params=params, validate=validate,
                                       runtime=("generator", "aggregator")))
        return fn
    return decorator


def get_attack(name: str, **params: Any) -> Attack:
    """Build the attack registered as ``name`` with hyperparameters ``params``.

    Raises
    ------
    KeyError
        If ``name`` is unknown (the message lists the valid names and a close match).
    TypeError
        If a parameter is not accepted by the attack (the message lists the valid ones).
    ValueError
        If a parameter value is out of range.

    Examples
    --------
    >>> get_attack("sign_flip_mean", scale=2.0).name
    'sign_flip_mean'
    """
    attack: Attack = ATTACKS.build(name, **params)
    return attack


def attack_names() -> list[str]:
    """Sorted names of the registered attacks."""
    return ATTACKS.names()


# --------------------------------------------------------------------------- checks


def _check_inputs(name: str, honest: Tensor, f: int, generator: torch.Generator) -> None:
    if not isinstance(honest, Tensor):
        raise TypeError(f"{name}: honest must be a torch.Tensor, got {type(honest).__name__}")
    if honest.ndim != 2 or honest.shape[0] < 1 or honest.shape[1] < 1:
        raise ValueError(
            f"{name}: honest must be a non-empty (h, d) stack of updates, "
            f"got shape {tuple(honest.shape)}"
        )
    if not honest.is_floating_point():
        raise ValueError(f"{name}: honest must be floating point, got dtype {honest.dtype}")
    if not bool(torch.isfinite(honest).all()):
        raise ValueError(f"{name}: honest contains NaN or Inf; drop or repair those updates")
    if isinstance(f, bool) or not isinstance(f, int):
        raise TypeError(f"{name}: f must be an int, got {type(f).__name__} {f!r}")
    if f < 1:
        raise ValueError(f"{name}: needs f >= 1 attackers, got f={f}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name}: generator must be a torch.Generator, got {type(generator).__name__}; "
            "use aggregation.registry.make_generator(seed)"
        )


def _check_real(name: str, param: str, value: float, *, low: float | None = None,
                strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: {param} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: {param} must be finite, got {value}")
    if low is not None and (value <= low if strict else value < low):
        op = ">" if strict else ">="
        raise ValueError(f"{name}: needs {param} {op} {low}, got {param}={value}")
    return value


def _real(*, low: float, strict: bool = True) -> Check:
    """A finite real above ``low`` (at least ``low`` unless ``strict``), bound as a float."""
    def check(name: str, param: str, value: Any) -> float:
        return _check_real(name, param, value, low=low, strict=strict)
    return check


def _check_perturbation(name: str, param: str, perturbation: Any) -> Perturbation:
    if perturbation not in _PERTURBATIONS:
        raise ValueError(
            f"{name}: unknown {param} {perturbation!r}; valid: {', '.join(_PERTURBATIONS)}"
        )
    return perturbation  # type: ignore[no-any-return]


def _repeat(row: Tensor, f: int) -> Tensor:
    """``(d,) -> (f, d)``, every attacker sending the same vector (a real copy)."""
    return row.unsqueeze(0).expand(f, -1).clone()


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    # drawn on the generator's device, so a CPU generator gives the same values for a
    # CUDA input as for a CPU one
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return z.to(device=like.device, dtype=like.dtype)


def _rand(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return u.to(device=like.device, dtype=like.dtype)


def _pairwise(g: Tensor) -> Tensor:
    """Exact pairwise Euclidean distances ``(h, h)`` (no ``|x|^2 + |y|^2 - 2xy`` shortcut)."""
    return torch.cdist(g, g, compute_mode="donot_use_mm_for_euclid_dist")


def _direction(mean: Tensor) -> Tensor:
    """``s = sign(mean)`` with ties (a zero coordinate) counted as ``+1``, shape ``(d,)``."""
    return torch.where(mean >= 0, torch.ones_like(mean), -torch.ones_like(mean))


# --------------------------------------------------------------------------- simple attacks


@register_attack("sign_flip_mean", params={"scale": _real(low=0.0)})
def sign_flip_mean(honest: Tensor, f: int, *, scale: float = 1.0) -> Tensor:
    """Sign flipping of the honest mean: every attacker sends it reversed and scaled.

    ``m_k = -scale * mean_i(g_i)`` for ``k = 1..f`` [Allen-Zhu et al., 2021; Li et al.,
    2019 (RSA)]. The omniscient form of the client-side ``sign_flip`` (which reverses the
    attacker's own update); the same vector as :func:`ipm` with ``epsilon = scale``, kept
    under this name for its default ``scale = 1``.

    Parameters
    ----------
    honest
        Honest updates, shape ``(h, d)``.
    f
        Number of attackers.
    scale
        Multiplier of the reversed mean (``> 0``).

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``.

    Examples
    --------
    >>> sign_flip_mean(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 1, scale=2.0)
    tensor([[-4., -6.]])
    """
    return _repeat(-scale * honest.mean(dim=0), f)


@register_attack("scaling", params={"scale": _real(low=0.0)})
def scaling(honest: Tensor, f: int, *, scale: float = 10.0) -> Tensor:
    """Boosted honest mean, a stand-in for model replacement [Bagdasaryan et al., 2020].

    ``m_k = scale * mean_i(g_i)``; with ``scale ~ n / eta`` the attackers' share of the
    average dominates the round.

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``.

    Examples
    --------
    >>> scaling(torch.tensor([[1.0], [3.0]]), 2, scale=10.0)
    tensor([[20.],
            [20.]])
    """
    return _repeat(scale * honest.mean(dim=0), f)


@register_attack("gaussian_noise", params={"std": _real(low=0.0)})
def gaussian_noise(honest: Tensor, f: int, *, std: float = 1.0,
                   generator: torch.Generator) -> Tensor:
    """Gaussian noise attack: each attacker sends an independent ``N(0, std^2 I_d)`` vector.

    [Blanchard et al., 2017, "Gaussian Byzantine" workers]. Only ``d`` and the dtype and
    device are taken from ``honest``; the draws come from ``generator``. Drawn by the
    simulation adversary for all ``f`` attackers at once; the client-side ``gaussian``
    (``std=...``) draws the same distribution on each attacker.

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``.

    Examples
    --------
    >>> from aggregation.registry import make_generator
    >>> gaussian_noise(torch.zeros(3, 5), 2, std=0.1, generator=make_generator(0)).shape
    torch.Size([2, 5])
    """
    return std * _randn((f, honest.shape[1]), generator, honest)


@register_attack("ipm", params={"epsilon": _real(low=0.0)})
def ipm(honest: Tensor, f: int, *, epsilon: float = 0.1) -> Tensor:
    """Inner-product manipulation [Xie, Koyejo & Gupta, UAI 2020].

    ``m_k = -epsilon * mean_i(g_i)``: for small ``epsilon`` the attackers stay close to the
    honest cloud yet make the inner product of the aggregate with the true gradient
    negative once enough of them pass the defense.

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``.

    Examples
    --------
    >>> ipm(torch.tensor([[2.0, -4.0]]), 1, epsilon=0.5)
    tensor([[-1.,  2.]])
    """
    return _repeat(-epsilon * honest.mean(dim=0), f)


# --------------------------------------------------------------------------- ALIE


def alie_z_max(n: int, f: int) -> float:
    """The largest safe ``z`` of "A Little Is Enough" [Baruch, Baruch & Goldberg, NeurIPS 2019].

    ``s = floor(n / 2 + 1) - f`` is the number of honest clients the attackers need on their
    side for a majority; ``z_max = Phi^{-1}((n - s) / n)`` with ``Phi`` the standard normal
    CDF, so that the attackers sit inside the spread of ``n - s`` honest clients.

    Parameters
    ----------
    n
        Clients in the round, honest and Byzantine (``n = h + f``).
    f
        Byzantine clients.

    Raises
    ------
    ValueError
        If ``f < 1``, ``n <= f``, or ``s <= 0`` (attackers already a majority, so
        ``Phi^{-1}(>= 1)`` is infinite).

    Examples
    --------
    >>> round(alie_z_max(50, 12), 4)   # s = 26 - 12 = 14, Phi^{-1}(36 / 50)
    0.5828
    """
    for name, v in (("n", n), ("f", f)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"alie: {name} must be an int, got {type(v).__name__} {v!r}")
    if f < 1 or n <= f:
        raise ValueError(f"alie: needs 1 <= f < n, got n={n}, f={f}")
    s = (n // 2 + 1) - f
    if s <= 0:
        raise ValueError(
            f"alie: z_max needs s = floor(n/2 + 1) - f >= 1, got n={n}, f={f}, s={s} "
            "(the attackers are already a majority): lower f or pass z explicitly"
        )
    return statistics.NormalDist().inv_cdf((n - s) / n)


@register_attack("alie", params={"z": optional(_real(low=0.0, strict=False))})
def alie(honest: Tensor, f: int, *, z: float | None = None) -> Tensor:
    """"A Little Is Enough" [Baruch, Baruch & Goldberg, NeurIPS 2019].

    Every attacker sends ``m_j = mu_j - z * sigma_j`` per coordinate ``j``, with ``mu`` and
    ``sigma`` the mean and the sample standard deviation (Bessel-corrected, ``h - 1``) of
    the honest updates. With ``z=None``, ``z = alie_z_max(h + f, f)``.

    Parameters
    ----------
    honest
        Honest updates ``(h, d)``, ``h >= 2`` (the sample deviation needs two).
    f
        Number of attackers.
    z
        Deviation in standard deviations (``>= 0``), or ``None`` for the paper's ``z_max``.

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``.

    Raises
    ------
    ValueError
        If ``h < 2``, or ``z`` is ``None`` and :func:`alie_z_max` refuses ``n, f``.

    Examples
    --------
    >>> alie(torch.tensor([[0.0], [2.0]]), 1, z=1.0)   # mu = 1, sigma = sqrt(2)
    tensor([[-0.4142]])
    """
    h = honest.shape[0]
    if h < 2:
        raise ValueError(f"alie: needs h >= 2 honest updates for a standard deviation, got h={h}")
    if z is None:
        z = alie_z_max(h + f, f)
    mu = honest.mean(dim=0)
    sigma = honest.std(dim=0, correction=1)
    return _repeat(mu - z * sigma, f)


# --------------------------------------------------------------------------- min-max / min-sum


def perturbation_vector(honest: Tensor, perturbation: Perturbation) -> Tensor:
    """The direction ``p`` of min-max / min-sum [Shejwalkar & Houmansadr, NDSS 2021].

    ``"unit"``: ``-mu / ||mu||`` (inverse unit vector); ``"std"``: ``-sigma`` (inverse
    coordinate-wise standard deviation, Bessel-corrected); ``"sign"``: ``-sign(mu)``.

    Returns
    -------
    Tensor
        ``(d,)``, dtype and device of ``honest``.

    Raises
    ------
    ValueError
        On an unknown ``perturbation``; ``"unit"`` with a zero honest mean (no direction);
        ``"std"`` with fewer than two honest updates.

    Examples
    --------
    >>> perturbation_vector(torch.tensor([[3.0, -4.0]]), "unit")
    tensor([-0.6000,  0.8000])
    """
    mu = honest.mean(dim=0)
    if perturbation == "unit":
        norm = torch.linalg.vector_norm(mu)
        if float(norm) == 0.0:
            raise ValueError(
                "min-max/min-sum: perturbation='unit' needs a nonzero honest mean; "
                "use perturbation='std'"
            )
        return mu.div(norm).neg()
    if perturbation == "std":
        if honest.shape[0] < 2:
            raise ValueError(
                f"min-max/min-sum: perturbation='std' needs h >= 2 honest updates, "
                f"got h={honest.shape[0]}"
            )
        return -honest.std(dim=0, correction=1)
    if perturbation == "sign":
        return -torch.sign(mu)
    raise ValueError(
        f"min-max/min-sum: unknown perturbation {perturbation!r}; "
        f"valid: {', '.join(_PERTURBATIONS)}"
    )


def _largest_root(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Largest ``gamma`` with ``c gamma^2 + 2 b gamma + a <= 0``, given ``a <= 0``, ``c > 0``.

    Uses the cancellation-free form of the quadratic formula.
    """
    a = torch.clamp(a, max=0.0)  # a <= 0 holds exactly (gamma = 0 is feasible); drop rounding
    root = torch.sqrt(b * b - c * a)
    pos = b > 0
    safe = torch.where(pos, b + root, torch.ones_like(b))
    return torch.where(pos, -a / safe, (-b + root) / c)


def min_max_gamma(honest: Tensor, p: Tensor) -> float:
    """Largest ``gamma`` of the min-max attack [Shejwalkar & Houmansadr, NDSS 2021, Eq. 3].

    Solves ``max gamma  s.t.  max_i ||mu + gamma p - g_i|| <= max_{i,j} ||g_i - g_j||``.
    ``||mu + gamma p - g_i||^2`` is a quadratic in ``gamma`` and ``gamma = 0`` is feasible,
    so the answer is the smallest over ``i`` of each quadratic's largest root: the exact
    optimum that the paper's bisection approximates. Computed in float64.

    Parameters
    ----------
    honest
        ``(h, d)`` honest updates.
    p
        ``(d,)`` perturbation direction.

    Returns
    -------
    float
        ``gamma >= 0``; ``0.0`` when ``p`` is zero (``gamma`` then has no effect).

    Examples
    --------
    >>> min_max_gamma(torch.tensor([[0.0], [2.0]]), torch.tensor([1.0]))   # mu=1, bound 2
    1.0
    """
    g = honest.to(torch.float64)
    p64 = p.to(torch.float64)
    c = float(p64 @ p64)
    if c == 0.0:
        return 0.0
    mu = g.mean(dim=0)
    bound_sq = float((_pairwise(g) ** 2).max())
    diff = mu.unsqueeze(0) - g  # (h, d)
    a = (diff * diff).sum(dim=1) - bound_sq  # (h,)
    b = diff @ p64  # (h,)
    return float(_largest_root(a, b, c).min())


def min_sum_gamma(honest: Tensor, p: Tensor) -> float:
    """Largest ``gamma`` of the min-sum attack [Shejwalkar & Houmansadr, NDSS 2021, Eq. 4].

    Solves ``max gamma  s.t.  sum_i ||mu + gamma p - g_i||^2 <= max_i sum_j ||g_i - g_j||^2``
    exactly (one quadratic in ``gamma``; ``gamma = 0`` is feasible since the mean minimises
    the sum of squared distances). Computed in float64.

    Returns
    -------
    float
        ``gamma >= 0``; ``0.0`` when ``p`` is zero.

    Examples
    --------
    >>> min_sum_gamma(torch.tensor([[0.0], [2.0]]), torch.tensor([1.0]))  # 2 + 2 g^2 <= 4
    1.0
    """
    g = honest.to(torch.float64)
    p64 = p.to(torch.float64)
    h = g.shape[0]
    c = float(p64 @ p64) * h
    if c == 0.0:
        return 0.0
    mu = g.mean(dim=0)
    bound = float((_pairwise(g) ** 2).sum(dim=1).max())
    diff = mu.unsqueeze(0) - g  # (h, d)
    a = (diff * diff).sum().reshape(1) - bound
    b = (diff @ p64).sum().reshape(1)
    return float(_largest_root(a, b, c)[0])


@register_attack("min_max", params={"perturbation": _check_perturbation})
def min_max(honest: Tensor, f: int, *, perturbation: Perturbation = "unit") -> Tensor:
    """Min-max attack [Shejwalkar & Houmansadr, "Manipulating the Byzantine", NDSS 2021].

    ``m = mu + gamma * p`` with ``p`` from :func:`perturbation_vector` and ``gamma`` the
    largest value keeping ``m`` no farther from any honest update than the honest updates
    are from each other (:func:`min_max_gamma`). All attackers send ``m``.

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``.

    Raises
    ------
    ValueError
        See :func:`perturbation_vector`.

    Examples
    --------
    >>> min_max(torch.tensor([[0.0], [2.0]]), 1, perturbation="sign")   # mu=1, p=-1, g=1
    tensor([[0.]])
    """
    p = perturbation_vector(honest, perturbation)
    gamma = min_max_gamma(honest, p)
    return _repeat(honest.mean(dim=0) + gamma * p, f)


@register_attack("min_sum", params={"perturbation": _check_perturbation})
def min_sum(honest: Tensor, f: int, *, perturbation: Perturbation = "unit") -> Tensor:
    """Min-sum attack [Shejwalkar & Houmansadr, "Manipulating the Byzantine", NDSS 2021].

    ``m = mu + gamma * p`` with ``gamma`` the largest value keeping the sum of squared
    distances from ``m`` to the honest updates within the largest such sum of an honest
    update (:func:`min_sum_gamma`). All attackers send ``m``.

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``.

    Examples
    --------
    >>> min_sum(torch.tensor([[0.0], [2.0]]), 1, perturbation="sign")
    tensor([[0.]])
    """
    p = perturbation_vector(honest, perturbation)
    gamma = min_sum_gamma(honest, p)
    return _repeat(honest.mean(dim=0) + gamma * p, f)


# --------------------------------------------------------------------------- Fang et al.


@register_attack("fang_trimmed_mean", params={"b": _real(low=1.0)})
def fang_trimmed_mean(honest: Tensor, f: int, *, b: float = 2.0,
                      generator: torch.Generator) -> Tensor:
    """Full-knowledge attack on trimmed mean / median [Fang et al., USENIX Security 2020].

    Directed deviation against ``s = sign(mu)`` (the direction each coordinate would move
    without attack; a zero coordinate counts as ``+1``). With ``w_max,j`` and ``w_min,j``
    the honest extremes, attacker ``k`` draws coordinate ``j`` uniformly (``generator``) from

    - ``s_j = +1``: ``[w_min,j / b, w_min,j]`` if ``w_min,j > 0`` else ``[b w_min,j, w_min,j]``;
    - ``s_j = -1``: ``[w_max,j, b w_max,j]`` if ``w_max,j > 0`` else ``[w_max,j, w_max,j / b]``,

    so every malicious value lies beyond the honest extreme, against ``s``. The paper works
    on model weights; here on updates, i.e. with the received global model at the origin.

    Parameters
    ----------
    b
        Range factor ``> 1`` (the paper uses 2).

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``; rows differ (independent draws).

    Examples
    --------
    >>> from aggregation.registry import make_generator
    >>> m = fang_trimmed_mean(torch.tensor([[1.0], [3.0]]), 2, generator=make_generator(0))
    >>> bool(((m >= 0.5) & (m <= 1.0)).all())   # s = +1, w_min = 1 > 0: [1/2, 1]
    True
    """
    s = _direction(honest.mean(dim=0))  # (d,)
    w_max = honest.max(dim=0).values
    w_min = honest.min(dim=0).values
    lo_up = torch.where(w_min > 0, w_min / b, w_min * b)  # s = +1: push below w_min
    hi_up = w_min
    lo_down = w_max  # s = -1: push above w_max
    hi_down = torch.where(w_max > 0, w_max * b, w_max / b)
    lo = torch.where(s > 0, lo_up, lo_down)
    hi = torch.where(s > 0, hi_up, hi_down)
    u = _rand((f, honest.shape[1]), generator, honest)
    return lo + u * (hi - lo)


class FangKrumResult(NamedTuple):
    """Outcome of :func:`fang_krum_search`."""

    malicious: Tensor  # (f, d)
    lam: float  # the lambda used
    selected: bool  # whether the aggregator kept an attacker at that lambda
    lam_max: float  # the paper's upper bound the search started from


def _fang_krum_lambda_max(honest: Tensor, f: int) -> float:
    """Upper bound on lambda [Fang et al., 2020, Sec. 3.2], with ``w_Re`` at the origin."""
    h, d = honest.shape
    n = h + f
    g = honest.to(torch.float64)
    dist = _pairwise(g)  # (h, h)
    # the h - 2 = n - f - 2 nearest honest neighbours of each honest update, self excluded
    nearest = torch.sort(dist, dim=1).values[:, 1: h - 1].sum(dim=1)
    first = float(nearest.min()) / ((n - 2 * f - 1) * math.sqrt(d))
    second = float(torch.linalg.vector_norm(g, dim=1).max()) / math.sqrt(d)
    return first + second


def fang_krum_search(honest: Tensor, f: int, *, aggregator: AggregatorLike,
                     generator: torch.Generator, epsilon: float = 0.0,
                     stop_threshold: float = 1e-5) -> FangKrumResult:
    """Full-knowledge attack on Krum [Fang et al., USENIX Security 2020, Sec. 3.2].

    The first attacker sends ``m_1 = -lambda * s`` (``s = sign(mu)``, zero as ``+1``; the
    received global model is the origin of update space); the other ``f - 1`` send
    ``m_1 + epsilon * u_k`` with ``u_k`` random unit vectors from ``generator`` drawn once
    (``epsilon = 0``: exact copies). ``lambda`` starts at the paper's bound

    ``lambda_max = min_i sum_{l in Gamma_i} ||g_l - g_i|| / ((n - 2f - 1) sqrt(d))
    + max_i ||g_i|| / sqrt(d)``

    (``Gamma_i``: the ``n - f - 2`` honest updates nearest to honest ``g_i``) and is halved
    until ``aggregator`` applied to ``[honest; malicious]`` keeps an attacker (an index
    ``>= h`` in ``result.kept``). If ``lambda`` drops below ``stop_threshold`` first, the
    search gives up and the smallest ``lambda`` tried is used (``selected=False``).

    Parameters
    ----------
    aggregator
        The defense, any Krum-like rule reporting ``kept``, e.g.
        ``aggregation.get("krum", f=f)``; it must accept ``n = h + f`` updates.
    epsilon
        Distance (``>= 0``) of attackers ``2..f`` from the first.
    stop_threshold
        Smallest ``lambda`` tried (``> 0``; the paper uses ``1e-5``).

    Returns
    -------
    FangKrumResult
        ``malicious`` ``(f, d)`` in the dtype and device of ``honest``, ``lam``,
        ``selected``, ``lam_max``.

    Raises
    ------
    ValueError
        If ``h < f + 2`` (the bound needs ``n - 2f - 1 >= 1``); errors of ``aggregator``
        (e.g. Krum's ``n >= 2f + 3``) propagate.

    Examples
    --------
    >>> import aggregation  # doctest: +SKIP
    >>> res = fang_krum_search(honest, 3, aggregator=aggregation.get("krum", f=3),
    ...                        generator=make_generator(0))  # doctest: +SKIP
    """
    h, d = honest.shape
    if h < f + 2:
        raise ValueError(
            f"fang_krum: the lambda bound needs n - 2f - 1 >= 1, i.e. h >= f + 2, "
            f"got h={h}, f={f}: lower f or sample more clients"
        )
    s = _direction(honest.mean(dim=0))  # (d,)
    offsets = torch.zeros((f, d), dtype=honest.dtype, device=honest.device)
    if epsilon > 0 and f > 1:
        u = _randn((f - 1, d), generator, honest)
        offsets[1:] = epsilon * u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
    lam_max = _fang_krum_lambda_max(honest, f)
    lam = lam_max
    while True:
        malicious = (-lam * s).unsqueeze(0) + offsets  # (f, d)
        result = aggregator(torch.cat([honest, malicious]), None, generator=generator)
        if bool((result.kept >= h).any()):
            return FangKrumResult(malicious, lam, True, lam_max)
        if lam / 2 < stop_threshold:
            return FangKrumResult(malicious, lam, False, lam_max)
        lam /= 2


@register_attack("fang_krum", params={"epsilon": _real(low=0.0, strict=False),
                                        "stop_threshold": _real(low=0.0)})
def fang_krum(honest: Tensor, f: int, *, aggregator: AggregatorLike,
              generator: torch.Generator, epsilon: float = 0.0,
              stop_threshold: float = 1e-5) -> Tensor:
    """The ``(f, d)`` malicious updates of :func:`fang_krum_search` [Fang et al., 2020]."""
    return fang_krum_search(honest, f, aggregator=aggregator, generator=generator,
                            epsilon=epsilon, stop_threshold=stop_threshold).malicious


# --------------------------------------------------------------------------- adaptive strength


class StrengthSearch(NamedTuple):
    """Outcome of :func:`strength_search`."""

    malicious: Tensor  # (f, d) at the chosen strength
    strength: float  # the z (ALIE) or epsilon (IPM) chosen
    distance: float  # ||aggregate - honest mean|| at that strength
    tried: tuple[tuple[float, float], ...]  # (strength, distance) in evaluation order


def _int_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def strength_search(honest: Tensor, f: int, craft: Callable[[float], Tensor], *,
                    aggregator: AggregatorLike, generator: torch.Generator, low: float,
                    high: float, grid: int, refine: int,
                    include: tuple[float, ...] = ()) -> StrengthSearch:
    """The strength of an attack that moves the defended aggregate farthest from the honest
    mean, by a grid and a line search [as ByzFL's optimal ALIE / IPM; Allouah et al., 2023].

    The objective is ``D(s) = ||A([honest; craft(s)]) - mu||`` with ``A`` the defense and
    ``mu`` the honest mean (computed in float64), the distance the attackers want large.
    It is evaluated on ``grid`` strengths spaced geometrically over ``[low, high]`` plus
    the strengths in ``include`` (e.g. the fixed attack's default), then ``refine`` times
    at the geometric midpoint between the best strength so far and the farther of its two
    evaluated neighbours, a bracketing line search that needs no unimodality. Every
    evaluation calls ``aggregator`` with a fresh generator of one seed drawn from
    ``generator``, so a random defense draws the same numbers for every candidate and
    the comparison is fair. The best strength wins; ties go to the smaller one. A
    candidate that the defense refuses (``ValueError``, e.g. a round it would skip) is
    recorded with distance ``nan`` and never chosen.

    Since ``include`` is among the candidates, the chosen strength moves the aggregate at
    least as far as each of them, as measured with the search's generator.

    Parameters
    ----------
    honest
        ``(h, d)`` honest updates.
    f
        Number of attackers; ``craft(s)`` returns their ``(f, d)`` updates at strength
        ``s``.
    aggregator
        The defense, called as ``aggregator(updates, None, generator=...)``.
    low, high
        ``0 < low < high``: the grid's range.
    grid
        Grid points, ``>= 2``.
    refine
        Line-search evaluations after the grid, ``>= 0``.
    include
        Further strengths to evaluate (those outside ``(0, inf)`` are ignored).

    Returns
    -------
    StrengthSearch

    Raises
    ------
    ValueError
        If the defense refuses every candidate (the last refusal is re-raised).

    Examples
    --------
    >>> import aggregation  # doctest: +SKIP
    >>> res = strength_search(honest, 3, lambda z: alie(honest, 3, z=z),
    ...                       aggregator=aggregation.get("median"), generator=g,
    ...                       low=0.1, high=10.0, grid=9, refine=8)  # doctest: +SKIP
    """
    seed = _int_seed(generator)
    mu = honest.to(torch.float64).mean(dim=0)
    results: dict[float, float] = {}
    crafted: dict[float, Tensor] = {}
    tried: list[tuple[float, float]] = []
    refusal: ValueError | None = None

    def evaluate(s: float) -> None:
        nonlocal refusal
        if s in results:
            return
        malicious = craft(s)
        try:
            out = aggregator(torch.cat([honest, malicious]), None,
                             generator=make_generator(seed, generator.device))
            dist = float(torch.linalg.vector_norm(out.update.to(torch.float64) - mu))
        except ValueError as exc:
            refusal, dist = exc, math.nan
        results[s], crafted[s] = dist, malicious
        tried.append((s, dist))

    ratio = (high / low) ** (1.0 / (grid - 1))
    for s in [*(v for v in include if 0 < v < math.inf), *(low * ratio**k for k in range(grid))]:
        evaluate(s)
    for _ in range(refine):
        top = _best(results)
        if top is None:
            break
        xs = sorted(results)
        i = xs.index(top)
        sides = [x for x in (xs[i - 1] if i > 0 else None,
                             xs[i + 1] if i + 1 < len(xs) else None) if x is not None]
        far = max(sides, key=lambda x: abs(math.log(x / top)))
        mid = math.sqrt(top * far)
        if mid in results:  # the bracket is exhausted in floating point
            break
        evaluate(mid)
    best = _best(results)
    if best is None:
        assert refusal is not None
        raise refusal
    return StrengthSearch(crafted[best], best, results[best], tuple(tried))


def _best(results: Mapping[float, float]) -> float | None:
    """The strength of the largest finite distance, the smallest on ties; None if none."""
    finite = [(d, s) for s, d in results.items() if not math.isnan(d)]
    if not finite:
        return None
    top = max(d for d, _ in finite)
    return min(s for d, s in finite if d == top)


def _search_range(name: str) -> Callable[[Mapping[str, Any]], None]:
    def validate(params: Mapping[str, Any]) -> None:
        if not params["low"] < params["high"]:
            raise ValueError(
                f"{name}: needs low < high for the search range, got low={params['low']:g}, "
                f"high={params['high']:g}"
            )
    return validate


_SEARCH_PARAMS: dict[str, Check] = {
    "low": _real(low=0.0), "high": _real(low=0.0),
    "grid": lambda name, param, value: _check_count(name, param, value, low=2),
    "refine": lambda name, param, value: _check_count(name, param, value, low=0),
}


def _check_count(name: str, param: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: {param} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name}: needs {param} >= {low}, got {param}={value}")
    return value


@register_attack("alie_adaptive", params=_SEARCH_PARAMS,
                 validate=_search_range("alie_adaptive"))
def alie_adaptive(honest: Tensor, f: int, *, aggregator: AggregatorLike,
                  generator: torch.Generator, low: float = 0.1, high: float = 10.0,
                  grid: int = 9, refine: int = 8) -> Tensor:
    """ALIE with ``z`` searched against the defense in use [Baruch et al., NeurIPS 2019;
    the search as ByzFL's optimal ALIE, Allouah et al., 2023].

    :func:`alie` at the ``z`` found by :func:`strength_search` over ``[low, high]``, with
    the paper's :func:`alie_z_max` (when defined for ``n = h + f``) among the candidates,
    so the result moves the defended aggregate at least as far as the fixed ``alie``
    does (as measured with the search's generator). ``grid + refine + 1`` calls of the
    defense per round.

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``.

    Raises
    ------
    ValueError
        If ``h < 2``, or the defense refuses every candidate.

    Examples
    --------
    >>> import aggregation
    >>> from aggregation.registry import make_generator
    >>> honest = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])   # mu = 2
    >>> res = alie_search(honest, 2, aggregator=aggregation.get("median"),
    ...                   generator=make_generator(0))
    >>> res.distance   # two attackers at or below 1 move the median of 7 from 2 to 1
    1.0
    >>> bool(res.malicious[0, 0] <= 1.0), res.malicious.shape
    (True, torch.Size([2, 1]))
    """
    return alie_search(honest, f, aggregator=aggregator, generator=generator, low=low,
                       high=high, grid=grid, refine=refine).malicious


def alie_search(honest: Tensor, f: int, *, aggregator: AggregatorLike,
                generator: torch.Generator, low: float = 0.1, high: float = 10.0,
                grid: int = 9, refine: int = 8) -> StrengthSearch:
    """The :class:`StrengthSearch` behind :func:`alie_adaptive` (``strength`` is ``z``)."""
    if honest.shape[0] < 2:
        raise ValueError(
            f"alie_adaptive: needs h >= 2 honest updates for a standard deviation, "
            f"got h={honest.shape[0]}"
        )
    try:
        include: tuple[float, ...] = (alie_z_max(honest.shape[0] + f, f),)
    except ValueError:  # attackers already a majority: no paper z to compare with
        include = ()
    return strength_search(honest, f, lambda z: alie(honest, f, z=z), aggregator=aggregator,
                           generator=generator, low=low, high=high, grid=grid,
                           refine=refine, include=include)


@register_attack("ipm_adaptive", params=_SEARCH_PARAMS,
                 validate=_search_range("ipm_adaptive"))
def ipm_adaptive(honest: Tensor, f: int, *, aggregator: AggregatorLike,
                 generator: torch.Generator, low: float = 0.01, high: float = 100.0,
                 grid: int = 9, refine: int = 8) -> Tensor:
    """IPM with ``epsilon`` searched against the defense in use [Xie, Koyejo & Gupta,
    UAI 2020; the search as ByzFL's optimal IPM, Allouah et al., 2023].

    :func:`ipm` at the ``epsilon`` found by :func:`strength_search` over ``[low, high]``,
    with ``ipm``'s default 0.1 among the candidates, so the result moves the defended
    aggregate at least as far as the fixed ``ipm`` does (as measured with the search's
    generator). Against the plain mean the distance grows with ``epsilon``, so the search
    ends at ``high``; a filtering defense stops it where the attackers start being
    removed. ``grid + refine + 1`` calls of the defense per round.

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``.

    Examples
    --------
    >>> import aggregation
    >>> from aggregation.registry import make_generator
    >>> m = ipm_adaptive(torch.ones(4, 2), 1, aggregator=aggregation.get("mean"),
    ...                  generator=make_generator(0))
    >>> m   # the mean is moved farthest at the top of the range
    tensor([[-100., -100.]])
    """
    return ipm_search(honest, f, aggregator=aggregator, generator=generator, low=low,
                      high=high, grid=grid, refine=refine).malicious


def ipm_search(honest: Tensor, f: int, *, aggregator: AggregatorLike,
               generator: torch.Generator, low: float = 0.01, high: float = 100.0,
               grid: int = 9, refine: int = 8) -> StrengthSearch:
    """The :class:`StrengthSearch` behind :func:`ipm_adaptive` (``strength`` is ``epsilon``)."""
    return strength_search(honest, f, lambda eps: ipm(honest, f, epsilon=eps),
                           aggregator=aggregator, generator=generator, low=low, high=high,
                           grid=grid, refine=refine, include=(0.1,))


# --------------------------------------------------------------------------- mimic


def mimic_index(honest: Tensor) -> int:
    """The honest client that mimic copies [Karimireddy, He & Jaggi, ICLR 2022, Sec. 5].

    The paper's heuristic: ``z`` = the top principal direction of the honest updates,
    ``argmax_{||z||=1} sum_i (z^T (g_i - mu))^2``, and ``i* = argmax_i z^T g_i``. The paper
    estimates ``z`` over warm-up rounds; this stateless version computes it exactly from
    the current round (top eigenvector ``v`` of the ``(h, h)`` centred Gram matrix, so
    ``z^T (g_i - mu)`` is proportional to ``v_i``). The sign of ``z`` is arbitrary, so
    ``i* = argmax_i |z^T (g_i - mu)|``: the client most extreme along ``z``. Ties go to
    the smallest index.

    Examples
    --------
    >>> mimic_index(torch.tensor([[0.0, 0.0], [1.0, 0.1], [-5.0, 0.0], [1.0, -0.1]]))
    2
    """
    g = honest.to(torch.float64)
    centred = g - g.mean(dim=0, keepdim=True)
    gram = centred @ centred.T  # (h, h)
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return int(torch.argmax(vecs[:, -1].abs()))


@register_attack("mimic")
def mimic(honest: Tensor, f: int) -> Tensor:
    """Mimic attack [Karimireddy, He & Jaggi, ICLR 2022]: all attackers copy one honest update.

    ``m_k = g_{i*}`` with ``i*`` from :func:`mimic_index`; under heterogeneous data this
    over-represents one client and starves the others without ever looking like an outlier.

    Returns
    -------
    Tensor
        ``(f, d)``, dtype and device of ``honest``.

    Examples
    --------
    >>> mimic(torch.tensor([[0.0], [1.0], [9.0]]), 2)
    tensor([[9.],
            [9.]])
    """
    return _repeat(honest[mimic_index(honest)], f)
