"""LatestModel's executor side without Spark: the newest version is loaded once and checked
against its metadata's checksum (the reader persistence uses), and the loaded networks live in
the Python worker's bounded model cache, not in a cache of their own."""

from __future__ import annotations

import json

import torch
from pyspark.ml.model_cache import ModelCache

from spark_ddl.common.model_source import ModelSource
from spark_ddl.formats.model_bytes import state_dict_to_bytes
from spark_ddl.ml.persistence import METADATA_FILE, WEIGHTS_FILE, _sha256
from spark_ddl.streaming.latest import NewestVersion
from spark_ddl.streaming.versions import VersionStore

SOURCE = ModelSource.of("torch.nn:Linear", {"in_features": 3, "out_features": 1})[0]


def publish(model_dir: str, value: float, tamper: bool = False) -> None:
    module = torch.nn.Linear(3, 1)
    torch.nn.init.constant_(module.weight, value)
    weights = state_dict_to_bytes(module)
    metadata = {"class": "spark_ddl.ml.model.TorchModel", "spark_ddl": {"files_sha256": {WEIGHTS_FILE: _sha256(weights)}}}
    if tamper:
        weights = weights[:-1] + bytes([weights[-1] ^ 0x40])
    files = {WEIGHTS_FILE: weights, METADATA_FILE: json.dumps(metadata).encode()}
    VersionStore(model_dir).publish(files, {"batch_id": 0, "query_id": "q", "rows": 1}, keep=10)


def test_the_newest_verified_version_is_loaded_and_a_tampered_one_is_skipped(tmp_path):
    model_dir, loads = str(tmp_path / "models"), []
    provider = NewestVersion(model_dir, SOURCE, refresh_seconds=0, on_load=lambda _, v: loads.append(v))
    publish(model_dir, 1.0)
    module, version = provider.current(torch.device("cpu"))
    assert version == 1 and module.weight.eq(1.0).all()
    publish(model_dir, 2.0, tamper=True)  # version 2 does not match its checksum: version 1 scores on
    assert provider.current(torch.device("cpu"))[1] == 1
    publish(model_dir, 3.0)
    module, version = provider.current(torch.device("cpu"))
    assert version == 3 and module.weight.eq(3.0).all() and loads == [1, 3]


def test_loaded_networks_live_in_the_bounded_model_cache(tmp_path):
    providers = []
    for index in range(ModelCache._capacity + 2):  # more model dirs than the cache holds
        publish(str(tmp_path / f"m{index}"), float(index))
        providers.append(NewestVersion(str(tmp_path / f"m{index}"), SOURCE, refresh_seconds=60))
        assert providers[-1].current(torch.device("cpu"))[0].weight.eq(float(index)).all()
    held = [key for key in ModelCache._models if str(key).startswith("spark_ddl:latest:")]
    assert 0 < len(held) <= ModelCache._capacity
    assert not any(str(tmp_path / "m0") in str(key) for key in held)  # the oldest was evicted
    assert providers[0].current(torch.device("cpu"))[1] == 1  # and is loaded again when needed
