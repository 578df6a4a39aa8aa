"""Rank 0's typed answer (spark_ddl.common.wire.AgentReport, no Spark): it round-trips through its JSON
encoding, its control fields travel beside the summary and never inside it; the old-format
fallback reads a model saved before its metadata held the input facts."""

from __future__ import annotations

import json
from pathlib import Path

from spark_ddl.common.batch_format import BatchSpec, InputField
from spark_ddl.common.wire import AgentReport
from spark_ddl.ml.model import TorchModel
from spark_ddl.ml.summary import OLD_FORMAT_KEYS, old_format_row_shapes

CONTROL_KEYS = ("paused_after_epoch", "batch_spec", "result_format", "row_shapes", "feature_dim")
OLD_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "saved_formats" / "2026-12-04" / "model"


def _spec() -> BatchSpec:
    return BatchSpec((InputField("features", "__ddl_in_0", "array", "float32"),
                      InputField("tokens", "__ddl_in_1", "array", "int64", ragged=True)), positional=False)


def test_the_report_round_trips_through_its_encoding_with_the_control_fields_beside_the_summary():
    summary = {"history": [{"epoch": 1, "train_loss": 0.5}], "world_size": 2, "shard_sizes": [3, 4]}
    report = AgentReport(summary, batch=_spec(), row_shapes={"features": (3, 5)}, result_format="json")
    data = report.encode()
    decoded = AgentReport.decode(data)
    assert decoded == report and decoded.batch.field("tokens").ragged
    assert decoded.row_shapes == {"features": (3, 5)} and decoded.feature_dim == 3
    raw = json.loads(data)  # JSON on the wire, no pickle
    assert set(raw) == {"summary", "paused_after_epoch", "batch", "row_shapes", "result_format"}
    assert raw["summary"] == summary and not set(CONTROL_KEYS) & set(raw["summary"])
    paused = AgentReport.decode(AgentReport(paused_after_epoch=2).encode())
    assert paused.paused_after_epoch == 2 and paused.summary == {} and paused.batch is None
    assert paused.feature_dim is None


def test_a_model_keeps_its_input_facts_as_its_own_not_in_its_summary():
    model = TorchModel(summary={"world_size": 2}, row_shapes={"features": [7]})
    assert model.row_shapes == {"features": (7,)} and model.feature_dim == 7
    assert not set(CONTROL_KEYS) & set(model.summary)


def test_the_old_format_fallback_reads_the_shapes_from_an_old_summary_and_takes_the_keys_out():
    section = json.loads((OLD_MODEL / "metadata" / "part-00000").read_text().splitlines()[0])["spark_ddl"]
    assert "row_shapes" not in section and set(CONTROL_KEYS) & set(section["summary"])  # the fixture is old
    shapes, summary = old_format_row_shapes(section["summary"])
    assert shapes == {"features": [3]} and summary["world_size"] == section["summary"]["world_size"]
    assert not set(OLD_FORMAT_KEYS) & set(summary) and set(CONTROL_KEYS) <= set(OLD_FORMAT_KEYS)
    only_width, _ = old_format_row_shapes({"feature_dim": 4})  # older still: no row_shapes in the summary
    assert only_width == {"features": [4]} and old_format_row_shapes({}) == ({}, {})
