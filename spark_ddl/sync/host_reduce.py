"""Gradient averaging through one flat buffer, with shared memory between co-located agents.

The CPU path of ``sync="allreduce"`` (``allreduce_impl="flat"``): no DDP. Every trainable
parameter's ``.grad`` is a view into one flat buffer, so backward writes the gradients
straight into it. Agents on one machine (same host name, boot and PID namespace) share one file in
``/dev/shm`` that holds a gradient *slot* per local agent plus a *result*: the slot is the
agent's flat buffer. ``average()`` then

1. waits until every local agent finished its backward (a barrier in the shared file),
2. lets local agent ``j`` sum chunk ``j`` of all slots into the result (memory bandwidth,
   no sockets, each agent a ``1/L`` share); on a machine that holds every rank it also scales
   the chunk to the mean and checks it for NaN/infinity while it is in cache,
3. with agents on several machines: each machine's leader all-reduces the result with the
   other leaders over gloo (one message per machine instead of one per agent); ``compression``
   (fp16, bf16, PowerSGD: ``machine_exchange``) applies here and only here, to the bytes that
   cross machines. With every agent on one machine nothing crosses: compression is a no-op and
   the result is bit for bit that of ``compression='none'``,
4. after a second barrier (a third with several machines), every agent copies the mean back
   into its slot, where the optimiser reads it.

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
import os
import secrets
import time
import weakref
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from spark_ddl.sync.finite import finite_flag
from spark_ddl.sync.machine_exchange import MachineExchange, make_exchange, ring_bytes_sent
from spark_ddl.sync.shared_memory import (AVERAGE_NOT_FINITE, MAX_CHECKED_SLOTS, SHARED_MEMORY_DIR, SPIN_BARRIER,
                                          HostLayout, LocalPeerError, SharedGradientFile, host_key, process_alive)

__all__ = ["FlatGradientReducer", "HostLayout", "LocalPeerError", "SPIN_BARRIER", "abort_local_peers", "host_key"]

log = logging.getLogger(__name__)

_SPIN_SECONDS = 0.002  # busy-wait (yielding the core) this long, then sleep between looks
_LIVENESS_SECONDS = 0.2  # how often a waiting agent checks that its local peers still run
_ACTIVE_REDUCERS: "weakref.WeakSet[FlatGradientReducer]" = weakref.WeakSet()


def abort_local_peers(rank: int) -> None:
    """After ``rank`` (this process) failed: tell the agents waiting in its shared gradient
    files, and release them (gradient views, mappings) now rather than at garbage collection."""
    for reducer in list(_ACTIVE_REDUCERS):
        reducer.abort(rank)
        reducer.close()


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


class FlatGradientReducer:
    """Owns the flat gradient buffer behind ``params``' ``.grad`` and averages it across all ranks.

    ``bind_gradients=False``: ``.grad`` is left alone and ``flat`` is only a staging buffer the
    size of ``params``, for averaging something else the same way (local SGD's parameters).
    """

    def __init__(self, params: Iterable[nn.Parameter], host_keys: list[str], timeout: float = 300.0,
                 directory: str = SHARED_MEMORY_DIR, spin: bool = SPIN_BARRIER, compression: str = "none",
                 bind_gradients: bool = True) -> None:
        self._timeout = timeout
        self._bound = bind_gradients
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
        self._file: SharedGradientFile | None = None
        self._shared = False
        self.own_gradients_finite = True  # this rank's gradients before the last checked average
        if len(host_keys) != self.world_size:
            raise ValueError(f"{len(host_keys)} host keys for {self.world_size} ranks")
        layout = HostLayout.from_keys(host_keys, rank)
        self.machines = layout  # where the agents are (``layout``: how they exchange, after any fallback)
        # compression only where bytes cross machines: with every rank on one machine, none
        self.compression = compression if len(layout.hosts) > 1 else "none"
        self.payload_bytes = 0  # bytes of the tensors this rank handed to gloo's all-reduce at the last average
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
        self._exchange: MachineExchange | None = None  # a leader's side of the exchange between machines
        if self._leader_group is not None:
            self._exchange = make_exchange(self.compression, self._leader_group, [p.shape for p in self._params],
                                           len(layout.hosts), self.world_size, self._mean)
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
        self._addresses: list[int] = []
        if bind_gradients:
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

    def placement(self) -> dict[str, object]:
        """For a summary: shared_memory, the agents per host of the exchange (``hosts``) and the ranks on
        each machine (``machines``)."""
        return {"shared_memory": self._shared, "hosts": [len(h) for h in self.layout.hosts],
                "machines": self.machines.hosts}

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
                opened = SharedGradientFile(path, token[0].encode(), len(local), self.numel, self._dtype, create=create)
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

    def average(self, check_finite: bool = False) -> bool | None:
        """Replace every rank's gradients by their mean over all ranks (collective).

        ``check_finite``: also return whether the mean is free of NaN and infinity (the same
        answer on every rank), and set ``own_gradients_finite`` to whether this rank's own
        gradients were. On one machine the agents check their chunks of the sum while it is in
        cache and tell each other through the shared file: no extra pass over the buffer.
        """
        if self._bound and any(p.grad is None or p.grad.data_ptr() != address
                               for p, address in zip(self._params, self._addresses)):
            raise RuntimeError(
                "a parameter's .grad no longer points into the flat gradient buffer (something set it to "
                "None or replaced it, e.g. optimizer.zero_grad() with set_to_none=True); with "
                "allreduce_impl='flat' gradients must be zeroed in place. Use allreduce_impl='ddp' otherwise."
            )
        if self.world_size == 1:  # the gradients are their own mean
            if check_finite:
                self.own_gradients_finite = bool(finite_flag([self.flat]))
                return self.own_gradients_finite
            return None
        if self._file is not None and len(self.layout.hosts) == 1 and len(self.layout.local_ranks) <= MAX_CHECKED_SLOTS:
            return self._average_on_one_machine(check_finite)
        own = bool(finite_flag([self.flat])) if check_finite else None
        if self._file is not None:
            self._local_barrier()  # every local slot holds its gradients
            _sum_rows(self._file.slots[:, self._chunk], self._file.result[self._chunk])
            result = self._file.result
            self._local_barrier()  # the local sum is complete
            self._across_machines(result)
            self._local_barrier()  # the leaders' sum (or, compressed, their mean) is complete
            if self.compression == "none":
                self._mean(result, self.flat)
            else:
                self.flat.copy_(result)
        else:
            self._across_machines(self.flat)
            if self.compression == "none":
                self._mean(self.flat, self.flat)  # the same operation: the same bits
        if not check_finite:
            return None
        finite = bool(finite_flag([self.flat]))
        self.own_gradients_finite = bool(own)
        return finite

    def _across_machines(self, total: torch.Tensor) -> None:
        """A leader: combine this machine's sum ``total`` with the other machines' (in place: their
        sum, or with compression their mean). Other ranks: nothing."""
        if self._exchange is not None:
            self._exchange(total)
            self.payload_bytes = self._exchange.payload_bytes

    @property
    def bytes_across_machines(self) -> int:
        """What this rank sent to the other machines' leaders at the last average: the bytes of the
        tensors it handed to gloo (``payload_bytes``), counted as a ring all-reduce sends them:
        2·(n − 1)/n of them for n leaders, so the payload once for two. 0 on a rank that is not a
        leader, and on one machine (also where its agents fell back to gloo: over loopback)."""
        if len(self.machines.hosts) < 2:
            return 0
        return ring_bytes_sent(self.payload_bytes, len(self.layout.hosts))

    def _average_on_one_machine(self, check_finite: bool) -> bool | None:
        """Every rank on this machine sums chunk ``local_index`` of all slots and writes its mean
        into that chunk of every slot: after the second barrier each slot (each rank's ``.grad``
        buffer) holds the whole mean. Between the barriers a rank touches only its own chunk of
        each slot, and no rank reads another's slot outside them."""
        file = self._file
        assert file is not None
        self._local_barrier()  # every local slot holds its gradients
        chunk = file.result[self._chunk]
        slots = file.slots[:, self._chunk]
        _sum_rows(slots, chunk)
        if check_finite:  # on the sum, before the slots are overwritten: finite exactly when the mean is
            file.checks[self.layout.local_index] = self._chunk_problems(chunk)
        for slot in slots:
            self._mean(chunk, slot)
        self._local_barrier()  # every chunk of the mean is in every slot
        if not check_finite:
            return None
        problems = int(np.bitwise_or.reduce(file.checks))
        self.own_gradients_finite = not problems & (1 << self.layout.local_index)
        return problems == 0

    def _chunk_problems(self, chunk: torch.Tensor) -> int:
        """This rank's check word for its chunk of the sum (0: all finite). A finite sum of the
        chunk proves it finite with one read of memory just written; otherwise look element-wise
        and, if the sum (so the mean) is not finite, at which slots were not."""
        if bool(torch.isfinite(chunk.sum())) or bool(torch.isfinite(chunk).all()):
            return 0
        assert self._file is not None
        problems = AVERAGE_NOT_FINITE
        for i, slot in enumerate(self._file.slots[:, self._chunk]):
            if not bool(torch.isfinite(slot).all()):
                problems |= 1 << i
        return problems

    def _mean(self, total: torch.Tensor, out: torch.Tensor) -> None:
        """``out = total / world_size`` (world > 1); for a power of two as a multiplication (the same
        bits, faster)."""
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
            if not process_alive(pid):
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
        if self._bound:
            for p in self._params:
                p.grad = None
        del self.flat
        if self._file is not None:
            self._file.close()
            self._file = None
        self._local_group = self._leader_group = None
        self._exchange = None
