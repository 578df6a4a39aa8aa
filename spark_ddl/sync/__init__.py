"""Synchronisation strategies, one module each, behind ``SyncStrategy``."""

from __future__ import annotations

import torch

from spark_ddl.sync.allreduce import AllReduceStrategy
from spark_ddl.sync.base import SyncStrategy

__all__ = ["SyncStrategy", "AllReduceStrategy", "make_strategy"]


def make_strategy(name: str, device: torch.device) -> SyncStrategy:
    """The strategy called ``name`` (see config.SYNC_STRATEGIES)."""
    if name == "allreduce":
        return AllReduceStrategy(device)
    raise ValueError(f"unknown sync strategy {name!r}")
