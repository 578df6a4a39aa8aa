"""How to rebuild a network: the one description the agents, the scoring executors and saved
models all use.

A ``ModelSource`` holds any of:

- a class path ``"package.module:Class"`` and JSON keyword arguments (no pickle anywhere);
- a torch.export program (scores without the model's code; checked before loading so that
  loading runs no pickle);
- the cloudpickled module object (what a user's ``nn.Module`` instance becomes; unpickling
  runs code, so a saved one is loaded only with ``allow_pickle=True``).

``build`` rebuilds the network for a purpose: training needs a trainable module (class path
or pickle), scoring takes any of them.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import pickle
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Callable, Union

import torch
from torch import nn

from spark_ddl.errors import ConfigError
from spark_ddl.formats import model_bytes

CLASS_PATH, PICKLE, EXPORT = "class_path", "pickle", "export"
EXPORT_FILE = "model.pt2"
PICKLED_MODULE_FILE = "module.cloudpickle"
# A module object whose state is this big is pickled without its tensors of STRIP_TENSOR_BYTES
# and more (they travel as weights, a chunk at a time): a pickle is one object in memory.
STRIP_TOTAL_BYTES = 64 * 2**20
STRIP_TENSOR_BYTES = 64 * 2**10
Weights = Union[bytes, Callable[[], BinaryIO]]  # safetensors bytes, or a function that opens them


def _meta_tensor(shape: tuple[int, ...], dtype: torch.dtype, parameter: bool, requires_grad: bool) -> torch.Tensor:
    """A stripped tensor's stand-in in an architecture-only pickle (no storage)."""
    tensor = torch.empty(shape, dtype=dtype, device="meta")
    return nn.Parameter(tensor, requires_grad=requires_grad) if parameter else tensor


def pickle_module(module: nn.Module) -> tuple[bytes, bool]:
    """The cloudpickled module, and whether its big tensors were left out (see STRIP_TOTAL_BYTES)."""
    from pyspark import cloudpickle

    tensors = [t for t in module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    big = {id(t) for t in tensors if t.numel() * t.element_size() >= STRIP_TENSOR_BYTES and t.device.type != "meta"}
    if total < STRIP_TOTAL_BYTES or not big:
        return cloudpickle.dumps(module), False

    class ArchitecturePickler(cloudpickle.CloudPickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, torch.Tensor) and id(obj) in big:
                return _meta_tensor, (tuple(obj.shape), obj.dtype, isinstance(obj, nn.Parameter), obj.requires_grad)
            return super().reducer_override(obj)

    buffer = io.BytesIO()
    ArchitecturePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(module)
    return buffer.getvalue(), True


def materialize(module: nn.Module) -> bool:
    """Give the stand-ins of an architecture-only pickle real (empty) CPU storage, keeping tied
    tensors tied; True if there were any (their values must then be loaded)."""
    replaced: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):  # noqa: SLF001 - replacing tensors in place
            for name, tensor in store.items():
                if tensor is None or tensor.device.type != "meta":
                    continue
                if id(tensor) not in replaced:
                    empty = torch.empty(tensor.shape, dtype=tensor.dtype)
                    replaced[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                                            if isinstance(tensor, nn.Parameter) else empty)
                store[name] = replaced[id(tensor)]
    return bool(replaced)


def load_weights(module: nn.Module, weights: Weights) -> None:
    """Load safetensors ``weights`` (bytes, or a function that opens them as a stream, read a
    chunk at a time into the module's own tensors)."""
    if isinstance(weights, (bytes, bytearray, memoryview)):
        module.load_state_dict(model_bytes.state_dict_from_bytes(bytes(weights)))
        return
    from spark_ddl.formats.weights_stream import load_into_module

    with weights() as stream:
        load_into_module(module, stream)


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


