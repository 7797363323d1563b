"""FLTrust's server side: the reference update from the server's root dataset each round.

FLTrust [Cao et al., NDSS 2021] weighs every client's update by how well it agrees with an
update the server computes itself: the global model trained, with the run's local-training
settings, on a small clean *root dataset* the server holds. :class:`RootUpdate` is that
server-side training as a round component (the ``server`` stage of
:mod:`server.stages`); the rule that uses it, ``fltrust``, is pure maths in
:mod:`aggregation.trust`, and the loop hands it the component's update as ``reference``.

The run config key ``root-dataset`` names the root dataset:

``held-out(size=S)``
    ``S`` examples drawn (seeded by the run's seed) from the task's training split and
    removed from every client's partition, so the server's data is its own.
``file(path=PATH)``
    The ``x_train``, ``y_train`` arrays of a Keras-style ``.npz`` on the server (the format
    of a node's ``data-path``).

The server gets the data and the training from the task (:class:`RootTask`, which
``simulations.task.DatasetTask`` implements): the server never imports client code.
Preconditions are checked before round 1 (:func:`check_root_dataset`): ``fltrust`` without a
root dataset, a root dataset with a rule that takes no reference, or a task that cannot
provide one are refused with the fix.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from aggregation import Aggregator
from runconfig import Spec
from runconfig.config import RunConfig

from .rounds import ModelSpec
from .stages import Component, Round, Verdict

__all__ = ["RootTask", "RootUpdate", "check_root_dataset", "needs_reference"]

log = logging.getLogger("fedshield.server")


@runtime_checkable
class RootTask(Protocol):
    """What FLTrust needs from the task beyond :class:`server.run.ServerTask`."""

    def root_data(self, spec: Spec) -> tuple[Tensor, Tensor]:
        """The root dataset ``(x (N, ...), y (N,))`` that ``spec`` (``root-dataset``) names.

        Raises ``ValueError`` / ``FileNotFoundError`` when it cannot be provided.
        """
        ...

    def train_on(
        self, model: nn.Module, x: Tensor, y: Tensor, *, cfg: RunConfig, server_round: int,
        device: torch.device,
    ) -> dict[str, float]:
        """Train ``model`` in place on ``(x, y)`` with ``cfg``'s local-training settings.

        Seeded from ``cfg.seed`` and ``server_round``; returns metrics (``train-loss``).
        """
        ...


def needs_reference(rule: Aggregator) -> bool:
    """Whether ``rule`` (with its pre-aggregation steps) takes the server's reference update."""
    return bool(getattr(rule, "needs_reference", False))


def check_root_dataset(cfg: RunConfig, rule: Aggregator) -> None:
    """Refuse, before round 1, a rule and a ``root-dataset`` that do not go together.

    Raises
    ------
    ValueError
        The rule needs a reference update and ``root-dataset`` is empty, or
        ``root-dataset`` is set for a rule that takes no reference.
    """
    if needs_reference(rule) and cfg.root_dataset is None:
        raise ValueError(
            f"aggregator={cfg.rule.name!r} weighs the clients against the server's own update "
            "on a root dataset, but root-dataset is empty: set root-dataset, e.g. "
            "'held-out(size=100)' (100 training examples kept by the server) or "
            "'file(path=root.npz)'"
        )
    if cfg.root_dataset is not None and not needs_reference(rule):
        raise ValueError(
            f"root-dataset={cfg.flat.get('root-dataset')!r} is set, but aggregator="
            f"{cfg.rule.name!r} takes no server-side reference update, so the server would "
            "train on it for nothing (and a held-out slice would be taken from the clients): "
            "use aggregator='fltrust', or set root-dataset=''"
        )


