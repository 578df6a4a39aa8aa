"""How training throughput grows with agents and with model size, each strategy's cost as it
grows: samples/s of 1, 2 and 4 agents on ``local-cluster[N,1,1024]`` (one executor JVM a
agent, all on this machine's cores), flat vs DDP; and of 2 agents on ``local[2]`` for MLPs of
about 0.3M, 3M and 30M parameters, against one plain single-thread process.

    spark-ddl bench scale --json bench_results/scale.json
    spark-ddl bench scale --agents 1,2 --sizes 0.3,3 --repeats 1        # quicker

Agents beyond the machine's cores share them: the agent curve then measures what the
exchange costs when agents contend, not a speed-up. The cost model (docs/performance.md) turns the measured
per-step exchange into a prediction for many machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from spark_ddl import get_or_create_session
from spark_ddl.apps.options import parse_with_config
from spark_ddl.benchmarks.common import emit
from spark_ddl.benchmarks.throughput import mlp_estimator, plain_training_samples_per_s, steady_samples_per_s, synthetic

FEATURES = 64


def hidden_for(million_parameters: float) -> int:
    """The width h of an MLP 64→h→h→10 with about that many parameters (h² + 76h + 10 = n)."""
    n = million_parameters * 1e6
    return int((-(FEATURES + 12) + ((FEATURES + 12) ** 2 + 4 * n) ** 0.5) / 2)


def parameters(hidden: int) -> int:
    return (FEATURES + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * 10


def _session(master: str, agents: int):
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    conf = {"spark.executor.memory": "768m"} if master.startswith("local-cluster") else {}
    return get_or_create_session(master=master, num_workers=agents, app_name="spark_ddl-bench-scale", extra_conf=conf)


def rate(spark, agents: int, hidden: int, rows: int, batch: int, repeats: int, **settings: Any) -> list[float]:
    """Steady samples/s of ``repeats`` fits of 2 epochs (after one untimed warm-up fit)."""
    data = synthetic(spark, rows, FEATURES, 10, agents).cache()
    data.count()
    estimator = mlp_estimator(FEATURES, [hidden, hidden], batch, epochs=2, num_workers=agents, **settings)
    estimator.copy({estimator.epochs: 1}).fit(data.limit(4 * batch * agents))
    try:
        return [steady_samples_per_s(estimator.fit(data)) for _ in range(repeats)]
    finally:
        data.unpersist()


def agents_curve(args: argparse.Namespace) -> list[dict[str, Any]]:
    hidden = hidden_for(args.agents_model)
    plain = plain_training_samples_per_s(args.rows, FEATURES, [hidden, hidden], args.batch_size)
    points = []
    for agents in args.agents:
        spark = _session(f"local-cluster[{agents},1,1024]", agents)
        for impl in ("flat", "ddp"):
            rates = rate(spark, agents, hidden, args.rows, args.batch_size, args.repeats, allreduce_impl=impl)
            points.append({"agents": agents, "impl": impl, "parameters": parameters(hidden),
                           "samples_per_s": statistics.median(rates), "plain_samples_per_s": plain,
                           "ratio": statistics.median(rates) / plain})
    return points


def sizes_curve(args: argparse.Namespace) -> list[dict[str, Any]]:
    spark = _session("local[2]", 2)
    points = []
    for size in args.sizes:
        hidden = hidden_for(size)
        rows = max(4 * args.batch_size, int(args.size_rows * 0.3 / size))  # about the same work per size
        plain = statistics.median(plain_training_samples_per_s(rows, FEATURES, [hidden, hidden], args.batch_size)
                                  for _ in range(args.repeats))
        for impl in ("flat", "ddp"):
            rates = rate(spark, 2, hidden, rows, args.batch_size, args.repeats, allreduce_impl=impl)
            points.append({"parameters": parameters(hidden), "impl": impl, "rows": rows,
                           "samples_per_s": statistics.median(rates), "plain_samples_per_s": plain,
                           "ratio": statistics.median(rates) / plain})
    return points


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run this benchmark with command-line arguments ``argv``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="1,2,4", help="agent counts (local-cluster[N,1,1024] each)")
    parser.add_argument("--agents-model", type=float, default=0.3, help="million parameters of the agents curve's MLP")
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the agents curve")
    parser.add_argument("--sizes", default="0.3,3,30", help="million parameters of the model-size curve's MLPs")
    parser.add_argument("--size-rows", type=int, default=100_000, help="rows for the 0.3M model (fewer for bigger)")
    parser.add_argument("--batch-size", type=int, default=128, help="per agent (and the plain process)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parse_with_config(parser, argv)
    args.agents = [int(a) for a in str(args.agents).split(",") if a]
    args.sizes = [float(s) for s in str(args.sizes).split(",") if s]
    agents = agents_curve(args) if args.agents else []
    sizes = sizes_curve(args) if args.sizes else []
    print(f"\nAgents (local-cluster[N,1,1024] on this machine), MLP {agents[0]['parameters'] / 1e6 if agents else 0:.2f}M "
          f"parameters, batch {args.batch_size}/agent, medians of {args.repeats}\n")
    print(f"{'agents':>6} {'impl':<5} {'samples/s':>11} {'÷ plain':>8}")
    for p in agents:
        print(f"{p['agents']:>6} {p['impl']:<5} {p['samples_per_s']:>11,.0f} {p['ratio']:>8.2f}")
    print(f"\nModel size, 2 agents (local[2]), batch {args.batch_size}/agent, medians of {args.repeats}\n")
    print(f"{'parameters':>11} {'impl':<5} {'rows':>8} {'samples/s':>11} {'plain':>9} {'÷ plain':>8}")
    for p in sizes:
        print(f"{p['parameters'] / 1e6:>10.2f}M {p['impl']:<5} {p['rows']:>8} {p['samples_per_s']:>11,.0f} "
              f"{p['plain_samples_per_s']:>9,.0f} {p['ratio']:>8.2f}")
    emit({"benchmark": "scale", "batch_size": args.batch_size, "repeats": args.repeats, "agents": agents,
          "sizes": sizes}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
