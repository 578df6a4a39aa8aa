"""The pre-launch input scan runs once per cached DataFrame: another fit of the same cached rows
(a hyper-parameter search, a CrossValidator fold) reuses what it found, and still refuses the
same bad input; an uncached DataFrame, or one cached anew, is scanned every time."""

from __future__ import annotations

import uuid

import pytest

from spark_ddl import SchemaError, TorchEstimator
from tests.helpers import TinyNet

ROWS = [([0.5, 1.0, -1.0, 2.0], float(i % 2)) for i in range(12)]
SCHEMA = "features array<double>, label double"


def driver_jobs(spark, action) -> int:
    """Spark jobs the calling thread starts during ``action`` (the pre-launch scan runs here;
    the barrier job runs in a thread of its own, outside the group)."""
    group = f"scan-{uuid.uuid4().hex[:8]}"
    sc = spark.sparkContext
    sc.setJobGroup(group, "input scan count")
    try:
        action()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    return len(sc.statusTracker().getJobIdsForGroup(group))


def estimator(**settings) -> TorchEstimator:
    return TorchEstimator(model=TinyNet(), loss="mse", epochs=1, batch_size=4, progress="off", timeout=120, **settings)


def test_a_cached_dataframe_is_scanned_once_and_again_after_it_is_cached_anew(spark):
    data = spark.createDataFrame(ROWS, SCHEMA).repartition(2)
    assert driver_jobs(spark, lambda: estimator().fit(data)) >= 1
    assert driver_jobs(spark, lambda: estimator().fit(data)) >= 1  # not cached: scanned every time
    data.cache().count()
    try:
        assert driver_jobs(spark, lambda: estimator().fit(data)) >= 1
        assert driver_jobs(spark, lambda: estimator().copy().fit(data)) == 0
        validated = estimator(validation_fraction=0.25)
        assert driver_jobs(spark, lambda: validated.fit(data)) >= 1  # other training columns: another scan
        assert driver_jobs(spark, lambda: validated.fit(data)) == 0
        data.unpersist()
        data.cache().count()
        assert driver_jobs(spark, lambda: estimator().fit(data)) >= 1  # a new cache entry
    finally:
        data.unpersist()


def test_bad_rows_of_a_cached_dataframe_are_refused_at_every_fit(spark):
    bad = spark.createDataFrame(ROWS + [([0.5, None, 1.0, 2.0], 1.0)], SCHEMA).repartition(2).cache()
    bad.count()
    try:
        for _ in range(2):
            with pytest.raises(SchemaError, match="1 row.s. with a null, NaN or infinite element"):
                estimator().fit(bad)
    finally:
        bad.unpersist()
