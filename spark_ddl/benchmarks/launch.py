"""Launch overhead: fit() of a trivial model vs TorchDistributor.run of one all-reduce vs the
floor (a bare barrier mapInArrow job that starts a gloo group and all-reduces one tensor), then
the same fit() and TorchDistributor.run from a Spark Connect client (``remote("local[2]")``).

    spark-ddl bench launch --repeats 5 --json bench_results/launch.json

The classic rows run side by side in one warm local[2] session, then that session stops and a
local Spark Connect server starts for the Connect rows (one process holds one kind of session
at a time); the table shows medians and the ratios to the classic fit(). Timings on a shared
machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys


import torch

from spark_ddl.apps.options import parse_with_config
from spark_ddl.benchmarks.common import emit, timed
from spark_ddl import TorchEstimator, get_or_create_session


def allreduce_once() -> float:
    """The function TorchDistributor runs on each of its processes (torchrun env)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    value = torch.ones(1)
    dist.all_reduce(value)
    dist.destroy_process_group()
    return float(value.item())


def floor_job(batches, meet: tuple[tuple[str, int], str] | None = None):
    """A barrier task that only forms a gloo group and all-reduces one tensor. The agents meet
    through Spark's allGather, or with ``meet`` (the address and secret of a driver's status
    channel) as fit() does."""
    import pyarrow as pa
    import torch
    import torch.distributed as dist
    from pyspark import BarrierTaskContext

    from spark_ddl.agent.rendezvous import (DriverRendezvous, environment_fingerprint, init_process_group,
                                           leave_group, rendezvous)

    for _ in batches:
        pass
    context = BarrierTaskContext.get()
    via = DriverRendezvous(meet[0], meet[1], context, 60) if meet is not None else None
    try:
        rdv = rendezvous(context, {"fingerprint": environment_fingerprint("gloo")}, 60, via)
    finally:
        if via is not None:
            via.close()
    init_process_group(rdv, "gloo", 60)
    value = torch.ones(1)
    dist.all_reduce(value)
    leave_group()  # the agent's teardown (see rendezvous.leave_group)
    yield pa.RecordBatch.from_pydict({"value": [float(value.item())]})


FLOOR = "floor: barrier mapInArrow + gloo all-reduce"
FLOOR_ALLGATHER = "the same floor meeting through Spark's allGather"


def floor_times(spark, repeats: int, allgather: bool = True) -> dict[str, list[float]]:
    """Seconds of the floor job, its agents meeting through a status channel on this driver as
    fit()'s do (``FLOOR``), and with ``allgather`` through Spark's allGather (``FLOOR_ALLGATHER``),
    which answers at the next whole second."""
    from spark_ddl.driver.capabilities import capabilities
    from spark_ddl.driver.monitor import AgentMonitor

    floor_input = spark.range(2).repartition(2).cache()
    floor_input.count()
    monitor = AgentMonitor(capabilities(spark).status_host(), stall_timeout=None)
    meet = (monitor.address, monitor.secret)
    try:
        times = {FLOOR: timed(lambda: floor_input.mapInArrow(functools.partial(floor_job, meet=meet), "value double",
                                                             barrier=True).collect(), repeats)}
        if allgather:
            times[FLOOR_ALLGATHER] = timed(lambda: floor_input.mapInArrow(floor_job, "value double",
                                                                          barrier=True).collect(), repeats)
        return times
    finally:
        monitor.close()
        floor_input.unpersist()


def tiny_fit_inputs(spark):
    """The trivial fit the launch rows time: 16 rows in 2 cached partitions, 1 epoch of a Linear."""
    rows = [([float(i), 1.0, 2.0, 3.0], float(i % 2)) for i in range(16)]
    tiny = spark.createDataFrame(rows, "features array<float>, label double").repartition(2).cache()
    tiny.count()
    estimator = TorchEstimator(model=torch.nn.Linear(4, 1), loss="mse", epochs=1, batch_size=8,
                               num_workers=2, timeout=60)
    return tiny, estimator


