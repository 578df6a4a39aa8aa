"""Agent side of the status channel: a daemon thread that tells the driver what this agent
is doing (see ``spark_ddl.driver.monitor``).

The training loop only assigns to ``Heartbeat.status`` (no I/O on the hot path); the thread
sends it every ``interval`` seconds, also while the training thread is blocked in a
collective or stuck in user code. Any channel error ends the sending quietly: training never
depends on it.

Without a channel (none was offered, or the driver cannot be reached, as for a Spark Connect
client the executors cannot connect to) and with ``stall_timeout``, the thread watches this
agent itself: when its status has not changed for ``stall_timeout`` seconds while it was not
waiting for its peers, it interrupts the training thread (a signal; its handler raises
``AgentStalled``), so the agent fails with a report of what it was doing and the driver raises
``StallError`` as it does when it detects the stall itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections import deque
from typing import Any, Iterator

from spark_ddl.common.wire import STALLED, describe

MAX_QUEUED_LOG_RECORDS = 1000  # older records are dropped when the driver cannot keep up
STALL_SIGNAL = getattr(signal, "SIGUSR2", None)  # interrupts the training thread after a stall
_PROGRESS_KEYS = ("phase", "epoch", "step", "updates", "waiting", "steps_done")

log = logging.getLogger("spark_ddl.agent")


class AgentStalled(Exception):
    """This agent made no progress for ``stall_timeout`` seconds (raised in its training thread)."""


assert AgentStalled.__name__ == STALLED  # the driver recognises the report by this type name


class Heartbeat:
    """Reports ``status`` (phase, epoch, step, updates, waiting) for one rank."""

    def __init__(self, address: tuple[str, int] | None, secret: str | None, rank: int,
                 interval: float = 1.0, stall_timeout: float | None = None,
                 placement: list[str] | None = None) -> None:
        self.status: dict[str, Any] = {"phase": "starting", "epoch": None, "step": None,
                                       "updates": 0, "waiting": False}
        self._address, self._secret, self._rank, self._interval = address, secret, rank, interval
        self._placement = placement  # each rank's executor (host:port), told to the driver in the hello
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logs: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUED_LOG_RECORDS)
        self._handler: logging.Handler | None = None
        self.stall_timeout = stall_timeout
        self.stalled: str | None = None  # set by the watchdog: what this agent was doing when it stalled
        self._interrupt_lock = threading.Lock()
        self._main_thread: int | None = None  # the training thread, while it can be interrupted

    def set(self, phase: str, waiting: bool = False, **fields: Any) -> None:
        """Record the current phase (``waiting``: blocked on peers, not computing)."""
        status = dict(self.status, phase=phase, waiting=waiting, **fields)
        self.status = status  # one reference assignment: the sender sees old or new, whole

    def forward_logs(self, level: str | int) -> None:
        """Send this process's log records at ``level`` and above to the driver (until ``stop``)."""
        heartbeat = self

        class _Forward(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    heartbeat._logs.append({"level": record.levelname, "name": record.name,
                                            "message": record.getMessage()})
                except Exception:  # noqa: BLE001 - a log record must never break training
                    self.handleError(record)

        self._handler = _Forward(level)
        logging.getLogger().addHandler(self._handler)
        ours = logging.getLogger("spark_ddl")
        if ours.getEffectiveLevel() > self._handler.level:
            ours.setLevel(self._handler.level)

    def start(self) -> "Heartbeat":
        if (self._address is not None and self._secret is not None) or self.stall_timeout:
            self._thread = threading.Thread(target=self._run, daemon=True, name="spark-ddl-heartbeat")
            self._thread.start()
        return self

    def stop(self) -> None:
        """Send the last status and log records, and close the connection."""
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * self._interval + 1)

    def _run(self) -> None:
        if self._address is not None and self._secret is not None:
            self._send()
        if self.stall_timeout and not self._stop.is_set():
            log.info("rank %d: no status channel to the driver; this agent watches itself for stalls", self._rank)
            self._watch()

    def _send(self) -> None:
        try:
            with socket.create_connection(self._address, timeout=10) as connection:
                connection.settimeout(10)
                send = connection.sendall
                hello = {"secret": self._secret, "rank": self._rank, "placement": self._placement}
                send((json.dumps(hello) + "\n").encode())
                self._send_pending(send)
                while not self._stop.wait(self._interval):
                    self._send_pending(send)
                self._send_pending(send)  # the last status and log records
        except (OSError, ValueError, TypeError):
            return  # best effort: the driver may be unreachable; training goes on

    def _send_pending(self, send) -> None:
        """Queued log records, then the current status, as JSON lines."""
        lines = [json.dumps({"log": self._logs.popleft()}) for _ in range(len(self._logs))]
        lines.append(json.dumps(self.status))
        send(("\n".join(lines) + "\n").encode())

    # -- the watchdog (no channel) ------------------------------------------------------------

    def _watch(self) -> None:
        """Interrupt the training thread once its status stood still for stall_timeout seconds
        while it was not waiting for peers (then a peer is the one stalled, or the collective's
        own timeout ends it)."""
        seen, changed = None, time.monotonic()
        while not self._stop.wait(self._interval):
            status = self.status
            progress = tuple(status.get(key) for key in _PROGRESS_KEYS)
            now = time.monotonic()
            if progress != seen:
                seen, changed = progress, now
            elif not status.get("waiting") and now - changed >= self.stall_timeout:
                self.stalled = (f"rank {self._rank} made no progress for {now - changed:.0f} s "
                                f"(stall_timeout={self.stall_timeout:g}); rank {self._rank}: {describe(status)}")
                self._interrupt()
                return

    def _interrupt(self) -> None:
        with self._interrupt_lock:
            if self._main_thread is None or STALL_SIGNAL is None:
                log.warning("%s, but the training thread cannot be interrupted here", self.stalled)
                return
            signal.pthread_kill(self._main_thread, STALL_SIGNAL)


@contextlib.contextmanager
def interruptible(heartbeat: Heartbeat) -> Iterator[None]:
    """Within the block, the heartbeat's watchdog can interrupt this (the main) thread with
    ``AgentStalled``. Elsewhere than in a process's main thread it does nothing."""
    if STALL_SIGNAL is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_stall(signum: int, frame: Any) -> None:
        if heartbeat.stalled:
            raise AgentStalled(heartbeat.stalled)

    previous = signal.signal(STALL_SIGNAL, on_stall)
    heartbeat._main_thread = threading.get_ident()  # noqa: SLF001 - this module's own pair
    try:
        yield
    finally:
        with heartbeat._interrupt_lock:  # noqa: SLF001 - no signal can arrive after this
            heartbeat._main_thread = None  # noqa: SLF001
        signal.signal(STALL_SIGNAL, previous)
