"""Driver side of the agents' status channel, and the stall detector built on it.

Each agent's heartbeat thread (``spark_ddl.heartbeat``) connects to this server over TCP and
sends newline-delimited JSON: first ``{"secret": ..., "rank": r}``, then its status every
interval. The server accepts only connections that present this run's secret (compared in
constant time) and only JSON objects, never pickles; a malformed or oversized line is
dropped and counted, and never disturbs training. The channel is best effort: if it fails,
training goes on. A connection whose hello holds ``rendezvous`` is the agents' rendezvous
(``spark_ddl.driver.peer_directory``); when the agents cannot reach this server, the launcher
runs the attempt again with Spark's own rendezvous.

Stall detection: the driver notes when each rank's reported status last *changed* (a step
completed, a new phase began). Once every rank has reported, a run in which nothing changed
on any rank for ``stall_timeout`` seconds is stalled; the report names the ranks that were not waiting for a peer
(the ones that stalled) and what each was doing.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import socketserver
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from spark_ddl.common.wire import STREAMED_PAYLOADS, describe
from spark_ddl.driver.peer_directory import PeerDirectory
from spark_ddl.errors import TrainingError

log = logging.getLogger("spark_ddl.monitor")
agent_log = logging.getLogger("spark_ddl.agents")  # agents' own log records, re-emitted here

MAX_LINE_BYTES = 64 * 1024
UPLOAD_KINDS = STREAMED_PAYLOADS  # what rank 0 may stream here (see spark_ddl.agent.delivery)
UPLOAD_CHUNK = 4 * 1024 * 1024
STATUS_KEYS = ("phase", "epoch", "step", "updates", "waiting", "steps_per_epoch", "epochs", "recent_epochs",
               "steps_done")


class StallError(TrainingError):
    """No agent made progress for ``stall_timeout`` seconds (the job was cancelled)."""


@dataclass
class RankStatus:
    """What the driver last heard from one rank."""

    status: dict[str, Any] = field(default_factory=dict)
    heard: float = 0.0  # monotonic time of the last message
    changed: float = 0.0  # monotonic time the status last changed


class AgentMonitor:
    """A TCP server on the driver that collects the agents' status for one training job."""

    def __init__(self, host: str | None, stall_timeout: float | None) -> None:
        self.secret = secrets.token_hex(16)
        self.stall_timeout = stall_timeout
        self.ranks: dict[int, RankStatus] = {}
        self.malformed = 0
        self.refused = 0
        self.uploads: dict[str, str] = {}  # payload kind -> the local file it was received into (rank 0's)
        self.upload_errors: list[str] = []
        self._spool: str | None = None
        self.started: dict[int, float] = {}  # rank -> monotonic time its task first connected
        self.closed: set[int] = set()  # ranks whose status connection ended (finished, failed or died)
        self.placement: list[str] | None = None  # rank -> its executor's host:port (the barrier stage's placement)
        self.peers = PeerDirectory()  # the agents' rendezvous (see spark_ddl.driver.peer_directory)
        self._lock = threading.Lock()
        monitor = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 60 * 60  # a silent connection is dropped after an hour

            def handle(self) -> None:
                monitor._serve_connection(self.rfile, self.wfile, self.connection)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            block_on_close = False

        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None  # None: no channel (agents report nothing)
        if host is None:  # turned off (spark.ddl.statusHost=none)
            log.info("no status channel for this fit: progress is shown when it ends; with stall_timeout "
                     "the agents watch for stalls themselves")
            return
        for bind_host in (host, "0.0.0.0"):  # the driver's address may not be bindable (NAT, k8s)
            try:
                self._server = Server((bind_host, 0), Handler)
                break
            except OSError as exc:
                log.debug("cannot listen on %s: %s", bind_host, exc)
        if self._server is None:
            log.warning("the agents' status channel could not start: no live progress and no stall "
                        "detection for this fit; training goes on")
            return
        self.address = (host, self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True, name="spark-ddl-monitor")
        self._thread.start()

    # -- connections -----------------------------------------------------------------------

    def _serve_connection(self, stream, reply=None, connection: socket.socket | None = None) -> None:
        hello = self._read_json(stream)
        if hello is None or not hmac.compare_digest(str(hello.get("secret", "")), self.secret) or not isinstance(
            hello.get("rank"), int
        ):
            with self._lock:
                self.refused += 1
            return  # closing the connection is the whole answer
        rank = hello["rank"]
        self._note_start(rank, hello.get("placement"))
        if "rendezvous" in hello:
            if connection is not None:  # the message follows once the agent has read its partition:
                connection.settimeout(None)  # no deadline here (a dead peer's socket: TCP keepalive)
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self.peers.serve(rank, hello["rendezvous"], stream, reply)
            return
        if "upload" in hello:
            self._receive_upload(rank, hello["upload"], stream, reply)
            return
        while True:
            try:
                line = stream.readline(MAX_LINE_BYTES + 1)
            except OSError:
                line = b""
            if not line:
                with self._lock:
                    self.closed.add(rank)
                return
            message = self._parse(line)
            if message is None:
                continue
            if isinstance(message.get("log"), dict):
                self._log_agent_record(rank, message["log"])
            else:
                self._record(rank, message)

    def _note_start(self, rank: int, placement: Any) -> None:
        """``rank``'s task runs; ``placement`` (from its heartbeat): every rank's executor, host:port."""
        with self._lock:
            self.started.setdefault(rank, time.monotonic())
            if isinstance(placement, list) and all(isinstance(a, str) and len(a) < 300 for a in placement):
                self.placement = list(placement)

    def _read_json(self, stream) -> dict[str, Any] | None:
        line = stream.readline(MAX_LINE_BYTES + 1)
        return self._parse(line) if line else None

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        try:
            if len(line) > MAX_LINE_BYTES:
                raise ValueError("line too long")
            value = json.loads(line)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            return value
        except (ValueError, UnicodeDecodeError):
            with self._lock:
                self.malformed += 1
            return None

    def _log_agent_record(self, rank: int, record: dict[str, Any]) -> None:
        """Re-emit an agent's log record on the driver, prefixed with its rank."""
        level = logging.getLevelName(str(record.get("level", "INFO")))
        agent_log.log(level if isinstance(level, int) else logging.INFO, "[rank %d] %s: %s", rank,
                      str(record.get("name", "?"))[:200], str(record.get("message", ""))[:MAX_LINE_BYTES])

    def _record(self, rank: int, status: dict[str, Any]) -> None:
        now = time.monotonic()
        status = {k: status.get(k) for k in STATUS_KEYS}
        with self._lock:
            entry = self.ranks.setdefault(rank, RankStatus(changed=now))
            if status != entry.status:
                entry.status, entry.changed = status, now
            entry.heard = now

    # -- rank 0's result, streamed ---------------------------------------------------------

    def _receive_upload(self, rank: int, upload: Any, stream, reply) -> None:
        """Copy an announced payload (``{"kind": ..., "bytes": n}``, rank 0 only) from the
        connection into a local file, one chunk at a time, and answer ``{"ok": ...}``."""
        ok, error, path = False, "", None
        try:
            kind, size = str(upload["kind"]), int(upload["bytes"])
            if rank != 0 or kind not in UPLOAD_KINDS or size < 0:
                raise ValueError(f"refused upload {upload!r} from rank {rank}")
            with self._lock:
                if self._spool is None:
                    self._spool = tempfile.mkdtemp(prefix="spark_ddl-result-")
            path = os.path.join(self._spool, f"{kind}-{secrets.token_hex(6)}.bin")
            buffer = memoryview(bytearray(min(UPLOAD_CHUNK, max(size, 1))))
            with open(path, "wb") as out:
                left = size
                while left:
                    count = stream.readinto(buffer[: min(left, len(buffer))])
                    if not count:
                        raise EOFError(f"the {kind} upload ended after {size - left} of {size} bytes")
                    out.write(buffer[:count])
                    left -= count
            with self._lock:
                self.uploads[kind] = path
            ok = True
        except Exception as exc:  # noqa: BLE001 - the agent falls back to result rows; it is told why
            error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.upload_errors.append(error)
            if path is not None and os.path.exists(path) and not ok:
                os.unlink(path)
        if reply is not None:
            try:
                reply.write((json.dumps({"ok": ok, "error": error}) + "\n").encode())
                reply.flush()
            except OSError:
                pass

    def take_uploads(self) -> dict[str, str]:
        """The received payload files (the caller deletes them), forgotten here."""
        with self._lock:
            uploads, self.uploads = self.uploads, {}
        return uploads

    # -- stall detection -------------------------------------------------------------------

    def stall_error(self, num_workers: int) -> StallError | None:
        """A StallError when no rank's status changed for stall_timeout seconds, else None."""
        if self.stall_timeout is None:
            return None
        now = time.monotonic()
        with self._lock:
            ranks = {r: RankStatus(dict(s.status), s.heard, s.changed) for r, s in self.ranks.items()}
        if len(ranks) < num_workers:
            return None  # still starting: Spark's scheduling and the rendezvous have their own timeouts
        last_change = max(s.changed for s in ranks.values())
        if now - last_change < self.stall_timeout:
            return None
        silent = [r for r in ranks if now - ranks[r].heard > self.stall_timeout]
        busy = [r for r, s in ranks.items() if r not in silent and not s.status.get("waiting")]
        culprits = sorted(silent + busy) or sorted(ranks)
        details = []
        for rank in range(num_workers):
            entry = ranks[rank]
            if rank in silent:
                details.append(f"rank {rank}: stopped reporting {now - entry.heard:.0f} s ago, last in "
                               f"{describe(entry.status)}")
            else:
                details.append(f"rank {rank}: {describe(entry.status)}")
        first = culprits[0] if culprits else None
        return StallError(
            f"Training stalled: no agent made progress for {now - last_change:.0f} s "
            f"(stall_timeout={self.stall_timeout:g}). Stalled: rank(s) {culprits}.\n  "
            + "\n  ".join(details)
            + "\nThe job was cancelled. If steps can legitimately take this long, raise stall_timeout.",
            rank=first, remote_type="Stall",
            remote_message=f"rank(s) {culprits} stalled in {describe(ranks[first].status) if first in ranks else '?'}",
            retriable=True,
        )

    def missing_ranks(self, num_workers: int) -> list[int]:
        """Ranks whose task has not connected yet (not started, or started where it cannot reach us)."""
        with self._lock:
            return [r for r in range(num_workers) if r not in self.started]

    def silent_ranks(self, num_workers: int, seconds: float) -> list[int]:
        """Ranks not heard from for ``seconds``, never heard, or whose connection ended: the
        candidates for a lost machine (after a failure)."""
        now = time.monotonic()
        with self._lock:
            return [r for r in range(num_workers)
                    if r not in self.ranks or r in self.closed or now - self.ranks[r].heard > seconds]

    def wait_for_exit(self, ranks: list[int], timeout: float) -> list[int]:
        """After a cancel: wait until each of ``ranks`` has closed its status connection (its
        process is gone), at most ``timeout`` seconds; returns the ranks still connected."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                left = [r for r in ranks if r in self.ranks and r not in self.closed]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def heard_from_any(self) -> bool:
        """True once any agent has reported."""
        with self._lock:
            return bool(self.ranks)

    def status_of(self, rank: int) -> dict[str, Any]:
        """The newest status ``rank`` reported ({} before its first report)."""
        with self._lock:
            entry = self.ranks.get(rank)
            return dict(entry.status) if entry else {}

    def close(self) -> None:
        """Stop serving and close the listening socket (connections close with their agents)."""
        self.peers.close()
        if self._server is None:
            return
        for path in self.take_uploads().values():  # never collected (e.g. the job failed afterwards)
            if os.path.exists(path):
                os.unlink(path)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
