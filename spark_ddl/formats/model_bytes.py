"""The trained model as bytes: safetensors weights, and torch.export programs checked before
loading (so that loading one runs no pickle)."""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from spark_ddl.common.batch_format import POSITIONAL_KEY, BatchSpec, dummy_batch, model_inputs

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


def optimizer_state_to_bytes(state: dict[str, Any]) -> bytes:
    """An optimiser's ``state_dict()`` (tensors, numbers, strings, tuples) as ``torch.save``
    bytes, every tensor copied to the CPU."""
    import io

    def cpu(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu").clone()
        if isinstance(value, dict):
            return {key: cpu(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(cpu(item) for item in value)
        return value

    buffer = io.BytesIO()
    torch.save(cpu(state), buffer)
    return buffer.getvalue()


def optimizer_state_from_bytes(data: bytes) -> dict[str, Any]:
    """Inverse of ``optimizer_state_to_bytes``, read with ``weights_only=True`` (no pickle of
    anything but tensors and plain values)."""
    import io

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
        raise ValueError("not an optimiser state (a dict with 'state' and 'param_groups')")
    return state


# ------------------------------------------------------------------ torch.export programs


def export_program(module: nn.Module, spec: BatchSpec, row_shapes: Mapping[str, tuple[int, ...]]) -> bytes:
    """The module as a ``torch.export`` program (eval mode; the batch size, and the length of
    ragged inputs, dynamic), as bytes, called the way the batch spec says (positionally or by
    keyword).

    Raises whatever torch.export raises for modules it cannot capture.
    """
    import copy
    import io

    frozen = copy.deepcopy(module).to("cpu").eval()
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=1)
    example = dummy_batch(spec, row_shapes, rows=2, ragged_length=3)  # sizes 0/1 would be specialised
    if spec.positional:
        program = torch.export.export(frozen, (example[POSITIONAL_KEY],), dynamic_shapes=({0: batch},), strict=False)
    else:
        kwargs = model_inputs(example, spec)
        dynamic = {name: ({0: batch, 1: length} if name.endswith("_mask") or spec.field(name).ragged else {0: batch})
                   if tensor.dim() else None for name, tensor in kwargs.items()}
        program = torch.export.export(frozen, (), kwargs, dynamic_shapes=dynamic, strict=False)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


class UnsafeArchiveError(ValueError):
    """A torch.export archive that would need full unpickling to load."""


def check_export_archive(data: bytes) -> None:
    """Refuse an archive whose loading would run pickle beyond torch's weights-only loader.

    ``torch.export.load`` unpickles weights or constants flagged ``use_pickle``, custom and
    opaque objects, and falls back to full unpickling when the sample inputs do not load with
    ``weights_only=True``. An archive written by ``export_program`` needs none of that.
    """
    import io
    import zipfile

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise UnsafeArchiveError(f"not a torch.export archive: {exc}") from exc
    for name in archive.namelist():
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            config = json.loads(archive.read(name)).get("config", {})
            for fqn, entry in config.items():
                if entry.get("use_pickle") or not str(entry.get("path_name", "")).startswith(
                    ("weight_", "tensor_")
                ):
                    raise UnsafeArchiveError(f"{name}: entry {fqn!r} would be unpickled")
        elif name.endswith(".pt") and ("/data/weights/" in name or "/data/constants/" in name):
            raise UnsafeArchiveError(f"{name} is a legacy pickled payload")
        elif "/data/sample_inputs/" in name:
            try:
                torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except Exception as exc:
                raise UnsafeArchiveError(f"{name} does not load with weights_only=True") from exc


def load_export_program(data: bytes) -> nn.Module:
    """The callable module of a checked torch.export archive."""
    import io

    check_export_archive(data)
    return torch.export.load(io.BytesIO(data)).module()
