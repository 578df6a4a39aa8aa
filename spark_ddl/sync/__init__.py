"""Synchronisation strategies, one module each, behind ``SyncStrategy``."""

from __future__ import annotations

import torch

from spark_ddl.sync.allreduce import AllReduceStrategy
from spark_ddl.sync.base import SyncStrategy
from spark_ddl.sync.local_sgd import LocalSGDStrategy
from spark_ddl.sync.parameter_server import ParameterServerStrategy

__all__ = ["SyncStrategy", "AllReduceStrategy", "ParameterServerStrategy", "LocalSGDStrategy",
           "make_strategy"]


def make_strategy(
    name: str, device: torch.device, sync_every: int = 1, compression: str = "none"
) -> SyncStrategy:
    """The strategy called ``name`` (see config.SYNC_STRATEGIES)."""
    if name == "allreduce":
        return AllReduceStrategy(device, compression)
    if name == "parameter_server":
        return ParameterServerStrategy(device)
    if name == "local_sgd":
        return LocalSGDStrategy(device, sync_every)
    raise ValueError(f"unknown sync strategy {name!r}")
