"""Task providers with custom models, as a user names them (``task=module:function``):
models the built-in ones do not cover, for the engines' equality tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from simulations.task import DatasetTask, build_task


class _CustomModelTask(DatasetTask):
    """The default task (data, partitions) with another model."""

    def __init__(self, base: DatasetTask, make: Callable[[], nn.Module]) -> None:
        self.__dict__.update(base.__dict__)
        self._make = make

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng():  # deterministic, and the global RNG left as it was
            torch.manual_seed(self.seed)
            return self._make()


class Frozen(nn.Module):
    """A frozen feature layer (``requires_grad=False``, as in fine-tuning) under a head."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)
        self.feat.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.feat(x.flatten(1))))


class Unused(nn.Module):
    """A parameter the forward pass never uses (an auxiliary head)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.aux = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


class Tied(nn.Module):
    """One weight under two names (``b.weight`` is ``a.weight``), as tied embeddings are."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x.flatten(1))))))


class FunctionalDropout(nn.Module):
    """Dropout called as a function in ``forward`` (no ``nn.Dropout`` module to see)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(x.flatten(1)))
        return self.head(nn.functional.dropout(h, 0.2, training=self.training))


def _provider(make: Callable[[], nn.Module]) -> Callable[[Mapping[str, Any]], DatasetTask]:
    def provide(run_config: Mapping[str, Any]) -> DatasetTask:
        return _CustomModelTask(build_task(run_config), make)
    return provide


frozen = _provider(Frozen)
unused = _provider(Unused)
tied = _provider(Tied)
functional_dropout = _provider(FunctionalDropout)
