"""A Spark Connect server in its own process, started with the ``sbin/start-connect-server.sh``
that ships in the pyspark wheel (``--wait``: in the foreground, so it is stopped by its process
group), for tests whose client runs in the test process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pyspark

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 180.0
STOP_TIMEOUT_SECONDS = 30.0


def leave_connect_mode() -> None:
    """Forget the process-wide Spark Connect mode a ``builder.remote(...)`` session switched on
    (pyspark's functions build Connect columns while it is on), and the token a local server
    (``remote("local[N]")``) left in the environment: with it, later ``sc://`` clients speak TLS
    to a server that does not."""
    for key in ("SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE", "SPARK_REMOTE", "SPARK_CONNECT_AUTHENTICATE_TOKEN"):
        os.environ.pop(key, None)


def close_client(spark) -> None:
    """Release a Connect session on its server and close its channel, leaving the server up
    (``stop()`` of any session of ``remote("local[N]")`` stops that local server). A session left
    open makes pyspark's atexit hook call the server again at exit, retrying for minutes once the
    server is gone."""
    try:
        spark.client.release_session()
    finally:
        spark.client.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def connect_server(workdir: Path, master: str = "local[2]", conf: dict[str, str] | None = None) -> Iterator[str]:
    """Start a server on a free loopback port; yield its ``sc://`` URL; stop it (and its Python
    workers) on exit, also when the block fails. Its executors run this interpreter with the
    repository on their path (the server takes nothing from the client's environment)."""
    home = Path(pyspark.__file__).parent
    port = free_port()
    settings = {"spark.connect.grpc.binding.address": "127.0.0.1", "spark.connect.grpc.binding.port": str(port),
                "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                "spark.sql.shuffle.partitions": "2", "spark.python.worker.faulthandler.enabled": "true",
                "spark.barrier.sync.timeout": "600s", **(conf or {})}
    command = ["bash", str(home / "sbin" / "start-connect-server.sh"), "--wait", "--master", master]
    for key, value in settings.items():
        command += ["--conf", f"{key}={value}"]
    env = dict(os.environ, SPARK_HOME=str(home), PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               PYTHONPATH=str(REPO), SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_DIR=str(workdir / "logs"),
               SPARK_PID_DIR=str(workdir / "pid"), SPARK_IDENT_STRING=f"ddl-test-{port}")
    for key in ("SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE", "SPARK_REMOTE", "PYSPARK_GATEWAY_PORT",
                "SPARK_CONNECT_AUTHENTICATE_TOKEN"):
        env.pop(key, None)  # a client's settings, not the server's
    log = open(workdir / "server.log", "wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _port_open(port):
            if server.poll() is not None:
                raise RuntimeError(f"the Spark Connect server exited ({server.returncode}); see {workdir}/server.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Spark Connect server on port {port} after {START_TIMEOUT_SECONDS:.0f} s")
            time.sleep(0.25)
        yield f"sc://127.0.0.1:{port}"
    finally:
        _stop(server)
        log.close()


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (JVM, Python workers), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_SECONDS), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait  # the group's other members (workers) follow their JVM
        while time.monotonic() < deadline:
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
