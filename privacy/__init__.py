"""The privacy core shared by central DP, DP-SGD, local DP and the privacy audits.

A base package (beside :mod:`aggregation`): pure torch, numpy and scipy, plus Opacus's
accountants imported lazily (``import opacus`` takes seconds). The mechanisms live with
their users: DP-FedAvg in :mod:`server.dp`, DP-SGD in :mod:`client.dp_sgd`, local DP in
:mod:`client.local_dp`; what they share lives here.

========================================  ==================================================
:mod:`privacy.accounting`                 events ``(z, q, steps)``, their history and its
                                          JSON round trip; epsilon through Opacus's ``rdp``
                                          (the default), ``prv`` or ``gdp`` accountants;
                                          :class:`PrivacyAccountant`; noise for a target
                                          epsilon
:mod:`privacy.clipping`                   per-row L2 clipping of an ``(n, d)`` stack
:mod:`privacy.noise`                      Gaussian noise from a ``torch.Generator`` and its
                                          calibration (classic and analytic Gaussian
                                          mechanism)
:mod:`privacy.checks`                     validation of DP parameters
========================================  ==================================================

One default accountant, ``"rdp"``: a valid upper bound (never under-reports), fast enough
to be asked every round by every client; ``"prv"`` is 10-15 % tighter but costs seconds per
call. See :mod:`privacy.accounting`.
"""

from __future__ import annotations

from .accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    AccountantName,
    HistoryEvent,
    PrivacyAccountant,
    check_accountant,
    check_event,
    epsilon_from_history,
    history_from_json,
    history_to_json,
    merge_history,
    noise_multiplier_for_epsilon,
)
from .clipping import check_updates, clip_updates
from .noise import gaussian_noise, gaussian_sigma

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "AccountantName",
    "HistoryEvent",
    "PrivacyAccountant",
    "check_accountant",
    "check_event",
    "check_updates",
    "clip_updates",
    "epsilon_from_history",
    "gaussian_noise",
    "gaussian_sigma",
    "history_from_json",
    "history_to_json",
    "merge_history",
    "noise_multiplier_for_epsilon",
]
