"""Local SGD: every agent steps on its own gradients; parameters are averaged every
``sync_every`` steps and once more at the end.

Fewer, larger messages than all-reduce. With ``sync_every=1`` and plain SGD it is the same
update as all-reduce; with larger periods replicas drift between averages.

How the parameters are averaged: on CPU agents whose trainable parameters share one dtype, through
the flat exchange of ``host_reduce`` (the agents of one machine sum in shared memory, the machines'
leaders all-reduce those sums over gloo: one message per machine, not per agent); elsewhere (GPUs,
mixed dtypes) with torch's ``average_parameters`` (an all-reduce over every rank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from spark_ddl.sync.base import (LockstepStrategy, OptimizerFactory, StrategyEnv, StrategySettings,
                                 average_floating_buffers, copy_flat_into)
from spark_ddl.sync.host_reduce import FlatGradientReducer
from spark_ddl.sync.shared_memory import machine_keys, machines_of


class LocalSGDStrategy(LockstepStrategy):
    """Independent optimiser steps, periodic parameter averaging."""

    name = "local_sgd"
    description = "each agent steps alone, parameters averaged every sync_every steps"
    replicas_identical = False

    @classmethod
    def create(cls, settings: StrategySettings, env: StrategyEnv) -> "LocalSGDStrategy":
        return cls(env.device, settings.sync_every, env.host_keys, settings.timeout)

    def __init__(self, device: torch.device, sync_every: int, host_keys: list[str] | None = None,
                 timeout: float = 300.0) -> None:
        super().__init__(device)
        self._sync_every = sync_every
        self._host_keys = host_keys
        self._timeout = timeout
        self._steps = 0  # synchronised steps so far (averages after sync_every, 2*sync_every, ...)
        self._unaveraged_steps = 0
        self._params: list[nn.Parameter] = []
        self._averager: FlatGradientReducer | None = None  # the flat exchange (CPU, one dtype), else None

    def setup(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        super().setup(module, make_optimizer)
        self._params = [p for p in module.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in self._params}
        if self._device.type == "cpu" and len(dtypes) == 1:
            self._averager = FlatGradientReducer(self._params, machine_keys(self._host_keys), self._timeout,
                                                 bind_gradients=False)

    def step(self, loss: torch.Tensor, sync: bool = True) -> None:
        loss.backward()
        if not sync:
            return
        if self.nonfinite is not None:
            self.nonfinite.note_local_gradients([p.grad for p in self.module.parameters()])
        if self._update_allowed([p.grad for p in self.module.parameters()], collective=False):  # its own gradient
            self.optimizer.step()
        self._steps += 1
        self._unaveraged_steps = self._steps % self._sync_every
        if self._unaveraged_steps == 0:
            with self.timed_exchange():
                self._average()
        self.optimizer.zero_grad(set_to_none=True)

    def _average(self) -> None:
        """Every replica takes the mean of the trainable parameters over all ranks (collective)."""
        if self._averager is None:
            average_parameters(iter(self._params), dist.group.WORLD)
            return
        with torch.no_grad():
            torch.cat([p.detach().reshape(-1) for p in self._params], out=self._averager.flat)
            self._averager.average()
            copy_flat_into(self._averager.flat, self._params)

    def state_dict(self) -> dict[str, Any]:
        return {"averager_step": self._steps, "unaveraged_steps": self._unaveraged_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = int(state["averager_step"])
        self._unaveraged_steps = int(state["unaveraged_steps"])

    def finish(self) -> None:
        if self._unaveraged_steps:  # the replicas drifted since the last average
            self._average()
        self._unaveraged_steps = 0
        average_floating_buffers(self.module)

    def summary(self) -> dict[str, Any]:
        """How the parameters were averaged; with the flat exchange, which ranks shared a machine and
        the bytes this rank's machine sent to the others per average and per step."""
        if self._averager is None:
            return {"average_impl": "all_reduce", "machines": machines_of(self._host_keys)}
        per_average = self._averager.bytes_across_machines
        return {"average_impl": "flat", **self._averager.placement(), "bytes_across_machines_per_average": per_average,
                "bytes_across_machines_per_step": per_average / self._sync_every}

    def close(self) -> None:
        if self._averager is not None:
            self._averager.close()
            self._averager = None
        super().close()
