"""Sample-level DP-SGD on a client with Opacus, its privacy loss adding up over rounds.

DP-SGD [Abadi et al., 2016] clips each example's gradient to ``max_grad_norm``, sums the
clipped gradients of a Poisson-sampled batch and adds ``N(0, (z * max_grad_norm)^2)``
noise; Opacus does the work (per-sample gradients, :class:`~opacus.optimizers.DPOptimizer`,
:class:`~opacus.data_loader.DPDataLoader`). What this module adds for federated learning is
that a client's privacy loss keeps adding up over the rounds it takes part in: the caller
passes the accountant *history* (a list of ``(noise_multiplier, sample_rate, steps)``, see
:mod:`privacy.accounting`) saved after the previous round and receives the new one, so
epsilon grows round after round instead of restarting from zero with each fresh
``PrivacyEngine``. Epsilon comes from the privacy core's accounting
(:func:`privacy.epsilon_from_history`), by default with the ``"rdp"`` accountant.

Guarantee: ``(epsilon, delta)``-DP for one *example* of this client's data (add/remove
adjacency), over every round whose history was passed back, against anyone who sees the
client's updates. It says nothing about the client as a whole; for that, use central DP
(:mod:`server.dp`) or local DP (:mod:`client.local_dp`).

Caveats, as Opacus documents them: ``secure_mode`` (a cryptographically secure generator
that also resists floating-point attacks [Mironov, 2012]) needs ``torchcsprng``, which is
not installable here, so noise and batch sampling come from seeded ``torch.Generator``
objects: reproducible and fine for research, not a hardened implementation. Models with
BatchNorm are refused (see :func:`check_dp_compatible`).

References
----------
Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang. "Deep Learning with Differential
Privacy". CCS 2016.
Yousefpour et al. "Opacus: User-Friendly Differential Privacy Library in PyTorch". 2021.
Mironov. "On Significance of the Least Significant Bits for Differential Privacy". CCS 2012.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from aggregation.registry import make_generator
from privacy import (
    DEFAULT_ACCOUNTANT,
    AccountantName,
    HistoryEvent,
    PrivacyAccountant,
    check_accountant,
    epsilon_from_history,
    history_to_json,
    merge_history,
    noise_multiplier_for_epsilon,
)
from privacy.checks import check_delta, check_int, check_positive

__all__ = [
    "DPSGDResult",
    "DPTrainer",
    "PrivacyBudgetExceeded",
    "check_dp_compatible",
    "dp_sgd_train",
    "make_dp_compatible",
    "make_private_trainer",
]

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]

# Warnings Opacus and torch raise on every round that this module documents instead.
_QUIET = (
    r"Secure RNG turned off.*",
    r"Full backward hook is firing when gradients are computed with respect to module "
    r"outputs since no inputs require gradients.*",
    r"GDP accounting is experimental.*",
)


class PrivacyBudgetExceeded(RuntimeError):
    """Training this round would push epsilon above the budget; nothing was trained."""


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse a model that DP-SGD cannot train privately.

    BatchNorm normalises each example with statistics of the whole batch, so one example's
    output, and its "per-sample" gradient, depends on the other examples: clipping no longer
    bounds one example's influence, and the running statistics (buffers, sent to the server
    with the weights) are computed from the data without noise. Opacus's
    :class:`~opacus.validators.ModuleValidator` lists these and other unsupported layers.

    Raises
    ------
    ValueError
        Listing the offending modules and the fix: build the model with GroupNorm (or
        LayerNorm / no norm), e.g. with :func:`make_dp_compatible`, on the server *and*
        every client, since the state dict must match.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors[:5])
        raise ValueError(
            f"model is not compatible with DP-SGD: {listed}. BatchNorm mixes examples within "
            "a batch (per-sample gradients then depend on other examples, and the running "
            "statistics leak the data without noise). Fix: build the model with GroupNorm "
            "instead (opacus.validators.ModuleValidator.fix(model), or "
            "client.dp_sgd.make_dp_compatible) everywhere the model is built, server included, "
            "so every party has the same architecture and state-dict keys"
        )


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` with DP-incompatible layers replaced (BatchNorm -> GroupNorm).

    Uses :meth:`opacus.validators.ModuleValidator.fix`. The result has different state-dict
    keys (no running statistics), so apply it where the architecture is defined, for the
    server and every client, never on one client alone.

    Raises
    ------
    ValueError
        If the fixed model is still incompatible.
    """
    fixed = cast(nn.Module, ModuleValidator.fix(model))
    check_dp_compatible(fixed)
    return fixed


