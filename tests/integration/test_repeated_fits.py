"""Python workers are reused between jobs: nothing from one fit may linger into the next."""

from __future__ import annotations

import time
from pathlib import Path

from spark_ddl import TorchEstimator
from tests.helpers import TinyNet, frame_with_partitions, regression_arrays


def listening_tcp_ports() -> set[int]:
    """Ports in LISTEN state on this machine (from /proc, IPv4 and IPv6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_ten_fits_in_a_row_each_finish_promptly_and_leak_no_listeners(spark):
    x, y = regression_arrays(64)
    frame = frame_with_partitions(spark, [(x[:32], y[:32]), (x[32:], y[32:])]).cache()
    frame.count()
    estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=2, timeout=30)
    estimator.fit(frame)  # warm the Python workers
    baseline = listening_tcp_ports()
    seconds = []
    for _ in range(10):
        started = time.monotonic()
        model = estimator.fit(frame)
        seconds.append(time.monotonic() - started)
        assert len(model.history) == 2
    leaked = listening_tcp_ports() - baseline
    assert leaked == set(), f"ports left listening after 10 fits: {sorted(leaked)}"
    # a hang guard, not a benchmark: a lingering process group would cost the 30 s timeout
    assert max(seconds) < 25, seconds
    frame.unpersist()
