"""What agents on one machine share: how ranks group into machines, and the mapped file their
gradients meet in (see ``host_reduce``)."""

from __future__ import annotations

import mmap
import os
import platform
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

SHARED_MEMORY_DIR = "/dev/shm"
_TOKEN_BYTES = 32  # the run's token opens the file, so an agent can tell it mapped its leader's file
SPIN_BARRIER = platform.machine().lower() in ("x86_64", "amd64")  # needs total store order
AVERAGE_NOT_FINITE = 1 << 62  # a check word's bit: the average held a NaN or infinity
MAX_CHECKED_SLOTS = 62  # slots a check word can name


class LocalPeerError(RuntimeError):
    """A local peer exited, failed, or did not arrive in time while this agent waited for it."""


def process_alive(pid: int) -> bool:
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


def machine_keys(host_keys: list[str] | None) -> list[str]:
    """Every rank's machine key: ``host_keys``, or where none were given one key per rank (every agent
    its own machine)."""
    return host_keys or [str(r) for r in range(dist.get_world_size())]


def machines_of(host_keys: list[str] | None) -> list[list[int]]:
    """The ranks on each machine (the summary's ``machines`` where no flat reducer runs)."""
    return HostLayout.from_keys(machine_keys(host_keys), dist.get_rank()).hosts


class SharedGradientFile:
    """The mapped file of one machine: a header of int64 words (token, abort word, one barrier
    counter, one pid and one check word per local agent), then ``slots`` rows of ``numel``, then
    the result row. Agent ``j``'s check word says what it found in its chunk of the step's sum:
    bit ``i`` set when slot ``i`` held a NaN or infinity there, ``AVERAGE_NOT_FINITE`` when the
    average did."""

    def __init__(self, path: str, token: bytes, slots: int, numel: int, dtype: torch.dtype, create: bool) -> None:
        words = _TOKEN_BYTES // 8 + 1 + 3 * slots
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
        self.pids = header[_TOKEN_BYTES // 8 + 1 + slots:_TOKEN_BYTES // 8 + 1 + 2 * slots]
        self.checks = header[_TOKEN_BYTES // 8 + 1 + 2 * slots:]
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
        del self.slots, self.result, self.counters, self.pids, self.checks, self._abort  # views of the mapping
        try:
            self._map.close()
        except BufferError:  # a tensor view still lives somewhere: the mapping goes with it
            pass
