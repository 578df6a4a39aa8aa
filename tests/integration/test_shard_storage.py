"""shard_storage='disk' trains exactly like memory mode and leaves no file behind."""

from __future__ import annotations

import glob
import os
import tempfile

import pytest
import torch

from spark_ddl import TorchEstimator
from tests.helpers import TinyNet, frame_with_partitions, regression_arrays, split_by_sizes


@pytest.mark.parametrize("sync", ["allreduce", "async"])
def test_disk_backed_shards_train_exactly_like_memory(spark, sync):
    data = frame_with_partitions(spark, split_by_sizes(*regression_arrays(300, seed=4), [150, 150]))
    models = {}
    pattern = os.path.join(tempfile.gettempdir(), "**", "spark_ddl-shard-*")  # executors' SPARK_LOCAL_DIRS
    before = set(glob.glob(pattern, recursive=True))
    for storage in ("memory", "disk"):
        torch.manual_seed(3)
        models[storage] = TorchEstimator(model=TinyNet(), loss="mse", batch_size=16, epochs=3, timeout=30,
                                         sync=sync, num_workers=2 if sync == "allreduce" else 1,
                                         shard_storage=storage, validation_fraction=0.2).fit(data)
    assert models["disk"].summary["shard_storage"] == "disk"
    assert models["memory"].summary["shard_storage"] == "memory"
    memory, disk = models["memory"].get_module().state_dict(), models["disk"].get_module().state_dict()
    assert all(torch.equal(memory[name], disk[name]) for name in memory)
    assert set(glob.glob(pattern, recursive=True)) == before
    assert all(rss > 0 for rss in models["disk"].summary["peak_rss_bytes_per_rank"])
