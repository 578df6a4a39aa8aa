"""spark-submit entry point of `spark-ddl stream-recommender` (the code lives in spark_ddl/apps/stream_recommender.py).

    spark-submit --master spark://host:7077 jobs/stream_recommender.py --help
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from spark_ddl.apps.stream_recommender import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
