"""``spark-ddl bench network``'s measurements of the links and its traffic model: TCP goodput and
α between two namespace machines, the leader's compression work, the bytes each strategy sends
across machines over the ranks' placement, and the cost model's prediction of a step."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
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


def _run_with_peers(main: list[str], peers: list[list[str]], env: dict[str, str] | None = None,
                    timeout: float = 300) -> str:
    """Start the ``peers`` commands, run ``main`` to its end (its stdout returned), then reap the peers
    (killed if they outlive it by 30 s)."""
    started = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for command in peers]
    try:
        return subprocess.run(main, env=env, check=True, capture_output=True, text=True, timeout=timeout).stdout
    finally:
        for peer in started:
            try:
                peer.wait(30)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait()


_GLOO_PROBE = r"""
import json, os, statistics, sys, time
import torch, torch.distributed as dist
rank, address, port, calls, floats = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=rank, world_size=2,
                        timeout=__import__("datetime").timedelta(seconds=120))
def timed(call, count, warm, barrier=False):
    times = []
    for i in range(count + warm):
        if barrier: dist.barrier()
        started = time.perf_counter(); call(); elapsed = time.perf_counter() - started
        if i >= warm: times.append(elapsed)
    return times
def slowest(seconds):  # both ranks run the same number of calls; the slower rank's time counts
    value = torch.tensor([max(seconds, 1e-6)]); dist.all_reduce(value, op=dist.ReduceOp.MAX); return value.item()
def both(times):  # (mean, median) of the slower rank; the mean: a step's exchanges add up, slow tail included
    return slowest(statistics.mean(times)), slowest(statistics.median(times))
def sized(call, barrier=False):
    first = slowest(timed(call, 1, 1, barrier)[0])
    return both(timed(call, int(min(50, max(5, 4.0 / first))), 0, barrier))
def all_reduce(value): return lambda: dist.all_reduce(value)
big = torch.zeros(floats)
out = {"gloo_big_floats": floats}
out["gloo_all_reduce_1_float_s"], out["gloo_all_reduce_1_float_median_s"] = both(
    timed(all_reduce(torch.zeros(1)), calls, 20))
out["gloo_all_reduce_big_s"], out["gloo_all_reduce_big_median_s"] = sized(all_reduce(big))
out["gloo_all_reduce_big_fp16_s"] = sized(all_reduce(torch.zeros(floats, dtype=torch.float16)))[0]
# one direction: rank 0 to rank 1 (the receiver finishes last), both starting together
out["gloo_broadcast_big_s"] = sized(lambda: dist.broadcast(big, 0), barrier=True)[0]
dist.barrier(); dist.destroy_process_group()
if rank == 0:
    print(json.dumps(out))
