"""Small classifiers for the simulations, registered by name in ``MODELS``.

``build_model(name, input_shape, num_classes, generator=g, **params)`` builds a model for
samples of shape ``input_shape`` (taken from the ``Dataset``) that maps a batch
``(B, *input_shape)`` to logits ``(B, num_classes)``.

Models
------
``logreg``
    Multinomial logistic regression: flatten, one linear layer.
``mlp(hidden=(64,), dropout=0.0)``
    Fully connected ReLU network.
``cnn(channels=(16, 32), hidden=128)``
    Conv-ReLU-maxpool blocks then a ReLU hidden layer, in the spirit of the CNN of
    [McMahan et al., 2017]; fits 8x8 digits, 28x28 MNIST and 32x32x3 CIFAR-10.

No model uses BatchNorm: it mixes samples within a batch, which breaks per-sample
gradients, so Opacus refuses it. Every model here passes
``opacus.validators.ModuleValidator.validate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from aggregation.catalog import Factory, register_function
from aggregation.registry import Registry, derive_seed

__all__ = ["MODELS", "build_model", "cnn", "logreg", "mlp", "num_parameters"]

ModelFactory = Callable[..., nn.Module]
"""``factory(input_shape, num_classes, /, **params) -> nn.Module``."""

MODELS: Registry[Factory[ModelFactory]] = Registry("model")
"""``MODELS.build(name, **params)`` is the model's factory with its hyperparameters bound."""


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
    **params: Any,
) -> nn.Module:
    """Build the model registered as ``name`` with deterministic initial weights.

    The weights are drawn under ``torch.random.fork_rng`` from a seed taken from
    ``generator`` (which advances by one draw); the global RNG is left as it was. Without
    a generator the seed is fixed (``derive_seed(0, "model", name)``), so two calls give
    identical weights: pass a generator to vary them.

    Parameters
    ----------
    name
        ``logreg``, ``mlp`` or ``cnn`` (``MODELS.names()``).
    input_shape
        Shape of one sample, e.g. ``Dataset.input_shape``: ``(C, H, W)`` or ``(F,)``.
    num_classes
        ``K >= 2``.
    generator
        Source of the initial weights.
    **params
        The model's hyperparameters.

    Returns
    -------
    nn.Module
        On the CPU, in training mode; maps ``(B, *input_shape)`` float32 to ``(B, K)``
        logits.

    Raises
    ------
    KeyError
        Unknown model (the message lists the valid ones).
    TypeError
        Unknown hyperparameter.
    ValueError
        Bad ``input_shape``, ``num_classes`` or hyperparameter.

    Examples
    --------
    >>> m = build_model("mlp", (1, 8, 8), 10, generator=torch.Generator().manual_seed(0))
    >>> m(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 10])
    """
    factory: ModelFactory = MODELS.build(name, **params)
    shape = _check_shape(name, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"model {name!r} needs an int num_classes >= 2, got {num_classes!r}")
    if generator is None:
        seed = derive_seed(0, "model", name)
    elif isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    else:
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(shape, num_classes)
    return model


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters ``d`` of ``model`` (trainable or not).

    Examples
    --------
    >>> num_parameters(build_model("logreg", (4,), 3))  # 4 * 3 weights + 3 biases
    15
    """
    return sum(p.numel() for p in model.parameters())


def _check_shape(name: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(
            f"model {name!r} needs input_shape as a non-empty tuple of positive ints, "
            f"got {input_shape!r}"
        )
    return shape


def _int_tuple(name: str, key: str, value: Sequence[int] | int) -> tuple[int, ...]:
    values = (value,) if isinstance(value, int) else tuple(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(
            f"{name} needs {key} as a non-empty list of positive ints, got {value!r}"
        )
    return values


@register_function(MODELS, "logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int, /) -> nn.Module:
    """Multinomial logistic regression: ``logits = W vec(x) + b``.

    ``W`` is ``(K, prod(input_shape))``; ``d = K * (prod(input_shape) + 1)``.

    Examples
    --------
    >>> logreg((1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@register_function(MODELS, "mlp")
def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    /,
    *,
    hidden: Sequence[int] | int = (64,),
    dropout: float = 0.0,
) -> nn.Module:
    """Multilayer perceptron: ``h_0 = vec(x)``, ``h_l = dropout(ReLU(W_l h_{l-1} + b_l))``.

    Logits are ``W_L h_{L-1} + b_L``.

    Parameters
    ----------
    hidden
        Width of each hidden layer (at least one; use ``logreg`` for none).
    dropout
        Dropout probability after each hidden layer, in ``[0, 1)``.

    Raises
    ------
    ValueError
        Empty or non-positive ``hidden``; ``dropout`` outside ``[0, 1)``.

    Examples
    --------
    >>> mlp((784,), 10, hidden=[32, 16])(torch.zeros(3, 784)).shape
    torch.Size([3, 10])
    """
    widths = _int_tuple("mlp", "hidden", hidden)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"mlp needs 0 <= dropout < 1, got dropout={dropout}")
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = math.prod(input_shape)
    for width in widths:
        layers += [nn.Linear(width_in, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(float(dropout)))
        width_in = width
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)


@register_function(MODELS, "cnn")
def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    /,
    *,
    channels: Sequence[int] | int = (16, 32),
    hidden: int = 128,
) -> nn.Module:
    """Convolutional network in the spirit of [McMahan et al., 2017], without BatchNorm.

    Per block ``l``: ``Conv2d(c_{l-1}, c_l, 3, padding=1) -> ReLU -> MaxPool2d(2)``, which
    keeps ``H, W`` through the convolution and halves them (floor) in the pooling; then
    ``Flatten -> Linear(c_L * H_L * W_L, hidden) -> ReLU -> Linear(hidden, K)``.
    8x8 digits end at 2x2, 28x28 MNIST at 7x7, 32x32 CIFAR-10 at 8x8 with two blocks.

    No normalisation layer is used: BatchNorm is refused by Opacus (per-sample gradients
    are undefined when samples are mixed) and the networks are shallow enough without.

    Parameters
    ----------
    channels
        Output channels of each block; the input needs ``H, W >= 2 ** len(channels)``.
    hidden
        Width of the fully connected hidden layer, ``>= 1``.

    Raises
    ------
    ValueError
        ``input_shape`` not ``(C, H, W)``, or too small for the number of blocks.

    Examples
    --------
    >>> cnn((3, 32, 32), 10)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"cnn needs image inputs (C, H, W), got input_shape={input_shape}: use mlp or "
            "logreg for flat features"
        )
    chans = _int_tuple("cnn", "channels", channels)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"cnn needs an int hidden >= 1, got hidden={hidden!r}")
    c_in, h, w = input_shape
    if min(h, w) < 2 ** len(chans):
        raise ValueError(
            f"cnn with {len(chans)} pooling blocks needs H, W >= {2 ** len(chans)}, got "
            f"{h}x{w}: use fewer channels entries"
        )
    layers: list[nn.Module] = []
    for c_out in chans:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in, h, w = c_out, h // 2, w // 2
    layers += [
        nn.Flatten(),
        nn.Linear(c_in * h * w, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers)
