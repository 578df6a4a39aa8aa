"""The design's steps 4–6 literally: gradients reduced to rank 0, averaged there, rank 0 applies
the optimiser, and the new parameters (and buffers) are broadcast to every agent.

Same maths as all-reduce, more traffic through one node: rank 0 receives and sends the whole
model every step. Offered for fidelity to the algorithm and as a baseline.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from spark_ddl.sync.base import OptimizerFactory, SyncStrategy


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every replica (one flat broadcast)."""
    tensors = [t.data for t in module.parameters()] + [b for b in module.buffers()]
    if not tensors:
        return
    for dtype in {t.dtype for t in tensors}:
        group = [t for t in tensors if t.dtype == dtype]
        flat = _flatten_dense_tensors(group)
        dist.broadcast(flat, src=src)
        for tensor, value in zip(group, _unflatten_dense_tensors(flat, group)):
            tensor.copy_(value)


class ParameterServerStrategy(SyncStrategy):
    """Rank 0 holds the optimiser; everyone else only computes gradients."""

    name = "parameter_server"

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def setup(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        broadcast_state(module)
        self._module = module
        self._optimizer = make_optimizer(module.parameters())  # only rank 0's ever steps

    @property
    def module(self) -> nn.Module:
        assert self._module is not None, "setup() first"
        return self._module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        assert self._optimizer is not None, "setup() first"
        return self._optimizer

    @property
    def trained_module(self) -> nn.Module:
        return self.module

    def step(self, loss: torch.Tensor, sync: bool = True) -> None:
        module, optimizer = self.module, self.optimizer
        loss.backward()
        if not sync:
            return  # accumulate locally; the next sync step sends the sum
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.reduce(flat, dst=0, op=dist.ReduceOp.SUM)  # step 4: gradients to the master
        if dist.get_rank() == 0:
            flat /= dist.get_world_size()
            for param, grad in zip(params, _unflatten_dense_tensors(flat, grads)):
                param.grad = grad
            optimizer.step()  # step 5: the master updates
        broadcast_state(module)  # step 6: everyone gets the master's parameters
        optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self._optimizer = None
