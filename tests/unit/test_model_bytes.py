import contextlib
import io
import os

import pytest
import torch

from spark_ddl.agent.shard import default_spec
from spark_ddl.common import wire
from spark_ddl.common.model_source import build_from_class_path
from spark_ddl.formats import model_bytes, storage
from tests.references import assert_same_state
from tests.tamper import EXPORT_ROUTES, tampered_archive


def test_chunks_stay_under_the_limit_and_reassemble():
    payload = os.urandom(wire.CHUNK_BYTES * 2 + 123)
    rows = [row for b in wire.output_batches("weights", 0, payload) for row in b.to_pylist()]
    assert len(rows) == 3 and max(len(r["data"]) for r in rows) <= wire.CHUNK_BYTES
    assert wire.reassemble(list(reversed(rows)), "weights") == payload
    with pytest.raises(RuntimeError, match="incomplete"):
        wire.reassemble(rows[:1] + rows[2:], "weights")


def test_state_dict_round_trip_without_pickle():
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    restored = model_bytes.state_dict_from_bytes(model_bytes.state_dict_to_bytes(module))
    assert_same_state(restored, module.state_dict())


def test_failed_write_leaves_the_existing_model_intact(tmp_path):
    target = tmp_path / "model"
    storage.write_directory(str(target), {"a.txt": b"old"}, overwrite=False)
    with pytest.raises(TypeError):
        storage.write_directory(str(target), {"a.txt": b"new", "b.txt": object()}, overwrite=True)
    assert (target / "a.txt").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_existing_path_needs_overwrite(tmp_path):
    target = tmp_path / "model"
    storage.write_directory(str(target), {"a.txt": b"old"}, overwrite=False)
    with pytest.raises(FileExistsError):
        storage.write_directory(str(target), {"a.txt": b"new"}, overwrite=False)
    storage.write_directory(str(target), {"b.txt": b"new"}, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_class_path_errors_are_clear():
    with pytest.raises(ValueError, match="package.module:Class"):
        build_from_class_path("torch.nn.Linear", {})
    module = build_from_class_path("torch.nn:Linear", {"in_features": 2, "out_features": 1})
    assert isinstance(module, torch.nn.Linear)


def test_nested_names_become_sub_directories(tmp_path):
    storage.write_directory(str(tmp_path / "m"), {"metadata/part-00000": b"{}", "w": b"1"}, overwrite=False)
    assert storage.list_directory(str(tmp_path / "m")) == ["metadata", "w"]
    assert storage.read_file(str(tmp_path / "m"), "metadata/part-00000") == b"{}"
    assert storage.read_file(str(tmp_path / "m"), "missing") is None


def test_export_archive_round_trip():
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
    data = model_bytes.export_program(module, default_spec(), {"features": (3,)})
    x = torch.randn(7, 3)
    torch.testing.assert_close(model_bytes.load_export_program(data)(x), module(x))
    model_bytes.check_export_archive(data)  # what export_program writes passes the check


@pytest.mark.parametrize("route", list(EXPORT_ROUTES))
def test_every_pickle_route_of_an_export_archive_is_refused_without_running_it(tmp_path, route):
    data = model_bytes.export_program(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()), default_spec(),
                                   {"features": (3,)})
    marker = tmp_path / "pwned"
    tampered = tampered_archive(data, route, marker)
    with pytest.raises(model_bytes.UnsafeArchiveError):
        model_bytes.load_export_program(tampered)
    assert not marker.exists()
    with contextlib.suppress(Exception):  # control: torch's own loader runs the payload
        torch.export.load(io.BytesIO(tampered))
    assert marker.exists(), "the planted payload did not run: this route tests nothing"
