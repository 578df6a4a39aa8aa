"""``spark-ddl testbed up|down``: start separate machines with a Spark standalone cluster on them
(root, iproute2), or remove everything of a prefix, also what a killed run left.

    spark-ddl testbed up --machines 2 --cores 2       # prints the master URL and the driver's settings
    spark-submit --master spark://10.77.0.1:PORT --conf spark.driver.host=10.77.0.1 jobs/train.py --workers 4
    spark-ddl testbed down
"""

from __future__ import annotations

import argparse
import sys

from spark_ddl.testbed.cluster import MachineCluster


def main(argv: list[str] | None = None, prog: str = "python -m spark_ddl.testbed") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--machines", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1, help="cores (barrier slots) per machine")
    parser.add_argument("--memory", default="1g", help="memory per machine's worker")
    parser.add_argument("--rate", default=None, help="cap every machine's link, e.g. 100mbit or 1gbit")
    parser.add_argument("--prefix", default="ddl", help="names of the namespaces, links and bridge")
    parser.add_argument("--subnet", default="10.77.0", help="the first three octets of the machines' addresses")
    args = parser.parse_args(argv)
    cluster = MachineCluster(args.machines, args.cores, args.memory, prefix=args.prefix, subnet=args.subnet)
    if args.action == "down":
        cluster.close()  # also the master that `up` left running (its pid is in the state directory)
        print(f"removed the machines of prefix {args.prefix!r}")
        return 0
    url = cluster.start()
    if args.rate:
        for machine in cluster.network.machines:
            cluster.limit(machine.number, args.rate)
    print(url)
    print(" ".join(f"--conf {k}={v}" for k, v in cluster.spark_conf().items() if k != "spark.master"))
    print(f"machines: {', '.join(f'{m.name}={m.address}' for m in cluster.network.machines)}; "
          f"logs under {cluster.state}; stop with: spark-ddl testbed down --prefix {args.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
