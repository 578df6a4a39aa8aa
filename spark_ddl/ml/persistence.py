"""Saving and loading ``TorchModel`` and ``TorchEstimator`` the pyspark.ml way
(``write().overwrite().save``, ``load``, inside ``Pipeline``/``PipelineModel`` and the tuning
models), all or nothing, with no pickle on the default load path.

Directory layout::

    metadata/part-00000    pyspark.ml metadata JSON (DefaultParamsWriter's) + a "spark_ddl" section
    weights.safetensors    a model's state_dict
    optimizer.pt           a model's optimiser state (torch.save of tensors and plain values, read
                           with weights_only=True), when training returned one: what a warm start continues
    model.pt2              a model's torch.export program, when export succeeded
    module.cloudpickle     only for networks given as module objects (loading needs allow_pickle)
    params.cloudpickle     only for an estimator's settings that are not JSON (e.g. a loss function)

Models and estimators are read through their public surface (``get_module``,
``model_source``, ``columns``, ``training_config``, ``summary``, the Params).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import threading
import types
from typing import Any, BinaryIO, Callable, Iterator, Protocol

import pyspark
import torch
from pyspark.ml.util import DefaultParamsReader, DefaultParamsWriter, MLReader, MLWriter
from torch import nn

from spark_ddl._version import __version__
from spark_ddl.common.model_source import EXPORT_FILE, ModelSource
from spark_ddl.driver.capabilities import directory_files
from spark_ddl.driver.columns import ColumnSpec
from spark_ddl.errors import ConfigError
from spark_ddl.formats import model_bytes, storage
from spark_ddl.formats.weights_stream import WeightsWriter, format_size, load_into_module
from spark_ddl.ml.params import ALIASES
from spark_ddl.ml.summary import old_format_row_shapes

FORMAT_VERSION = 1
METADATA_FILE = "metadata/part-00000"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
PICKLED_PARAMS_FILE = "params.cloudpickle"
EXPORT_MAX_BYTES = 256 * 2**20  # bigger models are saved without a torch.export program

_TRUST = threading.local()


@contextlib.contextmanager
def allow_pickle() -> Iterator[None]:
    """Within this block, loading (e.g. ``Pipeline.load``, ``CrossValidatorModel.load``) may
    unpickle saved module objects and callables. Unpickling runs code: only for files you trust."""
    previous = getattr(_TRUST, "allowed", False)
    _TRUST.allowed = True
    try:
        yield
    finally:
        _TRUST.allowed = previous


class SavableModel(Protocol):
    """The public surface of ``TorchModel`` that saving reads."""

    uid: str
    summary: dict[str, Any]
    optimizer_state: bytes | None

    def get_module(self) -> nn.Module: ...
    @property
    def model_source(self) -> ModelSource: ...
    @property
    def columns(self) -> ColumnSpec | None: ...
    @property
    def training_config(self) -> dict[str, Any]: ...
    @property
    def row_shapes(self) -> dict[str, tuple[int, ...]]: ...
    def extractParamMap(self) -> dict[Any, Any]: ...
    def isSet(self, param: Any) -> bool: ...


class SavableEstimator(Protocol):
    """The public surface of ``TorchEstimator`` that saving reads."""

    uid: str

    def model_source(self) -> tuple[ModelSource, nn.Module]: ...
    def extractParamMap(self) -> dict[Any, Any]: ...
    def isSet(self, param: Any) -> bool: ...


def _pickle_allowed(explicit: bool) -> bool:
    return explicit or getattr(_TRUST, "allowed", False)


def _sha256(data: storage.Content) -> str:
    digest = hashlib.sha256()
    storage._pieces(data, digest.update)  # noqa: SLF001 - a streamed file is hashed a piece at a time
    return digest.hexdigest()


def _stream_sha256(stream: BinaryIO) -> str:
    digest, buffer = hashlib.sha256(), bytearray(storage.READ_CHUNK)
    view = memoryview(buffer)
    while count := stream.readinto(view):
        digest.update(view[:count])
    return digest.hexdigest()


def _metadata(instance: Any, params: dict[str, Any], section: dict[str, Any]) -> bytes:
    """pyspark.ml's metadata JSON for ``instance`` with our section (one line: pyspark reads
    only the first line of the metadata file)."""
    spark_version = types.SimpleNamespace(version=pyspark.__version__)  # all the helper reads of a session
    text = DefaultParamsWriter._get_metadata_to_save(  # noqa: SLF001 - pyspark's helper for nested writers
        instance, spark_version, {"spark_ddl": section}, params)
    return text.encode()


def _section(files: dict[str, storage.Content], **facts: Any) -> dict[str, Any]:
    versions = {"spark_ddl": __version__, "torch": torch.__version__,
                "pyspark": pyspark.__version__, "python": platform.python_version()}
    return {"format_version": FORMAT_VERSION, **facts, "files_sha256": {n: _sha256(d) for n, d in files.items()},
            "versions": versions}


class _AtomicWriter(MLWriter):
    """``save(path)``: every file written beside the target, swapped in only when complete.
    Unlike pyspark's default writers, overwrite never deletes the old one first."""

    def __init__(self, files: Callable[[], dict[str, storage.Content]]) -> None:
        super().__init__()
        self._files = files

    def save(self, path: str) -> None:
        if not isinstance(path, str):
            raise TypeError(f"path should be a string, got {type(path).__name__}")
        files = directory_files(self._sparkSession)  # write().session(spark) picks one; else the active
        files.write_directory(path, self._files(), overwrite=self.shouldOverwrite)

    def saveImpl(self, path: str) -> None:  # pragma: no cover - save() does the work
        self.save(path)


