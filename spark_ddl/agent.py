"""Executor side: one barrier task = one agent that trains its replica with its peers.

``run_agent`` is what ``mapInArrow`` calls for each partition. It reads the shard, meets the
other agents, agrees on the number of steps, trains with the chosen sync strategy, and rank 0
yields the result (history + weights, in chunks) after every rank has left the group.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from spark_ddl.artifact import build_from_class_path, output_batches, state_dict_to_bytes
from spark_ddl.checkpoint import CheckpointEvery, compatibility_record, read_checkpoint, write_checkpoint
from spark_ddl.config import TrainConfig, classification_kind
from spark_ddl.devices import DevicePlan, select_device, task_gpu_addresses
from spark_ddl.errors import AgentFailure
from spark_ddl.heartbeat import Heartbeat
from spark_ddl.objectives import label_dtype, make_loss, make_optimizer, make_scheduler
from spark_ddl.rendezvous import environment_fingerprint, init_process_group, leave_group, rendezvous
from spark_ddl.shard import Shard, global_batch_sizes, steps_per_epoch, update_groups
from spark_ddl.shard_cache import DiskShard
from spark_ddl.sync import make_strategy
from spark_ddl.sync.host_reduce import LocalPeerError, abort_local_peers, host_key
from spark_ddl.sync.guard import check_replicas

log = logging.getLogger("spark_ddl.agent")

# Seconds a rank whose error is only a consequence of a peer's failure (a broken collective)
# waits before raising, so that the peer's own error reaches the driver first.
SECONDARY_FAILURE_DELAY = 3.0
# Seconds a failing agent waits for its process group's teardown before reporting its error:
# destroying a gloo group while a peer is inside a collective can block until the timeout,
# and the root cause must reach the driver before the peers' follow-on errors.
FAILURE_TEARDOWN_SECONDS = 2.0
RECENT_EPOCHS = 32  # epoch records rank 0's heartbeat carries to the driver


@dataclass
class AgentJob:
    """What the driver ships to every agent (pickled with the task closure)."""

    config: TrainConfig
    module_bytes: bytes | None = None  # cloudpickled nn.Module, or
    class_path: str | None = None  # "package.module:Class" built with class_kwargs
    class_kwargs: dict[str, Any] = field(default_factory=dict)
    fail_hook: Any = None  # tests only: callable(rank, epoch, step, module) run before each step
    strategy_factory: Any = None  # benchmarks only: callable(device) -> SyncStrategy
    monitor_address: tuple[str, int] | None = None  # the driver's status channel (set per attempt)
    monitor_secret: str | None = None
    heartbeat_interval: float = 1.0

    def build_module(self) -> nn.Module:
        if self.class_path is not None:
            return build_from_class_path(self.class_path, self.class_kwargs)
        from pyspark import cloudpickle

        try:
            return cloudpickle.loads(self.module_bytes)
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(
                f"The model cannot be rebuilt on the executor ({exc}). Make its code importable "
                "there (spark.submit.pyFiles / sc.addPyFile), or pass model='pkg.module:Class'."
            ) from exc


def run_agent(job: AgentJob, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Train on this partition with the other barrier tasks; rank 0 yields the result rows."""
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    rank = context.partitionId()
    heartbeat = Heartbeat(job.monitor_address, job.monitor_secret, rank, job.heartbeat_interval)
    if job.config.agent_log_level != "OFF":
        heartbeat.forward_logs(job.config.agent_log_level)
    heartbeat.start()
    result: list[pa.RecordBatch] = []
    try:
        result = _train(job, context, batches, heartbeat)
    except Exception as exc:
        _raise_agent_failure(rank, exc)
    finally:
        heartbeat.stop()
        destroy_group_within(FAILURE_TEARDOWN_SECONDS)  # after leave_group (success) nothing is left
    yield from result


