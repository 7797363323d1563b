"""Client-level central differential privacy: the DP-FedAvg mechanism.

The server clips every client's update to L2 norm ``C``, sums the clipped updates, divides
by the *expected* number of clients ``m`` and adds Gaussian noise of standard deviation
``z C / m`` [McMahan et al., 2018]. Optionally ``C`` follows a quantile of the update
norms, estimated privately [Andrew et al., 2021]. Clipping, noise and the accounting
(Opacus's accountants on an explicit, serialisable history, default ``"rdp"``) come from
the privacy core, :mod:`privacy`; this module is the mechanism and what it books.

Which guarantee holds
---------------------
Adjacency is *add/remove one client* (all of that client's data), the server is trusted
(it sees individual updates), and every round releases ``sum(clipped) / m + noise``, also
when fewer clients (or none) reply. Per round the mechanism is booked as a Gaussian
mechanism with noise multiplier ``z`` on a sum of sensitivity ``C``:

``sampling="poisson"``
    The server samples each of the ``N`` nodes independently with probability
    ``q = m / N`` (:func:`poisson_sample`). Privacy amplification by subsampling applies:
    booked as ``(z, q)``, the Poisson-subsampled Gaussian mechanism of DP-SGD.
``sampling="none"``
    Every one of the ``N`` nodes takes part in every round (``m = N``). No amplification:
    booked as ``(z, 1)``.
``sampling="fixed"``
    A fixed-size uniform sample of ``m`` nodes (what Flower's node sampling does). We claim
    *no* amplification, and because adding one client to a population sampled at fixed size
    swaps it for another client in the sample, one client moves the sum by up to ``2 C``:
    booked as ``(z / 2, 1)``. Accounting the fixed-size sample as ``(z, 1)`` (Flower's
    ``RdpAccountant``) under-reports epsilon. Use ``"poisson"`` to get amplification.

The calibration ``z C / m`` bounds one client's influence on the *unweighted mean* of
clipped updates only; :func:`check_rule_compatible` refuses every other rule.

Randomness comes from ``torch.Generator`` arguments; floating-point Gaussian sampling from
a seeded pseudo-random generator is fine for research but is not a hardened DP
implementation [Mironov, 2012]: do not use it to protect real data as is.

References
----------
McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent Language
Models". ICLR 2018.
Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with Adaptive
Clipping". NeurIPS 2021.
Mironov. "On Significance of the Least Significant Bits for Differential Privacy". CCS 2012.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

import aggregation
from privacy import (
    DEFAULT_ACCOUNTANT,
    AccountantName,
    PrivacyAccountant,
    check_accountant,
    check_updates,
    clip_updates,
    gaussian_noise,
)
from privacy.checks import check_delta, check_int, check_nonnegative, check_positive, is_real

__all__ = [
    "SAMPLINGS",
    "CentralDPConfig",
    "CentralDPResult",
    "CentralDPState",
    "DPFedAvg",
    "PrivacyAccountant",
    "check_rule_compatible",
    "dp_mean",
    "poisson_sample",
    "update_noise_multiplier",
]

Sampling = Literal["poisson", "fixed", "none"]

SAMPLINGS: tuple[str, ...] = ("poisson", "fixed", "none")


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------


_FLOAT_FIELDS = ("noise_multiplier", "clipping_norm", "target_quantile", "clip_lr",
                 "clipped_count_stddev", "delta", "max_epsilon")


@dataclass(frozen=True)
class CentralDPConfig:
    """Settings of client-level central DP (DP-FedAvg), validated on construction.

    Parameters
    ----------
    noise_multiplier
        ``z > 0``: the noise on the sum has standard deviation ``z C`` (on the mean
        ``z C / m``). With ``adaptive=True`` it is the *total* multiplier of the round,
        shared between the update and the clipped count (see :func:`update_noise_multiplier`).
    clipping_norm
        ``C > 0``, the L2 bound of each client's update (the initial bound when adaptive).
    adaptive
        Follow the ``target_quantile`` of the update norms [Andrew et al., 2021].
    target_quantile
        ``gamma`` in ``(0, 1)``: the fraction of updates that should be left unclipped.
    clip_lr
        ``eta > 0`` of the geometric update ``C <- C exp(-eta (b_tilde - gamma))``.
    clipped_count_stddev
        ``sigma_b > 0``, standard deviation of the noise on the count of unclipped updates;
        ``None`` means ``m / 20`` [Andrew et al., 2021]. Only with ``adaptive=True``.
    delta
        Target ``delta`` in ``(0, 1)`` at which epsilon is reported.
    max_epsilon
        Stop before a round would make epsilon exceed this; ``None``: no budget.
    sampling
        ``"poisson"``, ``"fixed"`` or ``"none"``: how clients are sampled, which decides what
        is booked per round (see the module docstring).
    accountant
        ``"rdp"`` (the default: fast, a valid upper bound, 10-15 % above PRV) or ``"prv"``
        (tighter, seconds per call); see :mod:`privacy.accounting`. ``"gdp"`` is refused:
        it can under-report and composes only a constant ``(z, q)``, while ``q = m / N``
        follows the number of connected nodes.

    Raises
    ------
    ValueError
        If a value is out of range, the accountant is unknown or ``"gdp"``, or
        ``clipped_count_stddev`` is given without ``adaptive=True``.

    Examples
    --------
    >>> cfg = CentralDPConfig(noise_multiplier=1.0, clipping_norm=0.5, sampling="poisson")
    >>> cfg.delta
    1e-05
    """

    noise_multiplier: float
    clipping_norm: float
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clipped_count_stddev: float | None = None
    delta: float = 1e-5
    max_epsilon: float | None = None
    sampling: Sampling = "poisson"
    accountant: AccountantName = DEFAULT_ACCOUNTANT

    def __post_init__(self) -> None:
        check_positive("noise_multiplier", self.noise_multiplier)
        check_positive("clipping_norm", self.clipping_norm)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be a bool, got {self.adaptive!r}")
        if not is_real(self.target_quantile) or not 0 < self.target_quantile < 1:
            raise ValueError(
                f"target_quantile must be in (0, 1), got {self.target_quantile!r}"
            )
        check_positive("clip_lr", self.clip_lr)
        if self.clipped_count_stddev is not None:
            check_positive("clipped_count_stddev", self.clipped_count_stddev)
            if not self.adaptive:
                raise ValueError(
                    "clipped_count_stddev only applies to adaptive clipping: "
                    "set adaptive=True or drop clipped_count_stddev"
                )
        check_delta(self.delta)
        if self.max_epsilon is not None:
            check_positive("max_epsilon", self.max_epsilon)
        if self.sampling not in SAMPLINGS:
            raise ValueError(
                f"unknown sampling {self.sampling!r}; valid: {', '.join(SAMPLINGS)}"
            )
        if check_accountant(self.accountant) == "gdp":
            raise ValueError(
                "central DP cannot use the gdp accountant: it composes identical steps only "
                "and can under-report, and the booked rate q = m/N changes whenever the "
                "number N of connected nodes does. Use accountant='rdp' (default) or 'prv'"
            )

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> CentralDPConfig:
        """Build from a mapping of field names (``-`` or ``_`` separated), refusing unknown keys.

        Integers are accepted for float fields (TOML ``noise_multiplier = 1``).

        Raises
        ------
        TypeError
            If a key is not a field; the message names the valid fields and a close match.
        ValueError
            As the constructor.

        Examples
        --------
        >>> CentralDPConfig.from_dict({"noise-multiplier": 1, "clipping-norm": 2}).clipping_norm
        2.0
        """
        valid = [f.name for f in fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            name = key.replace("-", "_")
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(
                    f"central DP config got unknown key {key!r}{hint}; "
                    f"valid keys: {', '.join(valid)}"
                )
            if name in _FLOAT_FIELDS and is_real(value):
                value = float(value)
            kwargs[name] = value
        return cls(**kwargs)


def dp_mean(
    updates: Tensor,
    clipping_norm: float,
    noise_multiplier: float,
    expected_clients: int,
    *,
    generator: torch.Generator,
) -> Tensor:
    """Differentially private mean of clipped updates, DP-FedAvg [McMahan et al., 2018].

    ``mean = sum_i clip(x_i, C) / m + N(0, (z C / m)^2 I_d)``

    with the fixed denominator ``m`` (the *expected* number of clients), not the number of
    rows ``n``: dividing by ``n`` would let the presence of a client change the
    denominator, which the sensitivity ``C / m`` does not cover. With Poisson sampling
    ``n`` varies round to round and may be ``0`` (the result is then pure noise; it must
    still be released and booked).

    Parameters
    ----------
    updates
        ``(n, d)`` finite float updates, ``n >= 0``.
    clipping_norm
        ``C > 0``.
    noise_multiplier
        ``z >= 0`` (``0`` gives the clipped mean with no privacy).
    expected_clients
        ``m >= 1``.
    generator
        Source of the noise, on the device of ``updates``.

    Returns
    -------
    Tensor
        ``(d,)``, dtype and device of ``updates``.

    Raises
    ------
    ValueError
        On malformed updates or out-of-range parameters.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    >>> torch.allclose(dp_mean(x, 1.0, 0.0, 2, generator=g), torch.tensor([0.3, 0.65]))
    True
    """
    updates = check_updates("dp_mean", updates)
    m = check_int("expected_clients", expected_clients, 1)
    check_nonnegative("noise_multiplier", noise_multiplier)
    clipped, _, _ = clip_updates(updates, clipping_norm)
    total = clipped.sum(dim=0)  # (d,)
    noise = gaussian_noise(
        updates.shape[1], noise_multiplier * clipping_norm, generator=generator,
        dtype=updates.dtype, device=updates.device,
    )
    return (total + noise) / m


# ---------------------------------------------------------------------------------------
# DP-FedAvg with fixed or adaptive clipping: an explicit init / apply pair
# ---------------------------------------------------------------------------------------


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Noise multiplier left for the update when the clipped count is also released.

    ``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (the paper's ``z_Δ``) [Andrew et al.,
    2021, Thm. 1]: the round (update with multiplier ``z_update`` on sensitivity ``C``;
    count of unclipped updates, each counted as ``b_i - 1/2``, with noise ``sigma_b`` on
    sensitivity ``1/2``) is as private as one Gaussian mechanism with multiplier ``z``.

    Raises
    ------
    ValueError
        If ``z >= 2 sigma_b``: the count's noise alone would already spend the round's
        budget.

    Examples
    --------
    >>> round(update_noise_multiplier(1.0, 5.0), 6)
    1.005038
    """
    z = check_positive("noise_multiplier", noise_multiplier)
    sb = check_positive("clipped_count_stddev", clipped_count_stddev)
    rest = z**-2 - (2 * sb) ** -2
    if not rest > 0:
        raise ValueError(
            f"adaptive clipping needs noise_multiplier z < 2 * clipped_count_stddev, got "
            f"z={z}, clipped_count_stddev={sb}: raise clipped_count_stddev above {z / 2:g} "
            "(default m/20: sample more clients) or lower z"
        )
    return float(rest**-0.5)