def read_metadata(path: str, spark: Any = None) -> dict[str, Any]:
    """The metadata JSON of a saved spark_ddl stage; a clear error if ``path`` holds none.
    ``spark``: the session whose side of the filesystem to read (default: the active one)."""
    files = directory_files(spark)
    parts = [n for n in files.list_directory(path, "metadata") if n.startswith("part-")]
    raw = files.read_file(path, f"metadata/{parts[0]}") if parts else None
    if raw is None:
        raise FileNotFoundError(f"{path} holds no saved spark_ddl model (no metadata/part-*).")
    metadata = DefaultParamsReader._parseMetaData(raw.decode().splitlines()[0])  # noqa: SLF001 - first line only
    if "spark_ddl" not in metadata:
        raise ValueError(f"{path} is a {metadata.get('class')} directory, not a spark_ddl stage")
    return metadata


def file_checksums(section: dict[str, Any]) -> dict[str, str]:
    """The sha256 of each saved file, from a metadata's ``spark_ddl`` section (any format version)."""
    checksums = dict(section.get("files_sha256") or {})
    if "weights_sha256" in section:  # models saved before files_sha256 existed
        checksums.setdefault(WEIGHTS_FILE, section["weights_sha256"])
        if (section.get("export") or {}).get("sha256"):
            checksums.setdefault(EXPORT_FILE, section["export"]["sha256"])
    return checksums


def matches_checksum(metadata_raw: bytes, name: str, data: bytes) -> bool:
    """Whether ``data`` is the file ``name`` that the metadata file ``metadata_raw`` describes."""
    metadata = DefaultParamsReader._parseMetaData(metadata_raw.decode().splitlines()[0])  # noqa: SLF001
    expected = file_checksums(metadata.get("spark_ddl") or {}).get(name)
    return expected is not None and expected == _sha256(data)


def _reader_of_files(path: str, section: dict[str, Any], spark: Any = None) -> Callable[[str], bytes | None]:
    """``read(name)``: a saved file's bytes, verified against the checksum in the metadata."""
    files = directory_files(spark)
    checksums = file_checksums(section)

    def read(name: str) -> bytes | None:
        data = files.read_file(path, name)
        if data is not None and name in checksums and _sha256(data) != checksums[name]:
            raise ValueError(f"{path}/{name} does not match the checksum in its metadata")
        return data

    return read


def _weights_opener(path: str, section: dict[str, Any], spark: Any = None) -> Callable[[], BinaryIO] | None:
    """A function opening the saved weights as a stream, after a first pass over them has
    matched the checksum in the metadata (no model-sized bytes in memory); None if absent."""
    files = directory_files(spark)
    expected = file_checksums(section).get(WEIGHTS_FILE)
    with files.open_file(path, WEIGHTS_FILE) or contextlib.nullcontext() as stream:
        if stream is None:
            return None
        if expected is not None and _stream_sha256(stream) != expected:
            raise ValueError(f"{path}/{WEIGHTS_FILE} does not match the checksum in its metadata")
    return lambda: files.open_file(path, WEIGHTS_FILE)


