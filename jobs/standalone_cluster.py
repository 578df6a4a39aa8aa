"""Start or stop a real Spark standalone cluster on this machine: one master and N workers on
127.0.0.1, run from the installed pyspark (``spark-class …deploy.master.Master`` / ``…Worker``).

    python jobs/standalone_cluster.py start --workers 2 --state /tmp/ddl-cluster   # prints the master URL
    spark-submit --master "$(cat /tmp/ddl-cluster/master_url)" jobs/train.py --workers 2
    python jobs/standalone_cluster.py stop --state /tmp/ddl-cluster

``start`` returns once every worker has registered with the master (or fails with the logs'
tails after ``--timeout`` seconds); the processes, their logs and the master URL live in the
state directory, which ``stop`` uses to terminate them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def spark_home() -> Path:
    import pyspark

    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(state: Path) -> dict[str, str]:
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_DIR=str(state / "logs"),
               SPARK_WORKER_DIR=str(state / "work"), PYSPARK_PYTHON=os.environ.get("PYSPARK_PYTHON", sys.executable))
    env.setdefault("SPARK_HOME", str(spark_home()))
    return env


def _launch(state: Path, name: str, args: list[str]) -> int:
    log = open(state / "logs" / f"{name}.log", "wb")
    process = subprocess.Popen([str(spark_home() / "bin" / "spark-class"), *args], stdout=log,
                               stderr=subprocess.STDOUT, env=_environment(state), start_new_session=True)
    (state / f"{name}.pid").write_text(str(process.pid))
    return process.pid


def alive_workers(webui_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{webui_port}/json/", timeout=2) as response:
            status = json.load(response)
    except (OSError, ValueError):
        return -1
    return sum(1 for worker in status.get("workers", []) if worker.get("state") == "ALIVE")


def start(state: Path, workers: int, cores: int, memory: str, timeout: float) -> str:
    """Start the master and ``workers`` workers; return the master URL once all registered."""
    (state / "logs").mkdir(parents=True, exist_ok=True)
    (state / "work").mkdir(exist_ok=True)
    port, webui = free_port(), free_port()
    url = f"spark://127.0.0.1:{port}"
    _launch(state, "master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                              "--port", str(port), "--webui-port", str(webui)])
    for number in range(workers):
        _launch(state, f"worker-{number}", ["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                            "--cores", str(cores), "--memory", memory, "--webui-port", "0",
                                            "--work-dir", str(state / "work"), url])
    deadline = time.monotonic() + timeout
    while alive_workers(webui) < workers:
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                              for p in sorted((state / "logs").glob("*.log")))
            stop(state)
            raise RuntimeError(f"the standalone cluster did not come up within {timeout:.0f} s\n{tails}")
        time.sleep(0.5)
    (state / "master_url").write_text(url)
    (state / "webui_port").write_text(str(webui))
    return url


def stop(state: Path, grace: float = 10.0) -> None:
    """Terminate every process started in ``state`` (SIGTERM, then SIGKILL after ``grace`` s)."""
    pids = []
    for pid_file in state.glob("*.pid"):
        pids.append(int(pid_file.read_text()))
        pid_file.unlink()
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _running(pid):
            _signal_group(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the launcher script and its JVM share the new session's group
    except (ProcessLookupError, PermissionError):
        pass


def _running(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:  # not our child (stop from another process): ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--state", default="/tmp/spark_ddl-standalone", help="directory for pids, logs, URL")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1, help="cores per worker")
    parser.add_argument("--memory", default="1g", help="memory per worker")
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv)
    state = Path(args.state)
    if args.action == "start":
        print(start(state, args.workers, args.cores, args.memory, args.timeout))
    else:
        stop(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
