"""Separate machines on one Linux host: a network namespace per machine, joined by a bridge.

Each machine is a network namespace ``<prefix>-m<i>`` holding one end of a veth pair (``eth0``,
address ``<subnet>.<10+i>``); the other end (``<prefix>v<i>``) is a port of the bridge
``<prefix>br0`` (``<subnet>.1``, the driver's address, in the host's own namespace). Processes
started on a machine also get their own host name (UTS namespace), PID namespace (so agents on
different machines never look co-located) and ``/dev/shm``; names resolve through
``/etc/netns/<ns>/hosts`` and an empty ``resolv.conf`` (Java waits a long time on a name it cannot
resolve). Per machine, the link can be shaped (``tc tbf``), cut and healed (the host-side veth
down/up: the peer goes silent, as in a partition), and every process can be killed at once.

Needs root, ``ip`` (iproute2), ``tc`` and ``unshare`` (util-linux). ``missing_requirements()``
says exactly what is missing so that tests can skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


def missing_requirements() -> str | None:
    """Why machines cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (this process runs as uid %d)" % os.geteuid()
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (Debian package {package}: apt-get install {package})"
    probe = "ddlprobe%d" % os.getpid()
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.strip() or exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> str:
    command = ["ip", *(("-n", netns) if netns else ()), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def _quiet(*command: str) -> None:
    subprocess.run(list(command), capture_output=True)


@dataclass(frozen=True)
class Machine:
    """One namespace machine: its number (1, 2, ...), name, namespace, address and host-side link."""

    number: int
    prefix: str
    subnet: str

    @property
    def name(self) -> str:
        return f"machine-{self.number}"

    @property
    def netns(self) -> str:
        return f"{self.prefix}-m{self.number}"

    @property
    def address(self) -> str:
        return f"{self.subnet}.{10 + self.number}"

    @property
    def link(self) -> str:
        return f"{self.prefix}v{self.number}"


class Network:
    """The bridge and the machines' namespaces. ``create()`` first sweeps whatever a killed run
    of the same prefix left; ``destroy()`` removes everything and is safe to call twice."""

    def __init__(self, machines: int, prefix: str = "ddl", subnet: str = "10.77.0") -> None:
        if not 1 <= machines <= 200:
            raise ValueError(f"machines must be in 1..200, got {machines}")
        self.prefix, self.subnet = prefix, subnet
        self.machines = [Machine(i, prefix, subnet) for i in range(1, machines + 1)]
        self.bridge = f"{prefix}br0"
        self.driver_address = f"{subnet}.1"
        self.driver_name = f"{prefix}-driver"

    def create(self) -> None:
        self.sweep()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.driver_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + f"{self.driver_address} {self.driver_name}\n" + "".join(
            f"{m.address} {m.name}\n" for m in self.machines)
        for machine in self.machines:
            _ip("netns", "add", machine.netns)
            etc = NETNS_ETC / machine.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
            (etc / "resolv.conf").write_text("")
            peer = f"{self.prefix}p{machine.number}"
            _ip("link", "add", machine.link, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", machine.netns)
            _ip("link", "set", peer, "name", "eth0", netns=machine.netns)
            _ip("addr", "add", f"{machine.address}/24", "dev", "eth0", netns=machine.netns)
            _ip("link", "set", "eth0", "up", netns=machine.netns)
            _ip("link", "set", "lo", "up", netns=machine.netns)
            _ip("link", "set", machine.link, "master", self.bridge)
            _ip("link", "set", machine.link, "up")

    def sweep(self) -> None:
        """Remove every namespace, link and process of this prefix (a killed run's leftovers)."""
        for netns in self._namespaces():
            self._kill_namespace(netns)
            _quiet("ip", "netns", "del", netns)
            shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
        for number in range(1, 201):
            if Path(f"/sys/class/net/{self.prefix}v{number}").exists():
                _quiet("ip", "link", "del", f"{self.prefix}v{number}")
        if Path(f"/sys/class/net/{self.bridge}").exists():
            _quiet("ip", "link", "del", self.bridge)

    destroy = sweep

    def _namespaces(self) -> list[str]:
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        names = [line.split()[0] for line in listing.splitlines() if line.strip()]
        return [n for n in names if n.startswith(f"{self.prefix}-m") and n[len(self.prefix) + 2:].isdigit()]

    # -- per machine ------------------------------------------------------------------------

    def machine(self, number: int) -> Machine:
        return self.machines[number - 1]

    def spawn(self, number: int, command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        """Start ``command`` on machine ``number``: its namespace, its own host name, PID
        namespace and /dev/shm. Returns the ``ip netns exec`` process (it becomes ``unshare``)."""
        machine = self.machine(number)
        inner = f"hostname {machine.name} && mount -t tmpfs -o size=4g tmpfs /dev/shm && exec \"$@\""
        argv = ["ip", "netns", "exec", machine.netns, "unshare", "--uts", "--pid", "--mount", "--fork",
                "--mount-proc", "--propagation", "private", "sh", "-c", inner, "sh", *command]
        with open(log_path, "ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def pids(self, number: int) -> list[int]:
        """Host PIDs of every process on machine ``number``."""
        return self._namespace_pids(self.machine(number).netns)

    @staticmethod
    def _namespace_pids(netns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def kill(self, number: int, wait: float = 10.0) -> None:
        """Kill every process of machine ``number`` at once (SIGKILL), as a crash would."""
        self._kill_namespace(self.machine(number).netns, wait)

    def _kill_namespace(self, netns: str, wait: float = 10.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            pids = self._namespace_pids(netns)
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def cut(self, number: int) -> None:
        """Cut machine ``number``'s link: its packets no longer arrive, nor do those sent to it."""
        _ip("link", "set", self.machine(number).link, "down")

    def heal(self, number: int) -> None:
        """Reconnect machine ``number``'s link."""
        _ip("link", "set", self.machine(number).link, "up")

    def limit(self, number: int, rate: str | None) -> None:
        """Cap machine ``number``'s link at ``rate`` (tc syntax, e.g. '100mbit', '1gbit') in both
        directions, or lift the cap (None)."""
        machine = self.machine(number)
        for device, netns in ((machine.link, None), ("eth0", machine.netns)):
            prefix = ["ip", "netns", "exec", netns] if netns else []
            _quiet(*prefix, "tc", "qdisc", "del", "dev", device, "root")
            if rate is not None:
                # the bucket: ~4 ms of traffic, at most 64 KiB (at 1 Gbit/s 4 ms is 500 KB, which refills while
                # the other direction works and lets a one-way phase start at the veth's own speed)
                burst = max(32 * 1024, min(64 * 1024, _bits_per_second(rate) // 8 // 250))
                subprocess.run([*prefix, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", rate,
                                "burst", str(burst), "latency", "100ms"], check=True, capture_output=True, text=True)


def _bits_per_second(rate: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * factor)
    raise ValueError(f"link rate {rate!r}: give a number with kbit, mbit or gbit (e.g. '100mbit')")