@dataclass(frozen=True)
class DPSGDResult:
    """What a DP-SGD round on a client returns.

    Attributes
    ----------
    history
        The accountant history after this round (store it; pass it back next round).
    epsilon
        Epsilon at ``delta`` spent over the whole history (this and earlier rounds).
    delta
        The ``delta`` of ``epsilon``.
    noise_multiplier
        ``z`` used this round (chosen by the target-epsilon search when asked).
    sample_rate
        Poisson rate ``q = 1 / ceil(N / batch_size)`` (Opacus's choice).
    steps
        Optimizer steps this round.
    train_loss
        Mean loss over the non-empty batches of the last epoch.
    """

    history: tuple[HistoryEvent, ...]
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    train_loss: float

    def history_json(self) -> str:
        """:attr:`history` as JSON, for a ``ConfigRecord``."""
        return history_to_json(self.history)


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


class DPTrainer:
    """A model, optimizer and data made private by Opacus for one round; use as a context.

    Built by :func:`make_private_trainer`. ``with make_private_trainer(...) as t:
    t.train()`` trains ``epochs`` epochs in place on the caller's ``model`` (Opacus's
    hooks are attached with ``wrap_model=False``, so the state-dict keys stay the plain
    model's) and removes the hooks on exit, so the same model can be made private again
    next round.
    """

    def __init__(self, *, model: nn.Module, optimizer: Any, loader: DataLoader[Any],
                 engine: PrivacyEngine, hooks: Any, epochs: int, delta: float,
                 noise_multiplier: float, sample_rate: float, steps_per_epoch: int,
                 accountant: str, loss_fn: LossFn, device: torch.device) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loader = loader
        self.engine = engine
        self.epochs = epochs
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch
        self.accountant = accountant
        self.loss_fn = loss_fn
        self.device = device
        self._hooks = hooks
        self._steps = 0

    @property
    def history(self) -> list[HistoryEvent]:
        """The accountant history so far (restored history plus this round's steps)."""
        return merge_history(self.engine.accountant.history)

    @property
    def steps(self) -> int:
        """Optimizer steps taken by this trainer."""
        return self._steps

    def epsilon(self) -> float:
        """Epsilon at the configured ``delta`` over the whole history."""
        return epsilon_from_history(self.history, self.delta, self.accountant)

    def train(self) -> float:
        """Train ``epochs`` epochs; return the mean loss over the last epoch's non-empty batches.

        Raises
        ------
        RuntimeError
            If the trainer was closed.
        """
        if self._hooks is None:
            raise RuntimeError("this DPTrainer is closed: make a new one for the next round")
        self.model.train()
        last = float("nan")
        with warnings.catch_warnings():
            for pattern in _QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            for _ in range(self.epochs):
                losses: list[float] = []
                for xb, yb in self.loader:
                    xb, yb = xb.to(self.device), yb.to(self.device)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = self.loss_fn(self.model, xb, yb)
                    loss.backward()  # type: ignore[no-untyped-call]
                    self.optimizer.step()  # an empty Poisson batch still adds noise and counts
                    self._steps += 1
                    if xb.shape[0] > 0:
                        losses.append(float(loss.detach()))
                last = sum(losses) / len(losses) if losses else float("nan")
        return last

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample attributes from the model (idempotent)."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None
            for p in self.model.parameters():
                p.grad = None
                if hasattr(p, "summed_grad"):  # left by DPOptimizer, not by the hooks
                    del p.summed_grad

    def __enter__(self) -> DPTrainer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def make_private_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    max_grad_norm: float,
    epochs: int,
    delta: float,
    generator: torch.Generator,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    planned_rounds: int | None = None,
    max_epsilon: float | None = None,
    accountant: AccountantName = DEFAULT_ACCOUNTANT,
    history: Iterable[Sequence[Any]] | None = None,
    loss_fn: LossFn | None = None,
) -> DPTrainer:
    """Make one round of local training differentially private with Opacus (DP-SGD).

    Per step [Abadi et al., 2016], for a Poisson batch ``B`` (each example kept with
    probability ``q = 1 / ceil(N / batch_size)``)::

        g = (sum_{i in B} clip(grad_i, S) + N(0, (z S)^2 I)) / (q N)

    with ``S = max_grad_norm``; each step is booked as ``(z, q, 1)`` on top of ``history``.

    Parameters
    ----------
    model
        Trained in place; must pass :func:`check_dp_compatible` (no BatchNorm). Its device
        is where training runs.
    optimizer
        An optimizer over ``model.parameters()`` (wrapped by Opacus's ``DPOptimizer``).
    x, y
        ``(N, ...)`` inputs and ``(N,)`` targets, ``N >= 1``.
    batch_size
        Expected batch size; fixes ``q``.
    max_grad_norm
        Per-example clipping norm ``S > 0``.
    epochs
        Local epochs this round; one epoch is ``int(1 / q)`` steps.
    delta
        ``delta`` at which epsilon is reported (below ``1 / N``).
    generator
        CPU generator: Poisson batch sampling, and the seed of the noise generator (made on
        the model's device). Same generator state, same data, same model: same result.
    noise_multiplier
        ``z > 0``. Exactly one of ``noise_multiplier`` and ``target_epsilon``.
    target_epsilon
        Pick ``z`` (:func:`opacus.accountants.utils.get_noise_multiplier`) so that
        ``planned_rounds`` rounds of ``epochs`` epochs end at epsilon ``<= target_epsilon``;
        also the budget unless ``max_epsilon`` is given. The search
        (:func:`privacy.noise_multiplier_for_epsilon`) costs about 1 s with ``"rdp"`` and
        5 s with ``"prv"``; it is memoised per process, and a caller in a
        fresh process each round can store ``DPSGDResult.noise_multiplier`` and pass it
        (with ``max_epsilon``) in later rounds instead.
    planned_rounds
        Rounds this client will train in, required with ``target_epsilon``.
    max_epsilon
        Budget: refuse to train if this round would end above it.
    accountant
        ``"rdp"`` (the default: fast, a valid upper bound), ``"prv"`` (Opacus's default,
        10-15 % tighter, seconds per call) or ``"gdp"`` (an approximation that can
        under-report); see :mod:`privacy.accounting`.
    history
        Events spent in earlier rounds (``None``: none). Keep it per client, e.g. as
        :func:`privacy.history_to_json` in Flower's ``context.state``.
    loss_fn
        ``loss_fn(model, x_batch, y_batch) -> scalar``, *mean*-reduced over the batch, each
        example's loss depending on that example only; cross-entropy by default.

    Returns
    -------
    DPTrainer
        Use as a context manager; ``train()`` then ``history`` / ``epsilon()``.

    Raises
    ------
    ValueError
        On bad arguments or an incompatible model (BatchNorm).
    PrivacyBudgetExceeded
        If the history plus this round would exceed the budget.

    Examples
    --------
    >>> model = nn.Linear(3, 2)
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(32, 3, generator=g), torch.randint(0, 2, (32,), generator=g)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with make_private_trainer(model, opt, x, y, batch_size=8, max_grad_norm=1.0,
    ...                           epochs=1, delta=1e-5, noise_multiplier=1.0,
    ...                           generator=torch.Generator().manual_seed(0)) as t:
    ...     _ = t.train()
    >>> t.history
    [(1.0, 0.25, 4)]
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() < 1 or (
        x.shape[0] != y.shape[0]
    ):
        raise ValueError("x and y must be tensors with the same number of rows (N, ...), (N,)")
    n = x.shape[0]
    if n < 1:
        raise ValueError("cannot train on an empty partition: give this client some data")
    bs = check_int("batch_size", batch_size, 1)
    s = check_positive("max_grad_norm", max_grad_norm)
    ep = check_int("epochs", epochs, 1)
    dl = check_delta(delta)
    check_accountant(accountant)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "give exactly one of noise_multiplier and target_epsilon, got "
            f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}"
        )
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU generator (it samples batches), got {generator.device}"
        )
    check_dp_compatible(model)
    spent = PrivacyAccountant(accountant, history or ())

    loader = DataLoader(TensorDataset(x, y), batch_size=bs, generator=generator)
    q = 1 / len(loader)  # Opacus's sampling rate for this loader
    steps_per_epoch = int(1 / q)  # Opacus's UniformWithReplacementSampler steps
    round_steps = ep * steps_per_epoch

    if target_epsilon is not None:
        target = check_positive("target_epsilon", target_epsilon)
        rounds = check_int("planned_rounds (required with target_epsilon)", planned_rounds, 1)
        z = noise_multiplier_for_epsilon(target, dl, q, rounds * round_steps, accountant)
        budget: float | None = target if max_epsilon is None else check_positive(
            "max_epsilon", max_epsilon)
    else:
        z = check_positive("noise_multiplier", noise_multiplier)
        budget = None if max_epsilon is None else check_positive("max_epsilon", max_epsilon)
    planned = spent.planned(z, q, round_steps)  # refuses what the accountant cannot compose
    if budget is not None:
        after = epsilon_from_history(planned, dl, accountant)
        if after > budget:
            raise PrivacyBudgetExceeded(
                f"this round ({round_steps} steps at z={z:g}, q={q:g}) would raise epsilon "
                f"to {after:.4g} > budget {budget:g} at delta={dl:g} (spent so far: "
                f"{spent.epsilon(dl):.4g}): stop training this client"
            )

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    noise_gen = make_generator(noise_seed, device=device)
    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = spent.history
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=z,
        max_grad_norm=s, poisson_sampling=True, noise_generator=noise_gen,
        wrap_model=False,
    )
    if len(dp_loader) != steps_per_epoch or dp_loader.sample_rate != q:
        hooks.cleanup()
        raise RuntimeError(
            f"Opacus sampled {len(dp_loader)} batches at rate {dp_loader.sample_rate}, "
            f"expected {steps_per_epoch} at {q}: the installed Opacus changed its data loader"
        )
    return DPTrainer(
        model=model, optimizer=dp_optimizer, loader=dp_loader, engine=engine, hooks=hooks,
        epochs=ep, delta=dl, noise_multiplier=z, sample_rate=q,
        steps_per_epoch=steps_per_epoch, accountant=accountant,
        loss_fn=loss_fn or _cross_entropy, device=device,
    )


def dp_sgd_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    max_grad_norm: float,
    epochs: int,
    delta: float,
    generator: torch.Generator,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    planned_rounds: int | None = None,
    max_epsilon: float | None = None,
    accountant: AccountantName = DEFAULT_ACCOUNTANT,
    history: Iterable[Sequence[Any]] | None = None,
    loss_fn: LossFn | None = None,
) -> DPSGDResult:
    """One round of DP-SGD on a client: :func:`make_private_trainer`, train, clean up.

    Same parameters and errors as :func:`make_private_trainer`. The model is trained in
    place and left with no Opacus hooks or attributes.

    Returns
    -------
    DPSGDResult
        The new history (store it for the next round) and epsilon over all rounds.

    Examples
    --------
    >>> model = nn.Linear(3, 2)
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(32, 3, generator=g), torch.randint(0, 2, (32,), generator=g)
    >>> kw = dict(batch_size=8, max_grad_norm=1.0, epochs=1, delta=1e-5,
    ...           noise_multiplier=1.0, accountant="rdp")
    >>> r1 = dp_sgd_train(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y,
    ...                   generator=torch.Generator().manual_seed(1), **kw)
    >>> r2 = dp_sgd_train(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y,
    ...                   generator=torch.Generator().manual_seed(2), history=r1.history, **kw)
    >>> r2.history, r2.epsilon > r1.epsilon
    (((1.0, 0.25, 8),), True)
    """
    with make_private_trainer(
        model, optimizer, x, y, batch_size=batch_size, max_grad_norm=max_grad_norm,
        epochs=epochs, delta=delta, generator=generator, noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon, planned_rounds=planned_rounds, max_epsilon=max_epsilon,
        accountant=accountant, history=history, loss_fn=loss_fn,
    ) as trainer:
        loss = trainer.train()
        hist = trainer.history
        eps = trainer.epsilon()
        return DPSGDResult(
            history=tuple(hist), epsilon=eps, delta=trainer.delta,
            noise_multiplier=trainer.noise_multiplier, sample_rate=trainer.sample_rate,
            steps=trainer.steps, train_loss=loss,
        )
