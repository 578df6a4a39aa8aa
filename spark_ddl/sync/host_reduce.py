"""Gradient averaging through one flat buffer, with shared memory between co-located agents.

The CPU path of ``sync="allreduce"`` (``allreduce_impl="flat"``): no DDP. Every trainable
parameter's ``.grad`` is a view into one flat buffer, so backward writes the gradients
straight into it. Agents on one machine (same host name, boot and PID namespace) share one file in
``/dev/shm`` that holds a gradient *slot* per local agent plus a *result*: the slot is the
agent's flat buffer. ``average()`` then

1. waits until every local agent finished its backward (a barrier in the shared file),
2. lets local agent ``j`` sum chunk ``j`` of all slots into the result (memory bandwidth,
   no sockets, each agent a ``1/L`` share),
3. with agents on several machines: each machine's leader all-reduces the result with the
   other leaders over gloo (one message per machine instead of one per agent),
4. after a second barrier, every agent copies the result divided by the world size back into
   its slot, where the optimiser reads it.

The local barrier spins on per-agent counters in the file (yielding the core, then sleeping
when a wait gets long): a gloo barrier's round trips through sockets and worker threads cost
more than the whole reduction on a 2-core box. Spinning relies on x86-64's store order; other
CPUs use a gloo barrier of the local group. A waiting agent gives up when a local peer's
process exits, when a local peer reports its own failure (``abort_local_peers``), or after
the timeout. When the shared file cannot be
made (no ``/dev/shm``, too little room in it, agents that look co-located but do not see the
same file), every agent counts as its own machine: a gloo all-reduce of the flat buffer.
"""

from __future__ import annotations

import logging
import mmap
import os
import platform
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

SHARED_MEMORY_DIR = "/dev/shm"
_TOKEN_BYTES = 32  # the run's token opens the file, so an agent can tell it mapped its leader's file
SPIN_BARRIER = platform.machine().lower() in ("x86_64", "amd64")  # needs total store order
_SPIN_SECONDS = 0.002  # busy-wait (yielding the core) this long, then sleep between looks
_LIVENESS_SECONDS = 0.2  # how often a waiting agent checks that its local peers still run
_ACTIVE_REDUCERS: "weakref.WeakSet[FlatGradientReducer]" = weakref.WeakSet()


class LocalPeerError(RuntimeError):
    """A local peer exited, failed, or did not arrive in time while this agent waited for it."""


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def abort_local_peers(rank: int) -> None:
    """After ``rank`` (this process) failed: tell the agents waiting in its shared gradient
    files, and release them (gradient views, mappings) now rather than at garbage collection."""
    for reducer in list(_ACTIVE_REDUCERS):
        reducer.abort(rank)
        reducer.close()


