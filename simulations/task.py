"""The default task provider: a registered dataset, partitioned, and a registered model.

``build_task(run_config)`` is what the apps load through the run config's ``task`` key.
Datasets and partitions are cached per process, since each ClientApp call asks again.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from aggregation.registry import derive_seed, make_generator
from runconfig.config import config_value
from runconfig.spec import parse_params

from .datasets import Dataset, load_dataset
from .models import build_model
from .partition import partition

__all__ = ["DatasetTask", "build_task"]

Scalar = bool | int | float | str


@functools.lru_cache(maxsize=8)
def _dataset(name: str, seed: int) -> Dataset:
    return load_dataset(name, seed=seed)


@functools.lru_cache(maxsize=32)
def _partitions(
    name: str, seed: int, scheme: str, params: tuple[tuple[str, Any], ...], num: int
) -> tuple[Tensor, ...]:
    ds = _dataset(name, seed)
    gen = make_generator(derive_seed(seed, "partition", scheme, num))
    return tuple(partition(scheme, ds.y_train, num, generator=gen, **dict(params)))


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
    ) -> None:
        self.dataset_name = dataset
        self.model_name = model
        self.model_params = dict(model_params)
        self.partitioner = partitioner
        self.partitioner_params = tuple(sorted(partitioner_params.items()))
        self.seed = seed

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
            self.dataset_name, self.seed, self.partitioner, self.partitioner_params, num_partitions
        )

    def train_data(self, node_config: Mapping[str, Scalar]) -> tuple[Tensor, Tensor]:
        """This node's training data: its own file (``data-path``) or its partition."""
        if "data-path" in node_config:
            own = load_dataset(f"npz:{node_config['data-path']}", seed=self.seed)
            return own.x_train, own.y_train
        if "partition-id" not in node_config or "num-partitions" not in node_config:
            raise ValueError(
                "node config needs partition-id and num-partitions (or data-path); start the "
                "SuperNode with --node-config \"partition-id=0 num-partitions=3\""
            )
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if not 0 <= pid < num:
            raise ValueError(f"partition-id must be in [0, {num}), got {pid}")
        idx = self.partition_indices(num)[pid]
        ds = self.dataset
        return ds.x_train[idx], ds.y_train[idx]

    def test_data(self) -> tuple[Tensor, Tensor]:
        """The held-out test split, for central evaluation."""
        ds = self.dataset
        return ds.x_test, ds.y_test


def build_task(run_config: Mapping[str, Scalar]) -> DatasetTask:
    """Task provider named by the default run config (``simulations.task:build_task``)."""
    return DatasetTask(
        config_value(run_config, "dataset", str),
        config_value(run_config, "model", str),
        model_params=parse_params(config_value(run_config, "model-params", str)),
        partitioner=config_value(run_config, "partitioner", str),
        partitioner_params=parse_params(config_value(run_config, "partitioner-params", str)),
        seed=config_value(run_config, "seed", int),
    )
