"""Rank 0's result on its way to the driver, in bounded memory on both sides.

A payload larger than one output row (the weights, the optimizer's state; a big return value of
``spark_ddl.run``) is streamed over the fit's authenticated status channel into a file on the
driver, one chunk at a time: the driver's JVM never holds it (its Python reads the weights into
the model chunk by chunk, the optimizer's state whole, once). Only when the channel
cannot be used (no address, an unreachable driver, a failed transfer) does it travel as result
rows through ``collect()``, which costs the driver's JVM several times its size; a payload
too large for that is refused with its size and the settings to change.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Union

import pyarrow as pa

from spark_ddl.common.wire import CHUNK_BYTES, ROWS_HEAP_FACTOR, STREAMED_PAYLOADS, AgentJob, output_batches
from spark_ddl.formats.weights_stream import WeightsWriter, format_size

log = logging.getLogger("spark_ddl.agent")

Payload = Union[bytes, WeightsWriter]
CONNECT_SECONDS = 10.0
REPLY_SECONDS = 600.0  # the driver writes the last chunk to its disk before it answers


class ResultTooLargeError(RuntimeError):
    """Rank 0's result could neither be streamed to the driver nor fit in its result rows."""


def deliver(job: AgentJob, payloads: dict[str, Payload]) -> list[pa.RecordBatch]:
    """Send rank 0's payloads: big ones over the status channel, the rest (and any whose
    transfer failed) as output rows, which are returned."""
    rows: list[pa.RecordBatch] = []
    for kind, payload in payloads.items():
        size = payload.size if isinstance(payload, WeightsWriter) else len(payload)
        problem = "the job has no status channel" if job.attempt.monitor_address is None else None
        if size > CHUNK_BYTES and kind in STREAMED_PAYLOADS and job.attempt.stream_results and problem is None:
            problem = _stream(job, kind, payload, size)
            if problem is None:
                continue
            log.warning("rank 0 could not stream its %s (%s) to the driver (%s); sending them as result rows",
                        kind, format_size(size), problem)
        if job.attempt.result_rows_limit is not None and size > job.attempt.result_rows_limit:
            raise ResultTooLargeError(
                f"The trained {kind} ({format_size(size)}) cannot reach the driver: streaming them failed "
                f"({problem or 'turned off'}), and as result rows they would need several times their size in the "
                f"driver's JVM heap, which allows {format_size(job.attempt.result_rows_limit)} "
                f"(spark.driver.memory and spark.driver.maxResultSize). Let the executors reach the driver's "
                "status channel (spark.driver.host must be an address they can connect to), or raise "
                f"spark.driver.memory to at least {_gigabytes(size * ROWS_HEAP_FACTOR)} "
                "and spark.driver.maxResultSize above the payload."
            )
        data = payload.to_bytes() if isinstance(payload, WeightsWriter) else payload
        rows.extend(output_batches(kind, 0, data))
    return rows


def _gigabytes(size: float) -> str:
    return f"{max(1, int(-(-size // 2**30)))}g"


def _stream(job: AgentJob, kind: str, payload: Payload, size: int) -> str | None:
    """Stream one payload to the driver; None when the driver confirmed it, else the reason."""
    try:
        with socket.create_connection(job.attempt.monitor_address, timeout=CONNECT_SECONDS) as connection:
            connection.settimeout(REPLY_SECONDS)
            hello = {"secret": job.attempt.monitor_secret, "rank": 0, "upload": {"kind": kind, "bytes": size}}
            connection.sendall((json.dumps(hello) + "\n").encode())
            if isinstance(payload, WeightsWriter):
                payload.write_to(connection.sendall)
            else:
                view = memoryview(payload)
                for start in range(0, len(view), CHUNK_BYTES):
                    connection.sendall(view[start : start + CHUNK_BYTES])
            connection.shutdown(socket.SHUT_WR)
            answer = connection.makefile("rb").readline(64 * 1024)
        reply = json.loads(answer) if answer else {"ok": False, "error": "no answer"}
        return None if reply.get("ok") else f"the driver answered: {reply.get('error') or 'not received'}"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"

