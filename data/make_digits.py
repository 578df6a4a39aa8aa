"""Regenerate ``data/digits.parquet`` from scikit-learn's bundled copy of the UCI digits set.

Run once by hand (``pip install scikit-learn`` first); the Parquet file is committed, so
neither training nor the tests need scikit-learn.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits

SEED = 20261127
TEST_FRACTION = 0.2


def main() -> None:
    digits = load_digits()
    features = digits.data.astype(np.float32)  # 1797 x 64, pixel intensities 0..16
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):  # stratified: 20 % of every class goes to the test split
        idx = np.flatnonzero(labels == digit)
        chosen = rng.choice(idx, size=round(len(idx) * TEST_FRACTION), replace=False)
        is_test[chosen] = True
    table = pa.table(
        {
            "id": pa.array(np.arange(len(labels)), pa.int64()),
            "features": pa.array(list(features), pa.list_(pa.float32())),
            "label": pa.array(labels, pa.int64()),
            "split": pa.array(np.where(is_test, "test", "train")),
        }
    )
    out = Path(__file__).with_name("digits.parquet")
    pq.write_table(table, out, compression="zstd")
    print(f"wrote {out}: {table.num_rows} rows, {int(is_test.sum())} test")


if __name__ == "__main__":
    main()
