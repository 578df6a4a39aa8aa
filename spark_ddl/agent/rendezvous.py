"""Agents find each other through Spark's barrier allGather and form one process group."""

from __future__ import annotations

import gc
import json
import platform
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from spark_ddl._version import __version__


@dataclass
class Rendezvous:
    """What every agent knows after the rendezvous."""

    rank: int
    world_size: int
    peers: list[dict[str, Any]]  # the message every rank sent, indexed by rank
    store: dist.TCPStore


def environment_fingerprint(backend: str) -> dict[str, str]:
    """Versions that must match on every agent for them to train together."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "spark_ddl": __version__,
        "backend": backend,
    }


def rendezvous(task_context, info: dict[str, Any], timeout: float) -> Rendezvous:
    """Exchange ``info`` (which must hold a ``fingerprint``) with all peers and start the TCP store on rank 0.

    Rank 0 opens the store on a port the OS picks (port 0, so no race for a free port) and
    publishes it through ``allGather``; the others connect to rank 0's host. Raises
    RuntimeError if the agents' environments differ.
    """
    rank = task_context.partitionId()
    task_infos = task_context.getTaskInfos()
    world_size = len(task_infos)
    wait = timedelta(seconds=timeout)
    store = None
    if rank == 0:
        store = dist.TCPStore(
            "0.0.0.0", 0, world_size, is_master=True, timeout=wait, wait_for_workers=False
        )
    message = dict(info, rank=rank, store_port=store.port if store is not None else None)
    peers = [json.loads(m) for m in task_context.allGather(json.dumps(message))]
    peers.sort(key=lambda p: p["rank"])
    fingerprints = {json.dumps(p["fingerprint"], sort_keys=True) for p in peers}
    if len(fingerprints) > 1:
        table = "; ".join(f"rank {p['rank']}: {p['fingerprint']}" for p in peers)
        raise RuntimeError(f"Agents run different environments, which cannot train together: {table}")
    if store is None:
        host = task_infos[0].address.rsplit(":", 1)[0]
        store = dist.TCPStore(
            host, int(peers[0]["store_port"]), world_size, is_master=False, timeout=wait
        )
    return Rendezvous(rank, world_size, peers, store)


def init_process_group(rdv: Rendezvous, backend: str, timeout: float) -> None:
    """Join the default process group through the rendezvous store."""
    if dist.is_initialized():  # left over from a killed task in this reused Python worker
        dist.destroy_process_group()
    dist.init_process_group(
        backend,
        store=rdv.store,
        rank=rdv.rank,
        world_size=rdv.world_size,
        timeout=timedelta(seconds=timeout),
    )


# Seconds the GIL is released between the final barrier and the process group's teardown.
GLOO_QUIESCE_SECONDS = 0.1


def leave_group(release: Callable[[], None] | None = None) -> None:
    """Leave the process group together, without the teardown deadlock of gloo.

    Every rank reaches one final barrier before anyone tears down. Then a short pause lets
    gloo's worker threads finish releasing the last work item (that needs the GIL): the
    process group's destructor joins those threads while this thread holds the GIL, so a
    worker still waiting for the GIL there would deadlock (seen with torch 2.13). Only then
    does ``release`` drop other holders of the group (e.g. the DDP wrapper), and the group
    itself goes last.
    """
    dist.barrier()
    time.sleep(GLOO_QUIESCE_SECONDS)
    if release is not None:
        release()
    gc.collect()
    dist.destroy_process_group()
