"""The agents' rendezvous, served by the driver's status channel.

Spark's own rendezvous for barrier tasks (``BarrierTaskContext.allGather``) polls for its
answer once a second, so every fit paid about a second there before any work began (measured:
1.00 s per call in ``local[2]``). Each agent instead opens a connection to the driver when its
task starts (so an unreachable driver is found before the partition is read), later sends its
message and gets every rank's back as soon as the last one arrives.

A rendezvous is keyed by the barrier stage; a rank that arrives again (Spark re-ran the stage)
starts a new round. Ranks that do not arrive within the agents' timeout are named in the answer.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

MAX_MESSAGE_BYTES = 64 * 2**20  # one rank's message (an elastic attempt's parts lists can be long)


@dataclass
class _Round:
    """One rendezvous of one barrier stage: the messages that arrived, by rank."""

    arrived: dict[int, Any] = field(default_factory=dict)
    superseded: bool = False  # a rank arrived again: Spark re-ran the stage


class PeerDirectory:
    """Collects one message per rank for each barrier stage and answers them all at once."""

    def __init__(self) -> None:
        self._rounds: dict[int, _Round] = {}
        self._changed = threading.Condition()
        self._closed = False

    def serve(self, rank: int, request: Any, stream: BinaryIO, reply: BinaryIO | None) -> None:
        """Serve one agent's connection: ``request`` is its hello's ``{"stage": id, "world": n,
        "timeout": s}``; its message follows on the next line."""
        try:
            stage, world, timeout = int(request["stage"]), int(request["world"]), float(request["timeout"])
            if not 0 <= rank < world:
                raise ValueError(f"rank {rank} outside a world of {world}")
        except (KeyError, TypeError, ValueError) as exc:
            self._answer(reply, {"error": f"malformed rendezvous request {request!r}: {exc}"})
            return
        line = stream.readline(MAX_MESSAGE_BYTES + 1)
        if not line:
            return  # the agent went away (its task failed or was killed)
        try:
            message = json.loads(line)
        except ValueError as exc:
            self._answer(reply, {"error": f"rank {rank}'s rendezvous message is not JSON: {exc}"})
            return
        self._answer(reply, self._meet(stage, world, rank, message, timeout))

    def _meet(self, stage: int, world: int, rank: int, message: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            meeting = self._rounds.get(stage)
            if meeting is None or rank in meeting.arrived:
                if meeting is not None:
                    meeting.superseded = True
                meeting = self._rounds[stage] = _Round()
            meeting.arrived[rank] = message
            self._changed.notify_all()
            while len(meeting.arrived) < world and not (self._closed or meeting.superseded):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(world)) - set(meeting.arrived))
                    return {"error": f"rank(s) {missing} did not reach the rendezvous within {timeout:g} s "
                                     f"(timeout); {len(meeting.arrived)} of {world} did", "timed_out": True}
                self._changed.wait(left)
            if len(meeting.arrived) < world:
                return {"error": "this rendezvous was given up: the stage ran again, or the driver ended the attempt"}
            return {"peers": [meeting.arrived[r] for r in range(world)]}

    @staticmethod
    def _answer(reply: BinaryIO | None, answer: dict[str, Any]) -> None:
        if reply is None:
            return
        try:
            reply.write((json.dumps(answer) + "\n").encode())
            reply.flush()
        except OSError:
            pass  # the agent is gone: its own error or timeout says why

    def close(self) -> None:
        """Wake every waiting connection: the attempt is over."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