@dataclass(frozen=True)
class CentralDPState:
    """State carried between rounds: the current clip norm ``C`` and the rounds done."""

    clipping_norm: float
    rounds: int = 0

    def to_dict(self) -> dict[str, float | int]:
        """JSON-able form (for checkpoints)."""
        return {"clipping_norm": self.clipping_norm, "rounds": self.rounds}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CentralDPState:
        """Inverse of :meth:`to_dict`."""
        return cls(float(data["clipping_norm"]), int(data["rounds"]))


@dataclass(frozen=True)
class CentralDPResult:
    """What one DP round releases and reports.

    Attributes
    ----------
    update
        ``(d,)`` the noised mean update; dtype and device of the input.
    clipping_norm
        ``C`` used this round.
    noise_std
        Standard deviation of the noise on each coordinate of ``update``
        (``z_update C / m``).
    num_clipped
        How many of the ``n`` updates were scaled down.
    unclipped_fraction
        ``b_tilde``, the noised fraction of unclipped updates (adaptive only, else
        ``None``); safe to log, it is part of the private release.
    """

    update: Tensor
    clipping_norm: float
    noise_std: float
    num_clipped: int
    unclipped_fraction: float | None


@dataclass(frozen=True)
class DPFedAvg:
    """DP-FedAvg with fixed [McMahan et al., 2018] or adaptive [Andrew et al., 2021] clipping.

    A stateful step as an explicit pair: ``state = dp.init()``, then each round
    ``result, state = dp.apply(state, updates, generator=g)``.

    Fixed clipping: ``update = sum_i clip(x_i, C) / m + N(0, (z C / m)^2)``.

    Adaptive clipping, with ``b_i = 1[||x_i|| <= C]`` and ``sigma_b`` the count noise::

        update  = sum_i clip(x_i, C) / m + N(0, (z_update C / m)^2)
        b_tilde = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2
        C      <- C exp(-eta (b_tilde - gamma))

    where ``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (:func:`update_noise_multiplier`);
    ``b_tilde`` is an unbiased estimate of the unclipped fraction when ``n = m``, and ``C``
    moves towards the ``gamma`` quantile of the norms. Either way the round is booked as
    :meth:`accounting_event`.

    Parameters
    ----------
    config
        The settings.
    expected_clients
        ``m >= 1``, the expected number of clients per round (``q N`` with Poisson
        sampling, the sample size with fixed sampling, ``N`` with ``sampling="none"``).

    Raises
    ------
    ValueError
        If ``m < 1`` or (adaptive) ``z >= 2 sigma_b``.

    Examples
    --------
    >>> dp = DPFedAvg(CentralDPConfig(noise_multiplier=1.0, clipping_norm=1.0), 10)
    >>> state = dp.init()
    >>> result, state = dp.apply(state, torch.ones(10, 4), generator=torch.Generator())
    >>> result.update.shape, result.noise_std
    (torch.Size([4]), 0.1)
    """

    config: CentralDPConfig
    expected_clients: int

    def __post_init__(self) -> None:
        if not isinstance(self.config, CentralDPConfig):
            raise ValueError(f"config must be a CentralDPConfig, got {type(self.config).__name__}")
        check_int("expected_clients", self.expected_clients, 1)
        if self.config.adaptive:
            update_noise_multiplier(self.config.noise_multiplier, self.count_stddev)

    @property
    def count_stddev(self) -> float:
        """``sigma_b``: the configured value, or ``m / 20``."""
        sb = self.config.clipped_count_stddev
        return self.expected_clients / 20 if sb is None else sb

    @property
    def z_update(self) -> float:
        """Multiplier of the noise on the update: ``z``, or ``z_update`` when adaptive."""
        if not self.config.adaptive:
            return self.config.noise_multiplier
        return update_noise_multiplier(self.config.noise_multiplier, self.count_stddev)

    def init(self) -> CentralDPState:
        """The state before round 1 (``C`` = the configured clipping norm)."""
        return CentralDPState(clipping_norm=self.config.clipping_norm, rounds=0)

    def apply(
        self, state: CentralDPState, updates: Tensor, *, generator: torch.Generator
    ) -> tuple[CentralDPResult, CentralDPState]:
        """Run one round on the ``(n, d)`` updates that arrived (``n >= 0``).

        Returns
        -------
        tuple
            ``(result, new_state)``; ``result.update`` is ``(d,)``.

        Raises
        ------
        ValueError
            On malformed updates.
        """
        updates = check_updates("DPFedAvg", updates)
        m = self.expected_clients
        c = state.clipping_norm
        clipped, _, was_clipped = clip_updates(updates, c)
        std = self.z_update * c / m
        noise = gaussian_noise(updates.shape[1], self.z_update * c,
                               generator=generator, dtype=updates.dtype, device=updates.device)
        update = (clipped.sum(dim=0) + noise) / m
        num_clipped = int(was_clipped.sum())
        b_tilde: float | None = None
        new_c = c
        if self.config.adaptive:
            n = updates.shape[0]
            centred = (n - num_clipped) - n / 2  # sum_i (b_i - 1/2)
            count_noise = float(
                torch.randn((), generator=generator, dtype=torch.float64,
                            device=generator.device)
            ) * self.count_stddev
            b_tilde = (centred + count_noise) / m + 0.5
            new_c = c * math.exp(-self.config.clip_lr * (b_tilde - self.config.target_quantile))
        result = CentralDPResult(update, c, std, num_clipped, b_tilde)
        return result, CentralDPState(clipping_norm=new_c, rounds=state.rounds + 1)

    def accounting_event(self, num_nodes: int) -> tuple[float, float]:
        """``(noise_multiplier, sample_rate)`` to book for one round over ``N`` nodes.

        ``"poisson"``: ``(z, m / N)``; ``"none"``: ``(z, 1)`` and requires ``m = N``;
        ``"fixed"``: ``(z / 2, 1)``, no amplification, sensitivity ``2 C`` (see the module
        docstring).

        Raises
        ------
        ValueError
            If ``N < m`` (Poisson rate above 1) or ``m != N`` with ``sampling="none"``.

        Examples
        --------
        >>> cfg = CentralDPConfig(noise_multiplier=1.0, clipping_norm=1.0)
        >>> DPFedAvg(cfg, 10).accounting_event(100)
        (1.0, 0.1)
        """
        n_nodes = check_int("num_nodes", num_nodes, 1)
        m = self.expected_clients
        z = self.config.noise_multiplier
        if self.config.sampling == "poisson":
            if m > n_nodes:
                raise ValueError(
                    f"Poisson sampling needs expected_clients m <= N nodes, got m={m}, "
                    f"N={n_nodes}: lower m or wait for more nodes"
                )
            return z, m / n_nodes
        if self.config.sampling == "none":
            if m != n_nodes:
                raise ValueError(
                    f"sampling='none' means every node takes part, so expected_clients must "
                    f"equal N: got m={m}, N={n_nodes}; use sampling='poisson' to sample"
                )
            return z, 1.0
        return z / 2, 1.0


