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


def stall_in_epoch_two(marker: str, step: int = 1, seconds: float = 600):
    """A ``_fail_hook``: rank 1 stalls at ``step`` of epoch 2 (sleeps ``seconds``), first writing
    to ``marker`` when the stall began (same machine, same clock)."""
    import time

    def hook(rank: int, epoch: int, step_now: int, module) -> None:
        if rank == 1 and epoch == 1 and step_now == step:
            with open(marker, "w") as out:
                out.write(repr(time.time()))
            time.sleep(seconds)

    return hook


def assert_a_stalled_agent_stops_itself(frame: DataFrame, marker: str) -> None:
    """Without a status channel: rank 1 stalls in epoch 2, its own watchdog stops it and the fit
    fails with a StallError that names it, within seconds of stall_timeout (not the sleep)."""
    import time

    import pytest

    from spark_ddl import TorchEstimator
    from spark_ddl.driver.monitor import StallError

    estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=3, timeout=60, stall_timeout=3)
    estimator._fail_hook = stall_in_epoch_two(marker)
    with pytest.raises(StallError) as info:
        estimator.fit(frame)
    stalled_for = time.time() - float(Path(marker).read_text())
    assert 3 <= stalled_for < 45, stalled_for  # not the sleep; StallError below says which path (load here reaches 10)
    assert info.value.rank == 1 and info.value.retriable and "stopped itself" in str(info.value)
    assert "rank 1: epoch 2, step 2: forward pass (model code)" in str(info.value)


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


BIG_ID = 2**40  # far above float32's exact range (2**24)


class TypeProbe(nn.Module):
    """Checks, inside every forward pass, that each input arrives with the dtype and shape of the
    type table (and that int64 IDs above 2**24 arrive exact); a linear head gives the output."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 + 3 + 16 + 4, 1)

    def forward(self, user, k, flag, price, vec, ids, tokens, tokens_mask, img, v):
        def require(condition, what):
            if not bool(condition):
                raise ValueError(f"type probe: {what}")

        require(user.dtype == torch.int64 and user.dim() == 1, f"user {user.dtype} {tuple(user.shape)}")
        if bool((user != 0).any()):  # not the driver's zero batch
            require(torch.equal(user - BIG_ID, k), "int64 IDs above 2**24 lost precision")
        require(flag.dtype == torch.bool and flag.dim() == 1, f"flag {flag.dtype}")
        require(price.dtype == torch.float32 and price.dim() == 1, f"price {price.dtype}")
        require(vec.dtype == torch.float32 and vec.shape[1:] == (3,), f"vec {vec.dtype} {tuple(vec.shape)}")
        require(ids.dtype == torch.int64 and ids.shape[1:] == (2,), f"ids {ids.dtype} {tuple(ids.shape)}")
        require(torch.equal(ids[:, 0], k) and torch.equal(ids[:, 1], k * 10), "int arrays lost values")
        require(tokens.dtype == torch.int64 and tokens_mask.dtype == torch.bool, "tokens/mask dtypes")
        require(tokens.shape == tokens_mask.shape, "mask shape")
        require(torch.equal(tokens_mask.sum(dim=1), (k % 4) + 1), "mask marks each row's real length")
        require(bool((tokens[~tokens_mask] == 0).all()), "padding is 0")
        require(tokens.shape[1] == int(((k % 4) + 1).max()), "padded to the batch's longest row")
        require(img.dtype == torch.float32 and img.shape[1:] == (1, 4, 4), f"img {tuple(img.shape)}")
        require(v.dtype == torch.float32 and v.shape[1:] == (4,), f"v {v.dtype} {tuple(v.shape)}")
        x = torch.cat([vec, price.unsqueeze(1), flag.float().unsqueeze(1), (tokens * tokens_mask).sum(1, keepdim=True)
                       .float(), img.reshape(len(img), -1), v], dim=1)
        return self.head(x)


class ImageProbe(nn.Module):
    """A tiny CNN that checks its input is float32 [B, 3, H, W] in [0, 1] with red = k/255 (RGB order)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)

    def forward(self, image, k):
        if image.dtype != torch.float32 or image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image probe: {image.dtype} {tuple(image.shape)}")
        if not torch.allclose(image[:, 0, 0, 0], k.float() * 10 / 255) or not torch.allclose(
                image[:, 2, 0, 0], k.float() * 20 / 255):
            raise ValueError("image probe: channels are not in RGB order or not scaled to [0, 1]")
        return self.head(torch.relu(self.conv(image)).mean(dim=(2, 3)))


class TwoTower(nn.Module):
    """Matrix factorisation with biases: rating ~ <user, item> + b_user + b_item + global."""

    def __init__(self, users: int, items: int, dim: int = 8) -> None:
        super().__init__()
        self.user = nn.Embedding(users, dim)
        self.item = nn.Embedding(items, dim)
        self.user_bias = nn.Embedding(users, 1)
        self.item_bias = nn.Embedding(items, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        for table in (self.user, self.item):
            nn.init.normal_(table.weight, std=0.1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, user, item):
        dot = (self.user(user) * self.item(item)).sum(dim=1)
        return (dot + self.user_bias(user).squeeze(1) + self.item_bias(item).squeeze(1) + self.bias).unsqueeze(1)


def ratings_frame(spark: SparkSession, rows: int = 200) -> DataFrame:
    """Random (user long < 20, item long < 30, rating double) rows for ``TwoTower(20, 30)``."""
    rng = np.random.default_rng(1)
    data = [(int(u), int(i), float(r)) for u, i, r in zip(rng.integers(0, 20, rows), rng.integers(0, 30, rows),
                                                          rng.normal(size=rows))]
    return spark.createDataFrame(data, "user long, item long, rating double")


def two_tower_predictions(model, scored) -> np.ndarray:
    """A local forward pass of a fitted TwoTower on the ids of ``scored`` (a pandas frame)."""
    with torch.no_grad():
        return model.get_module()(torch.tensor(scored["user"].to_numpy()),
                                  torch.tensor(scored["item"].to_numpy())).reshape(-1).numpy()



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
