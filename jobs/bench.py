"""spark-submit entry point of `spark-ddl bench` (the code lives in spark_ddl/benchmarks/).

    python jobs/bench.py strategies --epochs 10 --json bench_results/strategies.json
    spark-submit --master spark://host:7077 jobs/bench.py launch --repeats 5
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from spark_ddl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
