"""Synchronisation strategies, one module each, behind ``SyncStrategy``."""

from __future__ import annotations

import torch

from spark_ddl.config import TrainConfig
from spark_ddl.objectives import make_scheduler
from spark_ddl.shard import steps_per_epoch
from spark_ddl.sync.allreduce import AllReduceStrategy
from spark_ddl.sync.async_parameter_server import AsyncParameterServerStrategy
from spark_ddl.sync.base import SyncStrategy
from spark_ddl.sync.local_sgd import LocalSGDStrategy
from spark_ddl.sync.parameter_server import ParameterServerStrategy

__all__ = ["SyncStrategy", "AllReduceStrategy", "ParameterServerStrategy", "LocalSGDStrategy",
           "AsyncParameterServerStrategy", "make_strategy"]


def make_strategy(config: TrainConfig, device: torch.device, shard_sizes: list[int],
                  host_keys: list[str] | None = None) -> SyncStrategy:
    """The strategy ``config.sync`` names (see config.SYNC_STRATEGIES); ``host_keys[r]``
    identifies rank r's machine (see ``host_reduce.host_key``)."""
    if config.sync == "allreduce":
        return AllReduceStrategy(device, config.compression, config.allreduce_impl, host_keys,
                                 config.timeout)
    if config.sync == "parameter_server":
        return ParameterServerStrategy(device)
    if config.sync == "local_sgd":
        return LocalSGDStrategy(device, config.sync_every)
    if config.sync == "async":
        # pushes per epoch: each agent's own steps, grouped by accumulate_steps
        pushes = [-(-steps_per_epoch([n], config.batch_size) // config.accumulate_steps)
                  for n in shard_sizes]
        def scheduler(optimizer: torch.optim.Optimizer):
            return make_scheduler(config.lr_scheduler, optimizer, config.lr_scheduler_kwargs)

        return AsyncParameterServerStrategy(
            device, config.resolved_max_staleness, pushes, config.epochs, config.timeout,
            keep_snapshots=config.has_validation, make_scheduler=scheduler if config.lr_scheduler else None,
        )
    raise ValueError(f"unknown sync strategy {config.sync!r}")
