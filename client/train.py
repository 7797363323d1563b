"""Local training on a client: plain mini-batch SGD/Adam on CUDA when present, else CPU."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .order import BatchSource, HashedOrder, hashed_permutations

__all__ = [
    "OPTIMIZERS",
    "TrainSettings",
    "local_train",
    "resolve_device",
]

OPTIMIZERS = ("sgd", "adam")


def resolve_device(name: str) -> torch.device:
    """Map ``"auto"`` to CUDA when available (else CPU); pass ``"cpu"``/``"cuda[:i]"`` through.

    Raises
    ------
    ValueError
        If CUDA is asked for explicitly on a machine without it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"device={name!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for but CUDA is not available here; "
            "use device='auto' or 'cpu'"
        )
    return device


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of local training, as read from the run config."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"local-epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning-rate must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if self.optimizer == "adam" and self.momentum != 0:
            raise ValueError(
                f"momentum={self.momentum} has no effect with optimizer='adam' (Adam has its own "
                "moment estimates): set momentum=0 or use optimizer='sgd'"
            )

    def make_optimizer(self, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer these settings describe, over ``params``."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)



LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def local_train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: TrainSettings,
    *,
    device: torch.device,
    generator: BatchSource,
    loss_fn: LossFn | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for ``settings.epochs`` epochs on ``(x, y)``.

    Parameters
    ----------
    model
        The model, moved to ``device`` for training and left there.
    x, y
        Inputs ``(N, ...)`` and integer labels ``(N,)``.
    settings
        Epochs, batch size, optimizer.
    device
        Where to train (see :func:`resolve_device`).
    generator
        Where the batch order comes from (``batch-order``, :mod:`client.order`): a CPU
        generator, or a :class:`~client.order.HashedOrder`; training is reproducible
        given it.
    loss_fn
        ``loss_fn(model, x_batch, y_batch) -> scalar``; cross-entropy by default
        (adversarial training plugs in here).

    Returns
    -------
    dict
        ``train-loss`` (mean over the last epoch's batches), ``steps``.

    Raises
    ------
    ValueError
        If the data is empty or its shapes disagree.
    """
    if x.shape[0] == 0:
        raise ValueError("cannot train on an empty partition: give this client some data")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    loss_fn = loss_fn or _cross_entropy
    model.to(device)
    model.train()
    optimizer = settings.make_optimizer(model.parameters())
    # dropout and other in-model randomness draw from the global RNG: fork it and seed it
    # from this client's generator so the run is reproducible and leaves no trace
    if isinstance(generator, HashedOrder):
        rng_seed = generator.dropout_seed()
        perms: Iterable[Tensor] = torch.split(hashed_permutations(
            generator.seed, [generator.client], [x.shape[0]], settings.epochs), x.shape[0])
    else:
        rng_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        gen = generator
        # one permutation per epoch, drawn when the epoch starts
        perms = (torch.randperm(x.shape[0], generator=gen) for _ in range(settings.epochs))
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(rng_seed)
        return _epochs(model, x, y, settings, optimizer, device, perms, loss_fn)


def _epochs(
    model: nn.Module, x: Tensor, y: Tensor, settings: TrainSettings,
    optimizer: torch.optim.Optimizer, device: torch.device, perms: Iterable[Tensor],
    loss_fn: LossFn,
) -> dict[str, float]:
    steps = 0
    last_epoch_loss = 0.0
    for perm in perms:
        total, count = 0.0, 0
        for idx in torch.split(perm, settings.batch_size):
            xb = x[idx].to(device, non_blocking=True)
            yb = y[idx].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, xb, yb)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
            steps += 1
        last_epoch_loss = total / count
    return {"train-loss": last_epoch_loss, "steps": float(steps)}
