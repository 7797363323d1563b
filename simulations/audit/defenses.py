"""What a curious server sees of one client's local step, under each defense.

The victim client takes one local step on a batch ``(x, y)`` of size ``B``: its update is
``u = -lr * g`` with ``g = (1/B) sum_i grad l(x_i, y_i)`` (cross-entropy, mean over the
batch). The server knows ``lr`` and so sees the gradient ``g`` (or what a defense leaves of
it). A defense here maps the client's step to an :class:`Observation`; the inversion
attacks in :mod:`.inversion` work only on observations.

Registered defenses (``DEFENSES``; build one with :func:`make_defense`):

========================  ==================================================  ============
name (parameters)         what the server sees                                units
========================  ==================================================  ============
``none``                  ``g``                                               --
``dp_sgd``                DP-SGD step: per-sample clip, sum, Gaussian noise   gradient
(noise_multiplier,        ``(sum_i clip_C(g_i) + N(0, (z C)^2 I)) / B``
max_grad_norm)            [Abadi et al., 2016]
``local_dp``              clipped, noised update ``clip_C(u) + N(0, s^2 I)``  update
(clipping_norm,           [Geyer et al., 2017; Sun et al., 2021]
noise_std)
``clipping`` (max_norm)   clipped update ``clip_C(u)``                        update
``pruning`` (fraction)    ``g`` with the ``floor(p d)`` smallest-magnitude    --
                          entries zeroed [Zhu et al., 2019]
``secagg_sum`` (k)        ``sum_j g_j`` over the victim and ``k - 1`` other   --
                          clients of batch ``B`` each [Bonawitz et al., 2017]
========================  ==================================================  ============

``clip_C(v) = v * min(1, C / ||v||_2)`` over all parameters flattened together. "update"
units mean the parameter is on the scale of ``u = -lr g``, as the client applies it.

The defenses call the real mechanisms, so the audit measures what the code does: clipping
and noise come from the privacy core (:func:`privacy.clip_updates`, whose safety margin
keeps every clipped norm ``<= C`` exactly, and :func:`privacy.gaussian_noise`), local DP is
:func:`client.local_dp.local_dp_update`. The DP-SGD step is written out here from the same
pieces (per-example clipping, one Gaussian draw), because Opacus's trainer
(:mod:`client.dp_sgd`) samples its own Poisson batches and trains the model in place,
whereas the audit needs one step on a fixed batch ``B``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from aggregation.registry import Registry
from client.local_dp import local_dp_update
from privacy import clip_updates, gaussian_noise

__all__ = [
    "DEFENSES",
    "ClientStep",
    "Defense",
    "Observation",
    "batch_gradient",
    "describe",
    "draw_client_batches",
    "dp_sgd_gradient",
    "flatten",
    "make_defense",
    "per_sample_gradients",
    "prune_smallest",
    "unflatten",
]


@dataclass(frozen=True, eq=False)
class ClientStep:
    """One local step of the victim client, as the defense sees it.

    Attributes
    ----------
    model
        The global model the client received; its trainable parameters, in
        ``named_parameters()`` order, define the gradient layout.
    x
        ``(B, *input_shape)`` the victim's batch.
    y
        ``(B,)`` int64 labels.
    lr
        Local learning rate: the update is ``-lr * g``.
    pool_x, pool_y
        Other clients' data ``(N, *input_shape)``, ``(N,)``, from which ``secagg_sum``
        draws the batches summed with the victim's; ``None`` when no defense needs it.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    lr: float = 1.0
    pool_x: Tensor | None = None
    pool_y: Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.ndim < 2 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"client step needs x (B, ...) and y (B,) with equal B, got shapes "
                f"{tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )
        if self.x.shape[0] < 1:
            raise ValueError("client step needs a batch of at least one example")
        if not self.lr > 0:
            raise ValueError(f"client step needs lr > 0, got {self.lr}")
        if (self.pool_x is None) != (self.pool_y is None):
            raise ValueError("pool_x and pool_y must be given together")

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(self.x.shape[0])


@dataclass(frozen=True, eq=False)
class Observation:
    """The gradient a curious server recovers from a client's (defended) update.

    The attacker's model of it is ``gradient = (1 / normaliser) * sum over num_examples
    examples of grad l(x_i, y_i)`` (plus whatever noise the defense added).

    Attributes
    ----------
    gradient
        One tensor per trainable parameter, shaped like it.
    num_examples
        Examples behind the gradient: ``B``, or ``k B`` under ``secagg_sum``.
    normaliser
        The per-client batch size ``B`` that each client's loss was averaged over.
    """

    gradient: tuple[Tensor, ...]
    num_examples: int
    normaliser: int


