"""Synchronisation strategies across separate machines behind slow links: the testbed's namespace
machines (``spark_ddl.testbed``: each its own network namespace, address and host name, joined
by a bridge on this host), every machine's link capped at each rate in turn (``tc tbf``).

    spark-ddl bench network --json bench_results/network.json          # the default (≈ 11 min here)
    spark-ddl bench network --rates 100mbit --strategies flat,fp16 --agents-per-machine 1 --epochs 1

Per row (machines × agents per machine, link rate, strategy) it measures, on digits (MLP
64→512→512→10, a 1.2 MB gradient; trained on the ``train`` split, the ``test`` split held out
with ``validation_col``):

- seconds per epoch and per step (the fit's history; epochs after the first, medians);
- time to the target held-out accuracy: the fit's wall time minus the epochs after the first
  epoch that reached it (launch included), and the epochs' own seconds up to it, or "not reached";
- bytes across machines per step: the flat exchange's own count (``summary``), for the others
  the traffic model's (``model``: gloo's ring all-reduce, ring reduce + gather + binomial
  broadcast, over the ranks' placement), and what the machines' links actually carried (the
  veths' byte counters over the whole fit ÷ steps, busiest direction);
- the cost model's prediction: compute-only seconds per step (the same strategy with all agents
  on one machine, ``local[M·L]``: the machines here share this host's cores, so that is the same
  compute; fp16 and PowerSGD use flat's plus the leader's compression work, measured apart) +
  wire bytes ÷ link rate + messages × α, the link rate and α measured between two machines at
  each cap (TCP goodput of a bulk send; half a gloo all-reduce of one float).

Needs root and iproute2 (``spark_ddl.testbed.network.missing_requirements``). The machines use
the prefix ``ddlb`` and subnet 10.78.0 by default, apart from the test suite's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
    # every push is applied alone: momentum 0.9 with stale gradients needs a smaller lr
    "async": ("async (lr 0.005)", {"sync": "async", "lr": 0.005}),
}
SYNCHRONOUS = ("flat", "fp16", "powersgd", "ddp", "ps", "local_sgd")
DEFAULT_STRATEGIES = "flat,fp16,powersgd,ddp,ps,local_sgd"
SYNC_EVERY = 8
DDP_BUCKETS = 2  # DDP's first bucket holds 1 MiB, the rest go to the next: two all-reduces per step here


# -- the links ---------------------------------------------------------------------------------

_PROBE_SERVER = r"""
import socket, struct, sys
listener = socket.socket(); listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2]))); listener.listen(1); listener.settimeout(60)
conn, _ = listener.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def exact(n):
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(min(1 << 20, n - len(data)))
        if not chunk: raise SystemExit("closed")
        data += chunk
    return bytes(data)
pings = struct.unpack("!I", exact(4))[0]
for _ in range(pings):
    conn.sendall(exact(1))
size = struct.unpack("!Q", exact(8))[0]
left = size
while left:
    left -= len(conn.recv(min(1 << 20, left)))
conn.sendall(b"k")
"""

_PROBE_CLIENT = r"""
import json, socket, statistics, struct, sys, time
host, port, pings, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + 20
while True:
    try:
        conn = socket.create_connection((host, port), timeout=60); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.05)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
conn.sendall(struct.pack("!I", pings))
rtts = []
for _ in range(pings):
    started = time.perf_counter(); conn.sendall(b"p"); conn.recv(1); rtts.append(time.perf_counter() - started)
payload = b"\0" * (1 << 20)
conn.sendall(struct.pack("!Q", size))
started = time.perf_counter(); left = size
while left:
    n = min(len(payload), left); conn.sendall(payload[:n]); left -= n
conn.recv(1)
seconds = time.perf_counter() - started
rtt = statistics.median(rtts)
print(json.dumps({"rtt_s": rtt, "bulk_bytes": size, "bulk_seconds": seconds,
                  "goodput_bytes_per_s": size / max(seconds - rtt / 2, 1e-9)}))
"""


_GLOO_PROBE = r"""
import json, os, statistics, sys, time
import torch, torch.distributed as dist
rank, address, port, calls = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=rank, world_size=2,
                        timeout=__import__("datetime").timedelta(seconds=60))