def poisson_sample(num_nodes: int, q: float, *, generator: torch.Generator) -> list[int]:
    """Poisson sampling: each of ``N`` nodes joins independently with probability ``q``.

    This is the sampling under which amplification by subsampling holds for client-level
    DP [McMahan et al., 2018]; the sample size is ``Binomial(N, q)`` (possibly ``0``).

    Parameters
    ----------
    num_nodes
        ``N >= 0``; sort the node ids and map the returned positions onto them.
    q
        Sampling rate in ``[0, 1]`` (``expected_clients / N``).
    generator
        A CPU generator.

    Returns
    -------
    list of int
        Sorted positions in ``range(N)``.

    Raises
    ------
    ValueError
        If ``N < 0`` or ``q`` is outside ``[0, 1]``.

    Examples
    --------
    >>> poisson_sample(5, 1.0, generator=torch.Generator())
    [0, 1, 2, 3, 4]
    """
    n = check_int("num_nodes", num_nodes, 0)
    if not is_real(q) or not 0 <= q <= 1:
        raise ValueError(f"sampling rate q must be in [0, 1], got {q!r}")
    draws = torch.rand(n, generator=generator, dtype=torch.float64)
    return [int(i) for i in (draws < q).nonzero().flatten().tolist()]


def check_rule_compatible(
    rule_name: str,
    *,
    weights: Tensor | Sequence[float] | None = None,
    pre: Sequence[str] = (),
) -> None:
    """Refuse aggregation rules that the central-DP calibration does not cover.

    The noise ``N(0, (z C / m)^2)`` makes DP-FedAvg private because adding or removing
    one client moves ``sum_i clip(x_i, C) / m`` by at most ``C / m``
    [McMahan et al., 2018]. That bound holds for the *unweighted* mean of clipped updates
    only: Krum, the median, trimmed means and the other robust rules select or trim
    depending on the other clients, so their sensitivity needs its own analysis. A
    weighted mean gives a client up to ``w_max / sum(w)`` of the result, which
    the calibration ignores; it is refused unless all weights are equal. Of the
    pre-aggregation steps only per-client ``norm_clip`` keeps the bound (a client still
    affects only its own row); ``bucketing`` and ``nnm`` mix clients into several rows.

    Parameters
    ----------
    rule_name
        Registered aggregation rule.
    weights
        The per-client weights the rule would use (e.g. ``num-examples``), or ``None``.
    pre
        Names of pre-aggregation steps before the rule.

    Raises
    ------
    ValueError
        Naming the rule and why the calibration does not hold, and the fix.

    Examples
    --------
    >>> check_rule_compatible("mean")
    >>> check_rule_compatible("krum")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: central DP (noise z*C/m) is calibrated for the unweighted mean of clipped ...
    """
    head = "central DP (noise z*C/m) is calibrated for the unweighted mean of clipped updates"
    why = aggregation.central_dp_refusal(rule_name)  # declared where the rule is registered
    if why is not None:
        raise ValueError(
            f"{head} only; got rule {rule_name!r}: {why}. Use rule 'mean' with central DP, "
            "or drop central DP (e.g. use client-side DP-SGD) to keep a robust rule"
        )
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() > 0 and not bool((w == w[0]).all()):
            raise ValueError(
                f"{head}; got unequal weights (min {float(w.min()):g}, max {float(w.max()):g}):"
                " a weighted mean bounds one client's influence by w_i/sum(w), not 1/m. "
                "Aggregate without weights (every client counts 1/m)"
            )
    allowed = aggregation.dp_compatible_steps()
    bad = [p for p in pre if p not in allowed]
    if bad:
        raise ValueError(
            f"{head}; pre-aggregation {bad} mixes clients into shared rows, so one client "
            f"affects more than its own clipped update. Allowed before central DP: "
            f"{', '.join(allowed)}"
        )