@dataclass(frozen=True)
class ModelSource:
    """A network's architecture (and, for pickles and programs, its weights too)."""

    class_path: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    pickled: bytes | None = None  # cloudpickled nn.Module
    program: bytes | None = None  # torch.export archive
    class_name: str | None = None  # "package.module.Class", for messages
    stripped: bool = False  # the pickle left its big tensors out: building it needs weights

    # -------------------------------------------------------------- from what users give

    @classmethod
    def of(cls, model: Any, kwargs: dict[str, Any] | None = None) -> tuple["ModelSource", nn.Module]:
        """The source of a user's ``model`` (an nn.Module or a class path), and a local copy of
        the network (the driver's template). Raises ConfigError with the fix."""
        kwargs = dict(kwargs or {})
        if isinstance(model, str):
            try:
                json.dumps(kwargs)
            except TypeError as exc:
                raise ConfigError(f"model_kwargs must be JSON-serialisable: {exc}") from exc
            template = build_from_class_path(model, kwargs)
            return cls(class_path=model, kwargs=kwargs, class_name=_qualified_name(template)), template
        if isinstance(model, nn.Module):
            return cls.of_module(model), copy.deepcopy(model)
        raise ConfigError(
            f"model must be a torch.nn.Module or 'package.module:Class', got {type(model).__name__}."
        )

    @classmethod
    def of_module(cls, module: nn.Module) -> "ModelSource":
        """The cloudpickled module (raises ConfigError when it cannot be pickled)."""
        try:
            pickled, stripped = pickle_module(module)
        except Exception as exc:
            raise ConfigError(
                f"The model cannot be serialised to send it to the executors ({type(exc).__name__}: "
                f"{exc}). Remove unpicklable attributes (open files, locks, CUDA streams) or pass "
                "model='package.module:Class'."
            ) from exc
        return cls(pickled=pickled, class_name=_qualified_name(module), stripped=stripped)

    # -------------------------------------------------------------- what it is

    @property
    def kind(self) -> str:
        """'class_path', 'pickle' or 'export': the form the architecture is described in."""
        if self.class_path is not None:
            return CLASS_PATH
        return PICKLE if self.pickled is not None else EXPORT

    def with_program(self, program: bytes | None) -> "ModelSource":
        """The same source, also carrying a torch.export program."""
        return replace(self, program=program)

    # -------------------------------------------------------------- rebuilding

    def build(self, purpose: str = "train", weights: Weights | None = None, allow_pickle: bool = True) -> nn.Module:
        """A fresh network, with ``weights`` (safetensors bytes, or a function opening them)
        loaded when given; an architecture-only pickle needs them.

        ``purpose="train"``: a trainable module (class path, else the pickle). ``"score"``: the
        class path, else the checked export program (captured in eval mode; runs no pickle),
        else the pickle when ``allow_pickle``; in eval mode.
        """
        exported = False  # a program's module is in eval mode already and refuses train()/eval()
        if self.class_path is not None:
            module = build_from_class_path(self.class_path, self.kwargs)
        elif purpose == "score" and self.program is not None:
            module, exported = model_bytes.load_export_program(self.program), True
        elif self.pickled is not None and allow_pickle:
            module = self._unpickle()
            if materialize(module) and weights is None:
                raise ConfigError(f"This model ({self.class_name or 'a module object'}) was pickled without its "
                                  "weights; they must be loaded with it.")
        else:
            raise ConfigError(self._cannot_build(purpose))
        if weights is not None:
            load_weights(module, weights)
        if purpose == "score" and not exported:
            module.eval()
        return module

    def _unpickle(self) -> nn.Module:
        from pyspark import cloudpickle

        try:
            return cloudpickle.loads(self.pickled)
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(
                f"The model cannot be rebuilt here ({exc}). Make its code importable on the executors "
                "(spark.submit.pyFiles / addPyFile / addArtifacts), or pass model='pkg.module:Class'."
            ) from exc

    def _cannot_build(self, purpose: str) -> str:
        if purpose == "train" and self.program is not None:
            return (f"The model ({self.class_name or 'a torch.export program'}) was loaded from its "
                    "torch.export program, which scores but cannot be trained. Pass module=<an instance of "
                    "its architecture> when loading, or use a class path.")
        return f"This model ({self.class_name or 'unknown'}) does not describe its architecture."

    # -------------------------------------------------------------- saved files

    def record(self) -> dict[str, Any]:
        """The JSON description saved in a model's metadata (``files`` holds the bytes)."""
        if self.class_path is not None:
            return {"kind": CLASS_PATH, "class_path": self.class_path, "kwargs": self.kwargs,
                    "class": self.class_name}
        return {"kind": PICKLE if self.pickled is not None else EXPORT, "class": self.class_name}

    def files(self) -> dict[str, bytes]:
        """The files beside the metadata: the pickled module and/or the export program."""
        out = {}
        if self.pickled is not None:
            out[PICKLED_MODULE_FILE] = self.pickled
        if self.program is not None:
            out[EXPORT_FILE] = self.program
        return out

    @classmethod
    def from_files(cls, record: dict[str, Any], read: Callable[[str], bytes | None], allow_pickle: bool,
                   where: str) -> "ModelSource":
        """The source a saved ``record`` describes; ``read(name)`` returns a saved file's
        (checksum-verified) bytes or None. Runs no pickle; without ``allow_pickle`` a module
        that only a pickle describes is refused, naming the ways out."""
        if record.get("kind") == CLASS_PATH:
            return cls(class_path=record["class_path"], kwargs=dict(record.get("kwargs") or {}),
                       class_name=record.get("class"))
        program = read(EXPORT_FILE)
        refusal = None
        if program is not None:
            try:
                model_bytes.check_export_archive(program)
            except model_bytes.UnsafeArchiveError as exc:
                refusal, program = f"its torch.export program was refused ({exc})", None
        pickled = read(PICKLED_MODULE_FILE) if allow_pickle else None
        if program is None and pickled is None:
            if record.get("kind") != PICKLE:
                raise ConfigError(f"{where} does not describe its architecture; pass module=<an instance>.")
            reason = refusal or "no torch.export program could be saved for it"
            raise ConfigError(
                f"The model at {where} was trained from a module object ({record.get('class')}) and "
                f"{reason}, so only a pickle describes its architecture, and unpickling can run arbitrary "
                "code. Pass module=<an instance of that architecture>, or allow_pickle=True if you trust "
                "these files."
            )
        return cls(pickled=pickled, program=program, class_name=record.get("class"))


def _qualified_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"
