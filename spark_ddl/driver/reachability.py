"""Who can take part in the next attempt: decided by who answered, not by Spark's executor list.

A network partition differs from a crash: a crashed machine's connections close and Spark drops
its executors at once, but a partitioned machine is silent, and Spark keeps counting its
executors (and offering their slots to a barrier stage) until ``spark.network.timeout``. So after
an attempt fails, the driver takes the ranks that went silent in it (no heartbeat for a while,
or never started), finds the executor each was placed on (every agent reports the barrier
stage's placement, ``addresses`` of ``BarrierTaskContext.getTaskInfos()``) and tries to connect
to it. An executor that does not answer within ``PROBE_SECONDS`` is unreachable: its machine is
named in the error or the attempt's record, and (classic sessions) its executors are removed
from the application so that the retry's barrier stage is not offered their slots. They are
removed without lowering the application's executor target, so a machine that comes back gets
a new executor and an elastic fit grows back onto it.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from spark_ddl.errors import TrainingError

log = logging.getLogger("spark_ddl")

PROBE_SECONDS = 5.0  # an executor that accepts no connection this fast counts as unreachable
PROBE_TRY_SECONDS = 1.5  # each connection attempt's own timeout


@dataclass(frozen=True)
class LostMachine:
    """A machine whose ranks went silent or whose connections ended during an attempt."""

    address: str  # the executor's host:port, as the barrier stage placed tasks on it
    ranks: tuple[int, ...]  # the ranks that ran there
    silent: bool  # True: the machine itself does not answer (partition, or down); False: it answers

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    def describe(self) -> str:
        ranks = ", ".join(map(str, self.ranks))
        state = "no answer from the network" if self.silent else "answers, but its executor is gone"
        return f"{self.host} (rank{'s' if len(self.ranks) > 1 else ''} {ranks}: {state})"


class MachineUnreachableError(TrainingError):
    """Machines the fit needs stopped answering (a network partition, or a machine that is
    down while Spark still counts it) or lost their executors. ``machines`` lists them."""

    def __init__(self, message: str, machines: list[LostMachine], **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.machines = machines


_SILENT_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN}


def answers(address: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether the machine of ``host:port`` answers a TCP connection within ``timeout`` seconds:
    accepted, or refused (its kernel answered; the port may be a client's, as Spark's executor
    addresses are). Silence, "host unreachable" and "network unreachable" are no answer. Tried
    again every ``PROBE_TRY_SECONDS``: a link that just came back has to resolve the address first."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(PROBE_TRY_SECONDS, left))):
                return True
        except ValueError:
            return False
        except ConnectionRefusedError:
            return True
        except OSError as exc:
            if not isinstance(exc, socket.timeout) and exc.errno not in _SILENT_ERRNOS:
                return True  # any other answer came from the machine
            if deadline - time.monotonic() <= 0:
                return False
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def ranks_to_probe(silent_ranks: list[int], failed: TrainingError) -> list[int]:
    """After a failed attempt, the ranks whose machines to probe: those that went silent, and the
    rank whose executor Spark reported lost (``AgentLost``: its status connection may not have
    closed yet when Spark's report arrives, so silence alone can miss a crashed machine)."""
    if failed.remote_type == "AgentLost" and failed.rank is not None and failed.rank not in silent_ranks:
        return sorted([*silent_ranks, failed.rank])
    return list(silent_ranks)


def lost_machines(placement: list[str] | None, silent_ranks: list[int], probe=None,
                  listening: dict[str, str] | None = None) -> list[LostMachine]:
    """The machines of ``silent_ranks`` (by ``placement``, rank -> host:port), each probed.

    ``listening`` (host -> host:port) names a port known to listen on that host, e.g. the
    executor's block manager, which the driver must reach anyway: probed instead of the
    placement's address (an executor's client port, which a firewall may drop silently)."""
    if not placement or not silent_ranks:
        return []
    by_address: dict[str, list[int]] = {}
    for rank in silent_ranks:
        if 0 <= rank < len(placement):
            by_address.setdefault(placement[rank], []).append(rank)
    addresses = sorted(by_address)
    targets = [(listening or {}).get(a.rsplit(":", 1)[0], a) for a in addresses]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(addresses)))) as pool:
        answered = dict(zip(addresses, pool.map(probe or answers, targets)))
    return [LostMachine(a, tuple(sorted(by_address[a])), silent=not answered[a]) for a in addresses]


def unreachable_error(lost: list[LostMachine], cause: TrainingError, network_timeout: str,
                      elastic: bool) -> MachineUnreachableError:
    """The error a fit ends with when machines it needs stopped answering or lost their executors."""
    names = "; ".join(m.describe() for m in lost)
    what_to_do = (
        "The machines that answer have fewer slots than min_workers: restore the network or the machine, then "
        "run the fit again with resume=True (it continues from the newest checkpoint)."
        if elastic else
        "To finish on the machines that answer, set min_workers (with checkpoint_dir and max_retries >= 1); "
        "otherwise restore the network or the machine and run the fit again (resume=True continues from the "
        "newest checkpoint).")
    silent = any(m.silent for m in lost)
    spark_note = (f" Spark itself would notice only after spark.network.timeout ({network_timeout})."
                  if silent else "")
    message = (
        f"Training lost {names}. The fit cannot go on without {'them' if len(lost) > 1 else 'it'}: the "
        f"machines that answer do not have the slots it needs.{spark_note} {what_to_do}\n"
        f"What the driver saw first: {cause}")
    return MachineUnreachableError(message, lost, rank=lost[0].ranks[0], remote_type="MachineUnreachable",
                                   remote_message=names, retriable=False)
