"""``spark_ddl.LatestModel``: score a batch or streaming DataFrame with the newest version that
``fit_stream`` published, adding the version that scored each row.

The executors read the version store themselves (through pyarrow's filesystems: ``model_dir``
must be reachable from them, as a checkpoint_dir is): at most every ``refresh_seconds`` a
Python worker lists ``model_dir``, and only when the newest version changed does it read that
version's weights (checked against their checksum) into the network it already built. A running
scoring query therefore picks up a new version within ``refresh_seconds`` without a restart.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
from pyspark.sql import DataFrame
from torch import nn

from spark_ddl.common.model_source import ModelSource
from spark_ddl.errors import ConfigError
from spark_ddl.formats.model_bytes import state_dict_from_bytes
from spark_ddl.ml.inference import predict_frame
from spark_ddl.ml.model import TorchModel
from spark_ddl.ml.persistence import METADATA_FILE, WEIGHTS_FILE, matches_checksum
from spark_ddl.streaming.versions import VersionStore

_LOCK = threading.Lock()  # one listing/load at a time in a Python worker


@dataclass
class _Loaded:
    module: nn.Module
    version: int
    checked: float  # time.monotonic() of the last listing


def _verified_weights(store: VersionStore, number: int) -> bytes | None:
    """Version ``number``'s weights, None when it is gone (pruned) or does not match its checksum."""
    weights, metadata = store.read(number, WEIGHTS_FILE), store.read(number, METADATA_FILE)
    if weights is None or metadata is None:
        return None
    return weights if matches_checksum(metadata, WEIGHTS_FILE, weights) else None


@dataclass(frozen=True)
class NewestVersion:
    """The module provider of ``LatestModel`` (runs on the executors)."""

    model_dir: str
    source: ModelSource
    refresh_seconds: float
    on_load: Callable[[str, int], None] | None = None  # tests only: (model_dir, version) at every weights load

    def current(self, device: torch.device) -> tuple[nn.Module, int | None]:
        """The network with the newest version's weights, and that version. The loaded network
        lives in the Python worker's model cache (pyspark's, bounded, shared with ``TorchModel``)."""
        from pyspark.ml.model_cache import ModelCache

        key = f"spark_ddl:latest:{self.model_dir}:{device}:{self.source.class_path or self.source.class_name}"
        with _LOCK:
            entry, now = ModelCache.get(key), time.monotonic()
            if entry is not None and now - entry.checked < self.refresh_seconds:
                return entry.module, entry.version
            store = VersionStore(self.model_dir, executor=True)
            for _ in range(3):  # a version pruned between the listing and the read: list again
                newest = store.latest_number()
                if newest is None or (entry is not None and newest == entry.version):
                    break
                weights = _verified_weights(store, newest)
                if weights is None:
                    continue
                module = entry.module if entry is not None else self.source.build("score").to(device)
                module.load_state_dict(state_dict_from_bytes(weights))
                entry = _Loaded(module, newest, now)
                ModelCache.add(key, entry)
                if self.on_load is not None:
                    self.on_load(self.model_dir, newest)
                return entry.module, entry.version
            if entry is None:
                raise FileNotFoundError(f"{self.model_dir}: no readable version for scoring")
            entry.checked = now
            return entry.module, entry.version


class LatestModel:
    """Scores with the newest version under ``model_dir``; ``transform(df)`` (batch or
    streaming) appends the prediction (and probability for classifiers) and ``version_col``.

    >>> scored = spark_ddl.LatestModel("/models/recs", refresh_seconds=10).transform(events)

    The columns, task and network come from the newest version when ``transform`` is called;
    later versions must keep them (``fit_stream`` does). A network that only a pickle describes
    needs ``allow_pickle=True`` (only for files you trust).
    """

    _on_load: Callable[[str, int], None] | None = None  # tests only: called on the executors at each weights load

    def __init__(self, model_dir: str, refresh_seconds: float = 10.0, prediction_col: str | None = None,
                 probability_col: str | None = None, version_col: str = "model_version",
                 allow_pickle: bool = False) -> None:
        if isinstance(refresh_seconds, bool) or not isinstance(refresh_seconds, (int, float)) or refresh_seconds < 0:
            raise ConfigError(f"refresh_seconds must be a number of seconds >= 0, got {refresh_seconds!r}.")
        if model_dir.startswith("models:/"):  # a stream registered in MLflow: its version store, which the
            from spark_ddl.mlflow.registered import resolve_model_dir  # executors read (never MLflow)

            model_dir = resolve_model_dir(model_dir)[0]
        self.model_dir, self.refresh_seconds = model_dir.rstrip("/"), float(refresh_seconds)
        self.prediction_col, self.probability_col, self.version_col = prediction_col, probability_col, version_col
        self.allow_pickle = allow_pickle

    def transform(self, df: DataFrame) -> DataFrame:
        """``df`` scored by the newest version (re-read on the executors as versions appear)."""
        model = TorchModel.load_latest(self.model_dir, allow_pickle=self.allow_pickle)
        spec = model.scoring_columns(df.schema)
        provider = NewestVersion(self.model_dir, model.model_source, self.refresh_seconds, self._on_load)
        probability = self.probability_col if self.probability_col is not None else model.getProbabilityCol()
        return predict_frame(df, spec, provider, model.scoring, self.prediction_col or model.getPredictionCol(),
                             probability or None, model.getOrDefault(model.inference_batch_size), self.version_col)

    def __repr__(self) -> str:
        return f"LatestModel({self.model_dir!r}, refresh_seconds={self.refresh_seconds:g})"

