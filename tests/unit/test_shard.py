import pyarrow as pa
import pytest
import torch

from spark_ddl.agent.sampling import global_batch_sizes, steps_per_epoch, update_groups
from spark_ddl.agent.shard import Shard
from spark_ddl.common.wire import FEATURES, LABEL, VALIDATION


def batch(features, labels):
    return pa.RecordBatch.from_arrays(
        [pa.array(features, pa.list_(pa.float32())), pa.array(labels, pa.float64())], [FEATURES, LABEL]
    )


def test_batches_concatenate_into_tensors_in_order():
    shard, validation = Shard.from_arrow(iter([batch([[1, 2], [3, 4]], [0, 1]), batch([[5, 6]], [2])]), torch.int64)
    assert validation.num_rows == 0
    assert shard.features.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert shard.labels.tolist() == [0, 1, 2] and shard.labels.dtype == torch.int64
    assert shard.feature_dim == 2


def test_sliced_arrow_arrays_are_read_correctly():
    whole = batch([[1, 2], [3, 4], [5, 6]], [0, 1, 2])
    shard, _ = Shard.from_arrow(iter([whole.slice(1, 2)]), torch.float32)
    assert shard.features.tolist() == [[3, 4], [5, 6]]


def test_empty_partition_takes_the_width_of_its_peers():
    shard, _ = Shard.from_arrow(iter([]), torch.float32)
    assert shard.num_rows == 0 and shard.feature_dim is None
    assert shard.with_feature_dim(7).features.shape == (0, 7)


def test_unequal_feature_lengths_are_refused():
    with pytest.raises(ValueError, match="unequal lengths"):
        Shard.from_arrow(iter([batch([[1, 2], [3]], [0, 1])]), torch.float32)
    with pytest.raises(ValueError, match="unequal lengths"):
        Shard.from_arrow(iter([batch([[1, 2]], [0]), batch([[1, 2, 3]], [1])]), torch.float32)


def test_epoch_order_is_seeded_and_changes_every_epoch():
    shard = Shard.of(torch.zeros(50, 1), torch.zeros(50))
    assert shard.epoch_order(0, False, 0, 0).tolist() == list(range(50))
    first = shard.epoch_order(0, True, 3, 1)
    assert torch.equal(first, shard.epoch_order(0, True, 3, 1))
    assert not torch.equal(first, shard.epoch_order(1, True, 3, 1))
    assert not torch.equal(first, shard.epoch_order(0, True, 3, 0))
    assert sorted(first.tolist()) == list(range(50))


def test_step_count_and_global_batches_cover_the_largest_shard():
    assert steps_per_epoch([0, 1, 500], 32) == 16
    assert steps_per_epoch([0, 0], 8) == 0
    sizes = global_batch_sizes([0, 1, 500], 32, 16)
    assert sizes[0] == 33 and sizes[1] == 32 and sizes[-1] == 500 - 15 * 32
    assert sum(sizes) == 501


def test_validation_rows_are_split_off():
    rows = batch([[1, 1], [2, 2], [3, 3]], [0, 1, 2])
    marked = rows.append_column(VALIDATION, pa.array([False, True, None]))
    train, validation = Shard.from_arrow(iter([marked]), torch.int64)
    assert train.labels.tolist() == [0, 2] and validation.labels.tolist() == [1]


def test_update_groups_sync_at_the_end_of_each_group():
    assert update_groups([8, 8, 8, 5, 2], 2) == ([False, True, False, True, True], [16, 16, 13, 13, 2])
    assert update_groups([8, 3], 1) == ([True, True], [8, 3])
