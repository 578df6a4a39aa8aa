"""The training configuration that travels from the driver to every agent."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from spark_ddl.errors import ConfigError

LOSSES = ("cross_entropy", "mse", "bce_with_logits")
OPTIMIZERS = ("sgd", "adam", "adamw")
SYNC_STRATEGIES = ("allreduce", "parameter_server", "local_sgd", "async")
COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")
ALLREDUCE_IMPLS = ("auto", "flat", "ddp")
CLASSIFICATION_LOSSES = ("cross_entropy", "bce_with_logits")


def classification_kind(loss: object) -> str | None:
    """'multiclass' (cross_entropy), 'binary' (bce_with_logits), or None for regression losses."""
    return {"cross_entropy": "multiclass", "bce_with_logits": "binary"}.get(loss) if isinstance(loss, str) else None


@dataclass
class TrainConfig:
    """Everything an agent needs to train, apart from the model and the data.

    ``loss`` is a name from ``LOSSES`` or a callable ``loss(output, target) -> scalar`` that
    returns the *mean* over the batch (like torch's default reduction).
    """

    loss: str | Callable[..., Any] = "cross_entropy"
    optimizer: str = "sgd"
    lr: float = 0.1
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    epochs: int = 5
    num_workers: int = 2
    shuffle: bool = True
    seed: int = 0
    use_gpu: bool | None = None
    timeout: float = 300.0
    sync: str = "allreduce"
    sync_every: int = 8  # local_sgd: average parameters every this many steps
    compression: str = "none"  # allreduce only: torch DDP communication hook
    # allreduce only: "flat" (one gradient buffer averaged after backward, through shared memory
    # between agents on one machine; CPU, no compression), "ddp" (torch DDP), "auto" (flat where it applies)
    allreduce_impl: str = "auto"
    accumulate_steps: int = 1  # micro-batches per optimiser update (no communication between)
    max_staleness: int | None = None  # async: bound on updates a gradient may miss (None: auto)
    check_every: int = 0  # compare replica checksums every this many updates (0: only at the end)
    early_stopping_patience: int = 0  # epochs without validation-loss improvement; 0 = off
    lr_scheduler: str | None = None  # a class of torch.optim.lr_scheduler, stepped every epoch
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    has_validation: bool = False  # set by the driver when a validation set is configured
    checkpoint_dir: str | None = None  # local path or pyarrow.fs URI; None: no checkpoints
    checkpoint_every: int | str = 1  # epochs (int or "N epochs") or "N steps" (updates)
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in checkpoint_dir
    max_retries: int = 0  # resubmissions of a failed barrier job (from the newest checkpoint)
    stall_timeout: float | None = None  # seconds without a completed step anywhere → fail
    resume_from: str | None = None  # set by the driver for one attempt: the checkpoint to load
    progress: str = "auto"  # driver output while training: auto | bar | log | off
    shard_storage: str = "auto"  # memory | disk (memory-mapped file on the executor) | auto
    shard_memory_limit_mb: float = 2048.0  # auto: shards above this spill to disk
    agent_log_level: str = "WARNING"  # agents' log records at this level reach the driver; OFF: none

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first invalid setting; return self."""
        _check_int("num_workers", self.num_workers, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("epochs", self.epochs, 1)
        _check_int("seed", self.seed, None)
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}.")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, got {self.timeout!r}.")
        if not (callable(self.loss) or self.loss in LOSSES):
            raise ConfigError(
                f"loss must be one of {', '.join(LOSSES)} or a callable(output, target), "
                f"got {self.loss!r}."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}."
            )
        if not isinstance(self.optimizer_kwargs, dict):
            raise ConfigError(
                f"optimizer_kwargs must be a dict, got {type(self.optimizer_kwargs).__name__}."
            )
        if self.sync not in SYNC_STRATEGIES:
            raise ConfigError(
                f"sync must be one of {', '.join(SYNC_STRATEGIES)}, got {self.sync!r}."
            )
        _check_int("sync_every", self.sync_every, 1)
        _check_int("accumulate_steps", self.accumulate_steps, 1)
        _check_int("check_every", self.check_every, 0)
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}."
            )
        if self.compression != "none" and self.sync != "allreduce":
            raise ConfigError(
                f"compression={self.compression!r} works with sync='allreduce' (DDP communication "
                f"hooks), not with sync={self.sync!r}."
            )
        if self.allreduce_impl not in ALLREDUCE_IMPLS:
            raise ConfigError(
                f"allreduce_impl must be one of {', '.join(ALLREDUCE_IMPLS)}, got {self.allreduce_impl!r}."
            )
        if self.allreduce_impl == "flat" and (self.compression != "none" or self.use_gpu):
            raise ConfigError(
                "allreduce_impl='flat' averages uncompressed gradients of CPU agents; with "
                f"compression={self.compression!r} or use_gpu=True use allreduce_impl='ddp' or 'auto'."
            )
        _check_int("early_stopping_patience", self.early_stopping_patience, 0)
        if self.early_stopping_patience and not self.has_validation:
            raise ConfigError(
                "early_stopping_patience needs a validation set: set validation_col or "
                "validation_fraction."
            )
        if self.lr_scheduler is not None:
            import torch

            scheduler = getattr(torch.optim.lr_scheduler, str(self.lr_scheduler), None)
            if not isinstance(scheduler, type) or self.lr_scheduler.startswith("_"):
                raise ConfigError(
                    f"lr_scheduler must name a class in torch.optim.lr_scheduler (e.g. StepLR, "
                    f"CosineAnnealingLR, ReduceLROnPlateau), got {self.lr_scheduler!r}."
                )
        if not isinstance(self.lr_scheduler_kwargs, dict):
            raise ConfigError("lr_scheduler_kwargs must be a dict.")
        if self.sync == "async":
            self._validate_async()
        self._validate_fault_tolerance()
        if self.agent_log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "OFF"):
            raise ConfigError("agent_log_level must be DEBUG, INFO, WARNING, ERROR or OFF, got "
                              f"{self.agent_log_level!r}.")
        if self.shard_storage not in ("auto", "memory", "disk"):
            raise ConfigError(f"shard_storage must be 'auto', 'memory' or 'disk', got {self.shard_storage!r}.")
        if not (isinstance(self.shard_memory_limit_mb, (int, float)) and self.shard_memory_limit_mb >= 0):
            raise ConfigError(f"shard_memory_limit_mb must be a number >= 0, got {self.shard_memory_limit_mb!r}.")
        if self.progress not in ("auto", "bar", "log", "off"):
            raise ConfigError(f"progress must be 'auto', 'bar', 'log' or 'off', got {self.progress!r}.")
        if self.use_gpu not in (None, True, False):
            raise ConfigError(f"use_gpu must be None, True or False, got {self.use_gpu!r}.")
        return self

    def _validate_fault_tolerance(self) -> None:
        from spark_ddl.checkpoint import CheckpointEvery

        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir.strip():
                raise ConfigError(f"checkpoint_dir must be a path or URI, got {self.checkpoint_dir!r}.")
            if self.sync == "async":
                raise ConfigError(
                    "checkpoints continue a run exactly, which needs a lock-step strategy; "
                    "sync='async' is not reproducible. Use allreduce, parameter_server or local_sgd."
                )
        try:
            CheckpointEvery.parse(self.checkpoint_every)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _check_int("keep_checkpoints", self.keep_checkpoints, 1)
        _check_int("max_retries", self.max_retries, 0)
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("resume=True needs checkpoint_dir: the directory of the run to continue.")
        if self.stall_timeout is not None and not (
            isinstance(self.stall_timeout, (int, float)) and not isinstance(self.stall_timeout, bool)
            and self.stall_timeout > 0
        ):
            raise ConfigError(f"stall_timeout must be a positive number of seconds or None, got "
                              f"{self.stall_timeout!r}.")

    def _validate_async(self) -> None:
        if self.max_staleness is not None:
            _check_int("max_staleness", self.max_staleness, 0)
            if self.max_staleness < self.num_workers - 1:
                raise ConfigError(
                    f"max_staleness={self.max_staleness} is too small for {self.num_workers} agents: "
                    f"when all compute at once, each gradient misses the other "
                    f"{self.num_workers - 1} agents' updates. Set max_staleness >= {self.num_workers - 1}."
                )
        if self.check_every:
            raise ConfigError(
                "check_every compares replicas of the synchronous strategies; with sync='async' "
                "the replicas differ by design (they agree again at the end). Set check_every=0."
            )
        if self.early_stopping_patience:
            raise ConfigError(
                "early_stopping_patience needs every agent to stop at the same epoch, which "
                "sync='async' does not have; use a synchronous strategy or set it to 0."
            )
        if self.lr_scheduler == "ReduceLROnPlateau":
            raise ConfigError(
                "lr_scheduler='ReduceLROnPlateau' needs a metric at each epoch end, which the "
                "async server does not wait for; use an epoch-based scheduler (e.g. StepLR)."
            )

    @property
    def resolved_max_staleness(self) -> int:
        """max_staleness, or its default: 2 × (num_workers − 1), at least 4."""
        if self.max_staleness is not None:
            return self.max_staleness
        return max(4, 2 * (self.num_workers - 1))

    @property
    def spill_bytes(self) -> int | None:
        """Bytes of training rows an agent keeps in memory before spilling (None: never)."""
        if self.shard_storage == "memory":
            return None
        if self.shard_storage == "disk":
            return 0
        return int(self.shard_memory_limit_mb * 2**20)

    @property
    def is_classification(self) -> bool:
        """True when the loss is a classification loss (labels are class indices)."""
        return self.loss in CLASSIFICATION_LOSSES

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (a callable loss is recorded by its qualified name)."""
        out = dataclasses.asdict(self)
        if callable(self.loss):
            out["loss"] = f"callable:{getattr(self.loss, '__module__', '?')}." + getattr(
                self.loss, "__qualname__", type(self.loss).__name__
            )
        return out


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}.")
