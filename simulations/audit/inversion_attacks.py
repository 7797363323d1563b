"""Gradient inversion attacks: what a curious server reconstructs from one client's update.

The server knows the global model it sent, the client's learning rate and batch size, and
sees the update ``u = -lr g`` of one local step (or, under a defense, what
:mod:`.defenses` leaves of it). It searches for inputs whose gradient matches ``g``:

``dlg`` [Zhu et al., NeurIPS 2019]
    Dummy inputs ``x'`` and soft labels ``softmax(l')`` minimising the relative L2 gradient
    distance ``||g(x', l') - g||^2 / ||g||^2`` with L-BFGS.
``idlg`` [Zhao et al., 2020]
    The labels first, analytically from the last layer's gradient (:func:`recover_labels`),
    then ``x'`` alone by the same L-BFGS search.
``cosine`` ("inverting gradients", [Geiping et al., NeurIPS 2020])
    ``1 - cos(g(x', y'), g) + alpha TV(x')`` with recovered labels, Adam on the sign of the
    gradient, step decay at 3/8, 5/8, 7/8 of the run, and ``x'`` projected onto
    ``[0, 1]`` after every step.

The search runs in float64 on a copy of the model. Reconstructions are returned clipped
to the data box ``[0, 1]`` (the attacker knows the range), matched to the originals by
the Hungarian method on PSNR, and scored by PSNR, SSIM and label recovery.

Each attack is registered in :data:`INVERSION_ATTACKS` and run by name with :func:`invert`; the audit
that runs them under each defense is :func:`simulations.audit.inversion.run_inversion_audit`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from aggregation.catalog import Factory, register_function
from aggregation.registry import Registry

from .defenses import Observation

__all__ = [
    "INVERSION_ATTACKS",
    "Reconstruction",
    "cosine",
    "dlg",
    "idlg",
    "invert",
    "recover_labels",
    "total_variation",
]

@dataclass(frozen=True, eq=False)
class Reconstruction:
    """What an attack recovered.

    Attributes
    ----------
    x
        ``(M, *input_shape)`` float64 inputs in ``[0, 1]``, ``M = observation.num_examples``.
    y
        ``(M,)`` int64 labels, one per reconstructed input.
    loss
        Final value of the attack's objective.
    """

    x: Tensor
    y: Tensor
    loss: float


# what every attack gets from the audit runner, not from the user
_RUNTIME = ("input_shape", "num_classes", "iterations", "generator")
INVERSION_ATTACKS: Registry[Factory[Callable[..., Reconstruction]]] = Registry("inversion attack")


class _Matcher:
    """The attacker's float64 copy of the model and the observed gradient."""

    def __init__(self, model: nn.Module, observation: Observation) -> None:
        self.model = copy.deepcopy(model).to(torch.float64).eval()
        self.params = {
            n: p.detach().requires_grad_(True)
            for n, p in self.model.named_parameters() if p.requires_grad
        }
        self.buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        target = observation.gradient
        shapes = [tuple(p.shape) for p in self.params.values()]
        if len(target) != len(shapes) or any(
            tuple(t.shape) != s for t, s in zip(target, shapes, strict=True)
        ):
            raise ValueError(
                "the observed gradient does not fit the model: got shapes "
                f"{[tuple(t.shape) for t in target]}, the model's trainable parameters are "
                f"{shapes}"
            )
        self.target = [t.detach().to(device=p.device, dtype=torch.float64)
                       for t, p in zip(target, self.params.values(), strict=True)]
        self.target_sq = sum(float(t.pow(2).sum()) for t in self.target)
        if not self.target_sq > 0 or not math.isfinite(self.target_sq):
            raise ValueError(
                f"the observed gradient has squared norm {self.target_sq}: nothing to invert"
            )
        self.normaliser = observation.normaliser
        self.device = next(iter(self.params.values())).device

    def gradient(self, x: Tensor, labels: Tensor) -> list[Tensor]:
        """Gradient of ``(1/normaliser) sum_i CE(f(x_i), labels_i)``, differentiable in x."""
        out = functional_call(self.model, {**self.params, **self.buffers}, (x,))
        loss = F.cross_entropy(out, labels, reduction="sum") / self.normaliser
        return list(torch.autograd.grad(loss, list(self.params.values()), create_graph=True))

    def l2(self, x: Tensor, labels: Tensor) -> Tensor:
        """``||g(x, labels) - g||^2 / ||g||^2``."""
        g = self.gradient(x, labels)
        total = torch.stack([((a - b) ** 2).sum() for a, b in zip(g, self.target, strict=True)])
        return total.sum() / self.target_sq

    def cosine_distance(self, x: Tensor, labels: Tensor) -> Tensor:
        """``1 - <g(x, labels), g> / (||g(x, labels)|| ||g||)``."""
        g = self.gradient(x, labels)
        dot = torch.stack([(a * b).sum() for a, b in zip(g, self.target, strict=True)]).sum()
        norm = torch.stack([a.pow(2).sum() for a in g]).sum().sqrt()
        ratio: Tensor = dot / (norm * self.target_sq**0.5 + 1e-30)
        return torch.ones_like(ratio) - ratio


