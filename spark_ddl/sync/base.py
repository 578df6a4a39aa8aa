"""The interface every synchronisation strategy implements; the agent loop sees only this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def broadcast_state(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy rank ``src``'s parameters (unless ``buffers_only``) and buffers into every replica
    (one broadcast per dtype)."""
    tensors = [] if buffers_only else [t.data for t in module.parameters()]
    tensors += list(module.buffers())
    for dtype in dict.fromkeys(t.dtype for t in tensors):  # the same order on every rank (a set is not)
        group = [t for t in tensors if t.dtype == dtype]
        flat = _flatten_dense_tensors(group)
        dist.broadcast(flat, src=src)
        for tensor, value in zip(group, _unflatten_dense_tensors(flat, group)):
            tensor.copy_(value)


def average_floating_buffers(module: nn.Module) -> None:
    """Average floating buffers (e.g. batch-norm statistics: every agent saw other rows) across ranks."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()


class SyncStrategy(ABC):
    """Keeps the replicas of all agents in step.

    Lifecycle on every agent: ``setup`` once (after the process group exists), then per
    micro-step ``with micro_step(sync): forward through self.module; step(loss, sync)``, then
    ``finish`` and ``close`` once. ``sync=False`` only accumulates gradients (no
    communication, no update); the next ``sync=True`` step applies them. Every agent calls the
    same methods with the same arguments the same number of times.
    """

    name: str = ""
    lockstep: bool = True  # every agent runs the same steps together (False: async)
    replicas_identical: bool = True  # after every update (False: local SGD between averages)

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def setup(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Make the replicas identical (rank 0's parameters win) and build the optimiser."""
        broadcast_state(module)
        self._module = module
        self._optimizer = make_optimizer(module.parameters())

    @property
    def module(self) -> nn.Module:
        """The module to call for the forward pass (may be a wrapper, e.g. DDP)."""
        return self.trained_module

    @property
    def trained_module(self) -> nn.Module:
        """The plain trained module (no wrapper) whose state_dict is the result."""
        assert self._module is not None, "setup() first"
        return self._module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimiser that applies the updates (for learning-rate schedulers)."""
        assert self._optimizer is not None, "setup() first"
        return self._optimizer

    def micro_step(self, sync: bool) -> ContextManager[None]:
        """Context for the forward and backward of one micro-step (DDP: no_sync when not sync)."""
        return nullcontext()

    @abstractmethod
    def step(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backward pass; with ``sync`` also synchronisation, optimiser update, zeroed gradients."""

    def finish(self) -> None:
        """Called once after the last step (e.g. a final parameter average)."""

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own counters, for checkpoints (plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def summary(self) -> dict[str, Any]:
        """Strategy-specific facts for the training summary (rank 0)."""
        return {}

    def close(self) -> None:
        """Drop every reference to communication objects (wrappers, optimiser state hooks).

        Called after the final collective and before the process group is destroyed.
        """
        self._optimizer = None