CONNECT_FIT = "spark_ddl fit() over Spark Connect"
CONNECT_DISTRIBUTOR = "TorchDistributor.run over Spark Connect"


def connect_launch_times(repeats: int, distributor: bool) -> dict[str, list[float]]:
    """Stop this process's classic session, time fit() (and TorchDistributor.run) from a Spark
    Connect client of a local server (``remote("local[2]")``), stop it again."""
    import os

    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    spark = get_or_create_session(num_workers=2, app_name="spark_ddl-bench-connect", remote="local[2]")
    try:
        tiny, estimator = tiny_fit_inputs(spark)
        times = {CONNECT_FIT: timed(lambda: estimator.fit(tiny), repeats)}
        if distributor:
            from pyspark.ml.torch.distributor import TorchDistributor

            runner = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False)
            times[CONNECT_DISTRIBUTOR] = timed(lambda: runner.run(allreduce_once), max(1, repeats - 1))
        return times
    finally:
        spark.stop()
        for key in ("SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE", "SPARK_REMOTE", "SPARK_CONNECT_AUTHENTICATE_TOKEN"):
            os.environ.pop(key, None)  # the process may start a classic session again


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run this benchmark with command-line arguments ``argv``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-distributor", action="store_true", help="leave TorchDistributor out")
    parser.add_argument("--skip-connect", action="store_true", help="leave the Spark Connect rows out")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parse_with_config(parser, argv)

    spark = get_or_create_session(num_workers=2, app_name="spark_ddl-bench-launch")
    master = spark.sparkContext.master
    tiny, estimator = tiny_fit_inputs(spark)
    results: dict[str, list[float]] = floor_times(spark, args.repeats)
    results["spark_ddl fit() (1 epoch, 16 rows)"] = timed(lambda: estimator.fit(tiny), args.repeats)
    if not args.skip_distributor:
        from pyspark.ml.torch.distributor import TorchDistributor

        distributor = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False)
        results["TorchDistributor.run (one all-reduce)"] = timed(
            lambda: distributor.run(allreduce_once), args.repeats)
    if not args.skip_connect:
        results.update(connect_launch_times(args.repeats, not args.skip_distributor))

    fit_median = statistics.median(results["spark_ddl fit() (1 epoch, 16 rows)"])
    floor_median = statistics.median(results[FLOOR])
    print(f"\nLaunch overhead, warm local[2] session (classic, then a Spark Connect client of a local "
          f"server), {args.repeats} repeats (median seconds)\n")
    print(f"{'what':<48} {'median s':>9} {'min s':>7} {'max s':>7} {'÷ fit()':>8}")
    summary = {}
    for name, times in results.items():
        median = statistics.median(times)
        summary[name] = {"median_s": median, "times_s": times}
        print(f"{name:<48} {median:>9.2f} {min(times):>7.2f} {max(times):>7.2f} {median / fit_median:>8.2f}")
    ratios = {"fit_over_floor": fit_median / floor_median,
              "allgather_floor_over_fit": statistics.median(results[FLOOR_ALLGATHER]) / fit_median}
    if "TorchDistributor.run (one all-reduce)" in results:
        ratios["distributor_over_fit"] = statistics.median(
            results["TorchDistributor.run (one all-reduce)"]) / fit_median
    if CONNECT_FIT in results:
        ratios["connect_fit_over_fit"] = statistics.median(results[CONNECT_FIT]) / fit_median
    if CONNECT_DISTRIBUTOR in results:
        ratios["connect_distributor_over_connect_fit"] = statistics.median(
            results[CONNECT_DISTRIBUTOR]) / statistics.median(results[CONNECT_FIT])
    print("\n" + "  ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    out = {"benchmark": "launch", "repeats": args.repeats, "results": summary, "ratios": ratios,
           "torch": torch.__version__, "master": master}
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