def _restore_params(instance: Any, metadata: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Set the saved Params on ``instance`` (pyspark's getAndSetParams), accepting the names
    older versions saved (e.g. ``label_col`` for ``labelCol``)."""
    renamed = dict(metadata)
    for key in ("paramMap", "defaultParamMap"):
        renamed[key] = {ALIASES.get(name, name): value for name, value in (metadata.get(key) or {}).items()
                        if name not in skip and instance.hasParam(ALIASES.get(name, name))}
    DefaultParamsReader.getAndSetParams(instance, renamed)


# ------------------------------------------------------------------ TorchModel


def model_files(model: SavableModel, export_program: bool = True) -> dict[str, storage.Content]:
    """Every file of a saved model, by name (the weights written from the module's tensors a
    piece at a time; ``export_program=False``: no torch.export program is made for a model that
    has none; its class path or pickle still describes it)."""
    module = model.get_module()
    weights = WeightsWriter(module)
    source = model.model_source
    if source.pickled is not None:  # the network as it is now (a module object can change in training)
        source = ModelSource.of_module(module).with_program(source.program)
    export: dict[str, Any] = {"file": None}
    columns, shapes = model.columns, model.row_shapes
    exportable = columns is not None and all(f.ragged or f.name in shapes for f in columns.batch.inputs)
    if not export_program and source.program is None:
        export["error"] = "not requested"
    elif exportable and weights.size > EXPORT_MAX_BYTES:
        exportable = False
        export["error"] = (f"not exported: {format_size(weights.size)} of weights (an export program holds "
                           "several copies of them while it is written); load with module= or a class path")
    elif source.program is None and exportable:
        try:
            source = source.with_program(model_bytes.export_program(module, columns.batch, shapes))
        except Exception as exc:  # export is best effort: many modules cannot be captured
            export["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    elif not exportable and "error" not in export:
        export["error"] = "input shapes unknown"
    if source.program is not None:
        export = {"file": EXPORT_FILE}
    files = {WEIGHTS_FILE: weights, **source.files()}
    if model.optimizer_state is not None:
        files[OPTIMIZER_FILE] = model.optimizer_state
    section = _section(files, columns=columns.to_json_dict() if columns else None, config=model.training_config,
                       architecture=source.record(), summary=model.summary, export=export,
                       row_shapes={name: list(shape) for name, shape in shapes.items()})  # the model's input facts
    params = {p.name: v for p, v in model.extractParamMap().items() if model.isSet(p)}
    files[METADATA_FILE] = _metadata(model, params, section)
    return files


class ModelWriter(_AtomicWriter):
    """``model.write().overwrite().save(path)``."""

    def __init__(self, instance: SavableModel) -> None:
        super().__init__(lambda: model_files(instance))
        self.instance = instance


class ModelReader(MLReader):
    """``TorchModel.read().load(path)`` (what ``PipelineModel.load`` calls for this stage)."""

    def __init__(self, cls: type, module: nn.Module | None = None, allow_pickle: bool = False) -> None:
        super().__init__()
        self.cls, self.module, self.allow_pickle = cls, module, allow_pickle

    def load(self, path: str) -> Any:
        metadata = read_metadata(path, self._sparkSession)  # read().session(spark) picks one
        section = metadata["spark_ddl"]
        read = _reader_of_files(path, section, self._sparkSession)
        weights = _weights_opener(path, section, self._sparkSession)
        if weights is None:
            raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}")
        record = section.get("architecture") or {}
        trusted = _pickle_allowed(self.allow_pickle)
        if self.module is not None:
            source = (ModelSource.from_files(record, read, False, path) if record.get("kind") == "class_path"
                      else ModelSource.of_module(self.module))
            module = self.module
            with weights() as stream:
                load_into_module(module, stream, f"the weights saved at {path}")
        else:
            source = ModelSource.from_files(record, read, trusted, path)
            module = source.build("score", weights, allow_pickle=trusted)
        columns = section.get("columns")
        spec = ColumnSpec.from_json_dict(columns) if columns else None
        shapes, summary = ((section["row_shapes"], section.get("summary")) if "row_shapes" in section
                           else old_format_row_shapes(section.get("summary") or {}))  # saved up to 2026-12-04
        model = self.cls(module, spec=spec, config=section.get("config"), source=source, summary=summary,
                         optimizer_state=read(OPTIMIZER_FILE), row_shapes=shapes)
        model._resetUid(metadata["uid"])  # noqa: SLF001 - as pyspark's own readers do
        _restore_params(model, metadata)
        return model


def saved_training_state(path: str) -> tuple[bytes, bytes | None, dict[str, Any]]:
    """A saved model's weights, optimiser state (None if it has none) and training settings,
    checksum-verified, without rebuilding its network (what a warm start needs)."""
    section = read_metadata(path)["spark_ddl"]
    read = _reader_of_files(path, section)
    weights = read(WEIGHTS_FILE)
    if weights is None:
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}")
    return weights, read(OPTIMIZER_FILE), dict(section.get("config") or {})


# ------------------------------------------------------------------ TorchEstimator


def estimator_files(estimator: SavableEstimator) -> dict[str, storage.Content]:
    """Every file of a saved (unfitted) estimator: JSON Params, the network's source, and the
    settings that are not JSON (callables) as one pickle."""
    params, pickled_params, files = {}, {}, {}
    source_record = None
    for param, value in estimator.extractParamMap().items():
        if not estimator.isSet(param):
            continue
        if param.name == "model" and value is not None:
            source, template = estimator.model_source()
            files.update(source.files())
            if source.stripped:  # a big module object is pickled without its weights: they go beside it
                files[WEIGHTS_FILE] = WeightsWriter(template)
            source_record = source.record()
            continue
        if param.name == "initial_model" and value is not None and not isinstance(value, str):
            raise ConfigError("initial_model is a TorchModel object, which a saved estimator cannot hold: save it "
                              "(model.save(path)) and set initial_model=path before saving the estimator.")
        try:
            json.dumps(value)
            params[param.name] = value
        except TypeError:
            pickled_params[param.name] = value
    if pickled_params:
        from pyspark import cloudpickle

        files[PICKLED_PARAMS_FILE] = cloudpickle.dumps(pickled_params)
    section = _section(files, architecture=source_record, pickled_params=sorted(pickled_params))
    files[METADATA_FILE] = _metadata(estimator, params, section)
    return files


class EstimatorWriter(_AtomicWriter):
    """``estimator.write().overwrite().save(path)``."""

    def __init__(self, instance: SavableEstimator) -> None:
        super().__init__(lambda: estimator_files(instance))
        self.instance = instance


class EstimatorReader(MLReader):
    """``TorchEstimator.read().load(path)`` (what ``Pipeline.load`` calls for this stage)."""

    def __init__(self, cls: type, allow_pickle: bool = False) -> None:
        super().__init__()
        self.cls, self.allow_pickle = cls, allow_pickle

    def load(self, path: str) -> Any:
        metadata = read_metadata(path, self._sparkSession)  # read().session(spark) picks one
        section = metadata["spark_ddl"]
        read = _reader_of_files(path, section, self._sparkSession)
        trusted = _pickle_allowed(self.allow_pickle)
        pickled_names = list(section.get("pickled_params") or [])
        if pickled_names and not trusted:
            raise ConfigError(
                f"The estimator at {path} has settings that only a pickle describes ({', '.join(pickled_names)}), "
                "and unpickling can run arbitrary code. Load it with TorchEstimator.load(path, allow_pickle=True), "
                "or wrap Pipeline.load/CrossValidatorModel.load in `with spark_ddl.allow_pickle():`, only for "
                "files you trust."
            )
        estimator = self.cls()
        estimator._resetUid(metadata["uid"])  # noqa: SLF001 - as pyspark's own readers do
        _restore_params(estimator, metadata, skip=("model",))
        record = section.get("architecture")
        if record is not None:
            estimator._set(model=self._model(record, read, trusted, path, section))  # noqa: SLF001
        if pickled_names:
            from pyspark import cloudpickle

            estimator._set(**cloudpickle.loads(read(PICKLED_PARAMS_FILE)))  # noqa: SLF001
        return estimator

    @staticmethod
    def _model(record: dict[str, Any], read: Callable[[str], bytes | None], trusted: bool, path: str,
               section: dict[str, Any]) -> Any:
        """The estimator's ``model`` Param: the class path, or the unpickled module object."""
        if record.get("kind") == "class_path":
            return record["class_path"]
        if not trusted:
            raise ConfigError(
                f"The estimator at {path} trains a module object ({record.get('class')}), which only a pickle "
                "describes, and unpickling can run arbitrary code. Load it with TorchEstimator.load(path, "
                "allow_pickle=True), or wrap Pipeline.load/CrossValidatorModel.load in `with "
                "spark_ddl.allow_pickle():`, only for files you trust; or use model='package.module:Class'."
            )
        return ModelSource.from_files(record, read, True, path).build("train", _weights_opener(path, section))
