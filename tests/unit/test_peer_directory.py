"""The agents' rendezvous served by the driver's status channel, spoken to over real sockets."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from spark_ddl.driver.monitor import AgentMonitor


@pytest.fixture
def monitor():
    server = AgentMonitor("127.0.0.1", stall_timeout=None)
    yield server
    server.close()


def open_rendezvous(monitor, rank: int, world: int = 2, stage: int = 7, timeout: float = 30.0,
                    secret: str | None = None) -> socket.socket:
    """What an agent does when its task starts: connect and say which rendezvous it joins."""
    connection = socket.create_connection(monitor.address, timeout=60)
    hello = {"secret": monitor.secret if secret is None else secret, "rank": rank,
             "rendezvous": {"stage": stage, "world": world, "timeout": timeout}}
    connection.sendall((json.dumps(hello) + "\n").encode())
    return connection


def gather(connection: socket.socket, message: dict) -> dict:
    """Send this rank's message; the driver's answer."""
    with connection:
        connection.sendall((json.dumps(message) + "\n").encode())
        line = connection.makefile("rb").readline()
    return json.loads(line) if line else {}


def gather_in_thread(connection, message, answers: dict, key) -> threading.Thread:
    thread = threading.Thread(target=lambda: answers.__setitem__(key, gather(connection, message)), daemon=True)
    thread.start()
    return thread


def wait_until_arrived(monitor, arrived: dict, stage: int = 7, seconds: float = 30.0) -> None:
    """Wait (a hang guard, not a timing) until the directory holds exactly ``arrived``
    ({rank: message}) in its current round of ``stage``: an ordering, never a sleep."""
    directory = monitor.peers
    deadline = time.monotonic() + seconds
    with directory._changed:  # noqa: SLF001 - the directory's own condition: notified on every arrival
        while True:
            meeting = directory._rounds.get(stage)  # noqa: SLF001
            if meeting is not None and meeting.arrived == arrived:
                return
            left = deadline - time.monotonic()
            assert left > 0, f"the rendezvous holds {meeting and meeting.arrived}, expected {arrived}"
            directory._changed.wait(min(left, 0.1))  # noqa: SLF001


def test_every_rank_gets_every_message_in_rank_order_once_the_last_arrives(monitor):
    connections = [open_rendezvous(monitor, rank, world=3) for rank in range(3)]
    answers: dict = {}
    # ranks 2 and 0 arrive first and wait; rank 1 (the last) completes the rendezvous
    threads = [gather_in_thread(connections[r], {"rank": r, "port": 100 + r}, answers, r) for r in (2, 0)]
    wait_until_arrived(monitor, {2: {"rank": 2, "port": 102}, 0: {"rank": 0, "port": 100}})
    for thread in threads:
        thread.join(0.1)  # an answer sent (wrongly) before the last rank arrives would end the thread
    assert answers == {} and all(thread.is_alive() for thread in threads)  # both arrived; nobody answered yet
    threads.append(gather_in_thread(connections[1], {"rank": 1, "port": 101}, answers, 1))
    for thread in threads:
        thread.join(30)
    expected = [{"rank": r, "port": 100 + r} for r in range(3)]
    assert answers == {r: {"peers": expected} for r in range(3)}


def test_ranks_that_never_arrive_are_named_when_the_timeout_runs_out(monitor):
    answer = gather(open_rendezvous(monitor, 0, world=3, timeout=0.3), {"rank": 0})
    assert answer["timed_out"] and "rank(s) [1, 2] did not reach the rendezvous within 0.3 s" in answer["error"]


def test_a_stage_that_runs_again_meets_afresh(monitor):
    answers: dict = {}
    stale = gather_in_thread(open_rendezvous(monitor, 0), {"rank": 0, "try": 1}, answers, "stale")
    wait_until_arrived(monitor, {0: {"rank": 0, "try": 1}})
    # Spark re-ran the stage: rank 0 arrives again, then rank 1; the first round is given up
    again = gather_in_thread(open_rendezvous(monitor, 0), {"rank": 0, "try": 2}, answers, 0)
    wait_until_arrived(monitor, {0: {"rank": 0, "try": 2}})
    one = gather_in_thread(open_rendezvous(monitor, 1), {"rank": 1, "try": 2}, answers, 1)
    for thread in (stale, again, one):
        thread.join(30)
    assert "given up" in answers["stale"]["error"]
    assert answers[0] == answers[1] == {"peers": [{"rank": 0, "try": 2}, {"rank": 1, "try": 2}]}


def test_closing_the_monitor_releases_a_waiting_rank(monitor):
    answers: dict = {}
    waiting = gather_in_thread(open_rendezvous(monitor, 0), {"rank": 0}, answers, 0)
    wait_until_arrived(monitor, {0: {"rank": 0}})  # it waits inside the rendezvous
    monitor.close()
    waiting.join(30)
    assert not waiting.is_alive() and "given up" in answers[0]["error"]


@pytest.mark.parametrize("hello", [{"secret": "wrong", "rank": 0},
                                   {"rank": 5, "rendezvous": {"stage": 1, "world": 2, "timeout": 5}},
                                   {"rank": 0, "rendezvous": {"stage": "x", "world": 2, "timeout": 5}}])
def test_foreign_or_malformed_requests_get_no_peers(monitor, hello):
    hello = {"secret": monitor.secret, **hello}
    with socket.create_connection(monitor.address, timeout=10) as connection:
        connection.sendall((json.dumps(hello) + "\n").encode())
        connection.sendall(b'{"rank": 0}\n')
        line = connection.makefile("rb").readline()
    assert line == b"" or "malformed" in json.loads(line)["error"]  # refused, or told why
