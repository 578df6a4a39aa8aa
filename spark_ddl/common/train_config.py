"""The training settings that travel from the driver to every agent, each declared once.

Every field of ``TrainConfig`` is a ``setting(...)`` (see ``spark_ddl.common.settings``): its
declaration is the estimator's Param, its keyword argument, its command-line flags, its row of
the settings reference and its check; it also marks where the setting is exposed besides the
estimator (``run=True``: ``spark_ddl.run``; ``cli``: the commands with a flag for it, by default
``spark-ddl train`` only). Rules that involve several settings live in ``validate``, and a strategy's own rules
in its class (``SyncStrategy.check_settings``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable

from spark_ddl.common.objectives import objective_descriptions
from spark_ddl.common.settings import check_all, declared, setting
from spark_ddl.errors import ConfigError
from spark_ddl.sync import elastic_strategies, strategy_class, strategy_descriptions

OPTIMIZERS = ("sgd", "adam", "adamw")
COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")
ALLREDUCE_IMPLS = ("auto", "flat", "ddp")


@dataclass(frozen=True)
class CheckpointEvery:
    """How often to checkpoint: every ``count`` epochs or every ``count`` updates."""

    count: int
    unit: str  # "epochs" | "steps"

    @classmethod
    def parse(cls, value: Any) -> "CheckpointEvery":
        """An int (epochs) or a string such as ``"2 epochs"`` / ``"500 steps"``."""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return cls(value, "epochs")
        match = re.fullmatch(r"\s*(\d+)\s*(epochs?|steps?)\s*", str(value))
        if not match or int(match.group(1)) < 1:
            raise ValueError(
                f"checkpoint_every must be a positive number of epochs (e.g. 1) or a string like "
                f"'2 epochs' or '500 steps', got {value!r}."
            )
        unit = "epochs" if match.group(2).startswith("epoch") else "steps"
        return cls(int(match.group(1)), unit)




@dataclass
class TrainConfig:
    """Everything an agent needs to train, apart from the model and the data."""

    loss: str | Callable[..., Any] = setting(
        "cross_entropy", "the objective (spark_ddl.common.objectives), or a callable(output, target) returning the "
        "batch-mean loss", choices=objective_descriptions, callable_ok=True, resume_checked=True,
        cli=())  # no flag: each command trains one task, its loss is the command's
    train_step: Callable[..., Any] | None = setting(
        None, "callable(model, batch) -> batch-mean loss replacing loss(model(inputs), label); batch is a dict of "
        "the inputs' tensors (and 'label'), on the agent's device; loss still names the task", kind=object,
        nullable=True, callable_ok=True, cli=(), resume_checked=True)
    eval_step: Callable[..., Any] | None = setting(
        None, "callable(model, batch) -> dict of floats added (as val_<name>, weighted by rows over every agent) "
        "to each epoch's validation record", kind=object, nullable=True, callable_ok=True, cli=())
    optimizer: str = setting("sgd", "the optimiser", choices=OPTIMIZERS, resume_checked=True)
    lr: float = setting(0.1, "learning rate", positive=True, resume_checked=True, cli=("train", "apps"))
    optimizer_kwargs: dict[str, Any] = setting(
        doc="extra keyword arguments of the optimiser (e.g. momentum)", default_factory=dict, resume_checked=True)
    batch_size: int = setting(32, "mini-batch size per agent", minimum=1, resume_checked=True, run=True,
                              cli=("train", "apps"))
    epochs: int = setting(5, "number of passes over the data", minimum=1, cli=("train", "apps"))
    num_workers: int = setting(2, "number of agents (barrier tasks)", minimum=1, resume_checked=True, run=True,
                               cli=("train", "apps"), cli_aliases=("--workers",))
    shuffle: bool = setting(True, "reshuffle each agent's shard every epoch", resume_checked=True, run=True)
    seed: int = setting(0, "random seed (shuffling, dropout)", resume_checked=True, run=True,
                        cli=("train", "apps"))
    use_gpu: bool | None = setting(None, "None: GPU when the executors have one; True: require a GPU; "
                                   "False: CPU", kind=bool, nullable=True, run=True)
    timeout: float = setting(300.0, "seconds any collective or rendezvous may wait before failing",
                             positive=True, unit="seconds", run=True)
    sync: str = setting("allreduce", "synchronisation strategy", choices=strategy_descriptions,
                        resume_checked=True)
    sync_every: int = setting(8, "local_sgd: average the parameters every this many steps", minimum=1,
                              resume_checked=True)
    compression: str = setting(
        "none", "gradient compression for sync='allreduce': 'fp16' or 'bf16' (casts), 'powersgd' (rank-1, with "
        "error feedback). allreduce_impl='flat' compresses only what crosses machines (inside a machine: shared "
        "memory at full precision; every agent on one machine: no effect); 'ddp' uses torch's DDP communication "
        "hooks on every all-reduce ('bf16' there needs NCCL). sync='local_sgd': 'fp16' or 'bf16', each "
        "replica's change since the last average crosses machines in the low precision",
        choices=COMPRESSIONS, resume_checked=True)
    sparse_embeddings: str = setting(
        "auto", "sync='allreduce' on CPU: exchange only the rows a batch touched of embedding tables ('always'), "
        "never ('never'), or for tables of 16 MB and more when the update allows it ('auto': optimizer='sgd' "
        "without weight_decay, no grad_clip_norm); nn.Embedding(sparse=True) tables are always exchanged so",
        choices=("auto", "always", "never"))
    allreduce_impl: str = setting(
        "auto", "sync='allreduce': 'flat' (one gradient buffer averaged after backward, through shared "
        "memory between agents on one machine, compressed between machines; CPU), 'ddp' (torch DDP, overlapped "
        "with backward, compressed by its hooks) or 'auto' (flat on CPU, with or without compression)",
        choices=ALLREDUCE_IMPLS)
    accumulate_steps: int = setting(1, "micro-batches whose gradients are accumulated, without "
                                    "communication, before each update", minimum=1, resume_checked=True)
    max_staleness: int | None = setting(
        None, "async: the most updates a gradient may miss between the parameters it was computed on and "
        "its application; faster agents wait rather than exceed it (None: 2 x (num_workers - 1), at least 4)",
        kind=int, nullable=True, minimum=0)
    check_every: int = setting(0, "compare the replicas' parameter checksums every this many updates and "
                               "fail on divergence (0: only at the end of training)", minimum=0)
    early_stopping_patience: int = setting(
        0, "stop after this many epochs without a better validation loss and restore the best epoch's "
        "weights; 0 = off", minimum=0, resume_checked=True)
    grad_clip_norm: float | None = setting(None, "clip the gradients' total norm to this before every update, "
                                           "after the exchange (the same on every rank); None: off", kind=float,
                                           nullable=True, positive=True, resume_checked=True)
    on_nonfinite: str = setting(
        "raise", "a NaN or infinite loss or gradient: 'raise' NonFiniteLossError naming the epoch, step and rank "
        "the step it happens, or 'skip' that update on every agent (counted in the summary)",
        choices=("raise", "skip"))
    lr_scheduler: str | None = setting(None, "a torch.optim.lr_scheduler class name (e.g. 'StepLR'), "
                                       "stepped every epoch", kind=str, nullable=True, resume_checked=True)
    lr_scheduler_kwargs: dict[str, Any] = setting(doc="keyword arguments of the scheduler", default_factory=dict,
                                                  resume_checked=True)
    checkpoint_dir: str | None = setting(
        None, "directory (local path or pyarrow.fs URI, reachable from every executor) for training "
        "checkpoints; None: none", kind=str, nullable=True)
    checkpoint_every: int | str = setting(
        1, "checkpoint every N epochs (an int or 'N epochs') or 'N steps' (updates)", kind=object)
    keep_checkpoints: int = setting(2, "newest checkpoints kept", minimum=1)
    resume: bool = setting(False, "continue from the newest checkpoint in checkpoint_dir (fresh start if "
                           "there is none)")
    min_workers: int | None = setting(
        None, "elastic: a retry that finds fewer barrier slots than num_workers but at least this many continues "
        "from the newest checkpoint with one agent per slot (same global batch and sample order), and grows back "
        "at the next epoch boundary when slots return; None: num_workers (every attempt needs them all)",
        kind=int, nullable=True, minimum=1)
    max_retries: int = setting(0, "resubmit a barrier job that failed because an agent was lost or "
                               "stalled, up to this many times, resuming from the newest checkpoint", minimum=0, run=True)
    stall_timeout: float | None = setting(None, "fail when no agent completes a step for this many "
                                          "seconds; None: off", kind=float, nullable=True, positive=True,
                                          unit="seconds", run=True)
    progress: str = setting("auto", "live progress on the driver: 'auto' (a bar on a terminal, log lines "
                            "otherwise), 'bar', 'log' or 'off'", choices=("auto", "bar", "log", "off"),
                            run=True)
    shard_storage: str = setting("auto", "where an agent keeps its training rows: 'memory', 'disk' (a "
                                 "memory-mapped file on the executor's local disk) or 'auto' (disk above "
                                 "shard_memory_limit_mb)", choices=("auto", "memory", "disk"), run=True)
    shard_memory_limit_mb: float = setting(2048.0, "shard_storage='auto': shards above this many MB spill "
                                           "to disk", minimum=0, run=True)
    agent_log_level: str = setting("WARNING", "agents' log records at this level and above are re-emitted "
                                   "on the driver as [rank N] lines; 'OFF': none",
                                   choices=("DEBUG", "INFO", "WARNING", "ERROR", "OFF"), run=True)
    # set by the driver, not by users
    has_validation: bool = setting(False, "a validation set is configured", param=False)
    resume_from: str | None = setting(None, "the checkpoint this attempt loads", kind=str, nullable=True,
                                      param=False)

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first invalid setting; return self."""
        check_all(self)
        for name in ("train_step", "eval_step"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise ConfigError(f"{name} must be a callable(model, batch), got {getattr(self, name)!r}.")
        if self.lr_scheduler is not None:
            import torch

            scheduler = getattr(torch.optim.lr_scheduler, str(self.lr_scheduler), None)
            if not isinstance(scheduler, type) or self.lr_scheduler.startswith("_"):
                raise ConfigError(
                    f"lr_scheduler must name a class in torch.optim.lr_scheduler (e.g. StepLR, "
                    f"CosineAnnealingLR, ReduceLROnPlateau), got {self.lr_scheduler!r}."
                )
        if self.early_stopping_patience and not self.has_validation:
            raise ConfigError(
                "early_stopping_patience needs a validation set: set validation_col or "
                "validation_fraction."
            )
        try:
            CheckpointEvery.parse(self.checkpoint_every)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.checkpoint_dir is not None and not self.checkpoint_dir.strip():
            raise ConfigError(f"checkpoint_dir must be a path or URI, got {self.checkpoint_dir!r}.")
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("resume=True needs checkpoint_dir: the directory of the run to continue.")
        if self.elastic:
            if self.min_workers > self.num_workers:
                raise ConfigError(f"min_workers={self.min_workers} is above num_workers={self.num_workers}.")
            elastic_syncs = list(elastic_strategies())
            if self.sync not in elastic_syncs or self.checkpoint_dir is None or self.max_retries < 1:
                raise ConfigError(
                    f"min_workers below num_workers (elastic training) needs sync in {elastic_syncs} (replicas "
                    "that stay identical, so that fewer agents can take over the others' shards), a checkpoint_dir "
                    "to continue from, and max_retries >= 1.")
        strategy_class(self.sync).check_settings(self)
        return self

    @property
    def elastic(self) -> bool:
        """A retry may continue with fewer agents than num_workers."""
        return self.min_workers is not None and self.min_workers != self.num_workers

    @property
    def checkpoint_interval(self) -> CheckpointEvery | None:
        """How often to checkpoint (None without a checkpoint_dir)."""
        return CheckpointEvery.parse(self.checkpoint_every) if self.checkpoint_dir else None

    @property
    def spill_bytes(self) -> int | None:
        """Bytes of training rows an agent keeps in memory before spilling (None: never)."""
        if self.shard_storage == "memory":
            return None
        if self.shard_storage == "disk":
            return 0
        return int(self.shard_memory_limit_mb * 2**20)

    def resume_record(self) -> dict[str, Any]:
        """The settings a checkpoint records so that a resume can check it continues the same run."""
        return {name: _json_safe(getattr(self, name)) for name, (_, spec) in declared(self).items()
                if spec.resume_checked}

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (a callable is recorded by its qualified name)."""
        return {name: _json_safe(value) for name, value in dataclasses.asdict(self).items()}


def _json_safe(value: Any) -> Any:
    if callable(value):
        return f"callable:{getattr(value, '__module__', '?')}." + getattr(value, "__qualname__",
                                                                          type(value).__name__)
    return value
