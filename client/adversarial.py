"""L-infinity evasion attacks and PGD adversarial training for a client's local loop.

``fgsm`` [Goodfellow et al., 2015] and ``pgd`` [Madry et al., 2018] craft inputs
``x'`` with ``||x' - x||_inf <= eps`` inside the data box (``[0, 1]`` by default) that
raise the cross-entropy loss; ``pgd_adversarial_loss`` is Madry's robust training
objective ``E max_{||d||_inf <= eps} l(f(x + d), y)`` with the inner maximum taken by PGD.

The functions leave the model's parameters, gradients and train/eval mode untouched
(gradients are taken with respect to the input only), so a training loop can call them
between its own ``zero_grad`` and ``step``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fgsm", "input_gradient", "outside_box", "pgd", "pgd_adversarial_loss",
           "project_linf"]

Box = tuple[float, float] | None


def outside_box(low: float, high: float, clamp: tuple[float, float]) -> ValueError:
    """The refusal of inputs in ``[low, high]`` that leave the ``clamp`` box (the same
    words wherever inputs are checked: one client, a batched step, one client of it)."""
    return ValueError(
        f"inputs lie in [{low:.4g}, {high:.4g}], outside the clamp box [{clamp[0]}, "
        f"{clamp[1]}]: scale the data into the box or pass clamp=None"
    )


def _check(x: Tensor, y: Tensor, eps: float, clamp: Box) -> None:
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"evasion attacks need x (B, ...) and y (B,) with equal B, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"evasion attacks need floating-point inputs, got {x.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"evasion attacks need eps >= 0, got {eps!r}")
    if clamp is not None:
        lo, hi = clamp
        if not lo < hi:
            raise ValueError(f"clamp box needs lo < hi, got {clamp}")
        if x.numel() and (float(x.min()) < lo or float(x.max()) > hi):
            raise outside_box(float(x.min()), float(x.max()), clamp)


def input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``grad_x sum_i l(f(x_i), y_i)`` for cross-entropy ``l``; shape of ``x``.

    The sum (not the mean) keeps each example's gradient independent of the batch size.
    The model's parameters receive no ``.grad``.
    """
    xg = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(xg), y, reduction="sum")
    (gx,) = torch.autograd.grad(loss, [xg])
    return gx


def project_linf(x_adv: Tensor, x: Tensor, eps: float, clamp: Box) -> Tensor:
    """Project onto ``{x' : ||x' - x||_inf <= eps} ∩ box``: clip to the ball, then the box.

    Since ``x`` lies in the box the two clips land in the intersection.
    """
    out = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    if clamp is not None:
        out = out.clamp(clamp[0], clamp[1])
    return out


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *,
         clamp: Box = (0.0, 1.0)) -> Tensor:
    """Fast gradient sign method [Goodfellow et al., 2015].

    ``x' = clip_box(x + eps * sign(grad_x l(f(x), y)))``.

    Parameters
    ----------
    model
        Classifier returning logits; used in its current mode.
    x
        ``(B, ...)`` inputs inside ``clamp``.
    y
        ``(B,)`` int64 labels.
    eps
        L-infinity radius ``>= 0``.
    clamp
        The data box ``(lo, hi)``, or ``None`` for none.

    Returns
    -------
    Tensor
        ``(B, ...)`` adversarial inputs, detached, dtype and device of ``x``.

    Raises
    ------
    ValueError
        Mismatched shapes, ``eps < 0``, or inputs outside the box.

    Examples
    --------
    >>> model = nn.Linear(2, 2)
    >>> x = torch.full((1, 2), 0.5)
    >>> bool((fgsm(model, x, torch.tensor([0]), 0.1) - x).abs().max() <= 0.1 + 1e-7)
    True
    """
    _check(x, y, eps, clamp)
    x = x.detach()
    x_adv = x + eps * input_gradient(model, x, y).sign()
    return project_linf(x_adv, x, eps, clamp).detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    *,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    clamp: Box = (0.0, 1.0),
) -> Tensor:
    """Projected gradient descent on the loss, L-infinity [Madry et al., 2018].

    ``x^0 = x + U(-eps, eps)`` (or ``x``), then
    ``x^{t+1} = Proj_{B_inf(x, eps) ∩ box}(x^t + alpha * sign(grad_x l(f(x^t), y)))``
    for ``steps`` steps.

    Parameters
    ----------
    model
        Classifier returning logits; used in its current mode.
    x, y
        ``(B, ...)`` inputs inside ``clamp`` and ``(B,)`` int64 labels.
    eps
        L-infinity radius ``>= 0``.
    alpha
        Step size ``> 0`` (Madry et al. use about ``2.5 eps / steps``).
    steps
        Number of steps ``>= 1``.
    random_start
        Start from a uniform point of the ball (needs ``generator``).
    generator
        Source of the random start.
    clamp
        The data box ``(lo, hi)``, or ``None``.

    Returns
    -------
    Tensor
        ``(B, ...)`` adversarial inputs, detached.

    Raises
    ------
    ValueError
        Bad shapes or ranges, inputs outside the box, or ``random_start`` without a
        generator.

    Examples
    --------
    >>> model = nn.Linear(2, 2)
    >>> x = torch.full((3, 2), 0.5)
    >>> xa = pgd(model, x, torch.tensor([0, 1, 0]), 0.1, 0.05, 5,
    ...          generator=torch.Generator().manual_seed(0))
    >>> bool((xa - x).abs().max() <= 0.1 + 1e-7)
    True
    """
    _check(x, y, eps, clamp)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"pgd needs a step size alpha > 0, got {alpha!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"pgd needs an int steps >= 1, got {steps!r}")
    x = x.detach()
    if random_start:
        if generator is None:
            raise ValueError(
                "pgd with random_start=True needs a generator: pass "
                "generator=torch.Generator().manual_seed(seed) or random_start=False"
            )
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
        x_adv = project_linf(x + eps * (2 * u.to(x.device) - 1), x, eps, clamp)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv = project_linf(x_adv + alpha * input_gradient(model, x_adv, y).sign(),
                             x, eps, clamp)
    return x_adv.detach()


def pgd_adversarial_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    generator: torch.Generator,
    random_start: bool = True,
    clamp: Box = (0.0, 1.0),
) -> Tensor:
    """Madry et al.'s adversarial training loss [Madry et al., 2018].

    ``L = (1/B) sum_i l(f(x'_i), y_i)`` with ``x' = pgd(model, x, y, eps, alpha, steps)``:
    the inner maximisation by PGD, the outer minimisation by the caller's optimiser.

    Returns
    -------
    Tensor
        A scalar loss with a graph to the model's parameters (not to ``x``); call
        ``.backward()`` on it as on the clean loss.

    Raises
    ------
    ValueError
        As :func:`pgd`.

    Examples
    --------
    >>> model = nn.Linear(2, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> gen = torch.Generator().manual_seed(0)
    >>> x = torch.rand(4, 2, generator=gen)
    >>> loss = pgd_adversarial_loss(model, x, torch.tensor([0, 1, 0, 1]),
    ...                             eps=0.1, alpha=0.05, steps=3, generator=gen)
    >>> opt.zero_grad(); loss.backward(); opt.step()
    """
    x_adv = pgd(model, x, y, eps, alpha, steps, random_start=random_start,
                generator=generator, clamp=clamp)
    return F.cross_entropy(model(x_adv), y)
