"""TorchEstimator as a pyspark.ml stage: Pipelines, persistence, tuning, no pickle on load."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder
from pyspark.sql import functions as F
from torch import nn

import spark_ddl
from spark_ddl import ConfigError, TorchEstimator, TorchModel
from tests.references import assert_same_state
from tests.tamper import pickled, plant, tampered_archive

REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "data" / "digits.parquet")


class DigitsNet(nn.Module):
    """Defined only in this test module: a fresh process cannot import it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def digits(spark):
    frame = spark.read.parquet(DIGITS)
    pixels = frame.select("id", "label", "split", *[F.col("features")[i].alias(f"p{i}") for i in range(64)])
    return pixels.filter("split = 'train'"), pixels.filter("split = 'test'")


def digits_pipeline(**estimator_params) -> Pipeline:
    torch.manual_seed(0)
    assembler = VectorAssembler(inputCols=[f"p{i}" for i in range(64)], outputCol="raw")
    scaler = StandardScaler(inputCol="raw", outputCol="scaled", withMean=True, withStd=True)
    estimator = TorchEstimator(model=DigitsNet(), loss="cross_entropy", optimizer="adam", lr=0.01,
                               batch_size=32, epochs=6, feature_cols=["scaled"], label_col="label",
                               **estimator_params)
    return Pipeline(stages=[assembler, scaler, estimator])


