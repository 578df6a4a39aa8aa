"""Models and pipelines saved by earlier spark_ddl (tests/fixtures/saved_formats/<date>/, written
by tests/fixtures/make_saved_formats.py on that day) load with today's code and score as they
did then: the class paths they record (``spark_ddl.model.TorchModel``, ``spark_ddl.models:MLP``)
and their files must keep working whatever the package's layout becomes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array

from spark_ddl import TorchModel
from tests.references import FLOAT32_PATHS

SAVED = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "saved_formats").iterdir())


@pytest.mark.parametrize("folder", SAVED, ids=[p.name for p in SAVED])
def test_a_model_and_a_pipeline_saved_by_an_earlier_version_load_and_score_the_same(spark, folder):
    expected = json.loads((folder / "expected.json").read_text())
    frame = spark.createDataFrame([tuple(r) for r in expected["rows"]], "a double, b double, c double, label long")
    assert "spark_ddl.models:MLP" in (folder / "model" / "metadata" / "part-00000").read_text()
    for name, loaded in (("model", TorchModel.load(str(folder / "model"))),
                         ("pipeline", PipelineModel.load(str(folder / "pipeline")))):
        stage = loaded if name == "model" else loaded.stages[-1]
        # their summaries held the input facts (the old-format fallback reads them and takes them out)
        assert stage.row_shapes == {"features": (3,)} and stage.feature_dim == 3, name
        assert not {"row_shapes", "feature_dim", "batch_spec"} & set(stage.summary), name
        rows = loaded.transform(frame).select("prediction", vector_to_array("probability").alias("p")).collect()
        assert [r.prediction for r in rows] == [e[0] for e in expected[name]], name
        np.testing.assert_allclose([r.p for r in rows], [e[1] for e in expected[name]], **FLOAT32_PATHS)
