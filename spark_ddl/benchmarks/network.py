"""Synchronisation strategies across separate machines behind slow links: the testbed's namespace
machines (``spark_ddl.testbed``: each its own network namespace, address and host name, joined
by a bridge on this host), every machine's link capped at each rate in turn (``tc tbf``).

    spark-ddl bench network --repeats 3 --json bench_results/network.json   # docs/network.md's table (9–18 min here)
    spark-ddl bench network --rates 100mbit --strategies flat,fp16 --agents-per-machine 1 --epochs 1

Per row (machines × agents per machine, link rate, strategy) it measures, on digits (MLP
64→512→512→10, a 1.2 MB gradient; trained on the ``train`` split, the ``test`` split held out
with ``validation_col``):

- seconds per epoch and per step (the fit's history; the mean of the epochs after the first);
- time to the target held-out accuracy: the fit's wall time minus the epochs after the first
  epoch that reached it (launch included), and the epochs' own seconds up to it, or "not reached";
- bytes across machines per step: the flat exchange's own count (``summary``), for the others
  the traffic model's (``model``: gloo's ring all-reduce, ring reduce + gather + binomial
  broadcast, over the ranks' placement), and what the machines' links actually carried (the
  veths' byte counters over the whole fit ÷ steps, busiest direction);
- the cost model's prediction: the computation, measured in the same fits (the history's
  ``compute_seconds``: the slowest agent's seconds outside its exchange, per step; ``ddp``,
  whose exchange runs inside backward, takes the flat row's at the same rate) + the exchange,
  predicted: the leader's compression work (measured apart: the casts on one process; PowerSGD on
  two, less its all-reduces' latency) + wire bytes ÷ link rate + messages × α, the link rate and
  α measured between two machines at each cap (gloo's: an all-reduce of the gradient's size, as
  float32 and as float16, less one of a single float, whose half is α; beside it, in the JSON, the
  prediction with a bulk TCP send's goodput instead). Beside it the exchange measured (step − compute).

Repeats run interleaved (every strategy once, then again), so that a change of load on this
shared host falls on every strategy alike; repeat k trains with seed k (initial weights, the
epochs' orders) for every strategy; rows are medians over the repeats.

Needs root and iproute2 (``spark_ddl.testbed.network.missing_requirements``). The machines use
the prefix ``ddlb`` and subnet 10.78.0 by default, apart from the test suite's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from spark_ddl.benchmarks.common import steady_mean
from spark_ddl.benchmarks.network_model import (SYNC_EVERY, bandwidth_key, compression_compute, describe_link,
                                                link_counters, machine_of_rank, model_bytes, predict_exchange,
                                                probe_gloo, probe_link, rate_bits)
from spark_ddl.benchmarks.network_report import format_row, median_row, report

REPO = Path(__file__).resolve().parents[2]

# name → (label, estimator settings); "flat" is the CPU default allreduce_impl
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "flat": ("allreduce (flat)", {"sync": "allreduce", "allreduce_impl": "flat"}),
    "fp16": ("allreduce (flat) + fp16", {"sync": "allreduce", "allreduce_impl": "flat", "compression": "fp16"}),
    "powersgd": ("allreduce (flat) + powersgd",
                 {"sync": "allreduce", "allreduce_impl": "flat", "compression": "powersgd"}),
    "ddp": ("allreduce (ddp)", {"sync": "allreduce", "allreduce_impl": "ddp"}),
    "ps": ("parameter_server", {"sync": "parameter_server"}),
    "local_sgd": ("local_sgd (sync_every 8)", {"sync": "local_sgd", "sync_every": 8}),
    "local_sgd_fp16": ("local_sgd (sync_every 8) + fp16",
                       {"sync": "local_sgd", "sync_every": 8, "compression": "fp16"}),
    # every push is applied alone: momentum 0.9 with stale gradients needs a smaller lr
    "async": ("async (lr 0.005)", {"sync": "async", "lr": 0.005}),
}
SYNCHRONOUS = ("flat", "fp16", "powersgd", "ddp", "ps", "local_sgd", "local_sgd_fp16")
DEFAULT_STRATEGIES = "flat,fp16,powersgd,ddp,ps,local_sgd,local_sgd_fp16"


# -- the fits ----------------------------------------------------------------------------------

def digits_frame(spark, path: str, train_rows: int | None, partitions: int):
    """digits with a boolean ``held_out`` column (the test split); ``train_rows`` keeps that many
    training rows. Built from the driver's copy, so no machine needs the file. Every run gets the
    same shards in the same order (the rows shuffled once with a fixed seed and numbered, then
    ranges of those numbers, sorted): a round-robin repartition's rows arrive in the order the
    shuffle fetched them, and with another order the same seed trains another trajectory (flat
    reached 0.96 in epoch 2 in one run, in 4 in another); a hash of the number left the shards
    uneven (684 and 754 rows)."""
    import pandas as pd
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    table = pq.read_table(path).to_pandas()
    if train_rows is not None:  # and a quarter as many held-out rows (at least 100)
        held_out = table[table["split"] != "train"].head(max(100, train_rows // 4))
        table = pd.concat([table[table["split"] == "train"].head(train_rows), held_out])
    table = table.sample(frac=1.0, random_state=0).reset_index(drop=True)  # train and test mixed in every range
    table["row"] = table.index
    frame = spark.createDataFrame(table[["row", "features", "label", "split"]])
    frame = (frame.withColumn("held_out", F.col("split") == "test").drop("split")
             .repartitionByRange(partitions, "row").sortWithinPartitions("row").drop("row").cache())
    frame.count()
    return frame


def estimator_for(strategy: str, args: argparse.Namespace, workers: int, epochs: int | None = None,
                  seed: int = 0):
    from spark_ddl import TorchEstimator

    base = dict(model="spark_ddl.networks:MLP",
                model_kwargs={"in_features": 64, "out_features": 10, "hidden": args.hidden},
                loss="cross_entropy", optimizer="sgd", lr=args.lr, optimizer_kwargs={"momentum": 0.9},
                batch_size=args.batch_size, epochs=epochs or args.epochs, seed=seed, num_workers=workers,
                validation_col="held_out", timeout=args.timeout)
    return TorchEstimator(**{**base, **STRATEGIES[strategy][1]})


def one_fit(strategy: str, args: argparse.Namespace, frame, workers: int, cluster=None,
            seed: int = 0) -> dict[str, Any]:
    """Fit once with ``seed`` (the initial weights, the epochs' orders); the row's measurements (and
    the links' byte counters over the fit with ``cluster``)."""
    estimator = estimator_for(strategy, args, workers, seed=seed)
    before = link_counters(cluster) if cluster is not None else None
    started = time.perf_counter()
    model = estimator.fit(frame)
    wall = time.perf_counter() - started
    after = link_counters(cluster) if cluster is not None else None
    summary, history = dict(model.summary), model.history
    steps_run = summary.get("steps_run_per_rank") or [0]
    steps_per_epoch = max(steps_run) / max(len(history), 1)
    epoch_s = steady_mean(history)
    # what the exchanges wait for: between every two, the slowest agent's computation (else its total)
    total_compute = steady_mean(history, "compute_seconds")
    compute = steady_mean(history, "paced_compute_seconds")
    if compute is None:
        compute = total_compute
    reached = next((i for i, h in enumerate(history) if (h.get("val_accuracy") or 0) >= args.target), None)
    # wall: the fit's own time less the epochs (training and validation) after the one that reached the
    # target: launch, the epochs up to it with their validation, and the model's return to the driver
    later = history[reached + 1:] if reached is not None else []
    to_target = None if reached is None else wall - sum(h["seconds"] + h.get("val_seconds", 0.0) for h in later)
    training_to_target = None if reached is None else sum(h["seconds"] for h in history[:reached + 1])
    link_bytes = None
    if before is not None and after is not None:
        busiest = max(max(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before))
        link_bytes = busiest / max(max(steps_run), 1)
    return {"seed": seed, "fit_seconds": wall, "seconds_per_epoch": epoch_s,
            "seconds_per_step": epoch_s / steps_per_epoch if steps_per_epoch else None,
            "compute_seconds_per_step": compute / steps_per_epoch if compute and steps_per_epoch else None,
            "slowest_total_compute_seconds_per_step": (total_compute / steps_per_epoch
                                                       if total_compute and steps_per_epoch else None),
            "steps_per_epoch": steps_per_epoch, "time_to_target_s": to_target,
            "training_seconds_to_target": training_to_target,
            "target_epoch": None if reached is None else reached + 1,
            "val_accuracy": [h.get("val_accuracy") for h in history],
            "link_bytes_per_step": link_bytes,
            "summary": {k: summary.get(k) for k in ("world_size", "machines", "compression", "allreduce_impl",
                                                     "bytes_across_machines_per_step", "shard_sizes")}}


def warm_up(strategies: list[str], args: argparse.Namespace, frame, workers: int) -> None:
    """Python workers started, modules imported (PowerSGD's hook, DDP): one short fit each."""
    small = frame.limit(8 * args.batch_size * workers)
    for strategy in strategies:
        estimator_for(strategy, args, workers, epochs=1).fit(small)


def stop_active_session() -> None:
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()


def parameter_count(args: argparse.Namespace) -> int:
    from spark_ddl.networks import MLP

    return sum(p.numel() for p in MLP(64, 10, args.hidden).parameters())


def measure_link(cluster, rate: str, per_machine: int, floats: int, runs: int = 3) -> dict[str, Any]:
    """Cap every machine's link at ``rate``, then between machines 1 and 2: TCP goodput, α, and
    gloo's bandwidth for an all-reduce of ``floats`` (the gradient's size)."""
    for number in range(1, len(cluster.network.machines) + 1):
        cluster.limit(number, None if rate_bits(rate) is None else rate)
    link = probe_link(cluster, rate)
    link["tcp_alpha_s"] = link.pop("alpha_s")
    link.update(probe_gloo(cluster, floats, runs=runs))
    link["alpha_s"] = link["gloo_all_reduce_1_float_s"] / (2 * (2 - 1))  # two machines' ring: 2 messages
    link.update(rate=rate, agents_per_machine=per_machine)
    print(f"  link {rate}: {describe_link(link)}", flush=True)
    return link


def host_sharing(agents: int, cores: int | None = None) -> float:
    """How much slower the CPU work of an exchange runs because the testbed's machines share one
    host: its agents ÷ the host's cores (at least 1). Four agents on two cores: each has half a core,
    also while it copies, sums and sends (on a real cluster every machine has its own cores: 1)."""
    return max(1.0, agents / float(cores or os.cpu_count() or 1))


def predicted_row(row: dict[str, Any], strategy: str, args: argparse.Namespace, per_machine: int,
                  link: dict[str, Any], compression: dict[str, float], flat_compute: float | None,
                  layout: list[list[int]] | None = None, cpu_link: dict[str, Any] | None = None) -> None:
    """Add the traffic model's bytes and messages and the prediction to the measured ``row``: its own
    compute (for ddp: ``flat_compute``, flat's at the same rate) + the predicted exchange. The ranks'
    machines: the row's summary's, else ``layout`` (another fit's at this rate: ps and local_sgd
    report none), else contiguous. ``cpu_link``: the unlimited link's probes on this cluster, where
    the wire costs only CPU work; with more agents than the host has cores that work is stretched
    by ``host_sharing`` (the probes ran two processes on an otherwise idle host)."""
    parameters_bytes = 4 * parameter_count(args)
    machine_of = machine_of_rank(row["summary"].get("machines") or layout, args.machines, per_machine)
    wire, source, messages, one_way_bytes = model_bytes(strategy, parameters_bytes, machine_of, row["summary"])
    compute, compute_source = row["compute_seconds_per_step"], "fit"
    if compute is None and strategy == "ddp" and flat_compute is not None:
        compute, compute_source = flat_compute, "flat"
    alone = predict_exchange(wire, messages, link, compression.get(strategy, 0.0), bandwidth_key(strategy),
                             one_way_bytes)
    sharing = host_sharing(args.machines * per_machine)
    cpu_work = (predict_exchange(wire, 0, cpu_link, 0.0, bandwidth_key(strategy), one_way_bytes)
                if cpu_link is not None else None)
    exchange = alone + cpu_work * (sharing - 1) if alone is not None and cpu_work is not None else alone
    exchange_tcp = predict_exchange(wire, messages, link, compression.get(strategy, 0.0), "goodput_bytes_per_s",
                                    one_way_bytes, "goodput_bytes_per_s")
    step = row["seconds_per_step"]
    predicted = compute + exchange if compute is not None and exchange is not None else None
    measured_exchange = step - compute if compute is not None and step else None
    row.update(agents=f"{args.machines}×{per_machine}", machines=args.machines, agents_per_machine=per_machine,
               rate=link["rate"], strategy=strategy, label=STRATEGIES[strategy][0],
               synchronous=strategy in SYNCHRONOUS, bytes_across_per_step=wire, bytes_source=source,
               one_way_bytes_per_step=one_way_bytes,
               messages_per_step=messages, machine_of_rank=machine_of, compute_seconds_per_step=compute,
               compute_source=compute_source if compute is not None else None,
               compression_seconds_per_step=compression.get(strategy),
               predicted_exchange_seconds_per_step=exchange, measured_exchange_seconds_per_step=measured_exchange,
               host_sharing=sharing, exchange_cpu_seconds_per_step=cpu_work,
               predicted_seconds_per_step=predicted,
               predicted_seconds_per_step_host_alone=(compute + alone
                                                      if compute is not None and alone is not None else None),
               predicted_seconds_per_step_tcp=(compute + exchange_tcp
                                               if compute is not None and exchange_tcp is not None else None),
               measured_over_predicted=step / predicted if predicted and step else None,
               exchange_measured_over_predicted=(measured_exchange / exchange
                                                 if exchange and measured_exchange is not None else None))


def rate_rows(args: argparse.Namespace, cluster, frame, per_machine: int, link: dict[str, Any],
              compression: dict[str, float], cpu_link: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every strategy at the current caps, ``args.repeats`` rounds of one fit each, interleaved
    (``cpu_link``: this cluster's unlimited link, for ``predicted_row``)."""
    workers = args.machines * per_machine
    fits: dict[str, list] = {strategy: [] for strategy in args.strategies}
    for repeat in range(args.repeats):  # repeat k: seed k for every strategy (paired)
        for strategy in args.strategies:
            fits[strategy].append(one_fit(strategy, args, frame, workers, cluster, seed=repeat))
    rows = []
    layout = next((f["summary"]["machines"] for runs in fits.values() for f in runs if f["summary"].get("machines")),
                  None)  # how Spark placed the ranks, as a fit that reports it saw it
    for strategy in args.strategies:
        row = median_row(fits[strategy])
        flat = next((r["compute_seconds_per_step"] for r in rows if r["strategy"] == "flat"), None)
        predicted_row(row, strategy, args, per_machine, link, compression, flat, layout, cpu_link)
        rows.append(row)
        print("  " + format_row(row), flush=True)
    return rows


def machine_rows(args: argparse.Namespace, per_machine: int, compression: dict[str, float]) -> tuple[list, list]:
    """Every rate × strategy on ``args.machines`` machines of ``per_machine`` agents each;
    ``compression``: the leader's compression work per step, by strategy."""
    from spark_ddl.testbed.cluster import MachineCluster

    stop_active_session()
    workers = args.machines * per_machine
    rows, links = [], []
    cluster = MachineCluster(machines=args.machines, cores=per_machine, prefix=args.prefix, subnet=args.subnet)
    spark = None
    try:
        began = time.perf_counter()
        cluster.start()
        spark = cluster.session({"spark.app.name": "spark_ddl-bench-network"})
        print(f"  {args.machines} machines × {per_machine} cores up in {time.perf_counter() - began:.0f} s",
              flush=True)
        frame = digits_frame(spark, args.data, args.train_rows, workers)
        if args.warm_up:
            began = time.perf_counter()
            warm_up(args.strategies, args, frame, workers)
            print(f"  warm-up fits: {time.perf_counter() - began:.0f} s", flush=True)
        cpu_link = None  # the unlimited link's probes, once measured (the default order measures it first)
        for rate in args.rates:
            links.append(measure_link(cluster, rate, per_machine, parameter_count(args), args.probe_runs))
            if rate_bits(rate) is None:
                cpu_link = links[-1]
            rows += rate_rows(args, cluster, frame, per_machine, links[-1], compression, cpu_link)
    finally:
        try:
            if spark is not None:
                for number in range(1, args.machines + 1):
                    cluster.limit(number, None)  # the driver's goodbyes at full speed
                spark.stop()
        finally:
            cluster.close()
    return rows, links


# -- the command ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None, prog: str | None) -> argparse.Namespace:
    from spark_ddl.apps.options import parse_with_config

    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "data" / "digits.parquet"),
                        help="Parquet with features, label and split ('train'/'test') columns")
    parser.add_argument("--train-rows", type=int, default=None, help="use only this many training rows")
    parser.add_argument("--machines", type=int, default=2)
    parser.add_argument("--agents-per-machine", default="1,2", help="one cluster per value (its cores per machine)")
    parser.add_argument("--rates", default="unlimited,1gbit,100mbit", help="link caps (tc rates), 'unlimited'")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                        help=f"of {', '.join(STRATEGIES)} (async is not in the default)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.90, help="held-out accuracy for the time to target")
    parser.add_argument("--hidden", default="512,512")
    parser.add_argument("--batch-size", type=int, default=32, help="per agent")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=1,
                        help="fits per row, interleaved across the strategies, repeat k with seed k (medians "
                        "printed)")
    parser.add_argument("--probe-runs", type=int, default=3,
                        help="runs of each link and compression probe (their medians are used)")
    parser.add_argument("--compression-work", choices=("measure", "none"), default="measure",
                        help="measure the leader's fp16/PowerSGD compression work apart, for the prediction")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="skip the short untimed fit of each strategy before the rows (a quick smoke run)")
    parser.add_argument("--timeout", type=float, default=300.0, help="the fits' timeout (s)")
    parser.add_argument("--prefix", default="ddlb", help="the testbed's name prefix (the tests use ddlt, ddl)")
    parser.add_argument("--subnet", default="10.78.0")
    parser.add_argument("--json", default=None)
    args = parse_with_config(parser, argv)
    args.hidden = [int(h) for h in str(args.hidden).split(",") if h]
    args.rates = [r for r in str(args.rates).split(",") if r]
    args.strategies = [s for s in str(args.strategies).split(",") if s]
    unknown = sorted(set(args.strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    args.per_machine = [int(a) for a in str(args.agents_per_machine).split(",") if a]
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run this benchmark with command-line arguments ``argv``."""
    from spark_ddl.benchmarks.common import emit
    from spark_ddl.testbed.network import missing_requirements

    args = parse_args(argv, prog)
    reason = missing_requirements()
    if reason is not None:
        print(f"spark-ddl bench network needs separate machines: {reason}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows, links, compression = [], [], {}
    if args.compression_work == "measure":
        for strategy in ("fp16", "powersgd"):
            if strategy in args.strategies or (strategy == "fp16" and "local_sgd_fp16" in args.strategies):
                compression[strategy] = compression_compute(strategy, args.hidden, runs=args.probe_runs)
                print(f"  compression work of the leader, {strategy}: {compression[strategy] * 1e3:.2f} ms/step",
                      flush=True)
        if "local_sgd_fp16" in args.strategies:  # the same casts, once per average
            compression["local_sgd_fp16"] = compression["fp16"] / SYNC_EVERY
    for per_machine in args.per_machine:
        more_rows, more_links = machine_rows(args, per_machine, compression)
        rows += more_rows
        links += more_links
    checks = report(args, rows, links, compression)
    result = {"benchmark": "network", "machines": args.machines, "agents_per_machine": args.per_machine,
              "rates": args.rates, "strategies": args.strategies, "epochs": args.epochs, "target": args.target,
              "hidden": args.hidden, "batch_size": args.batch_size, "lr": args.lr, "repeats": args.repeats,
              "compute": "in the same fits (history compute_seconds; ddp: flat's at the same rate)",
              "compression_seconds_per_step": compression, "links": links, "rows": rows,
              "targets": checks, "seconds": time.perf_counter() - started}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
