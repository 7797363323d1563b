"""The default task provider: a registered dataset, partitioned, and a registered model.

``build_task(run_config)`` is what the apps load through the run config's ``task`` key.
Datasets and partitions are cached per process, since each ClientApp call asks again.

With ``root-dataset`` set (FLTrust, :mod:`server.fltrust`) the task also gives the server
its root dataset (:meth:`DatasetTask.root_data`) and trains the global model on it
(:meth:`DatasetTask.train_on`). A ``held-out(size=S)`` root dataset is ``S`` training
examples drawn with the run's seed and removed from every client's partition; without
``root-dataset`` the partitions are exactly those of a run without it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aggregation.registry import derive_seed, make_generator
from runconfig.config import RunConfig, config_value
from runconfig.spec import Spec, parse_params, parse_spec

from .datasets import Dataset, load_dataset
from .models import build_model
from .partition import partition

__all__ = ["DatasetTask", "build_task"]

Scalar = bool | int | float | str


@functools.lru_cache(maxsize=8)
def _dataset(name: str, seed: int) -> Dataset:
    return load_dataset(name, seed=seed)


@functools.lru_cache(maxsize=8)
def _held_out(name: str, seed: int, size: int) -> tuple[Tensor, Tensor]:
    """``(root, rest)``: sorted indices of ``size`` training examples drawn with the run's
    seed for the server's root dataset, and of the other examples."""
    n = _dataset(name, seed).num_train
    if not 1 <= size < n:
        raise ValueError(
            f"root-dataset held-out(size={size}) needs 1 <= size < {n}, the number of "
            f"training examples of {name!r} (the clients need the rest): lower size"
        )
    perm = torch.randperm(n, generator=make_generator(derive_seed(seed, "root-dataset", size)))
    return perm[:size].sort().values, perm[size:].sort().values


@functools.lru_cache(maxsize=32)
def _partitions(
    name: str, seed: int, scheme: str, params: tuple[tuple[str, Any], ...], num: int,
    held_out: int = 0,
) -> tuple[Tensor, ...]:
    ds = _dataset(name, seed)
    gen = make_generator(derive_seed(seed, "partition", scheme, num))
    if not held_out:
        return tuple(partition(scheme, ds.y_train, num, generator=gen, **dict(params)))
    # the root dataset is the server's: the clients' partitions are made of the rest
    rest = _held_out(name, seed, held_out)[1]
    parts = partition(scheme, ds.y_train[rest], num, generator=gen, **dict(params))
    return tuple(rest[p] for p in parts)


