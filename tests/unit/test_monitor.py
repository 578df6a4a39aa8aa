"""The driver's status channel: only this run's agents, only JSON, never disturbed."""

from __future__ import annotations

import json
import socket
import time

import pytest

from spark_ddl.agent.heartbeat import Heartbeat
from spark_ddl.driver.monitor import MAX_LINE_BYTES, AgentMonitor


@pytest.fixture
def monitor():
    server = AgentMonitor("127.0.0.1", stall_timeout=0.5)
    yield server
    server.close()


def wait_for(condition, seconds: float = 30.0) -> None:
    """Poll until ``condition()`` holds; fail after ``seconds`` (a deadline, not a speed claim)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def send_lines(address, *lines: bytes) -> bool:
    """Send the lines; True once the server has closed the connection (it may do so early)."""
    with socket.create_connection(address, timeout=5) as connection:
        try:
            for line in lines:
                connection.sendall(line)
            connection.shutdown(socket.SHUT_WR)
            return connection.recv(1) == b""
        except OSError:  # reset / not connected: the server closed first
            return True


def test_a_connection_without_the_runs_secret_is_refused(monitor):
    closed = send_lines(monitor.address, json.dumps({"secret": "guess", "rank": 0}).encode() + b"\n",
                        json.dumps({"phase": "forged", "step": 1}).encode() + b"\n")
    assert closed
    wait_for(lambda: monitor.refused == 1)
    assert monitor.ranks == {}


def test_malformed_lines_are_dropped_and_the_channel_keeps_working(monitor):
    hello = json.dumps({"secret": monitor.secret, "rank": 1}).encode() + b"\n"
    send_lines(monitor.address, hello, b"not json\n", b"[1, 2]\n", b"\xff\xfe\n", b"x" * (MAX_LINE_BYTES + 10) + b"\n",
               json.dumps({"phase": "forward pass", "epoch": 0, "step": 4, "waiting": False}).encode() + b"\n")
    wait_for(lambda: 1 in monitor.ranks)
    assert monitor.malformed >= 4
    assert monitor.ranks[1].status["step"] == 4


def test_heartbeats_feed_the_stall_detector():
    """Ordering, not timing: no stall before every rank has reported (however long the first
    was unchanged), a stall once nothing changed for stall_timeout, and a change clears it."""
    monitor = AgentMonitor("127.0.0.1", stall_timeout=2.0)
    beats = [Heartbeat(monitor.address, monitor.secret, rank, interval=0.05) for rank in (0, 1)]
    try:
        beats[0].set("backward pass and gradient synchronisation", waiting=True, epoch=1, step=2)
        beats[0].start()
        wait_for(lambda: 0 in monitor.ranks)
        wait_for(lambda: time.monotonic() - monitor.ranks[0].changed > 2.0, seconds=30)
        assert monitor.stall_error(1) is not None  # rank 0 alone has been unchanged for long enough
        assert monitor.stall_error(2) is None  # but rank 1 has not reported yet
        beats[1].set("forward pass (model code)", epoch=1, step=2)
        beats[1].start()
        wait_for(lambda: monitor.stall_error(2) is not None, seconds=30)
        error = monitor.stall_error(2)
        assert error.rank == 1 and "rank 1: epoch 2, step 3: forward pass (model code)" in str(error)
        assert "rank 0: epoch 2, step 3: backward pass and gradient synchronisation" in str(error)
        beats[1].set("forward pass (model code)", epoch=1, step=3)  # progress
        wait_for(lambda: monitor.stall_error(2) is None, seconds=30)
    finally:
        for beat in beats:
            beat.stop()
        monitor.close()


def test_an_unreachable_driver_does_not_disturb_the_agent():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = unused.getsockname()  # bound, not listening: connections are refused
    beat = Heartbeat(address, "secret", 0, interval=0.05).start()
    wait_for(lambda: not beat._thread.is_alive(), seconds=30)  # the sender gave up on its own
    beat.set("forward pass (model code)", step=1)  # training goes on: no error
    beat.stop()
    assert beat.status["step"] == 1 and not beat._thread.is_alive()


def test_an_unbindable_driver_address_falls_back_to_all_interfaces():
    server = AgentMonitor("192.0.2.1", stall_timeout=None)  # TEST-NET: not an address of this machine
    try:
        assert server.address[0] == "192.0.2.1"  # what the agents are told
        beat = Heartbeat(("127.0.0.1", server.address[1]), server.secret, 0, interval=0.05).start()
        wait_for(lambda: 0 in server.ranks)
        beat.stop()
    finally:
        server.close()
