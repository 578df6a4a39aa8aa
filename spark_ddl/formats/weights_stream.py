"""Weights as a stream: the safetensors format written from a module's tensors and read back into
them piece by piece, so that no copy of the whole model is ever held in memory.

``safetensors.torch.save`` builds the file in memory and ``load`` returns new tensors: both cost
a model-sized copy. Here the header (JSON: each tensor's dtype, shape and byte range) is
computed first, then each tensor's bytes go out in ``CHUNK_BYTES`` slices; reading fills the
target module's tensors in place. The files are ordinary safetensors files (checked against the
library in the tests). Both sides import this module; it imports neither.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO, Callable, Iterator

import torch
from torch import nn

CHUNK_BYTES = 4 * 1024 * 1024
Tensors = list[tuple[str, torch.Tensor]]

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_CODES = {code: dtype for dtype, code in _DTYPES.items()}


def module_tensors(module: nn.Module) -> Tensors:
    """The module's state_dict tensors by name (the tensors themselves, not copies)."""
    return [(name, value.detach()) for name, value in module.state_dict(keep_vars=True).items()
            if isinstance(value, torch.Tensor)]


def format_size(size: int) -> str:
    """'1.5 GiB', '135.2 MiB', '12 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


class WeightsWriter:
    """A module's (or a list of named tensors') safetensors bytes, produced on demand."""

    def __init__(self, tensors: Tensors | nn.Module) -> None:
        self.tensors = module_tensors(tensors) if isinstance(tensors, nn.Module) else list(tensors)
        entries, offset = {}, 0
        for name, tensor in self.tensors:
            if tensor.dtype not in _DTYPES:
                raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
            size = tensor.numel() * tensor.element_size()
            entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [offset, offset + size]}
            offset += size
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.header = struct.pack("<Q", len(header)) + header
        self.size = len(self.header) + offset

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview | bytes]:
        """The file's bytes in pieces of at most ``chunk_bytes`` (views of the tensors where
        they are contiguous CPU tensors; otherwise one tensor is copied at a time)."""
        yield self.header
        for _, tensor in self.tensors:
            if tensor.numel() == 0:
                continue
            plain = tensor.to("cpu").contiguous().reshape(-1)
            data = memoryview(plain.view(torch.uint8).numpy()) if plain.dtype != torch.uint8 else memoryview(
                plain.numpy())
            for start in range(0, len(data), chunk_bytes):
                yield data[start : start + chunk_bytes]

    def write_to(self, write: Callable[[Any], Any], chunk_bytes: int = CHUNK_BYTES) -> int:
        """Pass every piece to ``write`` (e.g. a file's or a socket's); return the bytes written."""
        for piece in self.chunks(chunk_bytes):
            write(piece)
        return self.size

    def to_bytes(self) -> bytes:
        """The whole file in memory (small models only)."""
        return b"".join(bytes(piece) for piece in self.chunks())


def read_header(stream: BinaryIO) -> dict[str, Any]:
    """The header of a safetensors stream positioned at its start (the stream is left at the data)."""
    prefix = _read_exactly(stream, 8)
    (length,) = struct.unpack("<Q", prefix)
    if length > 100 * 2**20:
        raise ValueError(f"not a safetensors stream (a header of {length} bytes)")
    header = json.loads(_read_exactly(stream, length))
    header.pop("__metadata__", None)
    return header


def read_into(stream: BinaryIO, targets: dict[str, torch.Tensor], what: str = "the weights",
              chunk_bytes: int = CHUNK_BYTES) -> None:
    """Fill ``targets`` (name → tensor, e.g. ``module_tensors``) in place from a safetensors
    stream, piece by piece. The names, dtypes and shapes must match exactly (as a strict
    ``load_state_dict``); a tensor that appears under two names (tied weights) is read twice."""
    header = read_header(stream)
    missing, unexpected = sorted(set(targets) - set(header)), sorted(set(header) - set(targets))
    if missing or unexpected:
        raise ValueError(f"{what} do not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    position = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        target = targets[name]
        start, end = entry["data_offsets"]
        if _CODES.get(entry["dtype"]) != target.dtype or list(entry["shape"]) != list(target.shape):
            raise ValueError(f"{what}: {name!r} is {entry['dtype']} {entry['shape']} but the model's is "
                             f"{target.dtype} {list(target.shape)}")
        if start != position:
            _read_exactly(stream, start - position)  # padding a foreign writer may leave
        position = end
        if end == start:
            continue
        direct = target.device.type == "cpu" and target.is_contiguous()
        landing = target.detach() if direct else torch.empty(target.shape, dtype=target.dtype)  # one tensor at most
        flat = landing.reshape(-1)
        view = memoryview((flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat).numpy())
        for offset in range(0, len(view), chunk_bytes):
            _read_exactly_into(stream, view[offset : offset + chunk_bytes])
        if not direct:
            with torch.no_grad():
                target.copy_(landing)


def load_into_module(module: nn.Module, stream: BinaryIO, what: str = "the weights") -> nn.Module:
    """``read_into`` the module's own tensors; returns the module."""
    read_into(stream, dict(module_tensors(module)), what)
    return module


def write_file(writer: WeightsWriter, path: str) -> None:
    """Write the safetensors file at a local ``path``."""
    with open(path, "wb") as out:
        writer.write_to(out.write)


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = bytearray(size)
    _read_exactly_into(stream, memoryview(data))
    return bytes(data)


def _read_exactly_into(stream: BinaryIO, view: memoryview) -> None:
    done = 0
    while done < len(view):
        count = stream.readinto(view[done:])
        if not count:
            raise EOFError(f"the weights ended early ({done} of {len(view)} bytes of a piece)")
        done += count


class ShippedWeights:
    """A reference to weights the driver shipped to the executors as a file through Spark's own
    file server (``SparkContext.addFile``: streamed from the driver's disk, fetched once per
    executor). Small to pickle; ``open`` (on an executor) gives the safetensors stream."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def open(self) -> BinaryIO:
        """The shipped file, fetched to this executor by Spark."""
        from pyspark import SparkFiles

        return open(SparkFiles.get(self.name), "rb")

    def __repr__(self) -> str:
        return f"ShippedWeights({self.name!r}, {format_size(self.size)})"