class Defense(Protocol):
    """A defense: maps the victim's step to what the server observes."""

    @property
    def name(self) -> str: ...

    def __call__(self, step: ClientStep, *, generator: torch.Generator) -> Observation: ...


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {n: b.detach() for n, b in model.named_buffers()}


def batch_gradient(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    """Gradient of the mean cross-entropy ``(1/B) sum_i l(f(x_i), y_i)`` over a batch.

    Parameters
    ----------
    model
        Classifier returning logits ``(B, K)``; it is not modified (no ``.grad`` is set).
    x, y
        ``(B, *input_shape)`` inputs and ``(B,)`` int64 labels.

    Returns
    -------
    tuple[Tensor, ...]
        One tensor per trainable parameter (``named_parameters()`` order).
    """
    params = {n: p.clone().requires_grad_(True) for n, p in _params(model).items()}
    out = functional_call(model, {**params, **_buffers(model)}, (x,))
    loss = F.cross_entropy(out, y)
    return tuple(torch.autograd.grad(loss, list(params.values())))


def per_sample_gradients(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    """Per-example gradients ``grad l(f(x_i), y_i)`` with ``torch.func.vmap(grad(...))``.

    Returns
    -------
    tuple[Tensor, ...]
        One tensor per trainable parameter, shaped ``(B, *param.shape)``.

    Raises
    ------
    RuntimeError
        From ``vmap`` when the model couples examples (batch norm in train mode).
    """
    params = _params(model)
    buffers = _buffers(model)

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**p, **buffers}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return tuple(grads[n] for n in params)


def flatten(tensors: Sequence[Tensor], *, batch_dims: int = 0) -> Tensor:
    """Concatenate tensors into ``(d,)`` (or ``(B, d)`` with ``batch_dims=1``)."""
    if batch_dims == 0:
        return torch.cat([t.reshape(-1) for t in tensors])
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Split a ``(d,)`` vector back into tensors shaped like ``like``."""
    out, start = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[start:start + n].reshape(t.shape))
        start += n
    if start != flat.numel():
        raise ValueError(f"unflatten: vector has {flat.numel()} entries, shapes need {start}")
    return tuple(out)


def dp_sgd_gradient(
    per_sample: Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator,
) -> Tensor:
    """The DP-SGD gradient of one batch [Abadi et al., 2016].

    ``g~ = (sum_i g_i min(1, C / ||g_i||) + N(0, (z C)^2 I)) / B``, the step Opacus takes
    with expected batch size ``B``: :func:`privacy.clip_updates` on the rows, then
    :func:`privacy.gaussian_noise` drawn on the generator's device.

    Parameters
    ----------
    per_sample
        ``(B, d)`` flattened per-example gradients, finite.
    noise_multiplier
        ``z >= 0``.
    max_grad_norm
        ``C > 0``, the per-example clipping norm.
    generator
        Source of the noise.

    Returns
    -------
    Tensor
        ``(d,)``, dtype and device of ``per_sample``.

    Raises
    ------
    ValueError
        If ``per_sample`` is not a finite 2-D float tensor, ``z < 0`` or ``C <= 0``.

    Examples
    --------
    >>> g = torch.tensor([[3.0, 4.0], [0.0, 0.5]], dtype=torch.float64)
    >>> out = dp_sgd_gradient(g, noise_multiplier=0.0, max_grad_norm=1.0,
    ...                       generator=torch.Generator())
    >>> [round(v, 6) for v in out.tolist()]
    [0.3, 0.65]
    """
    if per_sample.ndim != 2:
        raise ValueError(f"dp_sgd needs (B, d) per-sample gradients, got {tuple(per_sample.shape)}")
    if not noise_multiplier >= 0:
        raise ValueError(f"dp_sgd needs noise_multiplier >= 0, got {noise_multiplier}")
    clipped = clip_updates(per_sample, max_grad_norm)[0].sum(dim=0)  # (d,)
    noise = gaussian_noise(clipped.shape[0], noise_multiplier * max_grad_norm,
                           generator=generator, dtype=clipped.dtype)
    return (clipped + noise.to(clipped.device)) / per_sample.shape[0]


def prune_smallest(v: Tensor, fraction: float) -> Tensor:
    """Gradient pruning [Zhu et al., 2019]: zero the ``floor(p d)`` smallest ``|v_j|``.

    Ties are broken by position (stable sort), so exactly ``floor(p d)`` entries are
    zeroed (more may already be zero).

    Parameters
    ----------
    v
        ``(d,)`` flattened gradient.
    fraction
        ``p`` in ``[0, 1]``.

    Returns
    -------
    Tensor
        ``(d,)`` the pruned vector.

    Raises
    ------
    ValueError
        If ``v`` is not 1-D or ``p`` is outside ``[0, 1]``.

    Examples
    --------
    >>> prune_smallest(torch.tensor([0.1, -3.0, 0.2, 2.0]), 0.5).tolist()
    [0.0, -3.0, 0.0, 2.0]
    """
    if v.ndim != 1:
        raise ValueError(f"pruning needs a flat (d,) vector, got shape {tuple(v.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"pruning needs fraction in [0, 1], got {fraction}")
    k = math.floor(fraction * v.numel())
    order = torch.argsort(v.abs(), stable=True)
    out = v.clone()
    out[order[:k]] = 0
    return out


def draw_client_batches(
    pool_x: Tensor,
    pool_y: Tensor,
    num_clients: int,
    batch_size: int,
    *,
    generator: torch.Generator,
) -> list[tuple[Tensor, Tensor]]:
    """Draw ``num_clients`` disjoint batches of ``batch_size`` examples from a pool.

    Indices are ``randperm(N, generator)[: num_clients * batch_size]``, cut in order.

    Returns
    -------
    list[tuple[Tensor, Tensor]]
        ``num_clients`` pairs ``(x (B, ...), y (B,))``.

    Raises
    ------
    ValueError
        If the pool holds fewer than ``num_clients * batch_size`` examples.
    """
    need = num_clients * batch_size
    if pool_x.shape[0] < need:
        raise ValueError(
            f"secagg_sum needs {num_clients} other clients x {batch_size} examples = {need} "
            f"pool examples, got {pool_x.shape[0]}: lower k or the batch size"
        )
    idx = torch.randperm(pool_x.shape[0], generator=generator)[:need].to(pool_x.device)
    return [
        (pool_x[idx[j * batch_size:(j + 1) * batch_size]],
         pool_y[idx[j * batch_size:(j + 1) * batch_size]])
        for j in range(num_clients)
    ]


def _positive(name: str, param: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} needs {param} > 0, got {value!r}")
    return float(value)


def _non_negative(name: str, param: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} needs {param} >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class NoDefense:
    """The undefended step: the server sees ``g`` exactly."""

    name: str = field(default="none", init=False)

    def __call__(self, step: ClientStep, *, generator: torch.Generator) -> Observation:
        g = batch_gradient(step.model, step.x, step.y)
        return Observation(g, step.batch_size, step.batch_size)


@dataclass(frozen=True)
class DpSgd:
    """Sample-level DP-SGD [Abadi et al., 2016]; see :func:`dp_sgd_gradient`."""

    noise_multiplier: float
    max_grad_norm: float
    name: str = field(default="dp_sgd", init=False)

    def __post_init__(self) -> None:
        _non_negative(self.name, "noise_multiplier", self.noise_multiplier)
        _positive(self.name, "max_grad_norm", self.max_grad_norm)

    def __call__(self, step: ClientStep, *, generator: torch.Generator) -> Observation:
        per = per_sample_gradients(step.model, step.x, step.y)
        flat = dp_sgd_gradient(flatten(per, batch_dims=1),
                               noise_multiplier=self.noise_multiplier,
                               max_grad_norm=self.max_grad_norm, generator=generator)
        like = tuple(p[0] for p in per)
        return Observation(unflatten(flat, like), step.batch_size, step.batch_size)


@dataclass(frozen=True)
class LocalDp:
    """Update-level local DP: ``u~ = clip_C(u) + N(0, s^2 I)`` with ``u = -lr g``.

    The server sees ``-u~ / lr``. ``clipping_norm`` and ``noise_std`` are in update units:
    this is the client's own :func:`client.local_dp.local_dp_update` [Sun et al., 2021],
    run on the generator's device.
    """

    clipping_norm: float
    noise_std: float
    name: str = field(default="local_dp", init=False)

    def __post_init__(self) -> None:
        _positive(self.name, "clipping_norm", self.clipping_norm)
        _non_negative(self.name, "noise_std", self.noise_std)

    def __call__(self, step: ClientStep, *, generator: torch.Generator) -> Observation:
        g = batch_gradient(step.model, step.x, step.y)
        u = -step.lr * flatten(g)
        sent = local_dp_update(u.to(generator.device), self.clipping_norm,
                               noise_std=self.noise_std, generator=generator).to(u.device)
        return Observation(unflatten(-sent / step.lr, g), step.batch_size, step.batch_size)


@dataclass(frozen=True)
class Clipping:
    """Update clipping ``clip_C(u)``, ``u = -lr g``; the server sees ``-clip_C(u) / lr``.

    ``clip_C`` is :func:`privacy.clip_updates` on the one row ``u``.
    """

    max_norm: float
    name: str = field(default="clipping", init=False)

    def __post_init__(self) -> None:
        _positive(self.name, "max_norm", self.max_norm)

    def __call__(self, step: ClientStep, *, generator: torch.Generator) -> Observation:
        g = batch_gradient(step.model, step.x, step.y)
        u = clip_updates((-step.lr * flatten(g)).unsqueeze(0), self.max_norm)[0][0]  # (d,)
        return Observation(unflatten(-u / step.lr, g), step.batch_size, step.batch_size)


@dataclass(frozen=True)
class Pruning:
    """Gradient pruning [Zhu et al., 2019]; see :func:`prune_smallest` (global, all layers)."""

    fraction: float
    name: str = field(default="pruning", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"pruning needs fraction in [0, 1], got {self.fraction!r}")

    def __call__(self, step: ClientStep, *, generator: torch.Generator) -> Observation:
        g = batch_gradient(step.model, step.x, step.y)
        return Observation(unflatten(prune_smallest(flatten(g), self.fraction), g),
                           step.batch_size, step.batch_size)


@dataclass(frozen=True)
class SecAggSum:
    """Secure aggregation [Bonawitz et al., 2017]: the server sees only a sum of k clients.

    ``sum_j g_j`` over the victim and ``k - 1`` other clients, each averaging its own batch
    of ``B`` examples drawn by :func:`draw_client_batches` from ``step.pool_x``. The
    attacker knows ``k`` and ``B`` and must explain ``k B`` examples.
    """

    k: int
    name: str = field(default="secagg_sum", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"secagg_sum needs an int k >= 1 clients, got {self.k!r}")

    def __call__(self, step: ClientStep, *, generator: torch.Generator) -> Observation:
        total = list(batch_gradient(step.model, step.x, step.y))
        if self.k > 1:
            if step.pool_x is None or step.pool_y is None:
                raise ValueError(
                    "secagg_sum with k > 1 needs the other clients' data: pass pool_x and "
                    "pool_y in the ClientStep"
                )
            others = draw_client_batches(step.pool_x, step.pool_y, self.k - 1,
                                         step.batch_size, generator=generator)
            for xo, yo in others:
                for i, gi in enumerate(batch_gradient(step.model, xo, yo)):
                    total[i] = total[i] + gi
        return Observation(tuple(total), self.k * step.batch_size, step.batch_size)


DEFENSES: Registry[Callable[..., Defense]] = Registry("defense")
DEFENSES.register("none")(NoDefense)
DEFENSES.register("dp_sgd")(DpSgd)
DEFENSES.register("local_dp")(LocalDp)
DEFENSES.register("clipping")(Clipping)
DEFENSES.register("pruning")(Pruning)
DEFENSES.register("secagg_sum")(SecAggSum)


def make_defense(name: str, **params: Any) -> Defense:
    """Build the defense registered as ``name`` with its parameters.

    Raises
    ------
    KeyError
        Unknown name (the message lists the valid ones).
    TypeError
        Unknown parameter (the message lists the valid ones).
    ValueError
        A parameter out of range.

    Examples
    --------
    >>> make_defense("pruning", fraction=0.9)
    Pruning(fraction=0.9, name='pruning')
    """
    defense: Defense = DEFENSES.build(name, **params)
    return defense


def describe(name: str, params: Mapping[str, Any]) -> str:
    """``"dp_sgd(max_grad_norm=1.0, noise_multiplier=0.1)"``: a defense as one label."""
    if not params:
        return name
    inner = ", ".join(f"{k}={params[k]}" for k in sorted(params))
    return f"{name}({inner})"
