"""The gradient-inversion audit: what a curious server recovers of a client's batch.

The server knows the global model it sent, the client's learning rate and batch size, and
sees the update ``u = -lr g`` of one local step (or, under a defense, what
:mod:`.defenses` leaves of it). It runs the attacks of :mod:`.inversion_attacks` (DLG,
iDLG, inverting gradients) on what it observed. Reconstructions are matched to the
originals by the Hungarian method on PSNR and scored by PSNR, SSIM and label recovery
(:func:`evaluate_reconstruction`); :mod:`.inversion_report` writes the tables and image
grids.

:func:`run_inversion_audit` is the one entry point (``fedshield audit inversion``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from aggregation.registry import derive_seed, make_generator

from ..datasets import load_dataset
from ..models import build_model
from .defenses import ClientStep, describe, make_defense
from .inversion_attacks import INVERSION_ATTACKS, Reconstruction, invert
from .inversion_report import GridBlock, write_inversion_report
from .metrics import label_multiset_accuracy, match_reconstructions, psnr, ssim

__all__ = ["AuditDataset", "evaluate_reconstruction", "run_inversion_audit"]


class AuditDataset(Protocol):
    """What the audit reads from a ``simulations.datasets.Dataset``."""

    @property
    def x_train(self) -> Tensor: ...
    @property
    def y_train(self) -> Tensor: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def input_shape(self) -> tuple[int, ...]: ...


def evaluate_reconstruction(x_true: Tensor, y_true: Tensor,
                            rec: Reconstruction) -> dict[str, Any]:
    """Score a reconstruction against the victim's batch.

    The ``B`` originals are matched to ``B`` of the ``M >= B`` reconstructions by
    :func:`.metrics.match_reconstructions`; PSNR and SSIM are averaged over the matched
    pairs; ``label_acc`` is :func:`.metrics.label_multiset_accuracy` of the true labels
    against the labels of the matched reconstructions (all of them when ``M = B``).

    Returns
    -------
    dict
        ``psnr``, ``ssim``, ``label_acc`` (floats) and ``assignment`` (``(B,)`` int64).
    """
    x_true = x_true.to(torch.float64).cpu()
    x_rec = rec.x.to(torch.float64).cpu()
    assignment = match_reconstructions(x_true, x_rec)
    matched = x_rec[assignment]
    return {
        "psnr": float(psnr(x_true, matched).mean()),
        "ssim": float(ssim(x_true, matched).mean()),
        "label_acc": label_multiset_accuracy(y_true.cpu(), rec.y[assignment]),
        "assignment": assignment,
    }


def _check_int_list(name: str, values: Sequence[int], lo: int, hi: int) -> list[int]:
    out = list(values)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi
                      for v in out):
        raise ValueError(f"inversion audit needs {name} as ints in [{lo}, {hi}], got {values!r}")
    return out


def run_inversion_audit(
    model_name: str,
    dataset: str | AuditDataset,
    *,
    attacks: Sequence[str] = ("dlg", "idlg", "cosine"),
    defenses: Sequence[tuple[str, Mapping[str, Any]]] = (("none", {}),),
    batch_sizes: Sequence[int] = (1,),
    seed: int = 0,
    iterations: int = 200,
    out_dir: str | Path | None = None,
    trials: int = 1,
    lr: float = 0.1,
    model_params: Mapping[str, Any] | None = None,
    attack_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Audit how much of a client's batch a curious server recovers from one update.

    For each batch size ``B``, trial, defense and attack: a fresh victim batch of ``B``
    training examples (the same across defenses and attacks of a trial), the defended
    observation of its gradient on the freshly initialised global model (in eval mode, so
    dropout is off: the first-round FedSGD view), one inversion, and its scores (see
    :func:`evaluate_reconstruction`), averaged over trials.

    Parameters
    ----------
    model_name
        A ``simulations.models`` name (``logreg``, ``mlp``, ``cnn``); CLI ``--model``.
    dataset
        A dataset name for ``load_dataset(name, seed=seed)`` or a loaded ``Dataset`` with
        image inputs ``(C, H, W)`` in ``[0, 1]``; CLI ``--dataset``.
    attacks
        Names in ``INVERSION_ATTACKS``: ``dlg``, ``idlg``, ``cosine``; CLI ``--attack`` (repeatable).
    defenses
        ``(name, params)`` pairs for ``DEFENSES``; CLI ``--defense "name(k=v, ...)"``
        (repeatable, parsed by :func:`runconfig.spec.parse_spec`).
    batch_sizes
        Victim batch sizes, each in ``1..64``; CLI ``--batch-size`` (repeatable).
    seed
        Root seed: model weights, victim batches, defense noise and attack starts are
        derived from it with ``derive_seed``; CLI ``--seed``.
    iterations
        L-BFGS iterations (``dlg``, ``idlg``) or Adam steps (``cosine``); CLI
        ``--iterations``.
    out_dir
        Where ``inversion.csv``, ``inversion.md``, ``inversion_config.json`` and one
        ``inversion_<attack>.png`` grid per attack go (originals above the reconstructions
        under each defense, first trial); ``None`` writes nothing; CLI ``--out``.
    trials
        Victim batches per batch size; CLI ``--trials``.
    lr
        The victim's local learning rate (update ``-lr g``); sets the scale of
        ``clipping`` and ``local_dp``; CLI ``--lr``.
    model_params
        Hyperparameters for ``build_model``; CLI ``--model-param k=v`` (repeatable).
    attack_params
        Per-attack hyperparameters, e.g. ``{"cosine": {"tv_weight": 1e-3}}``; CLI
        ``--attack-param "cosine(tv_weight=1e-3)"``.

    Returns
    -------
    list[dict]
        One row per (attack, defense, batch size): ``attack``, ``defense`` (name with
        parameters), ``batch_size``, ``psnr`` (dB, mean over images and trials; ``inf``
        for exact copies), ``ssim``, ``label_acc``, ``trials``.

    Raises
    ------
    KeyError
        Unknown model, dataset, attack or defense name.
    TypeError
        Unknown parameter of one of them.
    ValueError
        Non-image data, or an argument out of range.

    Examples
    --------
    >>> rows = run_inversion_audit("logreg", "digits", attacks=["idlg"],
    ...                            defenses=[("none", {})], iterations=50)  # doctest: +SKIP
    >>> rows[0]["psnr"] > 30  # doctest: +SKIP
    True
    """
    ds: AuditDataset = load_dataset(dataset, seed=seed) if isinstance(dataset, str) else dataset
    if len(ds.input_shape) != 3:
        raise ValueError(
            f"the inversion audit needs image inputs (C, H, W), got input_shape "
            f"{ds.input_shape}: PSNR/SSIM and the TV prior are defined on images"
        )
    sizes = _check_int_list("batch_sizes", batch_sizes, 1, 64)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"inversion audit needs an int trials >= 1, got {trials!r}")
    if len(set(attacks)) != len(attacks) or len(set(sizes)) != len(sizes):
        raise ValueError(
            f"inversion audit needs distinct attacks and batch sizes, got {list(attacks)} and "
            f"{sizes}"
        )
    a_params = {a: dict((attack_params or {}).get(a, {})) for a in attacks}
    unknown = sorted(set(attack_params or {}) - set(attacks))
    if unknown:
        raise ValueError(f"attack_params names attacks not run: {unknown}; run {list(attacks)}")
    for a in attacks:  # unknown names and parameters fail before any training
        INVERSION_ATTACKS.build(a, **a_params[a])
    built = [(describe(name, params), make_defense(name, **dict(params)))
             for name, params in defenses]
    if not built or not attacks:
        raise ValueError("inversion audit needs at least one attack and one defense")
    labels = [label for label, _ in built]
    if len(set(labels)) != len(labels):
        raise ValueError(f"inversion audit got the same defense twice: {labels}")

    model = build_model(model_name, ds.input_shape, ds.num_classes,
                        generator=make_generator(derive_seed(seed, "inversion", "model")),
                        **dict(model_params or {}))
    model.eval()
    input_shape = tuple(ds.input_shape)
    n_train = int(ds.x_train.shape[0])

    sums: dict[tuple[str, str, int], dict[str, float]] = {}
    shown: dict[str, list[GridBlock]] = {a: [] for a in attacks}
    for b in sizes:
        for t in range(trials):
            perm = torch.randperm(n_train, generator=make_generator(
                derive_seed(seed, "inversion", "batch", b, "trial", t)))
            vx, vy = ds.x_train[perm[:b]], ds.y_train[perm[:b]]
            step = ClientStep(model, vx, vy, lr=lr, pool_x=ds.x_train[perm[b:]],
                              pool_y=ds.y_train[perm[b:]])
            per_attack: dict[str, list[tuple[str, float, Tensor]]] = {a: [] for a in attacks}
            for label, defense in built:
                obs = defense(step, generator=make_generator(
                    derive_seed(seed, "inversion", "defense", label, b, t)))
                for a in attacks:
                    rec = invert(a, model, obs, input_shape=input_shape,
                                 num_classes=ds.num_classes, iterations=iterations,
                                 generator=make_generator(
                                     derive_seed(seed, "inversion", "attack", a, b, t)),
                                 **a_params[a])
                    scores = evaluate_reconstruction(vx, vy, rec)
                    acc = sums.setdefault((a, label, b),
                                          {"psnr": 0.0, "ssim": 0.0, "label_acc": 0.0})
                    for key in acc:
                        acc[key] += scores[key] / trials
                    per_attack[a].append((label, scores["psnr"],
                                          rec.x[scores["assignment"]].float().cpu()))
            if t == 0:
                for a in attacks:
                    shown[a].append(GridBlock(f"B={b}", vx.cpu(), tuple(per_attack[a])))

    rows = [
        {"attack": a, "defense": label, "batch_size": b, "psnr": v["psnr"],
         "ssim": v["ssim"], "label_acc": v["label_acc"], "trials": trials}
        for (a, label, b), v in sums.items()
    ]
    if out_dir is not None:
        config = {
            "model_name": model_name, "dataset": dataset if isinstance(dataset, str)
            else getattr(dataset, "name", type(dataset).__name__),
            "attacks": list(attacks), "defenses": [[n, dict(p)] for n, p in defenses],
            "batch_sizes": sizes, "seed": seed, "iterations": iterations, "trials": trials,
            "lr": lr, "model_params": dict(model_params or {}), "attack_params": a_params,
        }
        write_inversion_report(out_dir, rows, config, shown)
    return rows
