"""Saving and loading TorchModel the pyspark.ml way (``write().overwrite().save``,
``TorchModel.load``, inside ``PipelineModel``), with no pickle on the default load path.

Directory layout::

    metadata/part-00000    pyspark.ml metadata JSON (class, uid, params) + "spark_ddl" section
    weights.safetensors    the state_dict
    model.pt2              torch.export program, when export succeeded (scores without the code)
    module.cloudpickle     only when the network was a module object (needs allow_pickle=True)
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from typing import TYPE_CHECKING, Any

import pyspark
import torch
from pyspark.ml.util import MLReader, MLWriter

import spark_ddl
from spark_ddl import artifact, storage
from spark_ddl.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from spark_ddl.estimator import TorchModel

FORMAT_VERSION = 1
METADATA_FILE = "metadata/part-00000"
WEIGHTS_FILE = "weights.safetensors"
EXPORT_FILE = "model.pt2"
PICKLED_MODULE_FILE = "module.cloudpickle"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_files(model: "TorchModel") -> dict[str, bytes]:
    """Every file of the saved model, by name."""
    module = model.get_module()
    weights = artifact.state_dict_to_bytes(module)
    files = {WEIGHTS_FILE: weights}
    export_info: dict[str, Any]
    exported = model._export_bytes  # noqa: SLF001
    if exported is None and model.feature_dim is not None:
        try:
            exported = artifact.export_program(module, model.feature_dim)
        except Exception as exc:  # export is best effort: many modules cannot be captured
            export_info = {"file": None, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    if exported is not None:
        files[EXPORT_FILE] = exported
        export_info = {"file": EXPORT_FILE, "sha256": _sha256(exported)}
    elif model.feature_dim is None:
        export_info = {"file": None, "error": "feature width unknown"}
    architecture = model._architecture  # noqa: SLF001
    if architecture.get("kind") == "pickle":
        from pyspark import cloudpickle

        files[PICKLED_MODULE_FILE] = cloudpickle.dumps(module)
    section = {
        "format_version": FORMAT_VERSION,
        "columns": model._spec.to_json_dict() if model._spec else None,  # noqa: SLF001
        "config": model._config,  # noqa: SLF001
        "architecture": architecture,
        "summary": model.summary,
        "feature_dim": model.feature_dim,
        "weights_sha256": _sha256(weights),
        "export": export_info,
        "versions": {"spark_ddl": spark_ddl.__version__, "torch": torch.__version__,
                     "pyspark": pyspark.__version__, "python": platform.python_version()},
    }
    metadata = {
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "timestamp": int(round(time.time() * 1000)),
        "sparkVersion": pyspark.__version__,
        "uid": model.uid,
        "paramMap": {p.name: v for p, v in model._paramMap.items()},  # noqa: SLF001
        "defaultParamMap": {p.name: v for p, v in model._defaultParamMap.items()},  # noqa: SLF001
        "spark_ddl": section,
    }
    # one line: pyspark.ml reads only the first line of the metadata file
    files[METADATA_FILE] = json.dumps(metadata, separators=(",", ":"), default=str).encode()
    return files


class TorchModelWriter(MLWriter):
    """``model.write().overwrite().save(path)``: all or nothing, never clobbering on failure.

    Unlike pyspark's default writers, overwrite does not delete the old model first: the new
    one is written beside it and swapped in only when complete.
    """

    def __init__(self, instance: "TorchModel") -> None:
        super().__init__()
        self.instance = instance

    def save(self, path: str) -> None:
        if not isinstance(path, str):
            raise TypeError(f"path should be a string, got {type(path).__name__}")
        storage.write_directory(path, model_files(self.instance), overwrite=self.shouldOverwrite)

    def saveImpl(self, path: str) -> None:  # pragma: no cover - save() does the work
        self.save(path)


def read_metadata(path: str) -> dict[str, Any]:
    """The metadata JSON of a saved TorchModel; a clear error if ``path`` holds none."""
    parts = [n for n in storage.list_directory(path, "metadata") if n.startswith("part-")]
    raw = storage.read_file(path, f"metadata/{parts[0]}") if parts else None
    if raw is None:
        raise FileNotFoundError(f"{path} holds no saved spark_ddl model (no metadata/part-*).")
    metadata = json.loads(raw)
    if "spark_ddl" not in metadata:
        raise ValueError(f"{path} is a {metadata.get('class')} directory, not a spark_ddl TorchModel")
    return metadata


def _verified(path: str, name: str, expected_sha256: str | None) -> bytes:
    data = storage.read_file(path, name)
    if data is None:
        raise FileNotFoundError(f"{path} has no {name}")
    if expected_sha256 is not None and _sha256(data) != expected_sha256:
        raise ValueError(f"{path}/{name} does not match the checksum in its metadata")
    return data


def load_module(path: str, section: dict[str, Any], module: "nn.Module | None",
                allow_pickle: bool) -> tuple["nn.Module", bytes | None]:
    """The network of a saved model, and its export program bytes when it came from one.

    Order: the caller's ``module``; the saved class path; the torch.export program (checked
    to need no unpickling); the pickled module only with ``allow_pickle=True``.
    """
    weights = _verified(path, WEIGHTS_FILE, section.get("weights_sha256"))
    architecture = section.get("architecture", {})
    export = section.get("export") or {}
    if module is None and architecture.get("kind") == "class_path":
        module = artifact.build_from_class_path(architecture["class_path"], architecture.get("kwargs"))
    if module is not None:
        module.load_state_dict(artifact.state_dict_from_bytes(weights))
        return module, None
    refusal = None
    if export.get("file"):
        exported = _verified(path, export["file"], export.get("sha256"))
        try:
            return artifact.load_export_program(exported), exported
        except artifact.UnsafeArchiveError as exc:
            refusal = f"its torch.export program was refused ({exc})"
    if architecture.get("kind") == "pickle":
        if not allow_pickle:
            reason = refusal or "no torch.export program could be saved for it"
            raise ConfigError(
                f"The model at {path} was trained from a module object ({architecture.get('class')}) "
                f"and {reason}, so only a pickle describes its architecture, and unpickling can run "
                "arbitrary code. Pass module=<an instance of that architecture>, or "
                "allow_pickle=True if you trust these files."
            )
        from pyspark import cloudpickle

        module = cloudpickle.loads(_verified(path, PICKLED_MODULE_FILE, None))
        module.load_state_dict(artifact.state_dict_from_bytes(weights))
        return module, None
    raise ConfigError(f"{path} does not describe its architecture; pass module=<an instance>.")


class TorchModelReader(MLReader):
    """``TorchModel.read().load(path)`` (what ``PipelineModel.load`` calls for this stage)."""

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> "TorchModel":
        return self.cls.load(path)
