"""Agents find each other and form one process group: through the driver's status channel
(``spark_ddl.driver.peer_directory``) when the launcher offers it, else through Spark's barrier
``allGather`` (which answers at the next whole second: about 1 s per fit)."""

from __future__ import annotations

import gc
import json
import platform
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from spark_ddl._version import __version__
from spark_ddl.common.wire import DRIVER_UNREACHABLE

CONNECT_SECONDS = 5.0  # an agent that cannot connect to the driver this fast fails: the launcher falls back
ANSWER_MARGIN_SECONDS = 30.0  # beyond the rendezvous timeout, for the driver's own answer to arrive
MAX_ANSWER_BYTES = 256 * 2**20


@dataclass
class Rendezvous:
    """What every agent knows after the rendezvous."""

    rank: int
    world_size: int
    peers: list[dict[str, Any]]  # the message every rank sent, indexed by rank
    store: dist.TCPStore
    route: str = "spark barrier"  # how they met: "driver" (its status channel) or Spark's allGather


class DriverUnreachableError(RuntimeError):
    """This agent could not open the driver's rendezvous: the launcher runs the attempt again
    with Spark's own rendezvous."""


assert DriverUnreachableError.__name__ == DRIVER_UNREACHABLE  # the launcher recognises it by this name


class DriverRendezvous:
    """This agent's connection to the driver's rendezvous, opened when its task starts (so an
    unreachable driver is found before the partition is read)."""

    def __init__(self, address: tuple[str, int], secret: str | None, task_context: Any, timeout: float) -> None:
        self.rank, self.timeout = task_context.partitionId(), timeout
        request = {"stage": task_context.stageId(), "world": len(task_context.getTaskInfos()), "timeout": timeout}
        hello = {"secret": secret, "rank": self.rank, "rendezvous": request}
        try:
            self._socket = socket.create_connection(tuple(address), timeout=CONNECT_SECONDS)
        except OSError as exc:
            raise DriverUnreachableError(
                f"rank {self.rank} cannot connect to the driver's status channel at {address[0]}:{address[1]} "
                f"({type(exc).__name__}, errno {exc.errno})") from None
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # idle while the partition is read
            self._socket.sendall((json.dumps(hello) + "\n").encode())
        except OSError as exc:
            self.close()
            raise DriverUnreachableError(f"rank {self.rank} lost the driver's status channel at once "
                                         f"({type(exc).__name__}, errno {exc.errno})") from None

    def gather(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's message, indexed by rank, once the last one has arrived at the driver."""
        self._socket.settimeout(self.timeout + ANSWER_MARGIN_SECONDS)
        try:
            self._socket.sendall((json.dumps(message) + "\n").encode())
            with self._socket.makefile("rb") as stream:
                line = stream.readline(MAX_ANSWER_BYTES)
        except socket.timeout:
            raise TimeoutError(f"rank {self.rank} had no answer from the driver's rendezvous within "
                               f"{self.timeout + ANSWER_MARGIN_SECONDS:g} s") from None
        if not line:
            raise RuntimeError(f"the driver closed rank {self.rank}'s rendezvous without an answer")
        answer = json.loads(line)
        if "error" in answer:
            raise (TimeoutError if answer.get("timed_out") else RuntimeError)(answer["error"])
        return answer["peers"]

    def close(self) -> None:
        self._socket.close()


def environment_fingerprint(backend: str) -> dict[str, str]:
    """Versions that must match on every agent for them to train together."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "spark_ddl": __version__,
        "backend": backend,
    }


def rendezvous(task_context, info: dict[str, Any], timeout: float, via: DriverRendezvous | None = None) -> Rendezvous:
    """Exchange ``info`` (which must hold a ``fingerprint``) with all peers and start the TCP store on rank 0.

    Rank 0 opens the store on a port the OS picks (port 0, so no race for a free port) and
    publishes it through the driver (``via``) or Spark's ``allGather``; the others connect to
    rank 0's host. Raises RuntimeError if the agents' environments differ.
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
    if via is not None:
        peers = via.gather(message)
    else:
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
    return Rendezvous(rank, world_size, peers, store, route="driver" if via is not None else "spark barrier")


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
