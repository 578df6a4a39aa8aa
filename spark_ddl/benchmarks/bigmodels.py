"""Big models and the driver's memory: fit / transform / save / load of MLPs of a given size on
the default 1 GB driver, with the driver JVM's peak heap and the driver Python's peak RSS in
each phase (the weights stream a piece at a time; nothing should grow with the model but the
driver's own copy of the module).

    spark-ddl bench bigmodels --sizes-gb 0.1,0.5 --json bench_results/bigmodels.json
    spark-ddl bench bigmodels --sizes-gb 2 --workers 1      # 2 GB: one agent keeps the host's memory in check
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from spark_ddl import TorchEstimator, TorchModel, get_or_create_session
from spark_ddl.benchmarks.common import emit


def parse_args(argv: list[str] | None, prog: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", default="0.1,0.5", help="model sizes in GB (float32 weights), comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="agents (each holds the model and its gradients)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the result here")
    return parser.parse_args(argv)


def mlp_of(size_bytes: float) -> nn.Module:
    """64 → h → h → h → 10: two h×h layers, 2 h² ≈ size / 4 parameters."""
    hidden = int(math.sqrt(size_bytes / 4 / 2))
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class DriverMemory:
    """Peaks since ``reset``: the driver JVM's heap (sum of its pools' peaks: an upper bound) and
    this Python process's resident set (VmHWM)."""

    def __init__(self, sc) -> None:
        factory = sc._jvm.java.lang.management.ManagementFactory  # noqa: SLF001
        self._pools = [p for p in factory.getMemoryPoolMXBeans() if p.getType().toString() == "Heap memory"]

    def reset(self) -> None:
        gc.collect()
        for pool in self._pools:
            pool.resetPeakUsage()
        with open("/proc/self/clear_refs", "w") as out:
            out.write("5")

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    def peaks(self) -> tuple[int, int]:
        heap = sum(int(pool.getPeakUsage().getUsed()) for pool in self._pools)
        with open("/proc/self/status") as status:
            rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
        return heap, rss


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Print the table and the JSON result."""
    args = parse_args(argv, prog)
    spark = get_or_create_session(num_workers=2, app_name="spark_ddl-bench-bigmodels")
    sc = spark.sparkContext
    memory = DriverMemory(sc)
    heap_max = int(sc._jvm.java.lang.Runtime.getRuntime().maxMemory())  # noqa: SLF001
    rng = np.random.default_rng(0)
    rows = [(rng.normal(size=64).tolist(), int(rng.integers(0, 10))) for _ in range(args.rows)]
    frame = spark.createDataFrame(rows, "features array<double>, label long").repartition(args.workers).cache()
    frame.count()
    results = []
    for size_gb in [float(s) for s in args.sizes_gb.split(",")]:
        torch.manual_seed(0)
        net = mlp_of(size_gb * 1e9)
        model_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        folder = tempfile.mkdtemp(prefix="spark_ddl-bench-bigmodels-")
        phases: dict[str, Callable[[], object]] = {}
        fitted: dict[str, TorchModel] = {}
        phases["fit"] = lambda: fitted.setdefault("model", TorchEstimator(
            model=net, loss="cross_entropy", optimizer="sgd", lr=1e-4, batch_size=16, epochs=1,
            num_workers=args.workers, progress="off").fit(frame))
        phases["transform"] = lambda: fitted["model"].transform(frame).select("prediction").collect()
        phases["save"] = lambda: fitted["model"].save(f"{folder}/m")
        phases["load"] = lambda: TorchModel.load(f"{folder}/m", module=net)
        row = {"size_gb": size_gb, "model_bytes": model_bytes}
        try:
            for name, phase in phases.items():
                memory.reset()
                before, started = memory.rss(), time.perf_counter()
                phase()
                heap, rss = memory.peaks()
                row[name] = {"seconds": time.perf_counter() - started, "driver_heap_peak_bytes": heap,
                             "driver_rss_before_bytes": before, "driver_rss_peak_bytes": rss}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row["route"] = fitted["model"].summary.get("result_route") if "model" in fitted else None
        results.append(row)
        fitted.clear()
        phases.clear()
        net = None
        gc.collect()
    print(f"driver JVM heap max {heap_max / 2**30:.2f} GiB; per phase: peak heap GiB / Python RSS GiB before -> "
          "peak / seconds")
    print(f"{'model GB':>9} " + " ".join(f"{name:>24}" for name in ("fit", "transform", "save", "load")))
    for row in results:
        cells = [f"{row[n]['driver_heap_peak_bytes'] / 2**30:.2f} / {row[n]['driver_rss_before_bytes'] / 2**30:.2f}->"
                 f"{row[n]['driver_rss_peak_bytes'] / 2**30:.2f} / {row[n]['seconds']:.0f}"
                 for n in ("fit", "transform", "save", "load") if n in row]
        print(f"{row['model_bytes'] / 1e9:>9.2f} " + " ".join(f"{c:>24}" for c in cells))
    emit({"benchmark": "bigmodels", "workers": args.workers, "driver_heap_max_bytes": heap_max,
          "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
