"""Pickle payloads planted in saved files, for the tests that attack "loading runs no pickle".

Unpickling a ``Payload`` runs ``touch <marker>``: a test asserts that the marker never appears
on the refused route, and (control) that it does appear when the same bytes are unpickled
the way torch or cloudpickle would without the check, so the payload is known to be live.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch


class Payload:
    """Unpickling this creates the file ``marker``."""

    def __init__(self, marker: Path | str) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def pickled(marker: Path | str) -> bytes:
    """A plain pickle of the payload (what cloudpickle.loads would run)."""
    return pickle.dumps(Payload(marker))


def torch_saved(obj) -> bytes:
    """``torch.save`` bytes of ``obj`` (a zip-format checkpoint holding a pickle)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def plant(directory: Path, name: str, data: bytes) -> None:
    """Write ``data`` as the saved stage's file ``name`` and record its checksum in the
    metadata, so that only the pickle refusal stands between the payload and a loader."""
    (directory / name).write_bytes(data)
    metadata_file = directory / "metadata" / "part-00000"
    metadata = json.loads(metadata_file.read_text())
    metadata["spark_ddl"]["files_sha256"][name] = hashlib.sha256(data).hexdigest()
    metadata_file.write_text(json.dumps(metadata))


# ------------------------------------------------------------------ torch.export archives

WEIGHTS, CONSTANTS = "archive/data/weights/", "archive/data/constants/"


def _use_pickle_weight(files: dict[str, bytes], marker: str) -> None:
    config = json.loads(files[WEIGHTS + "model_weights_config.json"])
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    files[WEIGHTS + "model_weights_config.json"] = json.dumps(config).encode()
    files[WEIGHTS + config["config"][first]["path_name"]] = torch_saved(Payload(marker))


def _constant(path_name: str, use_pickle: bool, data: Callable[[str], bytes]):
    def change(files: dict[str, bytes], marker: str) -> None:
        weights = json.loads(files[WEIGHTS + "model_weights_config.json"])["config"]
        meta = next(iter(weights.values()))["tensor_meta"]
        entry = {"path_name": path_name, "is_param": False, "use_pickle": use_pickle, "tensor_meta": meta}
        files[CONSTANTS + "model_constants_config.json"] = json.dumps({"config": {"planted": entry}}).encode()
        files[CONSTANTS + path_name] = data(marker)

    return change


def _legacy(directory: str):
    def change(files: dict[str, bytes], marker: str) -> None:
        files[directory + "model.pt"] = torch_saved(Payload(marker))

    return change


def _sample_inputs(files: dict[str, bytes], marker: str) -> None:
    files["archive/data/sample_inputs/model.pt"] = torch_saved(Payload(marker))


# Every way a torch.export archive makes torch.export.load unpickle (torch 2.x's _package.py):
# weights or constants flagged use_pickle, opaque objects, legacy .pt weight/constant files,
# and sample inputs that fail weights_only (torch then retries with full unpickling).
EXPORT_ROUTES: dict[str, Callable[[dict[str, bytes], str], None]] = {
    "use_pickle weight": _use_pickle_weight,
    "use_pickle constant": _constant("tensor_constant_0", True, lambda m: torch_saved(Payload(m))),
    # padded: torch first reads every constant file as a tensor (whole elements); pickle
    # ignores the bytes after its STOP opcode
    "opaque object constant": _constant("opaque_obj_0", False, lambda m: pickled(m).ljust(
        -(-len(pickled(m)) // 8) * 8, b"\0")),
    "legacy weights .pt": _legacy(WEIGHTS),
    "legacy constants .pt": _legacy(CONSTANTS),
    "sample inputs": _sample_inputs,
}


def tampered_archive(data: bytes, route: str, marker: Path | str) -> bytes:
    """The export archive ``data`` with a payload planted on ``route`` (see EXPORT_ROUTES)."""
    source = zipfile.ZipFile(io.BytesIO(data))
    files = {name: source.read(name) for name in source.namelist()}
    EXPORT_ROUTES[route](files, str(marker))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, body in files.items():
            archive.writestr(name, body)
    return out.getvalue()