"""


def probe_gloo(cluster, floats: int, calls: int = 200, runs: int = 3) -> dict[str, float]:
    """A gloo all-reduce between machines 1 and 2 in two processes on the machines' network namespaces:
    the mean seconds of one float (two messages on a two-member ring: 2·(M − 1)·α) and of ``floats``
    float32 (the gradient's size; means, not medians: a fit's exchanges add up, their slow tail
    included — on an unlimited link a probe's mean was up to 1.6× its median, the medians are kept
    beside them), and from the two the bytes per second gloo moves across the link
    with its own copies and threads (``gloo_bytes_per_s``: a two-member ring all-reduce of *S* bytes
    sends *S* each way; the bulk TCP goodput does not count gloo's CPU work); the same for ``floats``
    float16 (``gloo_fp16_bytes_per_s``: gloo sums half floats on the CPU far slower than floats, so
    on a fast link fp16's half of the bytes is not half of the time); and a broadcast of ``floats``
    float32 from one machine to the other (``gloo_oneway_bytes_per_s``: *S* in one direction while
    the other carries only acknowledgements — what ``parameter_server``'s gather and broadcast
    move at; unlimited, no sum and no traffic the other way make it 2–3× an all-reduce's; on a capped
    link the all-reduce's acknowledgements queue behind the other direction's data). Medians of
    ``runs`` probes, each in fresh processes (on an unlimited link one probe's all-reduce of *S*
    varied 1.6–3.6 ms)."""
    probes = [_probe_gloo_once(cluster, floats, calls) for _ in range(runs)]
    result = {key: statistics.median(probe[key] for probe in probes) for key in probes[0]}
    result["gloo_probe_runs"] = probes
    return result


def _probe_gloo_once(cluster, floats: int, calls: int) -> dict[str, float]:
    first = cluster.network.machine(1)
    port = 29412
    env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1")
    commands = [["ip", "netns", "exec", cluster.network.machine(rank + 1).netns, sys.executable, "-c", _GLOO_PROBE,
                 str(rank), first.address, str(port), str(calls), str(floats)] for rank in (0, 1)]
    result = json.loads(_run_with_peers(commands[0], commands[1:], env).strip().splitlines()[-1])
    latency = result["gloo_all_reduce_1_float_s"]
    for key, size, seconds, messages in (("gloo_bytes_per_s", 4, "gloo_all_reduce_big_s", 2),
                                         ("gloo_fp16_bytes_per_s", 2, "gloo_all_reduce_big_fp16_s", 2),
                                         ("gloo_oneway_bytes_per_s", 4, "gloo_broadcast_big_s", 1)):
        wire = float(size * floats)  # all-reduce: per direction on two members, 2 · (1/2) · S; broadcast: S
        result[key] = wire / max(result[seconds] - latency * messages / 2, 1e-9)
    return result


_COMPRESSION_PROBE = r"""
import json, os, statistics, sys, time
import torch, torch.distributed as dist
from spark_ddl.networks import MLP
from spark_ddl.sync.machine_exchange import make_exchange
compression, hidden, calls = sys.argv[1], [int(h) for h in sys.argv[2].split(",")], int(sys.argv[3])
rank, world, init = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
shapes = [p.shape for p in MLP(64, 10, hidden).parameters()]
numel = sum(int(torch.Size(s).numel()) for s in shapes)
def mean(total, out): torch.div(total, 2, out=out)
exchanges = {name: make_exchange(name, None, shapes, world, world, mean) for name in ("none", compression)}
gradient = torch.randn(numel, generator=torch.Generator().manual_seed(0))
out = {}
def mean_of(call, count, warm):  # the mean: a fit's steps add up, their slow tail included
    times = []
    for i in range(count + warm):
        started = time.perf_counter(); call(); elapsed = time.perf_counter() - started
        if i >= warm: times.append(elapsed)
    return statistics.mean(times)
for name, exchange in exchanges.items():
    out[name] = mean_of(lambda: exchange(gradient.clone()), calls, 5)
out["one_float"] = mean_of(lambda: dist.all_reduce(torch.zeros(1)), 100, 10)
dist.barrier(); dist.destroy_process_group()
if rank == 0:
    print(json.dumps(out))
"""

POWERSGD_ALL_REDUCES = 3  # one after the other each step: the uncompressed vectors, P, Q


def compression_compute(compression: str, hidden: list[int], calls: int = 50, runs: int = 3) -> float:
    """Seconds per step the leader's exchange spends on ``compression`` beyond its bytes and messages.
    fp16/bf16: the casts, on a one-process gloo group (no byte travels): ``compression`` minus
    ``none``. PowerSGD: on two processes of this host (loopback, one thread each, as agents), its
    exchange less the latency of its three all-reduces (the model counts those as messages × α on
    the link): torch's hook with its matrix products, orthogonalisation, error feedback and the
    hand-offs of its chained futures between gloo's threads and the caller, which a one-process
    group (no wait for a peer) would not show. The median of ``runs`` probes (from one start of the
    processes to the next it varies by up to 2× on this shared host)."""
    if compression == "none":
        return 0.0
    return statistics.median(_compression_probe(compression, hidden, calls) for _ in range(runs))


def _compression_probe(compression: str, hidden: list[int], calls: int) -> float:
    world = 2 if compression == "powersgd" else 1
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    init = f"tcp://127.0.0.1:{29413 if world == 2 else 29414}"
    commands = [[sys.executable, "-c", _COMPRESSION_PROBE, compression, ",".join(map(str, hidden)), str(calls),
                 str(rank), str(world), init] for rank in range(world)]
    times = json.loads(_run_with_peers(commands[0], commands[1:], env).strip().splitlines()[-1])
    if world == 1:
        return max(0.0, times[compression] - times["none"])
    return max(0.0, times[compression] - POWERSGD_ALL_REDUCES * times["one_float"])


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
    server = ["ip", "netns", "exec", server_machine.netns, sys.executable, "-c", _PROBE_SERVER,
              server_machine.address, str(port)]
    client = ["ip", "netns", "exec", client_machine.netns, sys.executable, "-c", _PROBE_CLIENT,
              server_machine.address, str(port), str(pings), str(size)]
    result = json.loads(_run_with_peers(client, [server], timeout=120))
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


def one_way(messages: list[tuple[int, int, float]], machine_of: list[int]) -> bool:
    """Whether ``messages`` (sent at the same time) use every link in one direction only: no machine
    both sends to and receives from another (a gather, a broadcast's round), so the link's far
    direction carries only acknowledgements."""
    senders = {machine_of[s] for s, d, _ in messages if machine_of[s] != machine_of[d]}
    receivers = {machine_of[d] for s, d, _ in messages if machine_of[s] != machine_of[d]}
    return not senders & receivers


def ring_all_reduce_bytes(size: float, machine_of: list[int]) -> float:
    """gloo's ring all-reduce over every rank (rank r sends to r + 1): a reduce-scatter and an
    all-gather, each (n − 1)/n of the payload along every ring edge."""
    n = len(machine_of)
    if n < 2:
        return 0.0
    return 2 * critical_bytes([(r, (r + 1) % n, (n - 1) / n * size) for r in range(n)], machine_of)


def reduce_broadcast_bytes(size: float, machine_of: list[int]) -> tuple[float, float]:
    """``parameter_server``'s exchange as gloo runs it: ``reduce`` to rank 0 (a ring reduce-scatter,
    rank r sending (n − 1)/n to r − 1, then every rank's 1/n chunk to the root), then
    ``broadcast`` from rank 0 (a binomial tree: in round i, ranks below 2^i send everything to
    rank + 2^i), the phases one after the other. (All the bytes on the critical path, those of them
    in phases that use the links one way only.)"""
    n = len(machine_of)
    if n < 2:
        return 0.0, 0.0
    phases = [[(r, (r - 1) % n, (n - 1) / n * size) for r in range(n)], [(r, 0, size / n) for r in range(1, n)]]
    step = 1
    while step < n:
        phases.append([(r, r + step, size) for r in range(step) if r + step < n])
        step *= 2
    total = one_way_total = 0.0
    for phase in phases:
        bytes_ = critical_bytes(phase, machine_of)
        total += bytes_
        one_way_total += bytes_ if one_way(phase, machine_of) else 0.0
    return total, one_way_total


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
                summary: dict[str, Any] | None) -> tuple[float, str, float, float]:
    """(bytes on the critical path of the busiest link per step — phases that follow each other
    add up; where the number comes from; messages per step on the critical path; how many of those
    bytes travel in phases that use the links one way only) for ``strategy``, ranks placed on
    machines as ``machine_of`` says. All-reduces use every link both ways at once."""
    size, world, machines = float(parameters_bytes), len(machine_of), len(set(machine_of))
    rounds = max(1, math.ceil(math.log2(world)))
    if strategy in ("flat", "fp16", "powersgd"):  # the machines' leaders only
        reported = (summary or {}).get("bytes_across_machines_per_step")
        all_reduces = POWERSGD_ALL_REDUCES if strategy == "powersgd" else 1
        if reported is None:
            shrink = {"flat": 1.0, "fp16": 0.5, "powersgd": 0.0105}[strategy]
            return 2 * (machines - 1) / machines * size * shrink, "model", 2 * (machines - 1) * all_reduces, 0.0
        return float(reported), "summary", 2 * (machines - 1) * all_reduces, 0.0
    if strategy == "ddp":
        return ring_all_reduce_bytes(size, machine_of), "model", 2 * (world - 1) * DDP_BUCKETS, 0.0
    if strategy == "ps":  # reduce (ring + gather), the verdict broadcast, the parameters broadcast
        total, one_way_bytes = reduce_broadcast_bytes(size, machine_of)
        return total, "model", (world - 1) + 1 + 2 * rounds, one_way_bytes
    if strategy in ("local_sgd", "local_sgd_fp16"):  # parameters (fp16: their changes) averaged every SYNC_EVERY steps
        reported = (summary or {}).get("bytes_across_machines_per_step")
        if reported is not None:  # the flat exchange: the machines' leaders only
            return float(reported), "summary", 2 * (machines - 1) / SYNC_EVERY, 0.0
        shrink = 0.5 if strategy == "local_sgd_fp16" else 1.0
        return (ring_all_reduce_bytes(size * shrink, machine_of) / SYNC_EVERY, "model", 2 * (world - 1) / SYNC_EVERY,
                0.0)
    return float("nan"), "model", float("nan"), 0.0  # async: no lock-step, no prediction


def describe_link(link: dict[str, Any]) -> str:
    mbit = 8 / 1e6
    return (f"TCP goodput {link['goodput_bytes_per_s'] * mbit:,.1f} Mbit/s, gloo {link['gloo_bytes_per_s'] * mbit:,.1f}"
            f" Mbit/s (all-reduce of {link['gloo_big_floats']:,} floats {link['gloo_all_reduce_big_s'] * 1e3:.2f} ms; "
            f"as float16 {link['gloo_fp16_bytes_per_s'] * mbit:,.1f} Mbit/s, "
            f"{link['gloo_all_reduce_big_fp16_s'] * 1e3:.2f} ms; one way, a broadcast: "
            f"{link['gloo_oneway_bytes_per_s'] * mbit:,.1f} Mbit/s, {link['gloo_broadcast_big_s'] * 1e3:.2f} ms), "
            f"gloo all-reduce of one float {link['gloo_all_reduce_1_float_s'] * 1e6:.0f} µs "
            f"(α {link['alpha_s'] * 1e6:.0f} µs; TCP round trip / 2: {link['tcp_alpha_s'] * 1e6:.0f} µs)")


def bandwidth_key(strategy: str) -> str:
    """The link's bandwidth that ``strategy``'s bytes travel at: gloo's for half floats for fp16 (and
    bf16), else gloo's for floats."""
    return "gloo_fp16_bytes_per_s" if strategy in ("fp16", "bf16", "local_sgd_fp16") else "gloo_bytes_per_s"


def predict_exchange(wire_bytes: float, messages: float, link: dict[str, float],
                     compression_s: float = 0.0, bandwidth: str = "gloo_bytes_per_s", one_way_bytes: float = 0.0,
                     one_way_bandwidth: str = "gloo_oneway_bytes_per_s") -> float | None:
    """Seconds per step of the exchange between machines: the leader's compression work + the wire
    bytes at the link's ``bandwidth`` (gloo's own, measured with a gradient-sized all-reduce; or
    ``goodput_bytes_per_s``, a bulk TCP send's), those of them sent one way only at
    ``one_way_bandwidth`` (gloo's broadcast) + the messages on the critical path at α each (None:
    async)."""
    if not math.isfinite(wire_bytes):
        return None
    both_ways = wire_bytes - one_way_bytes
    return (compression_s + both_ways / link[bandwidth] + one_way_bytes / link[one_way_bandwidth]
            + messages * link["alpha_s"])
