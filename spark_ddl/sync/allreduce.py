"""Synchronous data parallelism: gradients averaged by bucketed all-reduce (torch DDP),
optionally compressed by torch's DDP communication hooks (fp16, bf16, PowerSGD).

DDP broadcasts rank 0's parameters and buffers at construction, then all-reduces gradient
buckets while backward is still running, so every agent applies the same averaged gradient.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spark_ddl.sync.base import OptimizerFactory, SyncStrategy


def register_compression(ddp: DistributedDataParallel, compression: str) -> None:
    """Install torch's DDP communication hook for ``compression`` (none, fp16, bf16, powersgd)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif compression == "bf16":
        if dist.get_backend() != "nccl":
            raise ValueError(
                "compression='bf16' needs GPUs with NCCL (torch's bf16 hook); on CPU agents "
                "(gloo) use compression='fp16' or 'powersgd'."
            )
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif compression != "none":
        raise ValueError(f"unknown compression {compression!r}")


class AllReduceStrategy(SyncStrategy):
    """Gradient all-reduce, overlapped with backward (the default strategy)."""

    name = "allreduce"

    def __init__(self, device: torch.device, compression: str = "none") -> None:
        super().__init__(device)
        self._compression = compression
        self._ddp: DistributedDataParallel | None = None

    def setup(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        device_ids = [self._device.index] if self._device.type == "cuda" else None
        self._module = module
        # gradients live in the all-reduce buckets: one copy less per step, and less memory
        self._ddp = DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)
        register_compression(self._ddp, self._compression)
        self._optimizer = make_optimizer(self._ddp.parameters())

    @property
    def module(self) -> nn.Module:
        assert self._ddp is not None, "setup() first"
        return self._ddp

    def micro_step(self, sync: bool) -> ContextManager[None]:
        assert self._ddp is not None, "setup() first"
        return nullcontext() if sync else self._ddp.no_sync()  # no all-reduce while accumulating

    def step(self, loss: torch.Tensor, sync: bool = True) -> None:
        assert self._optimizer is not None, "setup() first"
        loss.backward()  # with sync, DDP's hooks average the gradients across agents here
        if sync:
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self._ddp = None  # the DDP reducer holds a reference to the process group
        super().close()
