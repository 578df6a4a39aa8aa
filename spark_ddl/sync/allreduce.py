"""Synchronous data parallelism: every agent applies the same averaged gradient.

Two implementations (``allreduce_impl``):

- ``ddp``: torch DDP, which all-reduces gradient buckets while backward is still running,
  optionally compressed by torch's DDP communication hooks (fp16, bf16, PowerSGD). The GPU path.
- ``flat``: one flat gradient buffer averaged after backward (``host_reduce``): shared memory
  between agents on one machine, gloo between machines. The CPU path (``auto``), where DDP's
  overlap only makes the all-reduce compete with backward for the same cores. Compression
  (fp16, bf16, PowerSGD: ``machine_exchange``) applies only to what crosses machines; with every
  agent on one machine it changes nothing.

Both start from rank 0's parameters and buffers, and after every update rank 0's buffers (e.g.
batch-norm statistics) go to every agent: the next forward sees what DDP's
``broadcast_buffers`` would give it, and the replicas stay identical between updates.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spark_ddl.errors import ConfigError
from spark_ddl.sync.base import (LockstepStrategy, OptimizerFactory, StrategyEnv, StrategySettings, broadcast_state,
                                 make_replicas_identical)
from spark_ddl.sync.host_reduce import FlatGradientReducer
from spark_ddl.sync.shared_memory import machine_keys, machines_of
from spark_ddl.sync.machine_exchange import FLAT_COMPRESSIONS, powersgd_state
from spark_ddl.sync.sparse_rows import average_sparse_gradient, make_tables_sparse, sparse_parameters, sparse_policy


Hook = Callable[[Any, Any], torch.futures.Future]  # a DDP communication hook: (state, bucket) -> future


def one_bucket_at_a_time(hook: Hook) -> Hook:
    """``hook`` run to completion before DDP hands it the next bucket.

    torch's PowerSGD hook chains ``.then()`` callbacks that each start an all-reduce and block on
    it (``.get_future().wait()``). With gloo those callbacks run on the process group's own worker
    threads (two per group): with two buckets or more, two chains each hold a worker thread while
    waiting for an all-reduce queued behind them on the same group, and no thread is left to run
    it — every rank stalls at the first compressed step (or, when the threads race, the ranks
    start their buckets' all-reduces in different orders and gloo aborts on a size mismatch). One
    chain at a time leaves a worker free and keeps the order of the collectives.
    (Overlap with backward is lost, which on CPU agents only competed for the same cores.)
    """
    @functools.wraps(hook)
    def run_to_completion(state: Any, bucket: Any) -> torch.futures.Future:
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(hook(state, bucket).wait())
        return done

    return run_to_completion


def register_compression(ddp: DistributedDataParallel, compression: str) -> None:
    """Install torch's DDP communication hook for ``compression`` (none, fp16, bf16, powersgd)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif compression == "bf16":
        if dist.get_backend() != "nccl":
            raise ValueError(
                "compression='bf16' with allreduce_impl='ddp' needs GPUs with NCCL (torch's bf16 hook); on CPU "
                "agents use allreduce_impl='flat' or 'auto' (bf16 between machines), or compression='fp16'."
            )
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif compression == "powersgd":
        hook = powerSGD_hook.powerSGD_hook
        if dist.get_backend() == "gloo":
            hook = one_bucket_at_a_time(hook)
        ddp.register_comm_hook(powersgd_state(None), hook)
    elif compression != "none":
        raise ValueError(f"unknown compression {compression!r}")


def use_flat_reducer(impl: str, compression: str, device: torch.device, module: nn.Module) -> bool:
    """Whether ``allreduce_impl=impl`` means the flat reducer for this module on this device (with any
    compression: the flat reducer compresses what crosses machines)."""
    dtypes = {p.dtype for p in module.parameters() if p.requires_grad}
    applies = device.type == "cpu" and compression in FLAT_COMPRESSIONS and len(dtypes) == 1
    if impl == "flat" and not applies:
        raise ValueError("allreduce_impl='flat' needs CPU agents and trainable parameters of one dtype "
                         f"(got {sorted(map(str, dtypes))}); use 'ddp' or 'auto'.")
    return impl == "flat" or (impl == "auto" and applies)


def _no_buffer_sync_before_forward() -> dict[str, bool]:
    """DDP's argument for "rank 0's buffers at the start, none before each forward": newer torch
    names it ``forward_sync_buffers`` (and warns about the old ``broadcast_buffers``)."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class AllReduceStrategy(LockstepStrategy):
    """Gradient all-reduce (the default strategy)."""

    name = "allreduce"
    description = "(default): averaged gradients, every agent applies the same update"
    supports_compression = True

    @classmethod
    def check_settings(cls, settings: StrategySettings) -> None:
        if settings.sparse_embeddings == "always" and sparse_policy(settings) == "never":
            raise ConfigError(
                "sparse_embeddings='always' needs an update that takes sparse gradients: optimizer='sgd' without "
                "weight_decay and no grad_clip_norm. Use sparse_embeddings='auto' or 'never' with these settings."
            )
        if settings.allreduce_impl == "flat" and settings.use_gpu:
            raise ConfigError("allreduce_impl='flat' averages the gradients of CPU agents; with use_gpu=True use "
                              "allreduce_impl='ddp' or 'auto'.")

    @classmethod
    def create(cls, settings: StrategySettings, env: StrategyEnv) -> "AllReduceStrategy":
        strategy = cls(env.device, settings.compression, settings.allreduce_impl, env.host_keys, settings.timeout)
        strategy._sparse_policy = sparse_policy(settings)
        return strategy

    def __init__(self, device: torch.device, compression: str = "none", impl: str = "auto",
                 host_keys: list[str] | None = None, timeout: float = 300.0) -> None:
        super().__init__(device)
        self._timeout = timeout
        self._compression = compression
        self._impl = impl
        self._host_keys = host_keys
        self._ddp: DistributedDataParallel | None = None
        self._reducer: FlatGradientReducer | None = None
        self._sparse: list[nn.Parameter] = []  # embedding tables whose touched rows travel alone
        self._sparse_policy = "never"  # which dense tables to switch to sparse gradients (see sparse_policy)
        self._has_buffers = False

    def setup(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self._module = module
        self._has_buffers = any(True for _ in module.buffers())
        self.exchange_seconds = None  # DDP: the exchange runs inside backward (the flat reducer: timed)
        self.initial_broadcast = make_replicas_identical(module, self._device)  # so DDP need not (init_sync)
        if use_flat_reducer(self._impl, self._compression, self._device, module):
            self.exchange_seconds = 0.0
            keys = machine_keys(self._host_keys)
            make_tables_sparse(module, self._sparse_policy)
            self._sparse = sparse_parameters(module)
            dense = [p for p in module.parameters() if not any(p is s for s in self._sparse)]
            self._reducer = FlatGradientReducer(dense, keys, self._timeout, compression=self._compression)
            self._optimizer = make_optimizer(module.parameters())
            return
        device_ids = [self._device.index] if self._device.type == "cuda" else None
        # gradients live in the all-reduce buckets: one copy less per step, and less memory
        # buffers: rank 0's are broadcast after every update (step), not by DDP before every forward
        self._ddp = DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True,
                                            init_sync=False, **_no_buffer_sync_before_forward())
        register_compression(self._ddp, self._compression)
        self._optimizer = make_optimizer(self._ddp.parameters())

    @property
    def module(self) -> nn.Module:
        if self._reducer is not None:
            return self.trained_module
        assert self._ddp is not None, "setup() first"
        return self._ddp

    def micro_step(self, sync: bool) -> ContextManager[None]:
        if self._reducer is not None:
            return nullcontext()
        assert self._ddp is not None, "setup() first"
        return nullcontext() if sync else self._ddp.no_sync()  # no all-reduce while accumulating

    def step(self, loss: torch.Tensor, sync: bool = True) -> None:
        assert self._optimizer is not None, "setup() first"
        loss.backward()  # with DDP and sync, its hooks average the gradients across agents here
        if not sync:
            return
        if self._reducer is not None:
            with self.timed_exchange():
                finite = self._reducer.average(check_finite=self.nonfinite is not None)
                for table in self._sparse:
                    average_sparse_gradient(table)
            if self.nonfinite is not None:
                self.nonfinite.note_local_finite(self._reducer.own_gradients_finite)
            if self._update_allowed([table.grad for table in self._sparse], known_finite=finite is not False):
                self._optimizer.step()
            self._reducer.zero()
            for table in self._sparse:
                table.grad = None
        else:
            if self._update_allowed([p.grad for p in self._module.parameters()]):
                self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        if self._has_buffers:  # rank 0's (e.g. batch-norm statistics), as DDP sends before the next forward
            broadcast_state(self._module, buffers_only=True)

    def summary(self) -> dict[str, Any]:
        """Which implementation ran, which ranks shared a machine, the compression applied and (flat)
        the bytes this rank's machine sent to the others per step (``FlatGradientReducer``'s
        ``bytes_across_machines``: the last step's, the steady state)."""
        if self._reducer is None:
            return {"allreduce_impl": "ddp", "compression": self._compression,
                    "machines": machines_of(self._host_keys)}
        reducer = self._reducer
        return {"allreduce_impl": "flat", **reducer.placement(), "compression": reducer.compression,
                "bytes_across_machines_per_step": reducer.bytes_across_machines,
                "sparse_tables": len(self._sparse)}

    def close(self) -> None:
        self._ddp = None  # the DDP reducer holds a reference to the process group
        if self._reducer is not None:
            self._reducer.close()
            self._reducer = None
        super().close()