def host_key() -> str:
    """What identifies agents that can share memory and see each other's processes: host name,
    boot id and PID namespace (containers that share a host name are not one machine here)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
    except OSError:
        boot_id = "?"
    try:
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_namespace = "?"
    return f"{os.uname().nodename}/{boot_id}/{pid_namespace}"


@dataclass(frozen=True)
class HostLayout:
    """Which ranks share a machine, as every rank computes it from the same host keys."""

    hosts: list[list[int]]  # ranks per machine, machines ordered by their lowest rank
    rank: int

    @classmethod
    def from_keys(cls, keys: list[str], rank: int) -> "HostLayout":
        by_key: dict[str, list[int]] = {}
        for r, key in enumerate(keys):
            by_key.setdefault(key, []).append(r)
        return cls(sorted(by_key.values()), rank)

    @classmethod
    def one_per_host(cls, world_size: int, rank: int) -> "HostLayout":
        return cls([[r] for r in range(world_size)], rank)

    @property
    def local_ranks(self) -> list[int]:
        return next(h for h in self.hosts if self.rank in h)

    @property
    def local_index(self) -> int:
        return self.local_ranks.index(self.rank)

    @property
    def leaders(self) -> list[int]:
        return [h[0] for h in self.hosts]


def _sum_rows(rows: torch.Tensor, out: torch.Tensor) -> None:
    """``out = rows[0] + rows[1] + ...``, left to right: element-wise adds stream through memory
    several times faster than ``torch.sum(rows, dim=0)`` over a slice of a few long rows."""
    if len(rows) == 1:
        out.copy_(rows[0])
        return
    torch.add(rows[0], rows[1], out=out)
    for row in rows[2:]:
        out.add_(row)


def _all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (a collective)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


class _SharedFile:
    """The mapped file of one machine: a header of int64 words (token, abort word, one barrier
    counter and one pid per local agent), then ``slots`` rows of ``numel``, then the result row."""

    def __init__(self, path: str, token: bytes, slots: int, numel: int, dtype: torch.dtype, create: bool) -> None:
        words = _TOKEN_BYTES // 8 + 1 + 2 * slots
        header_bytes = -(-words * 8 // 64) * 64
        itemsize = torch.empty(0, dtype=dtype).element_size()
        size = header_bytes + (slots + 1) * numel * itemsize
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, size)  # ENOSPC now, not SIGBUS at the first touch
                os.pwrite(fd, token, 0)
            elif os.fstat(fd).st_size != size or os.pread(fd, len(token), 0) != token:
                raise OSError(f"{path} is not this run's gradient file")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        header = np.frombuffer(self._map, dtype=np.int64, count=words)
        self._abort = header[_TOKEN_BYTES // 8:_TOKEN_BYTES // 8 + 1]  # failed rank + 1; 0: none
        self.counters = header[_TOKEN_BYTES // 8 + 1:_TOKEN_BYTES // 8 + 1 + slots]
        self.pids = header[_TOKEN_BYTES // 8 + 1 + slots:]
        whole = torch.frombuffer(self._map, dtype=dtype, count=(slots + 1) * numel, offset=header_bytes)
        self.slots = whole[: slots * numel].view(slots, numel)
        self.result = whole[slots * numel:]

    def abort(self, rank: int) -> None:
        if not self._abort[0]:  # the first failure is the cause; later ones follow from it
            self._abort[0] = rank + 1

    def aborted_by(self) -> int | None:
        value = int(self._abort[0])
        return value - 1 if value else None

    def close(self) -> None:
        del self.slots, self.result, self.counters, self.pids, self._abort  # views of the mapping
        try:
            self._map.close()
        except BufferError:  # a tensor view still lives somewhere: the mapping goes with it
            pass


class FlatGradientReducer:
    """Owns the flat gradient buffer behind ``params``' ``.grad`` and averages it across all ranks."""

    def __init__(self, params: Iterable[nn.Parameter], host_keys: list[str], timeout: float = 300.0,
                 directory: str = SHARED_MEMORY_DIR, spin: bool = SPIN_BARRIER) -> None:
        self._timeout = timeout
        self._spin = spin
        self._generation = 0
        self._params = [p for p in params if p.requires_grad]
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) != 1 or any(p.device.type != "cpu" for p in self._params):
            raise ValueError("the flat gradient buffer needs CPU parameters of one dtype")
        self._dtype = dtypes.pop()
        self.numel = sum(p.numel() for p in self._params)
        self.world_size = dist.get_world_size()
        rank = dist.get_rank()
        self._file: _SharedFile | None = None
        self._shared = False
        if len(host_keys) != self.world_size:
            raise ValueError(f"{len(host_keys)} host keys for {self.world_size} ranks")
        layout = HostLayout.from_keys(host_keys, rank)
        if any(len(h) > 1 for h in layout.hosts):
            layout = self._open_shared_file(layout, directory)
        self.layout = layout
        self._local_group = self._leader_group = None
        # every rank creates every group, in the same order (torch requires it)
        for ranks in layout.hosts:
            group = dist.new_group(ranks, backend="gloo") if len(ranks) > 1 else None
            if rank in ranks:
                self._local_group = group
        if len(layout.hosts) > 1:
            group = dist.new_group(layout.leaders, backend="gloo") if len(layout.hosts) < self.world_size else None
            if rank in layout.leaders:
                self._leader_group = group if group is not None else dist.group.WORLD
        if self._file is not None:
            self.flat = self._file.slots[layout.local_index]
            local = len(layout.local_ranks)
            chunk = -(-self.numel // local)
            self._chunk = slice(layout.local_index * chunk, min(self.numel, (layout.local_index + 1) * chunk))
            self._file.pids[layout.local_index] = os.getpid()
            self._local_barrier()  # every local pid is written
        else:
            self.flat = torch.zeros(self.numel, dtype=self._dtype)
        self.flat.zero_()
        offset = 0
        for p in self._params:
            p.grad = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self._addresses = [p.grad.data_ptr() for p in self._params]
        _ACTIVE_REDUCERS.add(self)

    def abort(self, rank: int) -> None:
        """Make the local peers waiting in the shared file raise LocalPeerError naming ``rank``."""
        if self._file is not None:
            self._file.abort(rank)

    @property
    def shared_memory(self) -> bool:
        """Whether the agents of every machine with several agents exchange gradients through shared memory."""
        return self._shared

    def _open_shared_file(self, layout: HostLayout, directory: str) -> HostLayout:
        """Map this machine's file (collective); the layout to use (one rank per host if any rank failed).

        Every rank runs the same collectives whatever fails locally, and a leader removes the
        file's name on every path (it is needed only until every local agent mapped it).
        """
        token = [secrets.token_hex(16) if layout.rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        local = layout.local_ranks
        leader = local[0]
        creates = len(local) > 1 and layout.rank == leader
        path = os.path.join(directory, f"spark-ddl-grad-{token[0]}-{leader}")
        opened, problem = None, ""

        def open_file(create: bool) -> None:
            nonlocal opened, problem
            try:
                opened = _SharedFile(path, token[0].encode(), len(local), self.numel, self._dtype, create=create)
            except Exception as error:  # noqa: BLE001 - any failure means: use gloo, on every rank
                problem = f"{path}: {type(error).__name__}: {error}"

        try:
            if creates:
                open_file(create=True)
            if _all_true(opened is not None or not creates):
                if len(local) > 1 and not creates:
                    open_file(create=False)
                shared = _all_true(opened is not None or len(local) == 1)
            else:
                shared = False
            dist.barrier()  # everyone mapped it (or gave up): the name can go
        finally:
            if creates:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self._shared = shared
        if shared:
            self._file = opened
            return layout
        if opened is not None:
            opened.close()
        if problem:
            log.warning("gradients go over gloo instead of shared memory (on every machine): %s", problem)
        return HostLayout.one_per_host(self.world_size, layout.rank)

    def average(self) -> None:
        """Replace every rank's gradients by their mean over all ranks (collective)."""
        if any(p.grad is None or p.grad.data_ptr() != address for p, address in zip(self._params, self._addresses)):
            raise RuntimeError(
                "a parameter's .grad no longer points into the flat gradient buffer (something set it to "
                "None or replaced it, e.g. optimizer.zero_grad() with set_to_none=True); with "
                "allreduce_impl='flat' gradients must be zeroed in place. Use allreduce_impl='ddp' otherwise."
            )
        if self._file is not None:
            self._local_barrier()  # every local slot holds its gradients
            _sum_rows(self._file.slots[:, self._chunk], self._file.result[self._chunk])
            result = self._file.result
            self._local_barrier()  # the local sum is complete
            if self._leader_group is not None:
                dist.all_reduce(result, group=self._leader_group)
            if len(self.layout.hosts) > 1:
                self._local_barrier()  # the leaders' sum is complete
            self._mean(result, self.flat)
        else:
            if self._leader_group is not None:
                dist.all_reduce(self.flat, group=self._leader_group)
            self._mean(self.flat, self.flat)  # the same operation: the same bits

    def _mean(self, total: torch.Tensor, out: torch.Tensor) -> None:
        """``out = total / world_size``; for a power of two as a multiplication (the same bits, faster)."""
        if self.world_size & (self.world_size - 1) == 0:
            torch.mul(total, 1.0 / self.world_size, out=out)
        else:
            torch.div(total, self.world_size, out=out)

    def _local_barrier(self) -> None:
        """Wait until every agent on this machine arrived here as often as this one."""
        if not self._spin:
            dist.barrier(group=self._local_group)
            return
        assert self._file is not None
        self._generation += 1
        generation, counters = self._generation, self._file.counters
        counters[self.layout.local_index] = generation  # the slot/result writes before it are visible first
        started = time.monotonic()
        next_check = started + _LIVENESS_SECONDS
        while counters.min() < generation:
            now = time.monotonic()
            if now - started < _SPIN_SECONDS:
                os.sched_yield()
                continue
            time.sleep(0.0002 if now - started < 1.0 else 0.002)
            if now >= next_check:
                next_check = now + _LIVENESS_SECONDS
                self._check_local_peers(generation, now - started)

    def _check_local_peers(self, generation: int, waited: float) -> None:
        assert self._file is not None
        local = self.layout.local_ranks
        failed = self._file.aborted_by()
        if failed is not None:
            raise LocalPeerError(f"rank {failed} on this machine failed while rank {self.layout.rank} "
                                 "waited for its gradients")
        behind = [r for r, count in zip(local, self._file.counters) if count < generation]
        for r in behind:
            pid = int(self._file.pids[local.index(r)])
            if pid <= 0:  # not written yet (the first barrier)
                continue
            if not _process_alive(pid):
                raise LocalPeerError(f"rank {r} on this machine (pid {pid}) exited while rank "
                                     f"{self.layout.rank} waited for its gradients")
        if waited > self._timeout:
            raise LocalPeerError(f"rank(s) {behind} on this machine did not reach the gradient exchange "
                                 f"within timeout={self._timeout:g} s")

    def adopt_gradients(self) -> None:
        """Copy gradients that no longer live in the buffer (replaced, or set to None by
        ``zero_grad(set_to_none=True)``) back into it, and point ``.grad`` at the views again:
        for callers that do not control how gradients are zeroed (``spark_ddl.run``)."""
        offset = 0
        for param, address in zip(self._params, self._addresses):
            view = self.flat[offset:offset + param.numel()].view_as(param)
            if param.grad is None:
                view.zero_()
            elif param.grad.data_ptr() != address:
                view.copy_(param.grad)
            param.grad = view
            offset += param.numel()

    def zero(self) -> None:
        """Zero the gradients in place (never ``set_to_none``: the views must stay)."""
        self.flat.zero_()

    def close(self) -> None:
        """Detach the gradients from the buffer and unmap the shared file (again: no-op)."""
        if not hasattr(self, "flat"):
            return
        _ACTIVE_REDUCERS.discard(self)
        for p in self._params:
            p.grad = None
        del self.flat
        if self._file is not None:
            self._file.close()
            self._file = None
        self._local_group = self._leader_group = None
