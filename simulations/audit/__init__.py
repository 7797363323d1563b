"""Audits of what a federated update leaks and how robust the model is.

* :mod:`.inversion`: the gradient-inversion audit by a curious server, with the attacks of
  :mod:`.inversion_attacks` (DLG, iDLG, inverting gradients) under the defenses of
  :mod:`.defenses`, scored by :mod:`.metrics`, written out by :mod:`.inversion_report`;
  :func:`run_inversion_audit` is the entry point of ``fedshield audit inversion``.
* :mod:`.membership`: loss-threshold membership inference (AUC, advantage).
* :mod:`.evasion`: robust accuracy under FGSM / PGD.

Plain torch, no Flower.
"""

from __future__ import annotations

from .defenses import DEFENSES, ClientStep, Observation, make_defense
from .evasion import EVASION_ATTACKS, robust_accuracy, robust_accuracy_curve
from .inversion import evaluate_reconstruction, run_inversion_audit
from .inversion_attacks import INVERSION_ATTACKS, Reconstruction, invert, recover_labels
from .membership import membership_advantage, membership_auc
from .metrics import psnr, ssim

__all__ = [
    "DEFENSES",
    "EVASION_ATTACKS",
    "INVERSION_ATTACKS",
    "ClientStep",
    "Observation",
    "Reconstruction",
    "evaluate_reconstruction",
    "invert",
    "make_defense",
    "membership_advantage",
    "membership_auc",
    "psnr",
    "recover_labels",
    "robust_accuracy",
    "robust_accuracy_curve",
    "run_inversion_audit",
    "ssim",
]