def _digest(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RootUpdate(Component):
    """The server's update on its root dataset, every round (FLTrust's reference).

    At the ``server`` stage a copy of the global model is trained on the root dataset with
    the run's local-training settings (``local-epochs``, ``batch-size``, ``learning-rate``,
    ``optimizer``, ``momentum``, ``weight-decay``; the batch order from a generator derived
    from the run's seed and the round), and the trained weights minus the global model,
    ``(d,)`` float64 on the server's device, become the round's ``server_update``. The
    global model itself is untouched. It records the root training loss in the round's
    row and each client's trust score in the audit report.

    Its state: the root dataset's size and SHA-256 digest and the last root training loss.
    A resume whose root dataset differs from the checkpoint's (a changed file) is stopped
    at the ``admit`` stage, since it would not continue the same run. Not ``critical``:
    a failed server update skips the round (the rule has no reference), which is safe.

    Parameters
    ----------
    task
        Provides the root data and the training (:class:`RootTask`).
    cfg
        The run config (``root-dataset``, the training settings, the seed).
    device
        The server's device: where the root training runs and the update lives.

    Raises
    ------
    ValueError
        ``cfg`` has no ``root-dataset``, or the task is not a :class:`RootTask`, or the
        root dataset is empty or its shapes disagree.
    """

    name = "fltrust"

    def __init__(self, task: object, cfg: RunConfig, device: torch.device) -> None:
        if cfg.root_dataset is None:
            raise ValueError("RootUpdate needs root-dataset in the run config")
        if not isinstance(task, RootTask):
            raise ValueError(
                f"root-dataset is set but the task ({type(task).__name__}, from task="
                f"{cfg.task!r}) has no root_data() and train_on() (server.fltrust.RootTask): "
                "use the default task 'simulations.task:build_task' or add both methods"
            )
        x, y = task.root_data(cfg.root_dataset)
        if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"root-dataset {cfg.flat.get('root-dataset')!r} gave x of shape "
                f"{tuple(x.shape)} and y of shape {tuple(y.shape)}: it needs N >= 1 examples "
                "and one label per example"
            )
        self.task: RootTask = task
        self.cfg = cfg
        self.device = device
        self.x, self.y = x, y
        self.digest = _digest(x, y)

    def init_state(self) -> dict[str, Any]:
        return {"root_examples": int(self.x.shape[0]), "root_digest": self.digest,
                "train_loss": None}

    def admit(self, rnd: Round, state: dict[str, Any]) -> tuple[Verdict | None, dict[str, Any]]:
        if state["root_digest"] != self.digest:
            return Verdict("stop", (
                f"the root dataset ({self.x.shape[0]} examples) differs from the one this run "
                f"was checkpointed with ({state['root_examples']} examples): resuming would "
                "not continue the same run; restore the root dataset or start a new run"
            )), state
        return None, state

    def server_update(
        self, rnd: Round, model: nn.Module, state: dict[str, Any]
    ) -> tuple[Tensor | None, dict[str, Any]]:
        spec = ModelSpec.from_state(model.state_dict())
        local = copy.deepcopy(model)
        metrics = self.task.train_on(local, self.x, self.y, cfg=self.cfg,
                                     server_round=rnd.number, device=self.device)
        trained = spec.flatten({k: v.to(self.device) for k, v in local.state_dict().items()})
        update = trained - rnd.global_flat.to(device=self.device, dtype=torch.float64)
        loss = metrics.get("train-loss")
        return update, {**state, "train_loss": None if loss is None else float(loss)}

    def record(
        self, rnd: Round, row: Mapping[str, Any], report: Mapping[str, Any],
        state: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        row_fields: dict[str, Any] = {}
        report_fields: dict[str, Any] = {}
        if rnd.new_global is None or rnd.result is None:  # skipped: no root training counted
            return row_fields, report_fields, state
        if state["train_loss"] is not None:
            row_fields["root-train-loss"] = state["train_loss"]
        trust = rnd.result.info.get("trust")
        if trust is not None and trust.shape == (len(rnd.accepted),):
            report_fields["trust"] = [
                {"node_id": r.node_id, "partition_id": r.partition_id, "trust": float(t)}
                for r, t in zip(rnd.accepted, trust.tolist(), strict=True)
            ]
        if float(rnd.result.info.get("all_distrusted", torch.tensor(0.0))) > 0:
            note = ("no client update has a positive cosine with the server's root update: "
                    "the aggregate is zero and the global model is unchanged")
            log.warning("round %d: fltrust: %s", rnd.number, note)
            report_fields["fltrust_note"] = note
        return row_fields, report_fields, state
