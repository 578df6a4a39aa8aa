"""The proof that synchronisation is right: 2 agents with per-agent batch b end with the same
parameters as one plain PyTorch process training on the combined batch 2b."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from spark_ddl import TorchEstimator
from tests.helpers import TinyNet, frame_with_partitions, regression_arrays, split_by_sizes
from tests.references import FLOAT32_PATHS, combined_batch_sgd, max_relative_difference, steps_per_epoch


def reference_training(module, parts, batch_size, epochs, lr):
    """One process, plain SGD: step s uses rank 0's rows [s*b, (s+1)*b) followed by rank 1's."""
    return combined_batch_sgd(module, parts, batch_size, epochs, lr), steps_per_epoch(parts, batch_size) * epochs


def train_both(spark, sizes, batch_size=8, epochs=2, lr=0.05):
    parts = split_by_sizes(*regression_arrays(sum(sizes), seed=3), sizes)
    torch.manual_seed(11)
    net = TinyNet()
    initial = copy.deepcopy(net)
    estimator = TorchEstimator(model=net, loss="mse", optimizer="sgd", lr=lr, batch_size=batch_size,
                               epochs=epochs, num_workers=2, shuffle=False, seed=0, timeout=60)
    trained = estimator.fit(frame_with_partitions(spark, parts))
    reference, steps = reference_training(initial, parts, batch_size, epochs, lr)
    return trained, reference, initial, steps


def test_two_agents_equal_one_process_on_the_combined_batch(any_spark):
    trained, reference, initial, steps = train_both(any_spark, [80, 80])
    assert steps >= 20
    assert max_relative_difference(initial, reference) > 1e-2  # training really moved the weights
    assert max_relative_difference(trained.get_module(), reference) <= 1e-5
    assert [h["epoch"] for h in trained.history] == [1, 2]
    assert trained.summary["shard_sizes"] == [80, 80]


@pytest.mark.parametrize("sizes", [[0, 45], [1, 45], [37, 61]])
def test_uneven_shards_equal_one_process_on_the_concatenated_batches(spark, sizes):
    trained, reference, initial, _ = train_both(spark, sizes, batch_size=8, epochs=3)
    assert trained.summary["shard_sizes"] == sizes
    assert max_relative_difference(trained.get_module(), reference) <= 1e-5


def test_fewer_rows_than_one_batch_per_agent_still_trains(spark):
    trained, reference, _, steps = train_both(spark, [2, 3], batch_size=32, epochs=4)
    assert steps == 4  # one (short) step per epoch
    assert max_relative_difference(trained.get_module(), reference) <= 1e-5


@pytest.mark.own_session
def test_three_agents_with_0_1_and_500_rows(sessions):
    spark = sessions.get("local3", master="local[3]")
    sizes = [0, 1, 500]
    parts = split_by_sizes(*regression_arrays(sum(sizes), seed=9), sizes)
    torch.manual_seed(5)
    net = TinyNet()
    initial = copy.deepcopy(net)
    trained = TorchEstimator(model=net, loss="mse", lr=0.05, batch_size=32, epochs=2, num_workers=3,
                             shuffle=False, timeout=60).fit(frame_with_partitions(spark, parts))
    reference, steps = reference_training(initial, parts, 32, 2, 0.05)
    assert trained.summary["shard_sizes"] == sizes and steps == 32
    assert max_relative_difference(trained.get_module(), reference) <= 1e-5


def test_multi_output_regression_on_an_array_label_equals_one_process(spark):
    """An array label column (docs/inputs.md: "an array column for multi-output regression") trains every
    output: 2 uneven shards, 3 targets, against one process on the combined batches; transform
    gives each row's vector of predictions."""
    sizes, rng = [21, 30], np.random.default_rng(8)
    x = rng.normal(size=(sum(sizes), 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4, 3)) + 0.1 * rng.normal(size=(sum(sizes), 3))).astype(np.float32)
    parts = split_by_sizes(x, y, sizes)
    payload = [[([float(v) for v in xr], [float(v) for v in yr]) for xr, yr in zip(px, py)] for px, py in parts]
    rdd = spark.sparkContext.parallelize(range(2), 2).flatMap(lambda i: payload[i])
    frame = spark.createDataFrame(rdd, "features array<float>, label array<float>")
    torch.manual_seed(2)
    net = TinyNet(out_features=3)
    initial = copy.deepcopy(net)
    trained = TorchEstimator(model=net, loss="mse", lr=0.05, batch_size=8, epochs=2, num_workers=2, shuffle=False,
                             timeout=60).fit(frame)
    reference = combined_batch_sgd(initial, parts, 8, 2, 0.05)
    assert max_relative_difference(initial, reference) > 1e-2  # training moved the weights
    assert max_relative_difference(trained.get_module(), reference) <= 1e-5
    scored = trained.transform(frame).select("features", "prediction").toPandas()
    with torch.no_grad():
        local = trained.get_module()(torch.tensor(np.stack(scored["features"].to_numpy()))).numpy()
    np.testing.assert_allclose(np.stack(scored["prediction"].to_numpy()), local, **FLOAT32_PATHS)  # a local forward
