"""Python workers are reused between jobs: nothing from one fit may linger into the next."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from spark_ddl import TorchEstimator, TrainingError
from tests.helpers import TinyNet, frame_with_partitions, regression_arrays


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants (for this test process: the Spark JVM, its Python
    daemon and workers, the agents), from the parent pid in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process just exited
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, pending = set(), [root]
    while pending:
        pid = pending.pop()
        if pid not in tree:
            tree.add(pid)
            pending.extend(children.get(pid, []))
    return tree


def listening_tcp_ports(pids: set[int]) -> set[int]:
    """TCP ports in LISTEN state on sockets that the processes ``pids`` hold open (socket
    inodes from /proc/<pid>/fd matched with /proc/net/tcp{,6}); other processes on the
    machine (other test runs, a Spark Connect server) are not counted."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # exited, or not ours to read
            continue
        links = [_readlink(fd) for fd in fds]  # a descriptor may close meanwhile
        inodes.update(link[len("socket:["):-1] for link in links if link.startswith("socket:["))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # TCP_LISTEN, one of ours
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def ours() -> set[int]:
    return listening_tcp_ports(process_tree(os.getpid()))


def wait_until(condition, seconds: float = 30.0, interval: float = 0.2) -> bool:
    """Poll ``condition()`` until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def test_the_listener_census_sees_this_process_tree_only():
    """The census used below: a socket this process listens on counts, one that a process
    outside the tree listens on does not."""
    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        assert mine.getsockname()[1] in ours()
    # another process on the machine (e.g. a Spark Connect server): started through a shell
    # that exits at once, so that it is not a descendant of this process
    code = ("import os, socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
            "print(os.getpid(), s.getsockname()[1], flush=True); time.sleep(120)")
    shell = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "{code}" &'], stdout=subprocess.PIPE, text=True)
    pid, port = (int(v) for v in shell.stdout.readline().split())
    shell.wait(30)
    try:
        assert pid not in process_tree(os.getpid())
        assert port in listening_tcp_ports(process_tree(pid)) and port not in ours()
    finally:
        os.kill(pid, signal.SIGKILL)


def test_ten_fits_in_a_row_each_finish_well_before_the_timeout_and_leak_no_listeners(spark):
    x, y = regression_arrays(64)
    frame = frame_with_partitions(spark, [(x[:32], y[:32]), (x[32:], y[32:])]).cache()
    frame.count()
    estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=2, timeout=120)
    estimator.fit(frame)  # warm the Python workers
    baseline = ours()
    assert baseline, "the census sees no listener of the Spark JVM (block manager, driver RPC)"
    seconds = []
    for _ in range(10):
        started = time.monotonic()
        model = estimator.fit(frame)
        seconds.append(time.monotonic() - started)
        assert len(model.history) == 2
    # servers of the last fit (Spark's result socket, the agents' stores) may take a moment to close
    assert wait_until(lambda: ours() <= baseline), f"ports left listening after 10 fits: {sorted(ours() - baseline)}"
    # a hang guard, not a benchmark: a process group left behind would cost the 120 s timeout
    assert max(seconds) < 60, seconds
    frame.unpersist()


def fail_on_rank_one_in_epoch_two(rank: int, epoch: int, step: int, module) -> None:
    if rank == 1 and epoch == 1:
        raise KeyError("planned failure")


def driver_resources(*directories: Path) -> dict[str, object]:
    """This (driver) process's threads and open sockets, and the files other than checkpoints
    in ``directories``. (Executor-side listeners are checked by the test above; after a failed
    fit the surviving rank's worker holds its store for SECONDARY_FAILURE_DELAY seconds.)"""
    fds = Path("/proc/self/fd")
    sockets = sum(1 for fd in fds.iterdir() if _readlink(fd).startswith("socket:"))
    return {
        "python threads": sorted(t.name for t in threading.enumerate()),
        "os threads": sorted(_thread_name(task) for task in Path("/proc/self/task").iterdir()),
        "sockets": sockets,
        "files": sorted(str(p) for d in directories for p in d.rglob("*")
                        if p.is_file() and not p.name.startswith("checkpoint-u")),
    }


def settled(snapshot, seconds: float = 30.0):
    """``snapshot()`` once two calls a second apart agree (threads of a finished fit have exited)."""
    deadline, previous = time.monotonic() + seconds, snapshot()
    while True:
        time.sleep(1)
        current = snapshot()
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current


def _thread_name(task: Path) -> str:
    try:
        return (task / "comm").read_text().strip()
    except OSError:
        return "?"


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_five_fits_one_failing_leave_threads_sockets_and_files_as_one_fit_does(spark, tmp_path):
    x, y = regression_arrays(64)
    frame = frame_with_partitions(spark, [(x[:32], y[:32]), (x[32:], y[32:])]).cache()
    frame.count()

    def fit(number: int, fail: bool = False) -> None:
        estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=2, timeout=30,
                                   stall_timeout=30, checkpoint_dir=str(tmp_path / f"run{number}"))
        if fail:
            estimator._fail_hook = fail_on_rank_one_in_epoch_two
            with pytest.raises(TrainingError, match="planned failure"):
                estimator.fit(frame)
        else:
            estimator.fit(frame)

    temp = Path(tempfile.gettempdir())
    before_temp = {p.name for p in temp.iterdir()}
    fit(-2)  # warm-up, one success and one failure: thread pools that torch and Arrow create
    fit(-1, fail=True)  # lazily, once per process, are not leaks
    fit(0)
    after_one = settled(lambda: driver_resources(tmp_path))
    for number in range(1, 6):
        fit(number, fail=number == 3)
    # monitor servers, job threads, checkpoint temporaries: all gone, once finished threads exit
    if not wait_until(lambda: driver_resources(tmp_path) == after_one):
        assert driver_resources(tmp_path) == after_one
    new_temp = {p.name for p in temp.iterdir()} - before_temp
    assert not [n for n in new_temp if "ddl" in n or n.startswith(".tmp-")], new_temp
    frame.unpersist()


def test_a_steady_training_step_maps_no_new_memory(spark):
    """A step's tensors come from the heap the earlier steps freed. (The shard is built with a
    1 MB mmap threshold; when it stayed on for training, the 1 MB gradient of a 512×512 layer
    was mapped and unmapped every step: 257 page faults a step, a fifth of the step's time.)"""
    x, y = regression_arrays(8000, features=8)
    df = frame_with_partitions(spark, [(x[:4000], y[:4000]), (x[4000:], y[4000:])])
    estimator = TorchEstimator(model="spark_ddl.networks:MLP",
                               model_kwargs={"in_features": 8, "out_features": 1, "hidden": [512, 512]},
                               loss="mse", batch_size=16, epochs=1, timeout=120, progress="off")
    for _ in range(2):  # the second fit in the reused workers too
        summary = estimator.fit(df).summary
        steps, faults = summary["steps_run_per_rank"], summary["training_page_faults_per_rank"]
        assert steps == [250, 250]
        # warm-up (the first step's allocations, the shared gradient file) is a few thousand at most
        assert all(f < 40 * s for f, s in zip(faults, steps)), faults
