"""Module paths that moved, still importable under their old names.

Saved pipelines record their stages' class paths (``spark_ddl.estimator.TorchEstimator``),
saved models their network's (``spark_ddl.models:MLP``), and pickles any class they hold. The
modules now live in layers (``ml/``, ``common/``, ``formats/``); importing an old path gives the
very module object of the new one (no copy, so classes and their identity are shared), loaded
only when something asks for it. New saves record the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Sequence

MOVED = {  # old module path -> where it lives now
    "spark_ddl.estimator": "spark_ddl.ml.estimator",
    "spark_ddl.model": "spark_ddl.ml.model",
    "spark_ddl.params": "spark_ddl.ml.params",
    "spark_ddl.persistence": "spark_ddl.ml.persistence",
    "spark_ddl.inference": "spark_ddl.ml.inference",
    "spark_ddl.warm_start": "spark_ddl.ml.warm_start",
    "spark_ddl.summary": "spark_ddl.ml.summary",
    "spark_ddl.wire": "spark_ddl.common.wire",
    "spark_ddl.batch_format": "spark_ddl.common.batch_format",
    "spark_ddl.model_source": "spark_ddl.common.model_source",
    "spark_ddl.config": "spark_ddl.common.train_config",
    "spark_ddl.settings": "spark_ddl.common.settings",
    "spark_ddl.objectives": "spark_ddl.common.objectives",
    "spark_ddl.optimizers": "spark_ddl.common.optimizers",
    "spark_ddl.devices": "spark_ddl.common.devices",
    "spark_ddl.artifact": "spark_ddl.formats.model_bytes",
    "spark_ddl.weights": "spark_ddl.formats.weights_stream",
    "spark_ddl.checkpoint": "spark_ddl.formats.checkpoint",
    "spark_ddl.storage": "spark_ddl.formats.storage",
    "spark_ddl.models": "spark_ddl.networks",
    "spark_ddl.settings_reference": "spark_ddl.apps.settings_reference",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target
        self.target_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.target_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.target_spec  # the import machinery set the old name's in between


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers an old module path with the module at its new path."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(MOVED[fullname]))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once per process."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
