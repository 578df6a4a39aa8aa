"""Local SGD: every agent steps on its own gradients; parameters are averaged every
``sync_every`` steps and once more at the end.

Fewer, larger messages than all-reduce. With ``sync_every=1`` and plain SGD it is the same
update as all-reduce; with larger periods replicas drift between averages.

How the parameters are averaged: on CPU agents whose trainable parameters share one dtype, through
the flat exchange of ``host_reduce`` (the agents of one machine sum in shared memory, the machines'
leaders all-reduce those sums over gloo: one message per machine, not per agent); elsewhere (GPUs,
mixed dtypes) with torch's ``average_parameters`` (an all-reduce over every rank).

``compression='fp16'``/``'bf16'``: what crosses machines is each replica's change since the last
average (its delta), in the low precision; every replica then takes the last average plus the
mean delta. Deltas are small beside the weights, so their rounding stays small, while the weights
themselves in fp16 would lose three digits. On CPU only the machines' leaders' exchange is
compressed (inside a machine the agents sum in shared memory at full precision); elsewhere every
rank's all-reduce is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from spark_ddl.errors import ConfigError
from spark_ddl.sync.base import (LockstepStrategy, OptimizerFactory, StrategyEnv, StrategySettings,
                                 average_floating_buffers, copy_flat_into, flatten)
from spark_ddl.sync.host_reduce import FlatGradientReducer
from spark_ddl.sync.shared_memory import machine_keys, machines_of


class LocalSGDStrategy(LockstepStrategy):
    """Independent optimiser steps, periodic parameter averaging."""

    name = "local_sgd"
    description = "each agent steps alone, parameters averaged every sync_every steps"
    replicas_identical = False
    supports_compression = True
    COMPRESSIONS = ("none", "fp16", "bf16")

    @classmethod
    def check_settings(cls, settings: StrategySettings) -> None:
        if settings.compression not in cls.COMPRESSIONS:
            raise ConfigError(
                f"compression={settings.compression!r} does not apply to sync='local_sgd', which averages "
                "parameters: use 'fp16' or 'bf16' (the change since the last average crosses the network in "
                "half precision), or sync='allreduce' for PowerSGD's low-rank gradients.")

    @classmethod
    def create(cls, settings: StrategySettings, env: StrategyEnv) -> "LocalSGDStrategy":
        return cls(env.device, settings.sync_every, env.host_keys, settings.timeout, settings.compression)

    def __init__(self, device: torch.device, sync_every: int, host_keys: list[str] | None = None,
                 timeout: float = 300.0, compression: str = "none") -> None:
        super().__init__(device)
        self._sync_every = sync_every
        self._host_keys = host_keys
        self._timeout = timeout
        self._compression = compression
        self._anchor: torch.Tensor | None = None  # compressed: the parameters of the last average, flat
        self._steps = 0  # synchronised steps so far (averages after sync_every, 2*sync_every, ...)
        self._unaveraged_steps = 0
        self._params: list[nn.Parameter] = []
        self._averager: FlatGradientReducer | None = None  # the flat exchange (CPU, one dtype), else None

    def setup(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        super().setup(module, make_optimizer)
        self._params = [p for p in module.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in self._params}
        if self._compression != "none":
            if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
                raise ValueError(f"sync='local_sgd' with compression={self._compression!r} needs every trainable "
                                 f"parameter in one floating dtype (found {sorted(map(str, dtypes))}); use "
                                 "compression='none' or cast the model")
            self._anchor = flatten(self._params)
        if self._device.type == "cpu" and len(dtypes) == 1:
            self._averager = FlatGradientReducer(self._params, machine_keys(self._host_keys), self._timeout,
                                                 bind_gradients=False, compression=self._compression)

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
        if self._anchor is not None:
            self._average_deltas(self._anchor)
        elif self._averager is None:
            average_parameters(iter(self._params), dist.group.WORLD)
        else:
            with torch.no_grad():
                flatten(self._params, out=self._averager.flat)
                self._averager.average()
                copy_flat_into(self._averager.flat, self._params)

    def _average_deltas(self, anchor: torch.Tensor) -> None:
        """Compressed: the last average plus the mean of every replica's change since, exchanged in
        the low precision; it becomes the new anchor on every rank alike."""
        with torch.no_grad():
            if self._averager is not None:
                delta = flatten(self._params, out=self._averager.flat)
                delta -= anchor
                self._averager.average()  # the mean delta, compressed between machines
            else:  # every rank's share of the mean, all-reduced in the low precision
                world = dist.get_world_size()
                delta = (flatten(self._params) - anchor) / world
                low = delta.to(torch.float16 if self._compression == "fp16" else torch.bfloat16)
                dist.all_reduce(low)
                delta.copy_(low)
            anchor += delta
            copy_flat_into(anchor, self._params)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"averager_step": self._steps, "unaveraged_steps": self._unaveraged_steps}
        if self._anchor is not None:  # compressed: the next deltas are measured from it
            state["anchor"] = self._anchor.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After the module's own state: the anchor is the checkpoint's, else the loaded parameters."""
        self._steps = int(state["averager_step"])
        self._unaveraged_steps = int(state["unaveraged_steps"])
        if self._anchor is not None:
            with torch.no_grad():
                if state.get("anchor") is not None:
                    self._anchor.copy_(state["anchor"])
                else:
                    flatten(self._params, out=self._anchor)

    def finish(self) -> None:
        if self._unaveraged_steps:  # the replicas drifted since the last average
            self._average()
        self._unaveraged_steps = 0
        average_floating_buffers(self.module)

    def summary(self) -> dict[str, Any]:
        """How the parameters were averaged; with the flat exchange, which ranks shared a machine and
        the bytes this rank's machine sent to the others per average and per step."""
        if self._averager is None:
            return {"average_impl": "all_reduce", "machines": machines_of(self._host_keys),
                    "compression": self._compression}
        per_average = self._averager.bytes_across_machines
        return {"average_impl": "flat", "compression": self._averager.compression, **self._averager.placement(),
                "bytes_across_machines_per_average": per_average,
                "bytes_across_machines_per_step": per_average / self._sync_every}

    def close(self) -> None:
        if self._averager is not None:
            self._averager.close()
            self._averager = None
        super().close()
