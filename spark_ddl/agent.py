"""Executor side: one barrier task = one agent that trains its replica with its peers.

``run_agent`` is what ``mapInArrow`` calls for each partition. It reads the shard, meets the
other agents, agrees on the number of steps, trains with the chosen sync strategy, and rank 0
yields the result (history + weights, in chunks) after every rank has left the group.
"""

from __future__ import annotations

import gc
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
from spark_ddl.config import TrainConfig
from spark_ddl.devices import select_device, task_gpu_addresses
from spark_ddl.errors import AgentFailure
from spark_ddl.objectives import label_dtype, make_loss, make_optimizer
from spark_ddl.rendezvous import environment_fingerprint, init_process_group, rendezvous
from spark_ddl.shard import Shard, global_batch_sizes, steps_per_epoch
from spark_ddl.sync import make_strategy

log = logging.getLogger("spark_ddl.agent")

# Seconds a rank whose error is only a consequence of a peer's failure (a broken collective)
# waits before raising, so that the peer's own error reaches the driver first.
SECONDARY_FAILURE_DELAY = 3.0
# Seconds the GIL is released between the final barrier and the process group's teardown.
GLOO_QUIESCE_SECONDS = 0.1


@dataclass
class AgentJob:
    """What the driver ships to every agent (pickled with the task closure)."""

    config: TrainConfig
    module_bytes: bytes | None = None  # cloudpickled nn.Module, or
    class_path: str | None = None  # "package.module:Class" built with class_kwargs
    class_kwargs: dict[str, Any] = field(default_factory=dict)
    fail_hook: Any = None  # tests only: callable(rank, epoch, step) run before each step

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
    result: list[pa.RecordBatch] = []
    try:
        result = _train(job, context, batches)
    except Exception as exc:
        _raise_agent_failure(rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    yield from result


def _train(job: AgentJob, context, batches: Iterator[pa.RecordBatch]) -> list[pa.RecordBatch]:
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

    shard = Shard.from_arrow(batches, label_dtype(config.loss))
    info = {
        "rows": shard.num_rows,
        "feature_dim": shard.feature_dim,
        "host": os.uname().nodename,
        "device": plan.device,
        "fingerprint": environment_fingerprint(plan.backend),
    }
    rdv = rendezvous(context, info, config.timeout)
    sizes = [int(p["rows"]) for p in rdv.peers]
    dims = {p["feature_dim"] for p in rdv.peers if p["feature_dim"] is not None}
    if sum(sizes) == 0:
        raise ValueError("the training DataFrame is empty: every partition has 0 rows")
    if len(dims) > 1:
        raise ValueError(f"agents hold feature arrays of different lengths: {sorted(dims)}")
    shard = shard.with_feature_dim(dims.pop())
    init_process_group(rdv, plan.backend, config.timeout)

    module = job.build_module().to(device)
    strategy = make_strategy(config.sync, device)
    strategy.setup(
        module,
        lambda params: make_optimizer(config.optimizer, params, config.lr, config.optimizer_kwargs),
    )
    loss_fn = make_loss(config.loss)
    history = _train_epochs(job, strategy, loss_fn, shard, sizes, rank, rdv.world_size, device)
    strategy.finish()

    weights = state_dict_to_bytes(strategy.trained_module) if rank == 0 else b""
    _leave_group(strategy)
    if rank != 0:
        return []
    summary = {"history": history, "world_size": rdv.world_size, "shard_sizes": sizes,
               "feature_dim": shard.features.shape[1],
               "device": plan.device, "backend": plan.backend, "threads_per_agent": threads}
    return [
        *output_batches("summary", 0, json.dumps(summary).encode()),
        *output_batches("weights", 0, weights),
    ]


def _train_epochs(
    job: AgentJob,
    strategy,
    loss_fn,
    shard: Shard,
    sizes: list[int],
    rank: int,
    world_size: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    config = job.config
    steps = steps_per_epoch(sizes, config.batch_size)
    batch_totals = global_batch_sizes(sizes, config.batch_size, steps)
    features, labels = shard.features.to(device), shard.labels.to(device)
    history: list[dict[str, Any]] = []
    model = strategy.module
    model.train()
    for epoch in range(config.epochs):
        started = time.perf_counter()
        order = shard.epoch_order(epoch, config.shuffle, config.seed, rank).to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for step in range(steps):
            if job.fail_hook is not None:
                job.fail_hook(rank, epoch, step)
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            local_rows = int(index.numel())
            output = model(features[index])
            if local_rows:
                loss = loss_fn(output, labels[index])
                loss_sum += loss.detach().double() * local_rows
                # Weight so that the all-reduce *average* equals the mean over the global batch,
                # also when shards are uneven and this agent's batch is short or empty.
                objective = loss * (local_rows * world_size / batch_totals[step])
            else:
                objective = output.sum() * 0.0  # still joins the collective with zero gradient
            strategy.step(objective)
        totals = torch.stack([loss_sum, torch.tensor(float(sizes[rank]), dtype=torch.float64, device=device)])
        dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        samples = int(totals[1].item())
        history.append({
            "epoch": epoch + 1,
            "train_loss": float(totals[0].item() / max(samples, 1)),
            "samples": samples,
            "seconds": seconds,
            "samples_per_s": samples / seconds if seconds > 0 else None,
        })
    return history


def _leave_group(strategy) -> None:
    """Leave the process group together, without the teardown deadlock of gloo.

    Every rank reaches one final barrier before anyone tears down. Then a short pause lets
    gloo's worker threads finish releasing the last work item (that needs the GIL): the
    process group's destructor joins those threads while this thread holds the GIL, so a
    worker still waiting for the GIL there would deadlock (seen with torch 2.13). Only then
    are the DDP wrapper and the group dropped, the group last.
    """
    dist.barrier()
    time.sleep(GLOO_QUIESCE_SECONDS)
    strategy.close()
    gc.collect()
    dist.destroy_process_group()


def _is_secondary(exc: BaseException) -> bool:
    """True for errors that only mean a peer went away (broken collective or store)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Gloo", "gloo", "Connection closed by peer", "Connection reset", "NCCL")
    )


def _raise_agent_failure(rank: int, exc: BaseException) -> None:
    secondary = _is_secondary(exc)
    info = {
        "rank": rank,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "secondary": secondary,
    }
    if secondary:
        if dist.is_initialized():
            dist.destroy_process_group()
        time.sleep(SECONDARY_FAILURE_DELAY)
    raise AgentFailure(info) from exc
