"""The trained model as bytes: chunked through the job's output, and saved to a directory
without pickle (safetensors weights + JSON metadata), atomically."""

from __future__ import annotations

import importlib
import json
import os
import uuid
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from spark_ddl.errors import ConfigError

CHUNK_BYTES = 4 * 1024 * 1024  # no output row carries more than this
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"
PICKLED_MODULE_FILE = "module.cloudpickle"
FORMAT_VERSION = 1

OUTPUT_SCHEMA = pa.schema(
    [("kind", pa.string()), ("rank", pa.int32()), ("seq", pa.int32()), ("data", pa.binary())]
)
OUTPUT_DDL = "kind string, rank int, seq int, data binary"


# ------------------------------------------------------------------ weights <-> bytes


def state_dict_to_bytes(module: nn.Module) -> bytes:
    """The module's state_dict as safetensors bytes (tensors copied to CPU, contiguous)."""
    tensors = {
        name: value.detach().to("cpu").contiguous().clone()
        for name, value in module.state_dict().items()
        if isinstance(value, torch.Tensor)
    }
    return save_safetensors(tensors)


def state_dict_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of ``state_dict_to_bytes`` (runs no pickle)."""
    return load_safetensors(data)


def output_batches(kind: str, rank: int, payload: bytes) -> Iterator[pa.RecordBatch]:
    """``payload`` cut into rows of at most CHUNK_BYTES, as Arrow batches of OUTPUT_SCHEMA."""
    chunks = [payload[i : i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)] or [b""]
    for seq, chunk in enumerate(chunks):
        yield pa.RecordBatch.from_pydict(
            {"kind": [kind], "rank": [rank], "seq": [seq], "data": [chunk]}, schema=OUTPUT_SCHEMA
        )


def reassemble(rows: Iterable[Any], kind: str, rank: int = 0) -> bytes | None:
    """Join the chunks of one (kind, rank) payload in order; None if there were none."""
    parts = sorted((r["seq"], bytes(r["data"])) for r in rows if r["kind"] == kind and r["rank"] == rank)
    if not parts:
        return None
    if [seq for seq, _ in parts] != list(range(len(parts))):
        raise RuntimeError(f"the {kind!r} payload of rank {rank} arrived incomplete")
    return b"".join(data for _, data in parts)


# ------------------------------------------------------------------ architectures


def build_from_class_path(class_path: str, kwargs: dict[str, Any] | None) -> nn.Module:
    """Instantiate ``"package.module:Class"`` with JSON keyword arguments (no pickle)."""
    module_name, sep, attr = class_path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model class path must look like 'package.module:Class', got {class_path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for model {class_path!r}: {exc}") from exc
    for part in attr.split("."):
        obj = getattr(obj, part)
    module = obj(**(kwargs or {}))
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{class_path} built a {type(module).__name__}, not a torch.nn.Module")
    return module


# ------------------------------------------------------------------ directories


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_model_dir(path: str, files: dict[str, bytes], overwrite: bool) -> None:
    """Write ``files`` as a directory at ``path``, all or nothing.

    The files go to a temporary sibling directory first; only when all are written is it
    renamed into place. With ``overwrite`` an existing model is moved aside and deleted only
    after the new one is in place; without it an existing path is an error and is untouched.
    """
    fs, target = _resolve(path)
    if _exists(fs, target) and not overwrite:
        raise FileExistsError(f"{path} already exists; use overwrite=True to replace it.")
    token = uuid.uuid4().hex[:12]
    staging, retired = f"{target}.tmp-{token}", f"{target}.old-{token}"
    fs.create_dir(staging, recursive=True)
    try:
        for name, data in files.items():
            with fs.open_output_stream(f"{staging}/{name}") as out:
                out.write(data)
        if _exists(fs, target):
            fs.move(target, retired)
        fs.move(staging, target)
    except BaseException:
        if _exists(fs, retired) and not _exists(fs, target):
            fs.move(retired, target)
        if _exists(fs, staging):
            fs.delete_dir(staging)
        raise
    if _exists(fs, retired):
        fs.delete_dir(retired)


def read_model_file(path: str, name: str) -> bytes | None:
    """One file of a saved model directory, or None if it is absent."""
    fs, target = _resolve(path)
    file_path = f"{target}/{name}"
    if not _exists(fs, file_path):
        return None
    with fs.open_input_stream(file_path) as stream:
        return stream.read()


def read_metadata(path: str) -> dict[str, Any]:
    """The metadata.json of a saved model; a clear error if the path holds no model."""
    raw = read_model_file(path, METADATA_FILE)
    if raw is None:
        raise FileNotFoundError(f"{path} holds no spark_ddl model (no {METADATA_FILE}).")
    return json.loads(raw)
