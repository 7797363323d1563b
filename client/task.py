"""The task a client trains on: its model and its data, provided by a plug-in.

The apps do not import ``simulations`` (imports flow one way); the run config names a
task provider (``task = "simulations.task:build_task"`` by default), a callable
``provider(run_config) -> Task``. A deployment can point it at its own module to bring
its own model and data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from runconfig import resolve_object

__all__ = ["ClientTask", "load_task"]

Scalar = bool | int | float | str


@runtime_checkable
class ClientTask(Protocol):
    """What a client needs: a fresh model and its own training data."""

    @property
    def num_classes(self) -> int:
        """Number of classes of the task's labels."""
        ...

    def build_model(self) -> nn.Module:
        """A model of the task's architecture (weights are overwritten by the server's)."""
        ...

    def train_data(self, node_config: Mapping[str, Scalar]) -> tuple[Tensor, Tensor]:
        """This node's training inputs ``(N, ...)`` and labels ``(N,)``.

        ``node_config`` holds ``partition-id`` and ``num-partitions`` (simulation and
        ``flower-supernode --node-config``) or ``data-path`` for a node with its own file.
        """
        ...


def load_task(run_config: Mapping[str, Scalar]) -> ClientTask:
    """Build the task named by ``run_config["task"]``.

    Raises
    ------
    ValueError
        If the provider cannot be imported or does not return a task.
    """
    path = run_config.get("task")
    if not isinstance(path, str) or not path:
        raise ValueError(
            "run config key 'task' must name a task provider as 'module:function', "
            "e.g. 'simulations.task:build_task'"
        )
    provider = resolve_object(path)
    task = provider(run_config)
    if not isinstance(task, ClientTask):
        raise ValueError(f"task provider {path!r} returned {type(task).__name__}, not a task")
    return task
