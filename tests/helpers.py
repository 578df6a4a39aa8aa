"""Models and data builders shared by the tests (importable on executors via PYTHONPATH)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pyspark.sql import DataFrame, SparkSession
from torch import nn

REPO = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    """A small MLP for regression or classification tests."""

    def __init__(self, in_features: int = 4, hidden: int = 8, out_features: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ExplodingNet(nn.Module):
    """Raises from forward (to test that the worker's own error reaches the driver)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom: ExplodingNet.forward refuses to run")


class DataDependentNet(nn.Module):
    """Python control flow on tensor values: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if float(out.detach().abs().sum()) > 1e9:  # a value-dependent branch
            return out * 0
        return out


def regression_arrays(rows: int, features: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic features and a noisy linear target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    w = rng.normal(size=(features,)).astype(np.float32)
    y = (x @ w + 0.1 * rng.normal(size=rows)).astype(np.float32)
    return x, y


def split_by_sizes(x: np.ndarray, y: np.ndarray, sizes: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive (features, labels) slices of the given sizes."""
    bounds = np.cumsum([0, *sizes])
    return [(x[lo:hi], y[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def frame_with_partitions(
    spark: SparkSession, parts: Sequence[tuple[np.ndarray, np.ndarray]]
) -> DataFrame:
    """A DataFrame whose partition i holds exactly the rows of ``parts[i]``, in order."""
    payload = [
        [([float(v) for v in x_row], float(y_row)) for x_row, y_row in zip(x, y)] for x, y in parts
    ]
    rdd = spark.sparkContext.parallelize(range(len(parts)), len(parts)).flatMap(lambda i: payload[i])
    frame = spark.createDataFrame(rdd, "features array<float>, label float")
    assert frame.rdd.getNumPartitions() == len(parts)
    return frame


class SparkJobs:
    """Counts the Spark jobs the whole application starts inside ``with SparkJobs(spark) as jobs:``
    (``jobs.count`` afterwards), from any thread and in any job group: job ids are allocated in
    sequence application-wide, so a one-task probe job before and after brackets them."""

    def __init__(self, spark: SparkSession) -> None:
        self.sc = spark.sparkContext
        self.first: int | None = None
        self.count: int | None = None

    def _probe(self) -> int:
        group = f"tests-probe-{uuid.uuid4().hex}"
        self.sc.setJobGroup(group, "tests: job id probe")
        try:
            self.sc.parallelize([0], 1).count()
        finally:
            for key in ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel"):
                self.sc.setLocalProperty(key, None)
        (job,) = self.sc.statusTracker().getJobIdsForGroup(group)
        return job

    def __enter__(self) -> "SparkJobs":
        self.first = self._probe()
        return self

    def __exit__(self, *exc_info) -> bool:
        self.count = self._probe() - self.first - 1
        return False