value, times = torch.zeros(1), []
for i in range(calls + 20):
    started = time.perf_counter(); dist.all_reduce(value); elapsed = time.perf_counter() - started
    if i >= 20: times.append(elapsed)
dist.barrier(); dist.destroy_process_group()
if rank == 0: print(json.dumps({"gloo_all_reduce_1_float_s": statistics.median(times)}))
"""


def probe_gloo(cluster, calls: int = 200) -> float:
    """Median seconds of a gloo all-reduce of one float between machines 1 and 2 (two messages on a
    two-member ring: 2·(M − 1)·α), in two processes that run on the machines' network namespaces."""
    first = cluster.network.machine(1)
    port = 29412
    env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1")
    commands = [["ip", "netns", "exec", cluster.network.machine(rank + 1).netns, sys.executable, "-c", _GLOO_PROBE,
                 str(rank), first.address, str(port), str(calls)] for rank in (0, 1)]
    peer = subprocess.Popen(commands[1], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        out = subprocess.run(commands[0], env=env, check=True, capture_output=True, text=True, timeout=180).stdout
    finally:
        try:
            peer.wait(30)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait()
    return float(json.loads(out.strip().splitlines()[-1])["gloo_all_reduce_1_float_s"])


_COMPRESSION_PROBE = r"""
import json, os, statistics, sys, tempfile, time
import torch, torch.distributed as dist
from spark_ddl.models import MLP
from spark_ddl.sync.machine_exchange import make_exchange
compression, hidden, calls = sys.argv[1], [int(h) for h in sys.argv[2].split(",")], int(sys.argv[3])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
shapes = [p.shape for p in MLP(64, 10, hidden).parameters()]
numel = sum(int(torch.Size(s).numel()) for s in shapes)
def mean(total, out): torch.div(total, 2, out=out)
exchanges = {name: make_exchange(name, None, shapes, 2, 2, mean) for name in ("none", compression)}
gradient = torch.randn(numel)
out = {}
for name, exchange in exchanges.items():
    times = []
    for i in range(calls + 5):
        total = gradient.clone()
        started = time.perf_counter(); exchange(total); elapsed = time.perf_counter() - started
        if i >= 5: times.append(elapsed)
    out[name] = statistics.median(times)
dist.destroy_process_group()
print(json.dumps({"seconds": max(0.0, out[compression] - out["none"])}))
"""


def compression_compute(compression: str, hidden: list[int], calls: int = 50) -> float:
    """Seconds per step the leader's exchange spends compressing (``compression`` minus ``none``, both
    on a one-process gloo group, so no byte travels): the cast for fp16, torch's PowerSGD hook (its
    matrix products, orthogonalisation and error feedback) for powersgd. One thread, as an agent."""
    if compression == "none":
        return 0.0
    out = subprocess.run([sys.executable, "-c", _COMPRESSION_PROBE, compression, ",".join(map(str, hidden)),
                          str(calls)], check=True, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def rate_bits(rate: str) -> float | None:
    """Bits per second of a tc rate ('100mbit'); None for 'unlimited'."""
    if rate in ("unlimited", "none", ""):
        return None
    from spark_ddl.testbed.network import _bits_per_second

    return float(_bits_per_second(rate))


def probe_link(cluster, rate: str, pings: int = 200) -> dict[str, float]:
    """TCP between machine 1 (client) and machine 2 (server) at the current caps: the median round
    trip of 1 byte (α = half of it) and the goodput of a bulk send of about half a second."""
    bits = rate_bits(rate)
    size = 64 << 20 if bits is None else int(min(64 << 20, max(1 << 20, bits / 8 * 0.5)))
    server_machine, client_machine = cluster.network.machine(2), cluster.network.machine(1)
    port = 29411
    server = subprocess.Popen(["ip", "netns", "exec", server_machine.netns, sys.executable, "-c", _PROBE_SERVER,
                               server_machine.address, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        out = subprocess.run(["ip", "netns", "exec", client_machine.netns, sys.executable, "-c", _PROBE_CLIENT,
                              server_machine.address, str(port), str(pings), str(size)],
                             check=True, capture_output=True, text=True, timeout=120).stdout
    finally:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    result = json.loads(out)
    result["alpha_s"] = result["rtt_s"] / 2
    return result


def link_counters(cluster) -> list[tuple[int, int]]:
    """(bytes to the machine, bytes from it) of every machine's link, as the host-side veth counts them."""
    counters = []
    for machine in cluster.network.machines:
        stats = Path(f"/sys/class/net/{machine.link}/statistics")
        counters.append((int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())))
    return counters


# -- the cost model ----------------------------------------------------------------------------

def critical_bytes(messages: list[tuple[int, int, float]], machine_of: list[int]) -> float:
    """Bytes on the busiest link direction for ``messages`` (source rank, destination rank, bytes)
    sent at the same time: each machine's link carries what its ranks send to other machines
    (out) and what they receive from them (in), each direction at the link's rate."""
    out: dict[int, float] = {}
    into: dict[int, float] = {}
    for source, destination, size in messages:
        a, b = machine_of[source], machine_of[destination]
        if a != b:
            out[a] = out.get(a, 0.0) + size
            into[b] = into.get(b, 0.0) + size
    return max([0.0, *out.values(), *into.values()])


def ring_all_reduce_bytes(size: float, machine_of: list[int]) -> float:
    """gloo's ring all-reduce over every rank (rank r sends to r + 1): a reduce-scatter and an
    all-gather, each (n − 1)/n of the payload along every ring edge."""
    n = len(machine_of)
    if n < 2:
        return 0.0
    return 2 * critical_bytes([(r, (r + 1) % n, (n - 1) / n * size) for r in range(n)], machine_of)


def reduce_broadcast_bytes(size: float, machine_of: list[int]) -> float:
    """``parameter_server``'s exchange as gloo runs it: ``reduce`` to rank 0 (a ring reduce-scatter,
    rank r sending (n − 1)/n to r − 1, then every rank's 1/n chunk to the root), then
    ``broadcast`` from rank 0 (a binomial tree: in round i, ranks below 2^i send everything to
    rank + 2^i), the phases one after the other."""
    n = len(machine_of)
    if n < 2:
        return 0.0
    total = critical_bytes([(r, (r - 1) % n, (n - 1) / n * size) for r in range(n)], machine_of)
    total += critical_bytes([(r, 0, size / n) for r in range(1, n)], machine_of)
    step = 1
    while step < n:
        total += critical_bytes([(r, r + step, size) for r in range(step) if r + step < n], machine_of)
        step *= 2
    return total


def machine_of_rank(layout: list[list[int]] | None, machines: int, per_machine: int) -> list[int]:
    """Each rank's machine from the summary's ``machines`` (ranks by machine), else contiguous."""
    if not layout:
        return [r // per_machine for r in range(machines * per_machine)]
    owner = {}
    for index, ranks in enumerate(layout):
        for rank in ranks:
            owner[rank] = index
    return [owner[r] for r in sorted(owner)]


def model_bytes(strategy: str, parameters_bytes: int, machine_of: list[int],
                summary: dict[str, Any] | None) -> tuple[float, str, float]:
    """(bytes on the critical path of the busiest link per step — phases that follow each other
    add up; where the number comes from; messages per step on the critical path) for ``strategy``,
    ranks placed on machines as ``machine_of`` says."""
    size, world, machines = float(parameters_bytes), len(machine_of), len(set(machine_of))
    rounds = max(1, math.ceil(math.log2(world)))
    if strategy in ("flat", "fp16", "powersgd"):  # the machines' leaders only
        reported = (summary or {}).get("bytes_across_machines_per_step")
        all_reduces = 3 if strategy == "powersgd" else 1  # PowerSGD: P, Q and the uncompressed vectors
        if reported is None:
            shrink = {"flat": 1.0, "fp16": 0.5, "powersgd": 0.0105}[strategy]
            return 2 * (machines - 1) / machines * size * shrink, "model", 2 * (machines - 1) * all_reduces
        return float(reported), "summary", 2 * (machines - 1) * all_reduces
    if strategy == "ddp":
        return ring_all_reduce_bytes(size, machine_of), "model", 2 * (world - 1) * DDP_BUCKETS
    if strategy == "ps":  # reduce (ring + gather), the verdict broadcast, the parameters broadcast
        return reduce_broadcast_bytes(size, machine_of), "model", (world - 1) + 1 + 2 * rounds
    if strategy == "local_sgd":  # parameters all-reduced every SYNC_EVERY steps
        return ring_all_reduce_bytes(size, machine_of) / SYNC_EVERY, "model", 2 * (world - 1) / SYNC_EVERY
    return float("nan"), "model", float("nan")  # async: no lock-step, no prediction


def describe_link(link: dict[str, Any]) -> str:
    return (f"TCP goodput {link['goodput_bytes_per_s'] * 8 / 1e6:,.1f} Mbit/s, gloo all-reduce of one float "
            f"{link['gloo_all_reduce_1_float_s'] * 1e6:.0f} µs (α {link['alpha_s'] * 1e6:.0f} µs; "
            f"TCP round trip / 2: {link['tcp_alpha_s'] * 1e6:.0f} µs)")


def predict(compute_s: float | None, wire_bytes: float, messages: float, link: dict[str, float]) -> float | None:
    if compute_s is None or not math.isfinite(wire_bytes):
        return None
    return compute_s + wire_bytes / link["goodput_bytes_per_s"] + messages * link["alpha_s"]


# -- the fits ----------------------------------------------------------------------------------

def digits_frame(spark, path: str, train_rows: int | None, partitions: int):
    """digits with a boolean ``held_out`` column (the test split); ``train_rows`` keeps that many
    training rows. Built from the driver's copy, so no machine needs the file."""
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    import pandas as pd

    table = pq.read_table(path).to_pandas()
    if train_rows is not None:  # and a quarter as many held-out rows (at least 100)
        held_out = table[table["split"] != "train"].head(max(100, train_rows // 4))
        table = pd.concat([table[table["split"] == "train"].head(train_rows), held_out])
    frame = spark.createDataFrame(table[["features", "label", "split"]])
    frame = frame.withColumn("held_out", F.col("split") == "test").drop("split").repartition(partitions).cache()
    frame.count()
    return frame


def estimator_for(strategy: str, args: argparse.Namespace, workers: int, epochs: int | None = None):
    from spark_ddl import TorchEstimator

    base = dict(model="spark_ddl.models:MLP",
                model_kwargs={"in_features": 64, "out_features": 10, "hidden": args.hidden},
                loss="cross_entropy", optimizer="sgd", lr=args.lr, optimizer_kwargs={"momentum": 0.9},
                batch_size=args.batch_size, epochs=epochs or args.epochs, seed=0, num_workers=workers,
                validation_col="held_out", timeout=args.timeout)
    return TorchEstimator(**{**base, **STRATEGIES[strategy][1]})


def one_fit(strategy: str, args: argparse.Namespace, frame, workers: int, cluster=None) -> dict[str, Any]:
    """Fit once; the row's measurements (and the links' byte counters over the fit with ``cluster``)."""
    estimator = estimator_for(strategy, args, workers)
    before = link_counters(cluster) if cluster is not None else None
    started = time.perf_counter()
    model = estimator.fit(frame)
    wall = time.perf_counter() - started
    after = link_counters(cluster) if cluster is not None else None
    summary, history = dict(model.summary), model.history
    steps_run = summary.get("steps_run_per_rank") or [0]
    steps_per_epoch = max(steps_run) / max(len(history), 1)
    steady = history[1:] or history
    epoch_s = statistics.median(h["seconds"] for h in steady)
    reached = next((i for i, h in enumerate(history) if (h.get("val_accuracy") or 0) >= args.target), None)
    # wall: the fit's own time less the epochs after the one that reached the target (launch included)
    to_target = None if reached is None else wall - sum(h["seconds"] for h in history[reached + 1:])
    training_to_target = None if reached is None else sum(h["seconds"] for h in history[:reached + 1])
    link_bytes = None
    if before is not None and after is not None:
        busiest = max(max(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before))
        link_bytes = busiest / max(max(steps_run), 1)
    return {"fit_seconds": wall, "seconds_per_epoch": epoch_s,
            "seconds_per_step": epoch_s / steps_per_epoch if steps_per_epoch else None,
            "steps_per_epoch": steps_per_epoch, "time_to_target_s": to_target,
            "training_seconds_to_target": training_to_target,
            "steady_seconds_per_step": [h["seconds"] / steps_per_epoch for h in steady] if steps_per_epoch else [],
            "target_epoch": None if reached is None else reached + 1,
            "val_accuracy": [h.get("val_accuracy") for h in history],
            "link_bytes_per_step": link_bytes,
            "summary": {k: summary.get(k) for k in ("world_size", "machines", "compression", "allreduce_impl",
                                                     "bytes_across_machines_per_step", "shard_sizes")}}


def median_row(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats (time to target: over the repeats that reached it, if most did)."""
    def med(key):
        values = [f[key] for f in fits if f[key] is not None]
        return statistics.median(values) if values and len(values) * 2 > len(fits) else None

    row = {key: med(key) for key in ("fit_seconds", "seconds_per_epoch", "seconds_per_step", "steps_per_epoch",
                                      "time_to_target_s", "training_seconds_to_target", "target_epoch",
                                      "link_bytes_per_step")}
    row["val_accuracy"] = fits[-1]["val_accuracy"]
    row["summary"] = fits[-1]["summary"]
    row["repeats"] = [{k: f[k] for k in ("seconds_per_step", "time_to_target_s", "training_seconds_to_target")}
                      for f in fits]
    return row


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


def local_base(strategy: str) -> str:
    """The strategy whose one-machine run is ``strategy``'s compute: on one machine the flat
    exchange compresses nothing, so flat, fp16 and powersgd do the same work there."""
    return "flat" if strategy in ("flat", "fp16", "powersgd") else strategy


def compute_only(args: argparse.Namespace, world: int) -> dict[str, float]:
    """Seconds per step with all ``world`` agents on this machine (local[world]), per strategy that
    needs one: the median of every steady epoch of ``max(3, repeats)`` fits."""
    from spark_ddl import get_or_create_session

    stop_active_session()
    spark = get_or_create_session(master=f"local[{world}]", num_workers=world,
                                  app_name="spark_ddl-bench-network-compute")
    try:
        frame = digits_frame(spark, args.data, args.train_rows, world)
        strategies = list(dict.fromkeys(local_base(s) for s in args.strategies if s in SYNCHRONOUS))
        if args.warm_up:
            warm_up(strategies, args, frame, world)
        out = {}
        for strategy in strategies:
            steps = []
            for _ in range(max(3, args.repeats)):
                fit = one_fit(strategy, args, frame, world)
                steps += fit["steady_seconds_per_step"]
            out[strategy] = statistics.median(steps)
            print(f"  compute-only, {world} agents on one machine, {strategy}: {out[strategy] * 1e3:.2f} ms/step",
                  flush=True)
        return out
    finally:
        spark.stop()


def machine_rows(args: argparse.Namespace, per_machine: int, local: dict[str, float],
                 compression: dict[str, float]) -> tuple[list, list]:
    """Every rate × strategy on ``args.machines`` machines of ``per_machine`` agents each; ``local``:
    compute-only seconds per step by ``local_base``, ``compression``: the leader's compression work."""
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
        parameters_bytes = None
        layout = None  # ranks by machine, as the last fit that reported it placed them
        for rate in args.rates:
            for number in range(1, args.machines + 1):
                cluster.limit(number, None if rate_bits(rate) is None else rate)
            link = probe_link(cluster, rate)
            link["tcp_alpha_s"] = link.pop("alpha_s")
            link["gloo_all_reduce_1_float_s"] = probe_gloo(cluster)
            link["alpha_s"] = link["gloo_all_reduce_1_float_s"] / (2 * (2 - 1))  # two machines' ring: 2 messages
            link.update(rate=rate, agents_per_machine=per_machine)
            links.append(link)
            print(f"  link {rate}: {describe_link(link)}", flush=True)
            for strategy in args.strategies:
                fits = [one_fit(strategy, args, frame, workers, cluster) for _ in range(args.repeats)]
                row = median_row(fits)
                if parameters_bytes is None:
                    from spark_ddl.models import MLP

                    parameters_bytes = 4 * sum(p.numel() for p in MLP(64, 10, args.hidden).parameters())
                layout = row["summary"].get("machines") or layout
                machine_of = machine_of_rank(layout, args.machines, per_machine)
                wire, source, messages = model_bytes(strategy, parameters_bytes, machine_of, row["summary"])
                compute = local.get(local_base(strategy))
                if compute is not None:
                    compute += compression.get(strategy, 0.0)
                predicted = predict(compute, wire, messages, link)
                row.update(agents=f"{args.machines}×{per_machine}", machines=args.machines,
                           agents_per_machine=per_machine, rate=rate, strategy=strategy,
                           label=STRATEGIES[strategy][0], synchronous=strategy in SYNCHRONOUS,
                           bytes_across_per_step=wire, bytes_source=source, messages_per_step=messages,
                           machine_of_rank=machine_of,
                           compute_seconds_per_step=compute, compression_seconds_per_step=compression.get(strategy),
                           predicted_seconds_per_step=predicted,
                           measured_over_predicted=(row["seconds_per_step"] / predicted
                                                    if predicted and row["seconds_per_step"] else None))
                rows.append(row)
                print("  " + format_row(row, args.target), flush=True)
    finally:
        try:
            if spark is not None:
                for number in range(1, args.machines + 1):
                    cluster.limit(number, None)  # the driver's goodbyes at full speed
                spark.stop()
        finally:
            cluster.close()
    return rows, links


# -- the table ---------------------------------------------------------------------------------

HEADER = (f"{'agents':<6} {'rate':<9} {'strategy':<27} {'s/epoch':>7} {'ms/step':>8} {'compute':>8} "
          f"{'predict':>8} {'meas/pred':>9} {'wire B/step':>19} {'link B/step':>11} {'to target':>14} {'training':>8}")


def format_row(row: dict[str, Any], target: float) -> str:
    def ms(value):
        return f"{value * 1e3:8.2f}" if value is not None else f"{'–':>8}"

    ratio = row.get("measured_over_predicted")
    source = " (model)" if row["bytes_source"] == "model" else ""
    across = f"{row['bytes_across_per_step']:,.0f}{source}" if math.isfinite(row["bytes_across_per_step"]) else "–"
    link = f"{row['link_bytes_per_step']:,.0f}" if row.get("link_bytes_per_step") is not None else "–"
    reached = (f"{row['time_to_target_s']:.1f} s (ep {row['target_epoch']:.0f})"
               if row.get("time_to_target_s") is not None else "not reached")
    training = f"{row['training_seconds_to_target']:.2f}" if row.get("training_seconds_to_target") else "–"
    return (f"{row['agents']:<6} {row['rate']:<9} {row['label']:<27} {row['seconds_per_epoch']:7.3f} "
            f"{ms(row['seconds_per_step'])} {ms(row.get('compute_seconds_per_step'))} "
            f"{ms(row.get('predicted_seconds_per_step'))} {f'{ratio:.2f}' if ratio else '–':>9} "
            f"{across:>19} {link:>11} {reached:>14} {training:>8}")


def targets(rows: list[dict[str, Any]], slow: str) -> dict[str, Any]:
    """The issue's three targets, as far as the rows measured allow."""
    out: dict[str, Any] = {}
    ratios = [r["measured_over_predicted"] for r in rows if r["synchronous"] and r["measured_over_predicted"]]
    if ratios:
        out["a_every_sync_row_within_25pct"] = all(0.75 <= x <= 1.25 for x in ratios)
        out["a_ratios_range"] = [min(ratios), max(ratios)]
        out["a_rows_within"] = f"{sum(0.75 <= x <= 1.25 for x in ratios)}/{len(ratios)}"
    for per_machine in sorted({r["agents_per_machine"] for r in rows}):
        group = {r["strategy"]: r for r in rows if r["rate"] == slow and r["agents_per_machine"] == per_machine}
        flat = group.get("flat")
        key = f"{rows[0]['machines']}x{per_machine}"
        if flat and flat["time_to_target_s"]:
            reached = [r for r in group.values() if r["time_to_target_s"] is not None]
            best = min(reached, key=lambda r: r["time_to_target_s"])
            speedup = flat["time_to_target_s"] / best["time_to_target_s"]
            out[f"b_{key}_best_to_target"] = {"strategy": best["strategy"], "speedup": speedup, "met": speedup >= 5}
            trained = [r for r in reached if r["training_seconds_to_target"]]
            fastest = min(trained, key=lambda r: r["training_seconds_to_target"])
            out[f"b_{key}_best_training_to_target"] = {
                "strategy": fastest["strategy"],
                "speedup": flat["training_seconds_to_target"] / fastest["training_seconds_to_target"]}
        if flat and group.get("fp16"):
            speedup = flat["seconds_per_step"] / group["fp16"]["seconds_per_step"]
            out[f"c_{key}_fp16_step_speedup"] = {"speedup": speedup, "met": speedup >= 1.8}
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run this benchmark with command-line arguments ``argv``."""
    from spark_ddl.apps.options import parse_with_config
    from spark_ddl.benchmarks.common import emit
    from spark_ddl.testbed.network import missing_requirements

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--repeats", type=int, default=1, help="fits per row (medians printed)")
    parser.add_argument("--compute", choices=("local", "none"), default="local",
                        help="measure compute-only step times on local[M·L] for the prediction (none: skip)")
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
    per_machine_values = [int(a) for a in str(args.agents_per_machine).split(",") if a]
    reason = missing_requirements()
    if reason is not None:
        print(f"spark-ddl bench network needs separate machines: {reason}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    rows, links, compute = [], [], {}
    compression = {}
    if args.compute == "local":
        for strategy in ("fp16", "powersgd"):
            if strategy in args.strategies:
                compression[strategy] = compression_compute(strategy, args.hidden)
                print(f"  compression work of the leader, {strategy}: {compression[strategy] * 1e3:.2f} ms/step",
                      flush=True)
    for per_machine in per_machine_values:
        world = args.machines * per_machine
        compute[world] = compute_only(args, world) if args.compute == "local" else {}
        more_rows, more_links = machine_rows(args, per_machine, compute[world], compression)
        rows += more_rows
        links += more_links

    slow = min(args.rates, key=lambda r: rate_bits(r) or float("inf"))
    print(f"\nSynchronisation across machines: digits, MLP 64→{'→'.join(map(str, args.hidden))}→10, batch "
          f"{args.batch_size}/agent, SGD momentum 0.9, {args.epochs} epochs, target held-out accuracy {args.target}"
          f"{f', medians of {args.repeats}' if args.repeats > 1 else ''}")
    print("compute: ms/step with every agent on one machine (local[M·L]; flat for fp16/powersgd) + the leader's "
          "compression work; predict = compute + wire ÷ TCP goodput + messages × α (both measured per rate); wire: "
          "bytes per step on one link's critical path (from the summary, or (model)); link: the busiest link "
          "direction's byte counter over the whole fit ÷ steps; to target: the fit's wall time less the epochs "
          "after the first at the target; training: the epochs' own seconds up to it\n")
    for name, seconds in compression.items():
        print(f"  compression work of the leader, {name}: {seconds * 1e3:.2f} ms/step")
    for link in links:
        print(f"  {args.machines}×{link['agents_per_machine']} link {link['rate']}: {describe_link(link)}")
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row, args.target))
    checks = targets(rows, slow)
    print()
    for key, value in checks.items():
        print(f"  {key}: {value}")
    result = {"benchmark": "network", "machines": args.machines, "agents_per_machine": per_machine_values,
              "rates": args.rates, "strategies": args.strategies, "epochs": args.epochs, "target": args.target,
              "hidden": args.hidden, "batch_size": args.batch_size, "repeats": args.repeats,
              "compute_seconds_per_step": {str(k): v for k, v in compute.items()},
              "compression_seconds_per_step": compression, "links": links, "rows": rows,
              "targets": checks, "seconds": time.perf_counter() - started}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