def _train(job: AgentJob, context, batches: Iterator[pa.RecordBatch], heartbeat: Heartbeat) -> list[pa.RecordBatch]:
    config = job.config
    rank = context.partitionId()
    threads = max(1, int(context.cpus() or 1))
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed + rank)

    plan = select_device(
        config.use_gpu,
        task_gpu_addresses(context),
        torch.cuda.is_available(),
        torch.cuda.device_count() if torch.cuda.is_available() else 0,
        local_rank=rank,
    )
    device = torch.device(plan.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    heartbeat.set("reading the partition")
    map_large_allocations()
    reset_peak_rss()
    rss_before_data = peak_rss_bytes()
    _log_memory("before reading the partition")
    train, validation = Shard.from_arrow(batches, label_dtype(config.loss), config.spill_bytes)
    try:
        return _train_on(job, context, heartbeat, train, validation, threads, plan, device, rss_before_data)
    finally:
        train.close()  # a disk shard's file goes with it


def _train_on(job: AgentJob, context, heartbeat: Heartbeat, train: Shard | DiskShard, validation: Shard, threads: int,
              plan: DevicePlan, device: torch.device, rss_before_data: int) -> list[pa.RecordBatch]:
    config, rank = job.config, context.partitionId()
    info = {
        "rows": train.num_rows,
        "validation_rows": validation.num_rows,
        "feature_dim": train.feature_dim or validation.feature_dim,
        "host": os.uname().nodename,
        "host_key": host_key(),
        "device": plan.device,
        "fingerprint": environment_fingerprint(plan.backend),
    }
    heartbeat.set("rendezvous with the other agents", waiting=True)
    rdv = rendezvous(context, info, config.timeout)
    if rdv.world_size != config.num_workers:
        raise RuntimeError(
            f"Spark ran {rdv.world_size} barrier task(s) but num_workers={config.num_workers}: the "
            "input's partitions changed between planning and execution (e.g. adaptive query "
            "execution coalesced them). Repartition the input to num_workers partitions."
        )
    sizes = [int(p["rows"]) for p in rdv.peers]
    dims = {p["feature_dim"] for p in rdv.peers if p["feature_dim"] is not None}
    if sum(sizes) == 0:
        raise ValueError("the training DataFrame is empty: every partition has 0 training rows")
    if config.has_validation and not any(p["validation_rows"] for p in rdv.peers):
        raise ValueError("the validation set is empty: no row is marked for validation")
    if len(dims) > 1:
        raise ValueError(f"agents hold feature arrays of different lengths: {sorted(dims)}")
    dim = dims.pop()
    train, validation = train.with_feature_dim(dim), validation.with_feature_dim(dim)
    _log_memory("after reading the partition")
    init_process_group(rdv, plan.backend, config.timeout)

    heartbeat.set("building the model and the sync strategy")
    module = job.build_module().to(device)
    if job.strategy_factory is not None:
        strategy = job.strategy_factory(device)
    else:
        strategy = make_strategy(config, device, sizes, [p["host_key"] for p in rdv.peers])
    strategy.setup(
        module,
        lambda params: make_optimizer(config.optimizer, params, config.lr, config.optimizer_kwargs),
    )
    _log_memory("after the process group, model and strategy")
    loop_class = _EpochLoop if strategy.lockstep else _AsyncLoop
    loop = loop_class(job, strategy, train, validation, sizes, rank, rdv.world_size, device, heartbeat)
    if config.resume_from is not None:
        heartbeat.set("loading the checkpoint", waiting=rank != 0)
        loop.resume(load_checkpoint_everywhere(config.resume_from, rank))
    history = loop.run()  # ends with strategy.finish()
    heartbeat.set("finishing (final checks, leaving the group)", waiting=True)
    _log_memory("after training")
    check_replicas(strategy.trained_module, device, "at the end of training")
    facts = torch.tensor([len(history), peak_rss_bytes(), train.num_rows * (train.feature_dim or 0) * 4,
                          rss_before_data],
                         dtype=torch.int64, device=device)
    per_rank = [torch.zeros_like(facts) for _ in range(rdv.world_size)]
    dist.all_gather(per_rank, facts)

    stopper = getattr(loop, "stopper", None)
    if stopper is not None:
        stopper.restore_best(strategy.trained_module)
    weights = state_dict_to_bytes(strategy.trained_module) if rank == 0 else b""
    strategy_summary = strategy.summary()
    leave_group(release=strategy.close)
    if rank != 0:
        return []
    summary = {
        "history": history, "world_size": rdv.world_size, "shard_sizes": sizes,
        "validation_sizes": [int(p["validation_rows"]) for p in rdv.peers], "feature_dim": dim,
        "device": plan.device, "backend": plan.backend, "threads_per_agent": threads,
        "best_epoch": stopper.best_epoch if stopper else None,
        "peak_rss_bytes_per_rank": [int(t[1].item()) for t in per_rank],
        "shard_feature_bytes_per_rank": [int(t[2].item()) for t in per_rank],
        "rss_before_data_bytes_per_rank": [int(t[3].item()) for t in per_rank],
        "shard_storage": "disk" if isinstance(train, DiskShard) else "memory",
        "stopped_early": bool(stopper and stopper.stopped),
        **strategy_summary,
    }
    if strategy.lockstep:
        summary["epochs_run_per_rank"] = [int(t[0].item()) for t in per_rank]
    return [
        *output_batches("summary", 0, json.dumps(summary).encode()),
        *output_batches("weights", 0, weights),
    ]


class _EarlyStopping:
    """Tracks the best validation loss; rank 0 keeps the best weights and decides for all."""

    def __init__(self, patience: int, keep_weights: bool) -> None:
        self.patience = patience
        self.keep_weights = keep_weights
        self.best_loss = float("inf")
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped = False

    def update(self, epoch: int, val_loss: float, module: nn.Module, device: torch.device) -> bool:
        """Record this epoch; return True (the same on every rank) when training must stop."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            if self.keep_weights:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        stop = self.best_epoch is not None and epoch - self.best_epoch >= self.patience
        decision = torch.tensor([1 if stop else 0], device=device)
        dist.broadcast(decision, src=0)  # rank 0's decision holds for all ranks
        self.stopped = bool(decision.item())
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any], keep_weights: bool) -> None:
        self.best_loss, self.best_epoch = float(state["best_loss"]), state["best_epoch"]
        self.best_state = state["best_state"] if keep_weights else None

    def restore_best(self, module: nn.Module) -> None:
        if self.best_state is not None:
            module.load_state_dict(self.best_state)


class _EpochLoop:
    """The per-epoch work every agent does in lock-step with the others."""

    def __init__(self, job: AgentJob, strategy, train: Shard, validation: Shard, sizes: list[int],
                 rank: int, world_size: int, device: torch.device, heartbeat: Heartbeat) -> None:
        self.job, self.config, self.strategy, self.heartbeat = job, job.config, strategy, heartbeat
        self.train, self.validation = train, validation
        self.sizes, self.rank, self.world_size, self.device = sizes, rank, world_size, device
        self.loss_fn = make_loss(self.config.loss)
        self.steps = steps_per_epoch(sizes, self.config.batch_size)
        self.is_sync_step, self.update_rows = update_groups(
            global_batch_sizes(sizes, self.config.batch_size, self.steps), self.config.accumulate_steps
        )
        self.scheduler = make_scheduler(self.config.lr_scheduler, strategy.optimizer,
                                        self.config.lr_scheduler_kwargs)
        self.check_every, self.updates = self.config.check_every, 0
        patience = self.config.early_stopping_patience
        self.stopper = _EarlyStopping(patience, keep_weights=rank == 0) if patience else None
        self.every = CheckpointEvery.parse(self.config.checkpoint_every) if self.config.checkpoint_dir else None
        heartbeat.set("starting the epochs", steps_per_epoch=self.steps, epochs=self.config.epochs)
        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.start_step, self.start_loss_sum = 0, 0, 0.0

    def run(self) -> list[dict[str, Any]]:
        history = self.history
        fetch, index_device = self.train.batch_source(self.device)
        for epoch in range(self.start_epoch, self.config.epochs):
            record = {"epoch": epoch + 1, "lr": self.strategy.optimizer.param_groups[0]["lr"]}
            resuming = epoch == self.start_epoch
            record.update(self._train_epoch(epoch, fetch, index_device, self.start_step if resuming else 0,
                                            self.start_loss_sum if resuming else 0.0))
            if self.config.has_validation:
                self.heartbeat.set("validation", epoch=epoch, step=None)
                record.update(self._validate())
            history.append(record)
            if self.rank == 0:  # the driver's live progress shows the newest epochs
                self.heartbeat.set("end of epoch", waiting=True, recent_epochs=history[-RECENT_EPOCHS:])
            if self.scheduler is not None:
                if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.scheduler.step(record.get("val_loss", record["train_loss"]))
                else:
                    self.scheduler.step()
            if self.stopper is not None and self.stopper.update(
                epoch + 1, record["val_loss"], self.strategy.trained_module, self.device
            ):
                break
            if self.every is not None and self.every.unit == "epochs" and (epoch + 1) % self.every.count == 0:
                self._checkpoint(epoch + 1, 0, 0.0)
        self.strategy.finish()
        return history

    def _checkpoint(self, epoch: int, step: int, loss_sum: float) -> None:
        """Collective: gather what each rank must keep; rank 0 writes the checkpoint."""
        strategy, config = self.strategy, self.config
        self.heartbeat.set("writing a checkpoint" if self.rank == 0 else "waiting for rank 0's checkpoint",
                           waiting=self.rank != 0)
        mine: dict[str, Any] = {"rng": torch.get_rng_state(), "loss_sum": float(loss_sum),
                                "strategy": strategy.state_dict()}
        if self.device.type == "cuda":
            mine["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if not strategy.replicas_identical:
            mine["model"] = _cpu_state(strategy.trained_module.state_dict())
            mine["optimizer"] = strategy.optimizer.state_dict()
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return
        state = {
            "settings": compatibility_record(config), "shard_sizes": self.sizes,
            "epoch": epoch, "step": step, "updates": self.updates, "history": self.history,
            "ranks": gathered,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "stopper": self.stopper.state_dict() if self.stopper is not None else None,
        }
        if strategy.replicas_identical:
            state["model"] = _cpu_state(strategy.trained_module.state_dict())
            state["optimizer"] = strategy.optimizer.state_dict()
        path = write_checkpoint(config.checkpoint_dir, state, self.updates, config.keep_checkpoints)
        log.info("checkpoint written: %s (epoch %d, step %d)", path, epoch + 1, step)

    def resume(self, state: dict[str, Any]) -> None:
        """Continue exactly where the checkpoint ``state`` left off (every rank calls this)."""
        if state["shard_sizes"] != self.sizes:
            raise ValueError(
                f"the checkpoint was written for shards of {state['shard_sizes']} rows but this "
                f"fit's agents hold {self.sizes}: the input data changed. Resume with the same "
                "DataFrame, or start a new run in an empty checkpoint_dir."
            )
        mine, strategy = state["ranks"][self.rank], self.strategy
        strategy.trained_module.load_state_dict(mine.get("model") or state["model"])
        strategy.optimizer.load_state_dict(mine.get("optimizer") or state["optimizer"])
        strategy.load_state_dict(mine["strategy"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.stopper is not None and state["stopper"] is not None:
            self.stopper.load_state_dict(state["stopper"], keep_weights=self.rank == 0)
        torch.set_rng_state(mine["rng"])
        if self.device.type == "cuda" and mine.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        self.history = list(state["history"])
        self.start_epoch, self.start_step = int(state["epoch"]), int(state["step"])
        self.start_loss_sum, self.updates = float(mine["loss_sum"]), int(state["updates"])

    def _train_epoch(self, epoch: int, fetch, index_device: torch.device,
                     first_step: int = 0, loss_so_far: float = 0.0) -> dict[str, Any]:
        config, model = self.config, self.strategy.module
        model.train()
        started = time.perf_counter()
        order = self.train.epoch_order(epoch, config.shuffle, config.seed, self.rank).to(index_device)
        loss_sum = torch.tensor(loss_so_far, dtype=torch.float64, device=self.device)
        heartbeat = self.heartbeat
        for step in range(first_step, self.steps):
            heartbeat.set("forward pass (model code)", epoch=epoch, step=step, updates=self.updates)
            if self.job.fail_hook is not None:
                self.job.fail_hook(self.rank, epoch, step, self.strategy.trained_module)
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            local_rows = int(index.numel())
            sync = self.is_sync_step[step]
            features, labels = fetch(index)
            with self.strategy.micro_step(sync):
                output = model(features)
                if local_rows:
                    loss = self.loss_fn(output, labels)
                    loss_sum += loss.detach().double() * local_rows
                    # Weight so that the all-reduce *average* equals the mean over all rows of
                    # the update (every agent, every accumulated micro-step), also when shards
                    # are uneven and this agent's batch is short or empty.
                    objective = loss * (local_rows * self.world_size / self.update_rows[step])
                else:
                    objective = output.sum() * 0.0  # still joins the collective with zero gradient
                heartbeat.set("backward pass and gradient synchronisation", waiting=sync, epoch=epoch, step=step,
                              updates=self.updates)
                self.strategy.step(objective, sync)
            if not sync:
                continue
            self.updates += 1
            if self.check_every and self.config.sync != "local_sgd" and self.updates % self.check_every == 0:
                check_replicas(self.strategy.trained_module, self.device, f"after update {self.updates}")
            if self.every is not None and self.every.unit == "steps" and self.updates % self.every.count == 0:
                self._checkpoint(epoch, step + 1, float(loss_sum))
        heartbeat.set("end of epoch: summing the loss over agents", waiting=True, epoch=epoch, step=None)
        totals = torch.stack([loss_sum, torch.tensor(float(self.sizes[self.rank]), dtype=torch.float64,
                                                     device=self.device)])
        dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        samples = int(totals[1].item())
        return {"train_loss": float(totals[0].item() / max(samples, 1)), "samples": samples,
                "seconds": seconds, "samples_per_s": samples / seconds if seconds > 0 else None}

    def _validate(self) -> dict[str, Any]:
        return validate(self.strategy.trained_module, self.validation, self.loss_fn,
                        self.config, self.device)


class _AsyncLoop:
    """sync='async': every agent cycles through its own shard, pushing a gradient per update
    and pulling fresh parameters, until the server has applied the run's budget of updates
    (each agent's steps per epoch × epochs, shared: a fast agent does more of them). No
    collective runs until the end, so a slow agent never stalls the others."""

    def __init__(self, job: AgentJob, strategy, train: Shard, validation: Shard, sizes: list[int],
                 rank: int, world_size: int, device: torch.device, heartbeat: Heartbeat) -> None:
        self.job, self.config, self.strategy, self.heartbeat = job, job.config, strategy, heartbeat
        self.train, self.validation, self.rank, self.device = train, validation, rank, device
        self.loss_fn = make_loss(self.config.loss)
        self._reported_epochs = 0

    def run(self) -> list[dict[str, Any]]:
        config, model, rows = self.config, self.strategy.module, self.train.num_rows
        fetch, index_device = self.train.batch_source(self.device)
        model.train()
        order, position, local_epoch, step = None, rows, -1, 0
        running = self.strategy.start()
        while running:
            batches = []
            for _ in range(config.accumulate_steps):  # one update's micro-batches
                if position >= rows:  # next pass over this agent's shard, freshly shuffled
                    local_epoch += 1
                    order = self.train.epoch_order(local_epoch, config.shuffle, config.seed,
                                                   self.rank).to(index_device)
                    position = 0
                batches.append(order[position : position + config.batch_size])
                position += len(batches[-1])
            update_rows = sum(len(index) for index in batches)
            loss_sum = 0.0
            for number, index in enumerate(batches):
                self.heartbeat.set("forward pass (model code)", epoch=local_epoch, step=step)
                if self.job.fail_hook is not None:
                    self.job.fail_hook(self.rank, local_epoch, step, self.strategy.trained_module)
                features, labels = fetch(index)
                loss = self.loss_fn(model(features), labels)
                loss_sum += float(loss.detach()) * len(index)
                last = number == len(batches) - 1
                self.heartbeat.set("backward pass, pushing the gradient and pulling parameters" if last
                                   else "backward pass", waiting=last, epoch=local_epoch, step=step)
                self.strategy.step(loss * (len(index) / update_rows), last,
                                   loss_sum=loss_sum, rows=update_rows)
                step += 1
            running = self.strategy.running
            self._report_progress()
        self.heartbeat.set("waiting for the other agents to finish", waiting=True, step=None)
        self.strategy.finish()
        self._report_progress("finishing (final parameters, validation)")  # the last pushes came from peers
        history = self.strategy.history()
        if config.has_validation:  # the master as it was at each epoch's end, on every agent
            epoch = 0
            while self.strategy.load_epoch_snapshot(epoch):
                record = validate(self.strategy.trained_module, self.validation, self.loss_fn,
                                  config, self.device)
                if history:
                    history[epoch].update(record)
                epoch += 1
        return history

    def _report_progress(self, phase: str = "forward pass (model code)") -> None:
        """Rank 0: the server's global progress (updates by every agent, finished epochs' training
        loss) for the driver's progress output; validation comes only at the end."""
        progress = self.strategy.progress()
        if progress is None:
            return
        updates, per_epoch = progress
        fields: dict[str, Any] = {}
        if updates // per_epoch > self._reported_epochs:  # an epoch ended: its record goes out
            finished = self.strategy.finished_epochs()
            self._reported_epochs = len(finished)
            fields["recent_epochs"] = finished[-RECENT_EPOCHS:]
        self.heartbeat.set(phase, epochs=self.config.epochs, steps_per_epoch=per_epoch, steps_done=updates,
                           **fields)


def validate(module: nn.Module, validation: Shard, loss_fn, config: TrainConfig,
             device: torch.device) -> dict[str, Any]:
    """Collective: loss (and accuracy for classifiers) over every agent's validation rows."""
    kind = classification_kind(config.loss)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*rows, correct, rows
    chunk = max(config.batch_size, 1024)
    module.eval()
    with torch.no_grad():
        for start in range(0, validation.num_rows, chunk):
            x = validation.features[start : start + chunk].to(device)
            y = validation.labels[start : start + chunk].to(device)
            output = module(x)
            sums[0] += loss_fn(output, y).double() * len(x)
            if kind == "multiclass":
                sums[1] += (output.argmax(dim=1) == y).sum()
            elif kind == "binary":
                sums[1] += ((output.reshape(-1) > 0) == (y.reshape(-1) > 0.5)).sum()
            sums[2] += len(x)
    module.train()
    dist.all_reduce(sums)
    record = {"val_loss": float(sums[0] / sums[2]), "val_samples": int(sums[2])}
    if kind is not None:
        record["val_accuracy"] = float(sums[1] / sums[2])
    return record


def _is_secondary(exc: BaseException) -> bool:
    """True for errors that only mean a peer went away (broken collective or store)."""
    if isinstance(exc, (LocalPeerError, getattr(dist, "DistError", ()))):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Gloo", "gloo", "Connection closed by peer", "Connection reset", "NCCL")
    )