def test_pipeline_model_round_trips_into_a_fresh_process(digits, tmp_path):
    train, test = digits
    fitted = digits_pipeline().fit(train)
    before = fitted.transform(test).select("id", "prediction", vector_to_array("probability").alias("p"))
    before_rows = {r.id: (r.prediction, r.p) for r in before.collect()}
    accuracy = sum(before_rows[r.id][0] == r.label for r in test.select("id", "label").collect()) / len(before_rows)
    assert accuracy > 0.9
    path = str(tmp_path / "pipeline")
    fitted.write().save(path)
    out = tmp_path / "after.json"
    script = textwrap.dedent(f"""
        import json, sys
        from pyspark.ml import PipelineModel
        from pyspark.ml.functions import vector_to_array
        from spark_ddl import get_or_create_session
        spark = get_or_create_session(num_workers=2)
        model = PipelineModel.load({path!r})
        test = spark.read.parquet({DIGITS!r}).filter("split = 'test'")
        from pyspark.sql import functions as F
        test = test.select("id", "label", *[F.col("features")[i].alias(f"p{{i}}") for i in range(64)])
        rows = model.transform(test).select("id", "prediction", vector_to_array("probability").alias("p")).collect()
        json.dump({{str(r.id): [r.prediction, list(r.p)] for r in rows}}, open({str(out)!r}, "w"))
        assert "tests" not in sys.modules and "tests.integration.test_pipeline" not in sys.modules
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no test code importable
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads(out.read_text())
    assert len(after) == len(before_rows)
    for key, (prediction, probability) in after.items():
        assert prediction == before_rows[int(key)][0]
        assert probability == pytest.approx(before_rows[int(key)][1], rel=1e-5, abs=1e-7)


def test_cross_validator_picks_the_better_learning_rate(digits):
    train, _ = digits
    pipeline = digits_pipeline(num_workers=2)
    estimator = pipeline.getStages()[-1]
    grid = ParamGridBuilder().addGrid(estimator.lr, [1e-6, 1e-2]).build()
    evaluator = MulticlassClassificationEvaluator(labelCol="label", predictionCol="prediction",
                                                  metricName="accuracy")
    cv = CrossValidator(estimator=pipeline, estimatorParamMaps=grid, evaluator=evaluator, numFolds=2, seed=3)
    cv_model = cv.fit(train)
    assert len(cv_model.avgMetrics) == 2
    assert cv_model.avgMetrics[1] > cv_model.avgMetrics[0] + 0.3
    best = cv_model.bestModel.stages[-1]
    assert best.summary["history"] and cv_model.avgMetrics[1] > 0.85


def test_a_tampered_model_is_refused_by_every_loader_without_running_its_pickles(spark, tmp_path):
    """A module-object model keeps module.cloudpickle and model.pt2: a payload is planted in both
    (checksums updated). TorchModel.load, its reader and PipelineModel.load refuse it and never
    run it; allowing pickles (control) runs it, so the payload is live."""
    frame = spark.createDataFrame([([float(i), 1.0, 2.0], float(i)) for i in range(20)],
                                  "features array<float>, label double")
    model = TorchEstimator(model=SelfishNet(), loss="mse", epochs=1).fit(frame)
    path, pipeline_path = tmp_path / "model", tmp_path / "pipeline"
    model.write().save(str(path))
    PipelineModel(stages=[model]).write().save(str(pipeline_path))
    (stage,) = (pipeline_path / "stages").iterdir()
    marker = tmp_path / "pwned"
    for directory in (path, stage):
        plant(directory, "model.pt2", tampered_archive((directory / "model.pt2").read_bytes(), "sample inputs", marker))
        plant(directory, "module.cloudpickle", pickled(marker))

    with pytest.raises(ConfigError, match="torch.export program was refused") as info:
        TorchModel.load(str(path))
    assert "allow_pickle=True" in str(info.value)
    with pytest.raises(ConfigError, match="torch.export program was refused"):
        TorchModel.read().load(str(path))
    with pytest.raises(ConfigError, match="torch.export program was refused"):
        PipelineModel.load(str(pipeline_path))
    assert not marker.exists()
    with spark_ddl.allow_pickle(), contextlib.suppress(Exception):  # control
        PipelineModel.load(str(pipeline_path))
    assert marker.exists()


@pytest.mark.parametrize("planted", ["module.cloudpickle", "params.cloudpickle"])
def test_a_tampered_estimator_is_refused_without_running_its_pickles(spark, tmp_path, planted):
    """An estimator saved with a module object (module.cloudpickle) or a callable loss
    (params.cloudpickle): with a payload planted there, TorchEstimator.load and Pipeline.load
    refuse without allow_pickle and never run it; with it (control) the payload runs."""
    model = SelfishNet() if planted == "module.cloudpickle" else "tests.helpers:TinyNet"
    loss = "mse" if planted == "module.cloudpickle" else smooth_l1
    estimator = TorchEstimator(model=model, loss=loss, epochs=1)
    path, pipeline_path = tmp_path / "estimator", tmp_path / "pipeline"
    estimator.write().save(str(path))
    Pipeline(stages=[estimator]).save(str(pipeline_path))
    (stage,) = (pipeline_path / "stages").iterdir()
    marker = tmp_path / "pwned"
    for directory in (path, stage):
        assert (directory / planted).exists()
        plant(directory, planted, pickled(marker))

    with pytest.raises(ConfigError, match="allow_pickle=True"):
        TorchEstimator.load(str(path))
    with pytest.raises(ConfigError, match="spark_ddl.allow_pickle"):
        Pipeline.load(str(pipeline_path))
    assert not marker.exists()
    with contextlib.suppress(Exception):  # control
        TorchEstimator.load(str(path), allow_pickle=True)
    assert marker.exists()


class SelfishNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_write_overwrite_replaces_and_plain_write_refuses(spark, tmp_path):
    frame = spark.createDataFrame([([float(i), 1.0, 2.0], float(i)) for i in range(20)],
                                  "features array<float>, label double")
    model = TorchEstimator(model="tests.helpers:TinyNet", model_kwargs={"in_features": 3}, loss="mse",
                           epochs=1).fit(frame)
    path = str(tmp_path / "m")
    model.write().save(path)
    with pytest.raises(FileExistsError):
        model.write().save(path)
    model.write().overwrite().save(path)
    uri = Path(path).as_uri()  # file:// goes through Hadoop's FileSystem in the JVM
    model.write().overwrite().save(uri)
    loaded = TorchModel.load(uri)
    assert loaded.uid == model.uid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_params_behave_like_every_pyspark_ml_stage():
    estimator = TorchEstimator(model=SelfishNet(), loss="mse", lr=0.3, epochs=3)
    explained = estimator.explainParams()
    for name in ("lr", "batch_size", "epochs", "num_workers", "feature_cols", "early_stopping_patience",
                 "validation_fraction", "lr_scheduler", "predictionCol"):
        assert f"{name}:" in explained
    assert "learning rate (default: 0.1, current: 0.3)" in explained
    copied = estimator.copy({estimator.lr: 0.05})
    assert copied.getOrDefault(copied.lr) == 0.05 and estimator.getOrDefault(estimator.lr) == 0.3
    assert copied.uid == estimator.uid and copied.getOrDefault(copied.epochs) == 3
    params = {p.name: v for p, v in estimator.extractParamMap().items()}
    assert params["lr"] == 0.3 and params["batch_size"] == 32 and params["loss"] == "mse"
    estimator.setParams(batch_size=8)
    assert estimator.getOrDefault(estimator.batch_size) == 8


def test_train_validation_split_tunes_epochs(digits):
    from pyspark.ml.tuning import TrainValidationSplit

    train, _ = digits
    pipeline = digits_pipeline()
    estimator = pipeline.getStages()[-1]
    grid = ParamGridBuilder().addGrid(estimator.epochs, [1, 6]).addGrid(estimator.lr, [1e-3]).build()
    tvs = TrainValidationSplit(estimator=pipeline, estimatorParamMaps=grid, trainRatio=0.75, seed=1,
                               evaluator=MulticlassClassificationEvaluator(metricName="accuracy"))
    model = tvs.fit(train)
    assert len(model.validationMetrics) == 2
    assert model.validationMetrics[1] > model.validationMetrics[0]
    assert model.bestModel.stages[-1].summary["history"][-1]["epoch"] == 6


def smooth_l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss given as a callable (saved with the estimator as a pickle)."""
    return nn.functional.smooth_l1_loss(output.reshape(-1), target.reshape(-1).float())


def test_an_unfitted_pipeline_saves_loads_and_then_fits_the_same_model(digits, tmp_path):
    train, test = digits
    assembler = VectorAssembler(inputCols=[f"p{i}" for i in range(64)], outputCol="raw")
    estimator = TorchEstimator(model="spark_ddl.networks:MLP", model_kwargs={"in_features": 64, "out_features": 10},
                               loss="cross_entropy", optimizer="adam", lr=0.01, batch_size=32, epochs=3,
                               featuresCol="raw", labelCol="label", seed=7, validation_fraction=0.1)
    pipeline = Pipeline(stages=[assembler, estimator])
    path = str(tmp_path / "unfitted")
    pipeline.save(path)
    loaded = Pipeline.load(path)
    loaded_estimator = loaded.getStages()[-1]
    assert isinstance(loaded_estimator, TorchEstimator) and loaded_estimator.uid == estimator.uid
    for name in ("model", "model_kwargs", "lr", "epochs", "seed", "labelCol", "feature_cols", "validation_fraction"):
        assert loaded_estimator.getOrDefault(name) == estimator.getOrDefault(name), name
    original, reloaded = pipeline.fit(train), loaded.fit(train)
    # every agent built the class with the fit's seed: the replicas were compared, not broadcast
    assert original.stages[-1].summary["initial_broadcast"] is False
    # same settings, same seed: the same training run
    assert_same_state(reloaded.stages[-1].get_module().state_dict(), original.stages[-1].get_module().state_dict())
    accuracy = reloaded.transform(test).select(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0]
    assert accuracy > 0.85


def test_an_estimator_with_a_module_object_and_a_callable_loss_loads_only_with_pickles_allowed(spark, tmp_path):
    frame = spark.createDataFrame([([float(i % 7), 1.0, float(i % 3)], float(i % 5)) for i in range(40)],
                                  "features array<float>, label double")
    estimator = TorchEstimator(model=SelfishNet(), loss=smooth_l1, epochs=2, lr=0.05)
    path = str(tmp_path / "estimator")
    estimator.write().save(path)
    assert sorted(p.name for p in (tmp_path / "estimator").iterdir()) == ["metadata", "module.cloudpickle",
                                                                           "params.cloudpickle"]
    with pytest.raises(ConfigError, match="allow_pickle=True"):
        TorchEstimator.load(path)
    pipeline_path = str(tmp_path / "pipeline")
    Pipeline(stages=[estimator]).save(pipeline_path)
    with pytest.raises(ConfigError, match="spark_ddl.allow_pickle"):
        Pipeline.load(pipeline_path)
    with spark_ddl.allow_pickle():
        loaded = Pipeline.load(pipeline_path).getStages()[0]
    assert TorchEstimator.load(path, allow_pickle=True).uid == loaded.uid == estimator.uid
    assert loaded.getOrDefault("loss") is smooth_l1
    # the initial weights travel too
    assert_same_state(loaded.getOrDefault("model").state_dict(), estimator.getOrDefault("model").state_dict())
    model = loaded.fit(frame)
    assert len(model.history) == 2


def test_a_cross_validator_model_with_a_torch_model_saves_and_loads(spark, tmp_path):
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.tuning import CrossValidatorModel

    frame = spark.createDataFrame([([float(i % 7), float(i % 5), float(i % 3)], float(i % 7) - 0.5 * (i % 3))
                                   for i in range(64)], "features array<float>, label double")
    estimator = TorchEstimator(model="tests.helpers:TinyNet", model_kwargs={"in_features": 3, "hidden": 6},
                               loss="mse", epochs=2, batch_size=8)
    grid = ParamGridBuilder().addGrid(estimator.lr, [1e-5, 0.05]).build()
    cv_model = CrossValidator(estimator=estimator, estimatorParamMaps=grid, evaluator=RegressionEvaluator(),
                              numFolds=2, seed=1).fit(frame)
    path = str(tmp_path / "cv")
    cv_model.save(path)
    loaded = CrossValidatorModel.load(path)
    assert isinstance(loaded.bestModel, TorchModel) and loaded.avgMetrics == cv_model.avgMetrics
    assert loaded.getEstimator().uid == estimator.uid
    assert [m[estimator.lr] for m in loaded.getEstimatorParamMaps()] == [1e-5, 0.05]
    before = cv_model.transform(frame).select("prediction").toPandas()["prediction"].to_numpy()
    after = loaded.transform(frame).select("prediction").toPandas()["prediction"].to_numpy()
    assert (before == after).all()
