"""Asynchronous parameter server with bounded staleness.

Placement: the server is a thread inside rank 0's agent, beside rank 0's own training. A
dedicated server rank would need one more barrier task (a Spark slot that holds no data);
a thread keeps ``num_workers`` = the number of data shards. Rank 0's training thread talks
to the server in memory; the other agents use torch.distributed point-to-point over two
gloo groups of their own (also when training runs on NCCL): *requests* (agent → server,
received from any source by the server thread only) and *replies* (server → agent, sent
under the server's lock), so no gloo group is ever used by two threads at once.

Protocol (fixed-size float tensors in the parameters' dtype):

* agent → server ``[kind, loss_sum, rows, gradient...]``: ``HELLO`` asks for the first
  parameters, ``PUSH`` delivers a gradient and asks for fresh parameters, ``DONE`` (an
  agent without training rows) leaves at once;
* server → agent ``[go, parameters...]``: ``go=1`` with the master parameters to compute the
  next gradient on, ``go=0`` to stop.

The grant rule and the epochs' budget live in ``async_server``.

Every wait has a timeout (the training ``timeout``); a peer that dies breaks the groups'
connections and fails the waits at once.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spark_ddl.common.optimizers import make_scheduler
from spark_ddl.errors import ConfigError
from spark_ddl.sync.async_server import DONE, HEADER, HELLO, PUSH, AsyncServer
from spark_ddl.sync.base import (AsyncStrategy, OptimizerFactory, StrategyEnv, StrategySettings,
                                 average_floating_buffers, copy_flat_into, flatten,
                                 make_replicas_identical)
from spark_ddl.sync.sparse_rows import dense_gradient


class AsyncTimeout(TimeoutError):
    """An agent or the server waited longer than the training timeout."""


def default_max_staleness(num_workers: int) -> int:
    """max_staleness when it is not set: 2 x (num_workers - 1), at least 4."""
    return max(4, 2 * (num_workers - 1))


class AsyncParameterServerStrategy(AsyncStrategy):
    """Agents push gradients and pull parameters without waiting for each other."""

    name = "async"
    description = "asynchronous parameter server: agents push gradients and pull parameters at their own pace"

    @classmethod
    def check_settings(cls, settings: StrategySettings) -> None:
        super().check_settings(settings)
        if settings.max_staleness is not None and settings.max_staleness < settings.num_workers - 1:
            raise ConfigError(
                f"max_staleness={settings.max_staleness} is too small for {settings.num_workers} agents: "
                f"when all compute at once, each gradient misses the other "
                f"{settings.num_workers - 1} agents' updates. Set max_staleness >= {settings.num_workers - 1}."
            )
        if settings.on_nonfinite == "skip":
            raise ConfigError("on_nonfinite='skip' needs the agents to agree on every update, which sync='async' "
                              "does not have; use on_nonfinite='raise' with async.")
        if settings.check_every:
            raise ConfigError(
                "check_every compares replicas of the synchronous strategies; with sync='async' "
                "the replicas differ by design (they agree again at the end). Set check_every=0."
            )
        if settings.early_stopping_patience:
            raise ConfigError(
                "early_stopping_patience needs every agent to stop at the same epoch, which "
                "sync='async' does not have; use a synchronous strategy or set it to 0."
            )
        if settings.lr_scheduler == "ReduceLROnPlateau":
            raise ConfigError(
                "lr_scheduler='ReduceLROnPlateau' needs a metric at each epoch end, which the "
                "async server does not wait for; use an epoch-based scheduler (e.g. StepLR)."
            )
        if settings.checkpoint_dir is not None:
            raise ConfigError(
                "checkpoints continue a run exactly, which needs a lock-step strategy; "
                "sync='async' is not reproducible. Use allreduce, parameter_server or local_sgd."
            )

    @classmethod
    def create(cls, settings: StrategySettings, env: StrategyEnv) -> "AsyncParameterServerStrategy":
        # pushes per epoch: each agent's own steps, grouped by accumulate_steps
        steps = [-(-rows // settings.batch_size) for rows in env.shard_sizes]
        pushes = [-(-count // settings.accumulate_steps) for count in steps]

        def scheduler(optimizer: torch.optim.Optimizer) -> Any:
            return make_scheduler(settings.lr_scheduler, optimizer, settings.lr_scheduler_kwargs)

        max_staleness = settings.max_staleness
        if max_staleness is None:
            max_staleness = default_max_staleness(settings.num_workers)
        return cls(env.device, max_staleness, pushes, settings.epochs, settings.timeout,
                   keep_snapshots=settings.has_validation,
                   make_scheduler=scheduler if settings.lr_scheduler else None)

    def __init__(self, device: torch.device, max_staleness: int, pushes_per_rank: list[int],
                 epochs: int, timeout: float, keep_snapshots: bool = False,
                 make_scheduler: Any = None) -> None:
        super().__init__(device)
        self._max_staleness = max_staleness
        self._pushes_per_rank = pushes_per_rank  # per epoch
        self._epochs = epochs
        self._timeout = timeout
        self._keep_snapshots = keep_snapshots
        self._make_scheduler = make_scheduler
        self._rank = -1
        self._requests = self._replies = None
        self._server: AsyncServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()
        self._error: BaseException | None = None
        self._local_go: bool | None = None  # rank 0's answer from its own server
        self._params: list[nn.Parameter] = []
        self._message: torch.Tensor | None = None
        self._reply: torch.Tensor | None = None
        self._server_reply: torch.Tensor | None = None
        self.running = False

    # -- lifecycle -------------------------------------------------------------------------

    def setup(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.initial_broadcast = make_replicas_identical(module, self._device)  # parameters come from the server anyway
        self._module = module
        self._optimizer = make_optimizer(module.parameters())  # the agent's own never steps
        self._params = [p for p in module.parameters() if p.requires_grad]
        if len({p.dtype for p in self._params}) > 1:
            raise ValueError("sync='async' needs all trainable parameters in one dtype")
        self._rank = dist.get_rank()
        wait = timedelta(seconds=self._timeout)
        self._requests = dist.new_group(backend="gloo", timeout=wait)
        self._replies = dist.new_group(backend="gloo", timeout=wait)
        numel = sum(p.numel() for p in self._params)
        dtype = self._params[0].dtype if self._params else torch.float32
        self._message = torch.zeros(HEADER + numel, dtype=dtype)
        self._reply = torch.zeros(1 + numel, dtype=dtype)
        if self._rank == 0:
            self._server_reply = torch.zeros_like(self._reply)
            self._server = AsyncServer(module, make_optimizer, dist.get_world_size(),
                                   sum(self._pushes_per_rank), self._epochs, self._max_staleness,
                                   self._keep_snapshots, self._make_scheduler)
            remote = [r for r in range(1, dist.get_world_size())]
            self._thread = threading.Thread(target=self._serve, args=(remote,), daemon=True,
                                            name="spark-ddl-async-server")
            self._thread.start()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The server's optimiser on rank 0 (its learning rate is the one that counts)."""
        if self._server is not None:
            return self._server.optimizer
        return super().optimizer

    def start(self) -> bool:
        """Ask for the first parameters (or leave at once without rows); True if a step may run."""
        has_rows = self._pushes_per_rank[self._rank] > 0
        self.running = self._exchange(HELLO if has_rows else DONE, 0.0, 0, None)
        return self.running

    def step(self, loss: torch.Tensor, sync: bool = True, loss_sum: float = 0.0, rows: int = 0) -> None:
        """Backward; with ``sync`` push the gradient and pull the parameters of the next step.

        ``loss_sum`` and ``rows`` (summed over the accumulated micro-steps) feed the
        server's per-epoch training loss.
        """
        loss.backward()
        if not sync:
            return
        grads = [dense_gradient(p) for p in self._params]
        gradient = flatten(grads).to("cpu")
        if self.nonfinite is not None:
            self.nonfinite.note_local_gradients([gradient])
        self._update_allowed([gradient], collective=False)  # raises (skip is refused for async)
        for param in self._params:
            param.grad = None
        self.running = self._exchange(PUSH, loss_sum, rows, gradient)

    def finish(self) -> None:
        """Wait for the server to finish; then every replica takes the final master parameters."""
        if self._thread is not None:
            self._thread.join(self._timeout)
            if self._thread.is_alive():
                raise AsyncTimeout(f"the async server did not finish within {self._timeout:.0f} s")
            self._raise_server_error()
            self._load(self._server.flat_parameters())
        flat = self._flat_local()
        dist.broadcast(flat, src=0)
        self._load(flat)
        average_floating_buffers(self.trained_module)

    def load_epoch_snapshot(self, epoch_index: int) -> bool:
        """Collective: every replica takes the master parameters as they were at the end of
        epoch ``epoch_index`` (kept when validation is on). False when there is none."""
        count = torch.tensor([len(self._server.snapshots) if self._server else 0], device=self._device)
        dist.broadcast(count, src=0)
        if epoch_index >= int(count.item()):
            return False
        flat = self._server.snapshots[epoch_index].clone() if self._server else self._flat_local()
        flat = flat.to(self._device)
        dist.broadcast(flat, src=0)
        self._load(flat)
        return True

    def progress(self) -> tuple[int, int] | None:
        """Rank 0, while training: (updates applied by the server, updates per epoch); None elsewhere."""
        if self._server is None:
            return None
        with self._lock:
            return self._server.version, self._server.pushes_per_epoch

    def finished_epochs(self) -> list[dict[str, Any]]:
        """Rank 0: the training records of the epochs the server has finished so far."""
        if self._server is None:
            return []
        with self._lock:
            return self._server.history()[:self._server.version // self._server.pushes_per_epoch]

    def history(self) -> list[dict[str, Any]]:
        """Per-epoch training records from the server (rank 0; empty elsewhere)."""
        return self._server.history() if self._server else []

    def summary(self) -> dict[str, Any]:
        if self._server is None:
            return {}
        return {"max_staleness": self._max_staleness,
                "max_staleness_seen": self._server.max_staleness_seen,
                "pushes_per_rank": list(self._server.pushes)}

    def close(self) -> None:
        self._requests = self._replies = None
        super().close()

    # -- communication ---------------------------------------------------------------------

    def _exchange(self, kind: float, loss_sum: float, rows: int, gradient: torch.Tensor | None) -> bool:
        """Send one message to the server; wait for its answer (go=True) unless DONE."""
        if self._rank == 0:
            return self._exchange_local(kind, loss_sum, rows, gradient)
        message = self._message
        message[0], message[1], message[2] = kind, loss_sum, rows
        if gradient is not None:
            message[HEADER:] = gradient
        dist.send(message, dst=0, group=self._requests)
        if kind == DONE:
            return False
        dist.recv(self._reply, src=0, group=self._replies)
        if self._reply[0].item() == 0:
            return False
        self._load(self._reply[1:])
        return True

    def _exchange_local(self, kind: float, loss_sum: float, rows: int,
                        gradient: torch.Tensor | None) -> bool:
        deadline = time.monotonic() + self._timeout
        with self._lock:
            self._raise_server_error()
            self._local_go = None
            self._server.receive(0, kind, loss_sum, rows, gradient)
            self._answer(self._server.grants())
            if kind == DONE:
                return False
            while self._local_go is None:
                self._raise_server_error()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AsyncTimeout(
                        f"rank 0 waited {self._timeout:.0f} s for the async server to grant a step"
                    )
                self._lock.wait(min(left, 1.0))
            if self._local_go:
                self._load(self._server.flat_parameters())
            return self._local_go

    def _serve(self, remote: list[int]) -> None:
        """Server thread: receive from any agent until every remote agent has stopped."""
        inbox = torch.zeros_like(self._message)
        try:
            while any(r not in self._server.finished for r in remote):
                sender = dist.recv(inbox, group=self._requests)
                kind = float(inbox[0].item())
                gradient = inbox[HEADER:].clone() if kind == PUSH else None
                with self._lock:
                    self._server.receive(sender, kind, float(inbox[1].item()), int(inbox[2].item()),
                                         gradient)
                    self._answer(self._server.grants())
        except BaseException as exc:  # surfaces in rank 0's training thread
            with self._lock:
                self._error = exc
                self._lock.notify_all()

    def _answer(self, decisions: list[tuple[int, bool]]) -> None:
        """Send each decision (called with the lock held, so one thread uses ``replies``)."""
        for rank, go in decisions:
            if rank == 0:
                self._local_go = go
                self._lock.notify_all()
                continue
            reply = self._server_reply
            reply[0] = 1.0 if go else 0.0
            if go:
                reply[1:] = self._server.flat_parameters()
            dist.send(reply, dst=rank, group=self._replies)

    def _raise_server_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the async parameter server failed: {self._error}") from self._error

    def _flat_local(self) -> torch.Tensor:
        return flatten([p.detach() for p in self._params]).to(self._device)

    def _load(self, flat: torch.Tensor) -> None:
        copy_flat_into(flat.to(self._device), self._params)
