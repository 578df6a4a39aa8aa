"""The disk-backed shard holds the same rows as the in-memory one and gives them back exactly."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import torch

from spark_ddl.agent.disk_shard import DiskShard
from spark_ddl.agent.shard import Shard
from spark_ddl.common.wire import FEATURES, LABEL, VALIDATION


def batches(rows: int, width: int, seed: int = 0, per_batch: int = 37):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, width)).astype(np.float32)
    y = rng.integers(0, 5, size=rows).astype(np.float64)
    held = rng.random(rows) < 0.2
    out = []
    for start in range(0, rows, per_batch):
        stop = min(rows, start + per_batch)
        out.append(pa.record_batch({
            FEATURES: pa.array(list(x[start:stop]), type=pa.list_(pa.float32())),
            LABEL: pa.array(y[start:stop]), VALIDATION: pa.array(held[start:stop]),
        }))
    return out


def test_spilled_shard_equals_the_in_memory_one_and_deletes_its_file():
    memory_train, memory_validation = Shard.from_arrow(batches(500, 6), torch.int64)
    disk_train, disk_validation = Shard.from_arrow(batches(500, 6), torch.int64, spill_bytes=2000)
    assert isinstance(disk_train, DiskShard) and os.path.exists(disk_train.path)
    assert disk_train.num_rows == memory_train.num_rows and disk_train.feature_dim == 6
    assert torch.equal(disk_validation.features, memory_validation.features)
    order = memory_train.epoch_order(3, True, 7, 1)
    assert torch.equal(order, disk_train.epoch_order(3, True, 7, 1))
    for start in range(0, len(order), 64):
        index = order[start:start + 64]
        batch = disk_train.batch(index)
        features, labels = batch["features"], batch["label"]
        assert torch.equal(features, memory_train.features[index])
        assert torch.equal(labels, memory_train.labels[index]) and labels.dtype == torch.int64
    path = disk_train.path
    disk_train.close()
    assert not os.path.exists(path)


def test_small_shards_stay_in_memory_under_auto():
    train, _ = Shard.from_arrow(batches(50, 4), torch.float32, spill_bytes=10**9)
    assert isinstance(train, Shard) and train.num_rows > 0