class DatasetTask:
    """A registered dataset split among clients by a registered partitioner, and a model."""

    def __init__(
        self,
        dataset: str,
        model: str,
        *,
        model_params: Mapping[str, Any],
        partitioner: str,
        partitioner_params: Mapping[str, Any],
        seed: int,
        root_dataset: Spec | None = None,
    ) -> None:
        self.dataset_name = dataset
        self.model_name = model
        self.model_params = dict(model_params)
        self.partitioner = partitioner
        self.partitioner_params = tuple(sorted(partitioner_params.items()))
        self.seed = seed
        self.root_dataset = root_dataset

    @property
    def _held_out_size(self) -> int:
        """Training examples the server keeps (``held-out`` root dataset), else 0."""
        if self.root_dataset is None or self.root_dataset.name != "held-out":
            return 0
        return int(self.root_dataset.params["size"])

    @property
    def dataset(self) -> Dataset:
        return _dataset(self.dataset_name, self.seed)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def build_model(self) -> nn.Module:
        """The model, initialised deterministically from the run's seed."""
        ds = self.dataset
        gen = make_generator(derive_seed(self.seed, "model-init"))
        return build_model(
            self.model_name, ds.input_shape, ds.num_classes, generator=gen, **self.model_params
        )

    def partition_indices(self, num_partitions: int) -> tuple[Tensor, ...]:
        """Index tensors of every client's training partition."""
        return _partitions(
            self.dataset_name, self.seed, self.partitioner, self.partitioner_params, num_partitions,
            self._held_out_size,
        )

    def train_data(self, node_config: Mapping[str, Scalar]) -> tuple[Tensor, Tensor]:
        """This node's training data: its own file (``data-path``) or its partition."""
        if "data-path" in node_config:
            own = load_dataset(f"npz:{node_config['data-path']}", seed=self.seed)
            return own.x_train, own.y_train
        idx = self._partition_of(node_config)
        ds = self.dataset
        return ds.x_train[idx], ds.y_train[idx]

    def train_data_concat(
        self, node_configs: Sequence[Mapping[str, Scalar]]
    ) -> tuple[Tensor, Tensor, list[int]]:
        """The training data of several nodes, concatenated in order, and each one's size:
        what :meth:`train_data` gives each, with one indexing of the dataset for all (the
        batched engine's round).

        Raises
        ------
        ValueError
            A node config :meth:`train_data` refuses, or one with its own file (``data-path``:
            ask :meth:`train_data`).
        """
        if any("data-path" in nc for nc in node_configs):
            raise ValueError("a node with its own data file (data-path): use train_data")
        parts: dict[int, tuple[Tensor, ...]] = {}  # the partitions of each num-partitions
        idx = [self._partition_of(nc, parts) for nc in node_configs]
        ds = self.dataset
        rows = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
        return ds.x_train[rows], ds.y_train[rows], [int(i.numel()) for i in idx]

    def _partition_of(
        self, node_config: Mapping[str, Scalar], parts: dict[int, tuple[Tensor, ...]] | None = None
    ) -> Tensor:
        """The indices of the node's partition of the training split (``parts``: the
        partitions already looked up, by number of partitions)."""
        if "partition-id" not in node_config or "num-partitions" not in node_config:
            raise ValueError(
                "node config needs partition-id and num-partitions (or data-path); start the "
                "SuperNode with --node-config \"partition-id=0 num-partitions=3\""
            )
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if not 0 <= pid < num:
            raise ValueError(f"partition-id must be in [0, {num}), got {pid}")
        if parts is None:
            return self.partition_indices(num)[pid]
        if num not in parts:
            parts[num] = self.partition_indices(num)
        return parts[num][pid]

    def test_data(self) -> tuple[Tensor, Tensor]:
        """The held-out test split, for central evaluation."""
        ds = self.dataset
        return ds.x_test, ds.y_test

    def root_data(self, spec: Spec) -> tuple[Tensor, Tensor]:
        """The server's root dataset (FLTrust) that the ``root-dataset`` spec names.

        ``held-out(size=S)``: the ``S`` training examples drawn with the run's seed, which
        no client's partition holds. ``file(path=PATH)``: ``x_train``, ``y_train`` of the
        Keras-style ``.npz`` at ``PATH`` (the format of a node's ``data-path``).

        Raises
        ------
        ValueError
            ``spec`` is not the root dataset this task was built with (its held-out
            examples would still be in the partitions), a held-out size outside
            ``[1, N)``, or a file whose samples or labels do not fit the task's dataset.
        FileNotFoundError
            The file does not exist.
        """
        if spec != self.root_dataset:
            raise ValueError(
                f"root_data({spec}) but this task was built with root-dataset="
                f"{self.root_dataset}: build the task from the run config that names it"
            )
        if spec.name == "held-out":
            root = _held_out(self.dataset_name, self.seed, int(spec.params["size"]))[0]
            ds = self.dataset
            return ds.x_train[root], ds.y_train[root]
        if spec.name != "file":
            raise ValueError(f"unknown root-dataset source {spec.name!r}; use held-out or file")
        path = Path(str(spec.params["path"])).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"root-dataset file(path={spec.params['path']}): no such file {str(path)!r}; "
                "give the server's .npz (x_train, y_train, x_test, y_test)"
            )
        own = load_dataset(f"npz:{path}", seed=self.seed)
        ds = self.dataset
        if own.input_shape != ds.input_shape:
            raise ValueError(
                f"root-dataset {path}: samples have shape {own.input_shape}, but the task's "
                f"dataset {self.dataset_name!r} has {ds.input_shape}"
            )
        top = int(own.y_train.max())
        if top >= ds.num_classes:
            raise ValueError(
                f"root-dataset {path}: label {top} is outside the {ds.num_classes} classes of "
                f"the task's dataset {self.dataset_name!r} (labels 0..{ds.num_classes - 1})"
            )
        return own.x_train, own.y_train

    def train_on(
        self, model: nn.Module, x: Tensor, y: Tensor, *, cfg: RunConfig, server_round: int,
        device: torch.device,
    ) -> dict[str, float]:
        """Train ``model`` in place on ``(x, y)`` as a client would (the server's root
        update): ``cfg``'s local-training settings, the batch order from a generator derived
        from ``cfg.seed`` and ``server_round``.

        Returns
        -------
        dict
            :func:`client.train.local_train`'s metrics (``train-loss``, ``steps``).
        """
        from client.app import train_settings  # the one reading of the training settings
        from client.train import local_train

        gen = make_generator(derive_seed(cfg.seed, "root-train", "round", server_round))
        return local_train(model, x, y, train_settings(cfg), device=device, generator=gen)


def build_task(run_config: Mapping[str, Scalar]) -> DatasetTask:
    """Task provider named by the default run config (``simulations.task:build_task``)."""
    root = str(run_config.get("root-dataset", "")).strip()
    return DatasetTask(
        config_value(run_config, "dataset", str),
        config_value(run_config, "model", str),
        model_params=parse_params(config_value(run_config, "model-params", str)),
        partitioner=config_value(run_config, "partitioner", str),
        partitioner_params=parse_params(config_value(run_config, "partitioner-params", str)),
        seed=config_value(run_config, "seed", int),
        root_dataset=parse_spec(root, what="root-dataset") if root else None,
    )
