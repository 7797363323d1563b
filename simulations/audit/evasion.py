"""Robust accuracy: how often the model stays right under an L-infinity evasion attack.

``robust_accuracy(model, x, y, attack=..., eps=...) = (1/N) sum_i [argmax f(x'_i) = y_i]``
with ``x' = attack(x)``, ``||x' - x||_inf <= eps`` inside the data box; ``eps = 0`` gives
the clean accuracy. Attacks are registered by name in ``EVASION_ATTACKS``:

``fgsm`` [Goodfellow et al., 2015]
    one signed-gradient step of size ``eps``.
``pgd`` [Madry et al., 2018]
    ``steps`` signed steps of size ``alpha`` (default ``2.5 eps / steps``) from a random
    start, projected onto the ball and box.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from aggregation.catalog import Factory, register_function
from aggregation.registry import Registry
from client.adversarial import Box, fgsm, pgd

__all__ = ["EVASION_ATTACKS", "robust_accuracy", "robust_accuracy_curve"]

EVASION_ATTACKS: Registry[Factory[Callable[..., Tensor]]] = Registry("evasion attack")
"""``EVASION_ATTACKS.build(name, eps=..., **params)`` is the attack
``(model, x, y, *, generator) -> x'`` with its parameters bound."""


@register_function(EVASION_ATTACKS, "fgsm", runtime=("generator",))
def _fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float,
          generator: torch.Generator | None = None, clamp: Box = (0.0, 1.0)) -> Tensor:
    return fgsm(model, x, y, eps, clamp=clamp)


@register_function(EVASION_ATTACKS, "pgd", runtime=("generator",))
def _pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float,
         generator: torch.Generator | None = None, alpha: float | None = None,
         steps: int = 10, random_start: bool = True, clamp: Box = (0.0, 1.0)) -> Tensor:
    step = 2.5 * eps / steps if alpha is None else alpha
    if step == 0:  # eps = 0: the ball is a point, any positive step stays on it
        step = 1.0
    return pgd(model, x, y, eps, step, steps, random_start=random_start,
               generator=generator, clamp=clamp)


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attack: str = "fgsm",
    eps: float,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    **params: Any,
) -> float:
    """Accuracy on adversarial inputs crafted by ``attack`` within radius ``eps``.

    The model is evaluated (and attacked) in eval mode; its previous mode is restored.

    Parameters
    ----------
    model
        Classifier returning logits ``(B, K)``.
    x, y
        ``(N, ...)`` inputs in the data box and ``(N,)`` int64 labels.
    attack
        ``fgsm`` or ``pgd`` (``EVASION_ATTACKS.names()``).
    eps
        L-infinity radius ``>= 0``.
    generator
        Source of PGD's random start (required for ``pgd`` unless
        ``random_start=False``).
    batch_size
        Examples attacked at once (``None``: all).
    **params
        The attack's own parameters: ``clamp``; for ``pgd`` also ``alpha``, ``steps``
        (default 10), ``random_start``.

    Returns
    -------
    float
        In ``[0, 1]``.

    Raises
    ------
    KeyError
        Unknown attack.
    TypeError
        Unknown attack parameter.
    ValueError
        Bad shapes or ranges (see :func:`client.adversarial.pgd`).

    Examples
    --------
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> x = torch.zeros(3, 1, 2, 2)
    >>> robust_accuracy(model, x, model(x).argmax(1), attack="fgsm", eps=0.0)
    1.0
    """
    fn = EVASION_ATTACKS.build(attack, eps=eps, **params)
    n = int(x.shape[0])
    if n == 0 or y.shape != (n,):
        raise ValueError(
            f"robust_accuracy needs x (N, ...) and y (N,) with N >= 1, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    size = n if batch_size is None else batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"robust_accuracy needs an int batch_size >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, n, size):
            xb, yb = x[start:start + size], y[start:start + size]
            x_adv = fn(model, xb, yb, generator=generator)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return correct / n


def robust_accuracy_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attack: str = "fgsm",
    epsilons: Sequence[float],
    generator: torch.Generator | None = None,
    **params: Any,
) -> list[dict[str, float]]:
    """``robust_accuracy`` at each radius: rows ``{"eps": e, "accuracy": a}``.

    One generator serves every radius in turn, so the curve is reproducible from its seed.
    """
    return [
        {"eps": float(e),
         "accuracy": robust_accuracy(model, x, y, attack=attack, eps=e, generator=generator,
                                     **params)}
        for e in epsilons
    ]
