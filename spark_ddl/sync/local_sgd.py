"""Local SGD: every agent steps on its own gradients; parameters are averaged every
``sync_every`` steps and once more at the end (torch's PeriodicModelAverager).

Fewer, larger messages than all-reduce. With ``sync_every=1`` and plain SGD it is the same
update as all-reduce; with larger periods replicas drift between averages.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from spark_ddl.sync.base import LockstepStrategy, StrategyEnv, StrategySettings, average_floating_buffers


class LocalSGDStrategy(LockstepStrategy):
    """Independent optimiser steps, periodic parameter averaging."""

    name = "local_sgd"
    description = "each agent steps alone, parameters averaged every sync_every steps"
    replicas_identical = False

    @classmethod
    def create(cls, settings: StrategySettings, env: StrategyEnv) -> "LocalSGDStrategy":
        return cls(env.device, settings.sync_every)

    def __init__(self, device: torch.device, sync_every: int) -> None:
        super().__init__(device)
        self._sync_every = sync_every
        # average after steps sync_every, 2*sync_every, ... (not after the very first step)
        with warnings.catch_warnings():  # torch advises DDP for period 1; we offer it on purpose
            warnings.simplefilter("ignore", UserWarning)
            self._averager = PeriodicModelAverager(period=sync_every, warmup_steps=sync_every - 1)
        self._unaveraged_steps = 0

    def step(self, loss: torch.Tensor, sync: bool = True) -> None:
        loss.backward()
        if not sync:
            return
        if self.nonfinite is not None:
            self.nonfinite.note_local_gradients([p.grad for p in self.module.parameters()])
        if self._update_allowed([p.grad for p in self.module.parameters()], collective=False):  # its own gradient
            self.optimizer.step()
        # torch averages only parameters that have a gradient: zero them after averaging
        with self.timed_exchange():  # every sync_every-th call averages; the others only count
            self._averager.average_parameters(self.module.parameters())
        self._unaveraged_steps = (self._unaveraged_steps + 1) % self._sync_every
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"averager_step": int(self._averager.step), "unaveraged_steps": self._unaveraged_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._averager.step = int(state["averager_step"])
        self._unaveraged_steps = int(state["unaveraged_steps"])

    def finish(self) -> None:
        if self._unaveraged_steps:  # the replicas drifted since the last average
            params = [p for p in self.module.parameters() if p.requires_grad]
            average_parameters(iter(params), self._averager.process_group)
        self._unaveraged_steps = 0
        average_floating_buffers(self.module)