def _raise_agent_failure(rank: int, exc: BaseException) -> None:
    abort_local_peers(rank)  # agents waiting for this one's gradients in shared memory stop now
    secondary = _is_secondary(exc)
    info = {
        "rank": rank,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "secondary": secondary,
    }
    if secondary:
        destroy_group_within(FAILURE_TEARDOWN_SECONDS)
        time.sleep(SECONDARY_FAILURE_DELAY)
    raise AgentFailure(info) from exc


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def load_checkpoint_everywhere(path: str, rank: int) -> dict[str, Any]:
    """Collective: rank 0 reads the checkpoint and every rank receives it (no shared
    filesystem needed for reading)."""
    holder = [read_checkpoint(path) if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS counter (Linux), so a reused Python worker reports this fit's."""
    try:
        with open("/proc/self/clear_refs", "w") as out:
            out.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since ``reset_peak_rss`` (VmHWM; 0 if unknown)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _log_memory(where: str) -> None:
    if log.isEnabledFor(logging.DEBUG):
        status = open("/proc/self/status").read() if os.path.exists("/proc/self/status") else ""
        fields = dict(line.split(":", 1) for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM")))
        log.debug("memory %s: RSS %s, peak %s", where, fields.get("VmRSS", "?").strip(), fields.get("VmHWM", "?").strip())


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Have glibc serve allocations above ``threshold`` bytes with their own mmap.

    glibc raises its mmap threshold after large blocks are freed, after which the shard's
    pieces (megabytes each) come from the heap and freeing them does not lower RSS: the
    shard's peak would be two copies instead of one. A fixed threshold keeps each piece's
    memory returnable the moment it is copied into the shard. No-op without glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (also turns off its dynamic adjustment)
    except (OSError, AttributeError):
        pass


def destroy_group_within(seconds: float) -> None:
    """Destroy the default process group, if any, waiting at most ``seconds`` for it.

    A teardown that blocks (a peer still inside a collective) goes on in a daemon thread; the
    next agent in this Python worker destroys a group that is still left, and a worker that
    exits takes it along.
    """
    if not dist.is_initialized():
        return
    import threading

    teardown = threading.Thread(target=dist.destroy_process_group, daemon=True, name="spark-ddl-teardown")
    teardown.start()
    teardown.join(seconds)
    if teardown.is_alive():
        log.warning("the process group's teardown is still blocked after %.0f s; reporting the error first",
                    seconds)
