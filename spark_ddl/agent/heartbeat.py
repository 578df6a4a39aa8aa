"""Agent side of the status channel: a daemon thread that tells the driver what this agent
is doing (see ``spark_ddl.monitor``).

The training loop only assigns to ``Heartbeat.status`` (no I/O on the hot path); the thread
sends it every ``interval`` seconds, also while the training thread is blocked in a
collective or stuck in user code. Any channel error ends the thread quietly: training never
depends on it.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import deque
from typing import Any

MAX_QUEUED_LOG_RECORDS = 1000  # older records are dropped when the driver cannot keep up


class Heartbeat:
    """Reports ``status`` (phase, epoch, step, updates, waiting) for one rank."""

    def __init__(self, address: tuple[str, int] | None, secret: str | None, rank: int,
                 interval: float = 1.0) -> None:
        self.status: dict[str, Any] = {"phase": "starting", "epoch": None, "step": None,
                                       "updates": 0, "waiting": False}
        self._address, self._secret, self._rank, self._interval = address, secret, rank, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logs: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUED_LOG_RECORDS)
        self._handler: logging.Handler | None = None

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
        if self._address is not None and self._secret is not None:
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
        try:
            with socket.create_connection(self._address, timeout=10) as connection:
                connection.settimeout(10)
                send = connection.sendall
                send((json.dumps({"secret": self._secret, "rank": self._rank}) + "\n").encode())
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
