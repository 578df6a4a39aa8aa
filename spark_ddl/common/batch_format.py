"""The one batch format: a dict of named tensors, from Arrow columns to the model's call.

The driver describes each model input as an ``InputField`` (what the agents, the scoring
executors and saved models all read); ``BatchSpec`` holds them with how the model is called.
On the executors, ``column_values`` turns one Arrow column into numpy (fixed-shape rows, or
``Ragged`` rows of varying length), ``Ragged.take`` pads a batch's rows to its longest row and
adds the ``<name>_mask``, and ``call_model`` calls the network: ``model(batch["features"])``
for the one-input shorthand, ``model(**inputs)`` for named inputs.

Kinds of input (``InputField.kind``):

- ``scalar``: one number or boolean per row → [B];
- ``array``: a numeric array per row → [B, L] (or [B, *shape] with ``shape``); rows of unequal
  length (or a ``max_length``) make it ``ragged``: padded per batch with 0, plus a mask;
- ``image``: Spark's image struct → float32 [B, C, H, W] in [0, 1], channels in RGB order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

LABEL_KEY = "label"
POSITIONAL_KEY = "features"  # the one-input shorthand's name in a batch
INT, FLOAT, BOOL = "int64", "float32", "bool"
_TORCH = {INT: torch.int64, FLOAT: torch.float32, BOOL: torch.bool}
_NUMPY = {INT: np.int64, FLOAT: np.float32, BOOL: np.bool_}
# OpenCV types Spark's image source writes (8 bits per channel; 1, 3 or 4 channels, BGR(A) order)
IMAGE_MODES = {0: 1, 16: 3, 24: 4}


@dataclass(frozen=True)
class InputField:
    """One model input: its name in the batch, where it comes from, and its tensor form."""

    name: str  # the model's keyword argument ("features" for the one-input shorthand)
    column: str  # the wire column the agents read (the driver projects the source columns to it)
    kind: str  # "scalar" | "array" | "image"
    dtype: str  # "int64" | "float32" | "bool" (images: float32 after scaling)
    shape: tuple[int, ...] | None = None  # per-row shape to reshape an array to (input_shapes)
    max_length: int | None = None  # arrays: truncate rows to this length (makes the input ragged)
    ragged: bool = False  # arrays: rows of unequal length, padded per batch with a mask

    @property
    def mask_name(self) -> str:
        return f"{self.name}_mask"

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "InputField":
        shape = data.get("shape")
        return cls(**{**data, "shape": tuple(shape) if shape is not None else None})


@dataclass(frozen=True)
class BatchSpec:
    """Every input of the model, and whether it takes them by position or by name."""

    inputs: tuple[InputField, ...]
    positional: bool  # model(batch["features"]) (the feature_cols shorthand) vs model(**inputs)

    def field(self, name: str) -> InputField:
        return next(f for f in self.inputs if f.name == name)

    def with_ragged(self, names: Iterable[str]) -> "BatchSpec":
        """The same spec with the inputs ``names`` marked ragged (decided from the data)."""
        names = set(names)
        return replace(self, inputs=tuple(replace(f, ragged=f.ragged or f.name in names) for f in self.inputs))

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [f.to_json() for f in self.inputs], "positional": self.positional}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "BatchSpec":
        return cls(tuple(InputField.from_json(f) for f in data["inputs"]), bool(data["positional"]))


# ------------------------------------------------------------------ Arrow → numpy


@dataclass
class Ragged:
    """Rows of varying length: all values one after another, and where each row starts."""

    values: np.ndarray | torch.Tensor
    offsets: np.ndarray | torch.Tensor  # len(rows) + 1, int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return int(np.asarray(self.values).nbytes + np.asarray(self.offsets).nbytes)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    def take(self, index: torch.Tensor, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(padded [B, L], mask [B, L]) for the rows at ``index``; L is the longest of them
        (at most ``max_length``), padding is 0, mask is True on real elements."""
        values, offsets = torch.as_tensor(self.values), torch.as_tensor(self.offsets)
        starts = offsets[index]
        lengths = offsets[index + 1] - starts
        if max_length is not None:
            lengths = lengths.clamp(max=max_length)
        width = int(lengths.max()) if len(index) else 0
        steps = torch.arange(width, dtype=torch.int64)
        mask = steps.unsqueeze(0) < lengths.unsqueeze(1)
        positions = (starts.unsqueeze(1) + steps.unsqueeze(0)).clamp(max=max(len(values) - 1, 0))
        padded = values[positions] if len(values) else torch.zeros(mask.shape, dtype=values.dtype)
        return padded.masked_fill(~mask, 0), mask

    @staticmethod
    def concatenate(parts: list["Ragged"]) -> "Ragged":
        if not parts:
            return Ragged(np.zeros(0, dtype=np.float32), np.zeros(1, dtype=np.int64))
        values = np.concatenate([np.asarray(p.values) for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        return Ragged(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def select(self, rows: np.ndarray) -> "Ragged":
        """The rows where the boolean ``rows`` is True."""
        keep = np.flatnonzero(rows)
        lengths = self.lengths[keep]
        starts = np.asarray(self.offsets)[keep]
        values = np.asarray(self.values)
        taken = [values[s : s + n] for s, n in zip(starts, lengths)]
        flat = np.concatenate(taken) if taken else values[:0]
        return Ragged(flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def column_values(field: InputField, column: pa.Array) -> np.ndarray | Ragged:
    """One Arrow column of wire rows as numpy: [n, *row_shape] for fixed rows, ``Ragged``
    for ragged arrays, uint8 [n, C, H, W] for images (scaled later, see ``as_tensor``)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{column.null_count} null value(s) in input {field.name!r}")
    if field.kind == "scalar":
        return column.to_numpy(zero_copy_only=False).astype(_NUMPY[field.dtype], copy=False)
    if field.kind == "image":
        return _image_values(field, column)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(_NUMPY[field.dtype], copy=False)
    offsets = column.offsets.to_numpy().astype(np.int64) - int(column.offsets[0].as_py())
    if field.ragged:
        return Ragged(values.copy(), offsets)
    lengths = np.diff(offsets)
    if len(lengths) and (lengths.min() != lengths.max()):
        raise ValueError(
            f"input {field.name!r} has arrays of unequal lengths (between {lengths.min()} and "
            f"{lengths.max()}); every row needs the same number of elements"
        )
    width = int(lengths[0]) if len(lengths) else 0
    rows = values.reshape(len(column), width)
    if field.shape is not None:
        if width != math.prod(field.shape):
            raise ValueError(f"input {field.name!r}: rows of {width} elements cannot take the shape "
                             f"{tuple(field.shape)} ({math.prod(field.shape)} elements)")
        rows = rows.reshape(len(column), *field.shape)
    return rows


def _image_values(field: InputField, column: pa.Array) -> np.ndarray:
    part = {name: pc.struct_field(column, name) for name in ("height", "width", "nChannels", "mode", "data")}
    heights = pc.unique(part["height"]).to_pylist()
    widths = pc.unique(part["width"]).to_pylist()
    channels = pc.unique(part["nChannels"]).to_pylist()
    modes = pc.unique(part["mode"]).to_pylist()
    if len(heights) > 1 or len(widths) > 1 or len(channels) > 1:
        raise ValueError(f"input {field.name!r} holds images of different sizes "
                         f"(heights {heights}, widths {widths}, channels {channels})")
    rows = len(column)
    if not rows:
        return np.zeros((0, *(field.shape or (0, 0, 0))), dtype=np.uint8)
    bad = [m for m in modes if m not in IMAGE_MODES]
    if bad:
        raise ValueError(f"input {field.name!r}: image mode {bad[0]} is not an 8-bit 1/3/4-channel image")
    height, width, depth = heights[0], widths[0], channels[0]
    data = part["data"]
    sizes = pc.binary_length(data)
    if pc.min(sizes).as_py() != height * width * depth or pc.max(sizes).as_py() != height * width * depth:
        raise ValueError(f"input {field.name!r}: image data of {pc.min(sizes).as_py()}–{pc.max(sizes).as_py()} "
                         f"bytes does not match {height}x{width}x{depth}")
    offsets = np.frombuffer(data.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(data.type) else np.int32)
    flat = np.frombuffer(data.buffers()[2], dtype=np.uint8, offset=int(offsets[data.offset]),
                         count=rows * height * width * depth)
    pixels = flat.reshape(rows, height, width, depth)
    if depth >= 3:  # BGR(A) → RGB(A)
        pixels = pixels[..., [2, 1, 0, *range(3, depth)]]
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def as_tensor(field: InputField, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Stored rows as the tensor the model receives (images: uint8 → float32 in [0, 1])."""
    tensor = torch.as_tensor(rows)
    if field.kind == "image":
        return tensor.to(torch.float32).div_(255.0)
    return tensor


# ------------------------------------------------------------------ calling the model


def model_inputs(batch: Mapping[str, torch.Tensor], spec: BatchSpec) -> dict[str, torch.Tensor]:
    """The keyword arguments the model receives: every input, and each ragged input's mask."""
    out = {}
    for field in spec.inputs:
        out[field.name] = batch[field.name]
        if field.ragged:
            out[field.mask_name] = batch[field.mask_name]
    return out


def call_model(model: nn.Module, batch: Mapping[str, torch.Tensor], spec: BatchSpec) -> Any:
    """``model(features)`` for the one-input shorthand, else ``model(**inputs)``."""
    if spec.positional:
        return model(batch[POSITIONAL_KEY])
    return model(**model_inputs(batch, spec))


def dummy_batch(spec: BatchSpec, row_shapes: Mapping[str, tuple[int, ...]], rows: int = 2,
                device: torch.device | str = "cpu", ragged_length: int = 1) -> dict[str, torch.Tensor]:
    """A batch of ``rows`` zero rows with the real inputs' dtypes and shapes (ragged inputs get
    ``ragged_length`` elements): for the driver's model check, an agent whose shard ran out,
    and the example inputs of an export."""
    batch = {}
    for field in spec.inputs:
        shape = (ragged_length,) if field.ragged else tuple(row_shapes.get(field.name, ()))
        batch[field.name] = torch.zeros((rows, *shape), dtype=_TORCH[field.dtype], device=device)
        if field.ragged:
            batch[field.mask_name] = torch.ones((rows, ragged_length), dtype=torch.bool, device=device)
    return batch


def tensor_dtype(name: str) -> torch.dtype:
    """The torch dtype for "int64" / "float32" / "bool"."""
    return _TORCH[name]