def _check_common(observation: Observation, input_shape: Sequence[int], num_classes: int,
                  iterations: int) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"inversion needs an int iterations >= 1, got {iterations!r}")
    if num_classes < 2:
        raise ValueError(f"inversion needs num_classes >= 2, got {num_classes}")
    if not input_shape or any(s < 1 for s in input_shape):
        raise ValueError(f"inversion needs a positive input_shape, got {tuple(input_shape)}")
    if observation.num_examples < 1 or observation.normaliser < 1:
        raise ValueError(
            f"observation needs num_examples, normaliser >= 1, got "
            f"{observation.num_examples}, {observation.normaliser}"
        )


def _last_linear(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    found: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = (name, module)
    if found is None:
        raise ValueError(
            f"label recovery needs a final nn.Linear layer with {num_classes} outputs; the "
            "model has none: use the dlg attack, which does not recover labels analytically"
        )
    return found


def _label_counts(s: Tensor, estimate: Tensor, m: int) -> Tensor:
    """Steps 1 and 2 of :func:`recover_labels`: ``(K,)`` int64 counts summing to ``m``."""
    counts = torch.zeros(s.numel(), dtype=torch.int64)
    for c in torch.argsort(s, stable=True).tolist():
        if s[c] < 0 and int(counts.sum()) < m:
            counts[c] = 1
    while int(counts.sum()) < m:
        counts[int(torch.argmax(estimate - counts.double()))] += 1
    return counts


def recover_labels(model: nn.Module, observation: Observation, num_classes: int) -> Tensor:
    """Labels behind a gradient, from the last layer [Zhao et al., 2020; Yin et al., 2021].

    For cross-entropy the last layer's bias gradient is
    ``s_c = normaliser * db_c = sum_i (p_ic - [y_i = c]) = P_c - n_c`` where
    ``n_c`` counts label ``c`` among the ``M`` examples and ``P_c = sum_i p_ic``.
    Without a bias the weight rows ``dW_c = (1/normaliser) sum_i (p_ic - [y_i = c]) h_i``
    are used: ``s_c = min_j dW_cj`` (negative for present classes when the activations
    ``h >= 0``, [Yin et al., 2021]).

    1. Every class with ``s_c < 0`` is present: it gets one label, most negative first,
       until ``M`` labels are given (iDLG: exact for ``M = 1``, where only the true class
       is negative).
    2. Remaining slots (repeated labels) go one by one to the class with the largest
       ``n^_c - n_c``, where ``n^_c = M / K - s_c / lambda`` estimates the count assuming
       the model's predictions average ``1/K`` (an untrained model). ``lambda`` is the
       gradient's unknown scale (1 unless a defense such as clipping rescaled it), fitted
       by alternating least squares ``lambda = <s, M/K - n> / ||M/K - n||^2`` with the
       counts ``n`` (at most 10 rounds). Without a bias the estimate is ``-s_c`` scaled to
       sum to ``M``.

    Recovered: the multiset of labels (which classes, and how often). Not recovered: which
    example carries which label; an attack ties them through its optimisation. On a
    trained model the uniform-prediction assumption fails and repeated labels are found
    less reliably; step 1 still finds the classes present.

    Parameters
    ----------
    model
        The model the gradient was taken on (its last ``nn.Linear`` with ``num_classes``
        outputs is read).
    observation
        The observed gradient.
    num_classes
        ``K``.

    Returns
    -------
    Tensor
        ``(M,)`` int64 labels, sorted, ``M = observation.num_examples``.

    Raises
    ------
    ValueError
        If the model has no final linear layer with ``K`` outputs.

    Examples
    --------
    >>> lin = nn.Linear(3, 4)
    >>> obs = Observation((torch.zeros(4, 3), torch.tensor([0.1, -0.9, 0.4, 0.4])), 1, 1)
    >>> recover_labels(lin, obs, 4).tolist()
    [1]
    """
    name, layer = _last_linear(model, num_classes)
    prefix = f"{name}." if name else ""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    m = observation.num_examples
    if layer.bias is not None and f"{prefix}bias" in names:
        s = observation.gradient[names.index(f"{prefix}bias")].detach().double().cpu()
        s = s * observation.normaliser
        scale = 1.0
        for _ in range(10):
            counts = _label_counts(s, m / num_classes - s / scale, m)
            r = m / num_classes - counts.double()
            denom = float((r * r).sum())
            fitted = float((s * r).sum()) / denom if denom > 0 else 0.0
            if not fitted > 0 or fitted == scale:
                break
            scale = fitted
        counts = _label_counts(s, m / num_classes - s / scale, m)
    elif f"{prefix}weight" in names:
        w = observation.gradient[names.index(f"{prefix}weight")].detach().double().cpu()
        s = w.min(dim=1).values
        neg = torch.clamp(-s, min=0)
        estimate = neg * (m / neg.sum()) if neg.sum() > 0 else torch.full_like(s, m / num_classes)
        counts = _label_counts(s, estimate, m)
    else:
        raise ValueError("label recovery needs the last layer's weight or bias to be trainable")
    return torch.repeat_interleave(torch.arange(num_classes), counts)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation of images ``(M, C, H, W)`` [Rudin et al., 1992].

    ``TV(x) = mean |x[..., i+1, j] - x[..., i, j]| + mean |x[..., i, j+1] - x[..., i, j]|``.
    Returns a scalar tensor.
    """
    if x.ndim != 4:
        raise ValueError(f"total variation needs images (M, C, H, W), got {tuple(x.shape)}")
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    return dh + dw


def _dummy_inputs(m: int, input_shape: Sequence[int], generator: torch.Generator,
                  device: torch.device) -> Tensor:
    x = torch.rand((m, *input_shape), generator=generator, dtype=torch.float64,
                   device=generator.device)
    return x.to(device).requires_grad_(True)


def _lbfgs(variables: list[Tensor], objective: Callable[[], Tensor], iterations: int,
           lr: float) -> float:
    if not lr > 0:
        raise ValueError(f"the L-BFGS attacks need lr > 0, got {lr}")
    opt = torch.optim.LBFGS(
        variables, lr=lr, max_iter=iterations, history_size=100,
        line_search_fn="strong_wolfe", tolerance_grad=1e-14, tolerance_change=1e-16,
    )

    def closure() -> float:
        loss = objective()
        grads = torch.autograd.grad(loss, variables)
        for v, g in zip(variables, grads, strict=True):
            v.grad = g
        return float(loss.detach())

    opt.step(closure)  # type: ignore[no-untyped-call]
    return _final(objective)


def _final(objective: Callable[[], Tensor]) -> float:
    return float(objective().detach())


@register_function(INVERSION_ATTACKS, "dlg", runtime=_RUNTIME)
def dlg(
    model: nn.Module,
    observation: Observation,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    iterations: int,
    generator: torch.Generator,
    lr: float = 1.0,
) -> Reconstruction:
    """Deep leakage from gradients [Zhu et al., NeurIPS 2019].

    ``min over x', l' of ||g(x', softmax(l')) - g||^2 / ||g||^2`` (the relative form of
    the paper's L2 distance: same minimiser, scale-free), jointly over ``M`` dummy inputs
    ``x'`` (uniform in ``[0, 1]`` at the start) and soft labels, with L-BFGS (strong-Wolfe
    line search, at most ``iterations`` iterations).

    Parameters
    ----------
    model, observation
        The global model and what the server observed of the victim's gradient.
    input_shape, num_classes
        Shape of one input and ``K``.
    iterations
        L-BFGS iterations.
    generator
        Source of the dummy inputs and labels.
    lr
        L-BFGS step size (> 0; the line search adapts it).

    Returns
    -------
    Reconstruction
        ``x (M, *input_shape)`` clipped to ``[0, 1]``, ``y = argmax l'``.

    Raises
    ------
    ValueError
        If the gradient does not fit the model or a parameter is out of range.

    Examples
    --------
    >>> from simulations.audit.defenses import ClientStep, make_defense
    >>> from simulations.models import build_model
    >>> model = build_model("logreg", (1, 2, 2), 3, generator=torch.Generator().manual_seed(0))
    >>> x, y = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]]), torch.tensor([2])
    >>> obs = make_defense("none")(ClientStep(model, x, y), generator=torch.Generator())
    >>> rec = dlg(model, obs, input_shape=(1, 2, 2), num_classes=3, iterations=50,
    ...           generator=torch.Generator().manual_seed(0))
    >>> rec.y.tolist(), bool((rec.x.float() - x).abs().max() < 1e-4)
    ([2], True)
    """
    _check_common(observation, input_shape, num_classes, iterations)
    match = _Matcher(model, observation)
    m = observation.num_examples
    x = _dummy_inputs(m, input_shape, generator, match.device)
    logits = torch.randn((m, num_classes), generator=generator, dtype=torch.float64,
                         device=generator.device).to(match.device).requires_grad_(True)
    loss = _lbfgs([x, logits], lambda: match.l2(x, F.softmax(logits, dim=1)), iterations, lr)
    return Reconstruction(x.detach().clamp(0, 1), logits.detach().argmax(dim=1).cpu(), loss)


@register_function(INVERSION_ATTACKS, "idlg", runtime=_RUNTIME)
def idlg(
    model: nn.Module,
    observation: Observation,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    iterations: int,
    generator: torch.Generator,
    lr: float = 1.0,
) -> Reconstruction:
    """Improved DLG [Zhao et al., 2020]: labels analytically, then DLG on the inputs.

    ``y' = recover_labels(...)`` (exact for one example: the only negative entry of the
    last bias gradient), then ``min over x' of ||g(x', y') - g||^2 / ||g||^2`` with
    L-BFGS as in :func:`dlg` (same parameters).

    Returns
    -------
    Reconstruction
        ``x (M, *input_shape)`` clipped to ``[0, 1]``, ``y`` the recovered labels.

    Raises
    ------
    ValueError
        If the model has no final linear layer with ``num_classes`` outputs.

    Examples
    --------
    >>> from simulations.audit.defenses import ClientStep, make_defense
    >>> from simulations.models import build_model
    >>> model = build_model("logreg", (1, 2, 2), 3, generator=torch.Generator().manual_seed(0))
    >>> x, y = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]]), torch.tensor([2])
    >>> obs = make_defense("none")(ClientStep(model, x, y), generator=torch.Generator())
    >>> rec = idlg(model, obs, input_shape=(1, 2, 2), num_classes=3, iterations=50,
    ...            generator=torch.Generator().manual_seed(0))
    >>> rec.y.tolist(), bool((rec.x.float() - x).abs().max() < 1e-6)
    ([2], True)
    """
    _check_common(observation, input_shape, num_classes, iterations)
    match = _Matcher(model, observation)
    labels = recover_labels(model, observation, num_classes).to(match.device)
    x = _dummy_inputs(observation.num_examples, input_shape, generator, match.device)
    loss = _lbfgs([x], lambda: match.l2(x, labels), iterations, lr)
    return Reconstruction(x.detach().clamp(0, 1), labels.cpu(), loss)


@register_function(INVERSION_ATTACKS, "cosine", runtime=_RUNTIME)
def cosine(
    model: nn.Module,
    observation: Observation,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    iterations: int,
    generator: torch.Generator,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
) -> Reconstruction:
    """Inverting gradients [Geiping et al., NeurIPS 2020].

    ``min over x' in [0, 1] of 1 - <g(x', y'), g> / (||g(x', y')|| ||g||) + alpha TV(x')``
    with ``y' = recover_labels(...)``: Adam (step ``lr``) fed the sign of the gradient,
    ``lr`` divided by 10 at 3/8, 5/8 and 7/8 of ``iterations``, and ``x'`` projected onto
    ``[0, 1]`` after every step. The cosine ignores the gradient's scale, so clipping
    alone does not stop it.

    Parameters
    ----------
    lr
        Adam step size (> 0).
    tv_weight
        ``alpha >= 0``; needs image inputs ``(C, H, W)`` when positive.

    Returns
    -------
    Reconstruction
        ``x (M, *input_shape)`` in ``[0, 1]``, ``y`` the recovered labels.

    Raises
    ------
    ValueError
        If ``tv_weight > 0`` for non-image inputs, or a parameter is out of range.

    Examples
    --------
    >>> from simulations.audit.defenses import ClientStep, make_defense
    >>> from simulations.models import build_model
    >>> model = build_model("logreg", (1, 2, 2), 3, generator=torch.Generator().manual_seed(0))
    >>> x, y = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]]), torch.tensor([2])
    >>> obs = make_defense("none")(ClientStep(model, x, y), generator=torch.Generator())
    >>> rec = cosine(model, obs, input_shape=(1, 2, 2), num_classes=3, iterations=200,
    ...              generator=torch.Generator().manual_seed(0))
    >>> rec.y.tolist(), bool((rec.x.float() - x).abs().max() < 1e-2)
    ([2], True)
    """
    _check_common(observation, input_shape, num_classes, iterations)
    if not lr > 0:
        raise ValueError(f"cosine attack needs lr > 0, got {lr}")
    if not tv_weight >= 0:
        raise ValueError(f"cosine attack needs tv_weight >= 0, got {tv_weight}")
    if tv_weight > 0 and len(input_shape) != 3:
        raise ValueError(
            f"the total-variation prior needs image inputs (C, H, W), got {input_shape}: "
            "pass tv_weight=0"
        )
    match = _Matcher(model, observation)
    labels = recover_labels(model, observation, num_classes).to(match.device)
    x = _dummy_inputs(observation.num_examples, input_shape, generator, match.device)
    opt = torch.optim.Adam([x], lr=lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

    def objective() -> Tensor:
        loss = match.cosine_distance(x, labels)
        if tv_weight > 0:
            loss = loss + tv_weight * total_variation(x)
        return loss

    for _ in range(iterations):
        loss = objective()
        (gx,) = torch.autograd.grad(loss, [x])
        x.grad = gx.sign()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return Reconstruction(x.detach(), labels.cpu(), _final(objective))


def invert(
    attack: str,
    model: nn.Module,
    observation: Observation,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    iterations: int,
    generator: torch.Generator,
    **params: Any,
) -> Reconstruction:
    """Run the attack registered as ``attack`` (``INVERSION_ATTACKS.names()``) with its parameters.

    Raises
    ------
    KeyError
        Unknown attack.
    TypeError
        Unknown attack parameter.
    """
    fn = INVERSION_ATTACKS.build(attack, **params)
    out: Reconstruction = fn(model, observation, input_shape=input_shape,
                             num_classes=num_classes, iterations=iterations, generator=generator)
    return out
