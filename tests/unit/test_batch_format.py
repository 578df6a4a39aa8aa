"""The batch format's conversions (no Spark): Arrow columns → numpy rows, padding with masks,
image structs → RGB tensors, the zero batch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from spark_ddl.common.batch_format import (BatchSpec, InputField, Ragged, as_tensor, call_model, column_values,
                                           dummy_batch)


def test_ragged_rows_pad_to_the_batchs_longest_row_with_a_mask():
    field = InputField("tokens", "c", "array", "int64", ragged=True)
    column = pa.array([[5], [6, 7, 8], [], [9, 10]], pa.list_(pa.int64())).slice(1)  # a sliced column too
    rows = column_values(field, column)
    assert isinstance(rows, Ragged) and rows.lengths.tolist() == [3, 0, 2]
    padded, mask = rows.take(torch.tensor([2, 0]))
    assert padded.tolist() == [[9, 10, 0], [6, 7, 8]] and mask.tolist() == [[True, True, False], [True, True, True]]
    padded, mask = rows.take(torch.tensor([0, 2]), max_length=2)
    assert padded.tolist() == [[6, 7], [9, 10]] and mask.all()
    padded, mask = rows.take(torch.tensor([1]))
    assert padded.shape == (1, 0) and mask.shape == (1, 0)  # only empty rows: width 0


def test_fixed_arrays_keep_their_element_type_and_take_declared_shapes():
    ints = column_values(InputField("ids", "c", "array", "int64"), pa.array([[2**40, 1], [3, 2**41]]))
    assert ints.dtype == np.int64 and ints[0, 0] == 2**40 and ints[1, 1] == 2**41
    image = column_values(InputField("x", "c", "array", "float32", shape=(1, 2, 2)), pa.array([[1.0, 2, 3, 4]]))
    assert image.shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="unequal lengths"):
        column_values(InputField("x", "c", "array", "float32"), pa.array([[1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="null"):
        column_values(InputField("x", "c", "scalar", "int64"), pa.array([1, None]))


def test_image_structs_become_rgb_floats_in_zero_one():
    height, width = 2, 3
    bgr = np.zeros((height, width, 3), dtype=np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 255  # Spark stores blue, green, red
    struct = pa.array([{"height": height, "width": width, "nChannels": 3, "mode": 16, "data": bgr.tobytes()}] * 2)
    field = InputField("image", "c", "image", "float32")
    stored = column_values(field, struct)
    assert stored.dtype == np.uint8 and stored.shape == (2, 3, height, width)
    tensor = as_tensor(field, stored)
    assert tensor.dtype == torch.float32
    assert torch.allclose(tensor[0, :, 0, 0], torch.tensor([255, 20, 10]) / 255.0)  # red first
    mixed = pa.array([{"height": 2, "width": 3, "nChannels": 3, "mode": 16, "data": bgr.tobytes()},
                      {"height": 3, "width": 2, "nChannels": 3, "mode": 16, "data": bgr.tobytes()}])
    with pytest.raises(ValueError, match="different sizes"):
        column_values(field, mixed)


def test_models_are_called_by_position_or_by_name_with_masks():
    spec = BatchSpec((InputField("tokens", "a", "array", "int64", ragged=True), InputField("n", "b", "scalar", "int64")),
                     positional=False)
    batch = dummy_batch(spec, {"n": ()}, rows=2, ragged_length=3)
    assert batch["tokens"].shape == (2, 3) and batch["tokens_mask"].dtype == torch.bool and batch["n"].shape == (2,)
    seen = {}

    def model(**kwargs):
        seen.update(kwargs)
        return torch.zeros(2, 1)

    call_model(model, {**batch, "label": torch.zeros(2)}, spec)
    assert sorted(seen) == ["n", "tokens", "tokens_mask"]  # the label never reaches the model
    assert BatchSpec.from_json(spec.to_json()) == spec
