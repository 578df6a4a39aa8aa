"""The two contracts a synchronisation strategy implements, and what they share.

``LockstepStrategy``: every agent runs the same steps together (allreduce, parameter_server,
local_sgd); the lock-step loop drives it. ``AsyncStrategy``: agents step at their own pace
(async); the async loop drives it. A strategy reads only the settings ``StrategySettings``
lists and the facts in ``StrategyEnv``, so this package does not depend on the driver or
on the agent's loops.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn

from spark_ddl.errors import ConfigError
from spark_ddl.sync.finite import NonFiniteGuard, all_finite
from spark_ddl.sync.guard import state_is_identical

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class StrategySettings(Protocol):
    """The training settings strategies read (``TrainConfig`` provides them)."""

    num_workers: int
    batch_size: int
    epochs: int
    timeout: float
    use_gpu: bool | None
    compression: str
    allreduce_impl: str
    sparse_embeddings: str
    optimizer: str
    optimizer_kwargs: dict[str, Any]
    grad_clip_norm: float | None
    sync_every: int
    accumulate_steps: int
    max_staleness: int | None
    check_every: int
    early_stopping_patience: int
    lr_scheduler: str | None
    lr_scheduler_kwargs: dict[str, Any]
    checkpoint_dir: str | None
    has_validation: bool
    on_nonfinite: str


@dataclass(frozen=True)
class StrategyEnv:
    """What an agent knows when it builds its strategy (after the rendezvous)."""

    device: torch.device
    shard_sizes: list[int]  # training rows per rank
    host_keys: list[str]  # per rank: which machine it runs on (see host_reduce.host_key)


# ------------------------------------------------------------------ tensor helpers


def flatten(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """One 1-D tensor holding ``tensors`` one after another (they share one dtype): a new one, or
    written into ``out`` (of their total size)."""
    if not tensors:
        return torch.zeros(0) if out is None else out
    pieces = [t.detach().reshape(-1) for t in tensors]
    return torch.cat(pieces) if out is None else torch.cat(pieces, out=out)


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like each tensor of ``like`` (the inverse of ``flatten``)."""
    views, offset = [], 0
    for tensor in like:
        views.append(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
    return views


def copy_flat_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy the values of ``flat`` into ``tensors`` in place."""
    with torch.no_grad():
        for tensor, value in zip(tensors, unflatten(flat, tensors)):
            tensor.copy_(value)


def broadcast_state(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy rank ``src``'s parameters (unless ``buffers_only``) and buffers into every replica
    (one broadcast per dtype)."""
    tensors = [] if buffers_only else [t.data for t in module.parameters()]
    tensors += list(module.buffers())
    for dtype in dict.fromkeys(t.dtype for t in tensors):  # the same order on every rank (a set is not)
        group = [t for t in tensors if t.dtype == dtype]
        flat = flatten(group)
        dist.broadcast(flat, src=src)
        copy_flat_into(flat, group)


def make_replicas_identical(module: nn.Module, device: torch.device) -> bool:
    """Collective: give every replica rank 0's parameters and buffers; True if that took a broadcast.
    Replicas built equal (the same seed, a pickled module, a warm start) are only compared, so a big
    model does not cross a slow network once more before training starts."""
    if state_is_identical(module, device):
        return False
    broadcast_state(module)
    return True


def average_floating_buffers(module: nn.Module) -> None:
    """Average floating buffers (e.g. batch-norm statistics: every agent saw other rows) across ranks."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()


# ------------------------------------------------------------------ the contracts


class SyncStrategy(ABC):
    """What every strategy has: a name, its settings rules, the module and the optimiser.

    Lifecycle on every agent: ``create``, ``setup`` once (after the process group exists),
    the steps its loop drives, ``finish``, ``summary`` and ``close`` once.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line, for the Param doc and the CLI help
    supports_compression: ClassVar[bool] = False
    # the replicas are equal after every update, so that fewer agents can take over the others'
    # shards at an epoch boundary (elastic training, min_workers) and check_every can compare them
    replicas_identical: ClassVar[bool] = False

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.nonfinite: NonFiniteGuard | None = None  # set by the loop: checks before every update
        self.initial_broadcast: bool | None = None  # whether setup broadcast rank 0's state (else: built equal)

    def _update_allowed(self, gradients: list[torch.Tensor | None], collective: bool = True,
                        known_finite: bool = True) -> bool:
        """Whether to apply the update of these (exchanged) ``gradients``: True unless one is NaN
        or infinite (or ``known_finite`` is False: others, checked already, were), which raises or
        (``on_nonfinite='skip'``) returns False. ``collective``: every rank asks with the same
        gradients."""
        if self.nonfinite is None:
            return True
        return self.nonfinite.resolve(known_finite and all_finite(gradients), collective)

    @classmethod
    def check_settings(cls, settings: StrategySettings) -> None:
        """Raise ConfigError (on the driver, before launch) for settings this strategy cannot honour."""
        if settings.compression != "none" and not cls.supports_compression:
            raise ConfigError(
                f"compression={settings.compression!r} works with sync='allreduce' (its gradient "
                f"exchange) and, 'fp16'/'bf16', with sync='local_sgd', not with sync={cls.name!r}."
            )

    @classmethod
    @abstractmethod
    def create(cls, settings: StrategySettings, env: StrategyEnv) -> "SyncStrategy":
        """The strategy for one agent."""

    def setup(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Make the replicas identical (rank 0's parameters win) and build the optimiser."""
        self.initial_broadcast = make_replicas_identical(module, self._device)
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

    def finish(self) -> None:
        """Called once after the last step (e.g. a final parameter average)."""

    def summary(self) -> dict[str, Any]:
        """Strategy-specific facts for the training summary (rank 0)."""
        return {}

    def close(self) -> None:
        """Drop every reference to communication objects (wrappers, optimiser state hooks).

        Called after the final collective and before the process group is destroyed.
        """
        self._optimizer = None


class LockstepStrategy(SyncStrategy):
    """Every agent runs the same micro-steps together: per micro-step
    ``with micro_step(sync): forward through self.module; step(loss, sync)``. ``sync=False``
    only accumulates gradients (no communication, no update); the next ``sync=True`` step
    applies them. Every agent calls the same methods with the same arguments."""

    replicas_identical: ClassVar[bool] = True  # (False: local SGD between its averages)
    # seconds this agent spent in its exchange with the others so far (its collectives, waits for the
    # other agents and compression included), or None where the exchange runs inside backward (DDP)
    exchange_seconds: float | None = 0.0
    exchanges: int = 0  # timed exchanges so far (the points where every agent waits for the others)

    @contextmanager
    def timed_exchange(self) -> Iterator[None]:
        """Count the time in this block as exchange (``exchange_seconds``), not computation."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.exchange_seconds is not None:
                self.exchange_seconds += time.perf_counter() - started
                self.exchanges += 1

    def micro_step(self, sync: bool) -> ContextManager[None]:
        """Context for the forward and backward of one micro-step (DDP: no_sync when not sync)."""
        return nullcontext()

    @abstractmethod
    def step(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backward pass; with ``sync`` also synchronisation, optimiser update, zeroed gradients."""

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own counters, for checkpoints (plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class AsyncStrategy(SyncStrategy):
    """Agents step at their own pace: ``start``, then ``step`` while ``running``, then
    ``finish`` (collective: every replica takes the final parameters). The epochs are the
    strategy's own (a budget of updates shared by all agents), so it keeps the history."""

    running: bool = False

    @abstractmethod
    def start(self) -> bool:
        """Ask for the first parameters; True if this agent may run a step."""

    @abstractmethod
    def step(self, loss: torch.Tensor, sync: bool = True, loss_sum: float = 0.0, rows: int = 0) -> None:
        """Backward; with ``sync`` hand over the gradient and take fresh parameters (sets ``running``)."""

    @abstractmethod
    def progress(self) -> tuple[int, int] | None:
        """(updates applied so far, updates per epoch) where this rank knows them, else None."""

    @abstractmethod
    def finished_epochs(self) -> list[dict[str, Any]]:
        """The training records of the epochs finished so far (where known; else [])."""

    @abstractmethod
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch training records after ``finish`` (rank 0; [] elsewhere)."""

    @abstractmethod
    def load_epoch_snapshot(self, epoch_index: int) -> bool:
        """Collective: every replica takes the parameters as they were at the end of epoch
        ``epoch_index``; False when there is none (validation of past epochs)."""
