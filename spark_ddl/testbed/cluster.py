"""A Spark standalone cluster of separate machines on one Linux host (see ``network``): the
master and the driver on the bridge's address, one worker per namespace machine with
``cores`` cores. Tests, ``spark-ddl bench network`` and ``spark-ddl testbed`` use it.

    with MachineCluster(machines=2, cores=2) as cluster:
        spark = cluster.session()               # the driver, in this process
        cluster.cut(2); cluster.heal(2)         # a network partition of machine 2, healed
        cluster.kill(2); cluster.revive(2)      # machine 2 crashes, then boots again
        cluster.limit(1, "100mbit")             # machine 1's link at 100 Mbit/s

Everything it starts lives in the network namespaces of its prefix or is recorded in its state
directory; ``close()`` (and the next start, for what a killed run left) removes it all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from spark_ddl.testbed.network import Network, missing_requirements

__all__ = ["MachineCluster", "missing_requirements"]


def _spark_home() -> Path:
    import pyspark

    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class MachineCluster:
    """``machines`` namespace machines × ``cores`` cores, a standalone master, and the settings
    a driver in this process needs to use them."""

    def __init__(self, machines: int = 2, cores: int = 1, memory: str = "1g", prefix: str = "ddl",
                 subnet: str = "10.77.0", state_dir: str | Path | None = None, start_timeout: float = 120.0) -> None:
        self.network = Network(machines, prefix, subnet)
        self.cores, self.memory, self.start_timeout = cores, memory, start_timeout
        self.state = Path(state_dir or Path(tempfile.gettempdir()) / f"spark_ddl-testbed-{prefix}")
        self.master_url: str | None = None
        self._master: subprocess.Popen | None = None
        self._webui_port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "MachineCluster":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> str:
        """Make the machines, start the master and a worker on each; return the master URL once
        every worker has registered."""
        reason = missing_requirements()
        if reason is not None:
            raise RuntimeError(f"cannot start separate machines here: {reason}")
        self._stop_master_of_a_killed_run()
        shutil.rmtree(self.state, ignore_errors=True)
        (self.state / "logs").mkdir(parents=True)
        try:
            self.network.create()
            host = self.network.driver_address
            port, self._webui_port = _free_port(host), _free_port(host)
            self.master_url = f"spark://{host}:{port}"
            env = self._environment(host, "master")
            with open(self.state / "logs" / "master.log", "ab") as log:
                self._master = subprocess.Popen(
                    [str(_spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master",
                     "--host", host, "--port", str(port), "--webui-port", str(self._webui_port)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            (self.state / "master.pid").write_text(str(self._master.pid))
            for machine in self.network.machines:
                self._start_worker(machine.number)
            self.wait_for_workers(len(self.network.machines))
        except BaseException:
            self.close()
            raise
        return self.master_url

    def close(self) -> None:
        """Stop every process and remove the machines (safe to call twice)."""
        self.network.destroy()
        if self._master is not None:
            _stop_group(self._master.pid, child=self._master)
            self._master.wait(10)
            self._master = None
        self._stop_master_of_a_killed_run()  # one started by another process (``spark-ddl testbed up``)

    def _stop_master_of_a_killed_run(self) -> None:
        pid_file = self.state / "master.pid"
        if pid_file.exists():
            _stop_group(int(pid_file.read_text()))
            pid_file.unlink()

    # -- the driver's side -------------------------------------------------------------------

    def spark_conf(self) -> dict[str, str]:
        """What a driver in this process sets to run its executors on the machines."""
        assert self.master_url is not None, "start() first"
        return {
            "spark.master": self.master_url,
            "spark.driver.host": self.network.driver_address,
            "spark.driver.bindAddress": self.network.driver_address,
            "spark.executor.cores": str(self.cores),
            "spark.executor.memory": "512m",
            "spark.task.cpus": "1",
            "spark.cores.max": str(self.cores * len(self.network.machines)),
        }

    def session(self, extra_conf: dict[str, str] | None = None):
        """A SparkSession of this process whose executors run on the machines (one per machine),
        returned once every executor has registered."""
        from spark_ddl.driver.session import get_or_create_session

        spark = get_or_create_session(master=self.master_url, extra_conf={**self.spark_conf(), **(extra_conf or {})})
        self.wait_for_executors(spark, len(self.network.machines))
        return spark

    def wait_for_executors(self, spark, count: int, timeout: float | None = None) -> None:
        """Wait until ``count`` executors are registered with ``spark``'s driver."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while len(executor_hosts(spark)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} executors did not register within {timeout or self.start_timeout:.0f} s "
                                   f"(have {executor_hosts(spark)}); logs under {self.state / 'logs'}")
            time.sleep(0.25)

    # -- the machines ------------------------------------------------------------------------

    def address(self, number: int) -> str:
        return self.network.machine(number).address

    def cut(self, number: int) -> None:
        """A network partition: machine ``number`` goes silent (its processes keep running)."""
        self.network.cut(number)

    def heal(self, number: int) -> None:
        self.network.heal(number)

    def limit(self, number: int, rate: str | None) -> None:
        """Cap machine ``number``'s link (e.g. '100mbit'); None lifts the cap."""
        self.network.limit(number, rate)

    def kill(self, number: int) -> None:
        """Machine ``number`` crashes: every process on it is killed at once."""
        self.network.kill(number)

    def revive(self, number: int, wait: bool = True) -> None:
        """Boot machine ``number`` again after ``kill``: a fresh worker registers with the master."""
        if self.network.pids(number):
            raise RuntimeError(f"machine {number} is still running; kill({number}) first")
        self.heal(number)
        self._start_worker(number)
        if wait:
            self.wait_for_workers(len(self.network.machines))

    def is_running(self, number: int) -> bool:
        return bool(self.network.pids(number))

    def wait_for_workers(self, count: int, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while self.alive_workers() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} workers did not register within {timeout or self.start_timeout:.0f} s\n"
                                   + self.log_tails())
            time.sleep(0.5)

    def alive_workers(self) -> int:
        """Workers registered and alive at the master (-1: the master does not answer)."""
        status = self._master_status()
        return -1 if status is None else sum(1 for w in status.get("workers", []) if w.get("state") == "ALIVE")

    def granted_cores(self) -> int:
        """Cores the master has given to running applications (their executors' cores)."""
        status = self._master_status() or {}
        return sum(int(app.get("cores", 0)) for app in status.get("activeapps", []))

    def _master_status(self) -> dict | None:
        try:
            url = f"http://{self.network.driver_address}:{self._webui_port}/json/"
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.load(response)
        except (OSError, ValueError):
            return None

    def log_tails(self, chars: int = 1500) -> str:
        return "\n".join(f"--- {p.relative_to(self.state)}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted(self.state.rglob("*.log")))

    def _start_worker(self, number: int) -> None:
        machine = self.network.machine(number)
        home = self.state / machine.name
        for sub in ("work", "local", "logs"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        env = self._environment(machine.address, machine.name)
        env.update(SPARK_WORKER_DIR=str(home / "work"), SPARK_LOCAL_DIRS=str(home / "local"))
        command = [str(_spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker",
                   "--host", machine.address, "--cores", str(self.cores), "--memory", self.memory,
                   "--webui-port", "0", "--work-dir", str(home / "work"), str(self.master_url)]
        self.network.spawn(number, command, env, self.state / "logs" / f"{machine.name}.log")

    def _environment(self, address: str, name: str) -> dict[str, str]:
        env = dict(os.environ, SPARK_LOCAL_IP=address, SPARK_LOCAL_HOSTNAME=address,
                   SPARK_LOG_DIR=str(self.state / "logs" / name),
                   PYSPARK_PYTHON=os.environ.get("PYSPARK_PYTHON", sys.executable))
        env.setdefault("SPARK_HOME", str(_spark_home()))
        return env


def executor_hosts(spark) -> list[str]:
    """The hosts of the executors registered with ``spark``'s driver (not the driver itself)."""
    infos = spark.sparkContext._jsc.sc().statusTracker().getExecutorInfos()  # noqa: SLF001
    driver = spark.sparkContext.getConf().get("spark.driver.host", "")
    hosts = [str(info.host()) for info in infos]
    if driver in hosts:
        hosts.remove(driver)  # the driver's own entry
    return hosts


def _stop_group(pid: int, grace: float = 10.0, child: subprocess.Popen | None = None) -> None:
    """SIGTERM process group ``pid``, SIGKILL it if it outlives ``grace`` seconds. ``child``: this
    process's own child leading the group, reaped while waiting (a zombie still counts as a member:
    unreaped, the group would look alive through both graces)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if child is not None:
                child.poll()
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)
