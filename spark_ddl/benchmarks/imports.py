"""What an agent's Python worker holds before any data: the resident memory each import (and
the first optimiser) adds, measured step by step in a fresh interpreter.

    spark-ddl bench imports --json bench_results/imports.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from spark_ddl.apps.options import parse_with_config
from spark_ddl.benchmarks.common import emit

# Each step runs after the ones before it, in this order, in one fresh interpreter.
STEPS = [
    ("python", ""),
    ("numpy", "import numpy"),
    ("pyarrow", "import pyarrow"),
    ("pyspark worker", "import pyspark.worker"),
    ("torch", "import torch"),
    ("torch.distributed", "import torch.distributed"),
    ("spark_ddl agent", "import spark_ddl.agent.entry"),
    ("first optimiser (torch._dynamo, sympy)", "torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)"),
    ("first Arrow conversion (pandas)", "pyarrow.array(numpy.arange(3))"),
]

_PROBE = """
import json, sys
def rss():
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith('VmRSS'))
out = []
for name, code in json.loads(sys.argv[1]):
    before = set(sys.modules)
    exec(code, globals())
    new = set(sys.modules) - before
    heavy = sorted(m for m in new if m in ('pandas', 'torch._dynamo', 'sympy', 'torch._inductor', 'scipy'))
    out.append({"step": name, "rss_bytes": rss(), "modules": len(new), "heavy_modules": heavy})
print(json.dumps(out))
"""


def import_costs() -> list[dict]:
    """RSS after each of ``STEPS`` in a fresh interpreter (the agent's imports, in its order)."""
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(STEPS)], capture_output=True, text=True,
                            check=True, timeout=300)
    steps = json.loads(result.stdout.strip().splitlines()[-1])
    previous = 0
    for step in steps:
        step["added_bytes"], previous = step["rss_bytes"] - previous, step["rss_bytes"]
    return steps


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run this benchmark with command-line arguments ``argv``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parse_with_config(parser, argv)
    steps = import_costs()
    print(f"\n{'step':<42} {'RSS MB':>8} {'added MB':>9}  new heavy modules")
    for step in steps:
        print(f"{step['step']:<42} {step['rss_bytes'] / 2**20:>8.0f} {step['added_bytes'] / 2**20:>9.0f}  "
              f"{', '.join(step['heavy_modules'])}")
    emit({"benchmark": "imports", "steps": steps}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
