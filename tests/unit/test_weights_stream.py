"""The streamed safetensors format (spark_ddl.formats.weights_stream): byte-identical in meaning to the
library's files, read back in place, refused when it does not fit; architecture-only pickles."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from spark_ddl.common.model_source import ModelSource, pickle_module
from spark_ddl.formats import storage
from spark_ddl.formats.weights_stream import WeightsWriter, load_into_module, module_tensors
from tests.references import assert_same_state


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3).to(torch.float64))
    module[1].running_mean.add_(1.5)
    return module


def test_written_files_load_with_the_safetensors_library_and_its_files_load_here():
    module = _mixed()
    data = WeightsWriter(module).to_bytes()
    assert len(data) == WeightsWriter(module).size
    assert_same_state(load_safetensors(data), module.state_dict())
    target = _mixed()
    for tensor in target.parameters():
        tensor.data.zero_()
    load_into_module(target, io.BytesIO(save_safetensors({k: v.contiguous() for k, v in module.state_dict().items()})))
    assert_same_state(target.state_dict(), module.state_dict())


def test_chunks_are_bounded_and_reading_fills_the_modules_own_tensors():
    module = nn.Linear(300, 200)
    writer = WeightsWriter(module)
    assert max(len(piece) for piece in writer.chunks(4096)) <= 4096
    target = nn.Linear(300, 200)
    pointers = {name: t.data_ptr() for name, t in module_tensors(target)}
    load_into_module(target, io.BytesIO(writer.to_bytes()))
    assert {name: t.data_ptr() for name, t in module_tensors(target)} == pointers  # no new tensors
    assert_same_state(target.state_dict(), module.state_dict())


def test_weights_that_do_not_fit_the_model_are_refused_by_name():
    data = WeightsWriter(nn.Linear(4, 2)).to_bytes()
    with pytest.raises(ValueError, match=r"'weight' is F32 \[2, 4\] but the model's is torch.float32 \[3, 4\]"):
        load_into_module(nn.Linear(4, 3), io.BytesIO(data))
    with pytest.raises(ValueError, match="missing"):
        load_into_module(nn.Sequential(nn.Linear(4, 2)), io.BytesIO(data))
    with pytest.raises(EOFError):
        load_into_module(nn.Linear(4, 2), io.BytesIO(data[:-5]))


def test_a_big_module_object_is_pickled_without_its_tensors_and_rebuilt_with_them(monkeypatch):
    import spark_ddl.common.model_source as model_source

    monkeypatch.setattr(model_source, "STRIP_TOTAL_BYTES", 1024)
    module = nn.Sequential(nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 2))
    pickled, stripped = pickle_module(module)
    assert stripped and len(pickled) < 20_000  # the 80 KB first layer is not in it
    source = ModelSource.of_module(module)
    with pytest.raises(Exception, match="pickled without its weights"):
        source.build("train")
    rebuilt = source.build("train", lambda: io.BytesIO(WeightsWriter(module).to_bytes()))
    assert_same_state(rebuilt.state_dict(), module.state_dict())


def test_streamed_content_is_written_and_opened_a_piece_at_a_time(tmp_path):
    module = nn.Linear(64, 32)
    storage.write_directory(str(tmp_path / "m"), {"w.safetensors": WeightsWriter(module), "a": b"x"}, overwrite=False)
    with storage.open_file(str(tmp_path / "m"), "w.safetensors") as stream:
        assert_same_state(load_safetensors(stream.read()), module.state_dict())
    assert storage.open_file(str(tmp_path / "m"), "missing") is None


def test_an_estimator_with_a_big_module_object_saves_its_weights_beside_the_architecture(monkeypatch, tmp_path):
    import spark_ddl.common.model_source as model_source
    from spark_ddl import TorchEstimator

    monkeypatch.setattr(model_source, "STRIP_TOTAL_BYTES", 1024)
    module = nn.Sequential(nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 2))
    TorchEstimator(model=module, loss="mse").save(str(tmp_path / "e"))
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["metadata", "module.cloudpickle",
                                                                  "weights.safetensors"]
    loaded = TorchEstimator.load(str(tmp_path / "e"), allow_pickle=True).getOrDefault("model")
    assert_same_state(loaded.state_dict(), module.state_dict())
