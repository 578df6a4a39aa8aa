"""Synchronous data parallelism: gradients averaged by bucketed all-reduce (torch DDP).

DDP broadcasts rank 0's parameters and buffers at construction, then all-reduces gradient
buckets while backward is still running, so every agent applies the same averaged gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spark_ddl.sync.base import OptimizerFactory, SyncStrategy


class AllReduceStrategy(SyncStrategy):
    """Gradient all-reduce, overlapped with backward (the default strategy)."""

    name = "allreduce"

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._module: nn.Module | None = None
        self._ddp: DistributedDataParallel | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def setup(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        device_ids = [self._device.index] if self._device.type == "cuda" else None
        self._module = module
        self._ddp = DistributedDataParallel(module, device_ids=device_ids)
        self._optimizer = make_optimizer(self._ddp.parameters())

    @property
    def module(self) -> nn.Module:
        assert self._ddp is not None, "setup() first"
        return self._ddp

    def step(self, loss: torch.Tensor) -> None:
        assert self._optimizer is not None, "setup() first"
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP's hooks average the gradients across agents here
        self._optimizer.step()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        assert self._optimizer is not None, "setup() first"
        return self._optimizer

    @property
    def trained_module(self) -> nn.Module:
        assert self._module is not None, "setup() first"
        return self._module

    def close(self) -> None:
        self._ddp = None  # the DDP reducer holds a reference to the process group
        self._optimizer = None
