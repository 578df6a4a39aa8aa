"""Named, typed model inputs (inputs=), custom training steps and validation metrics, on a real
local Spark: every row of the type table reaches the model as documented, in training and in
transform; the driver refuses what the model cannot take before anything is launched."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest
import torch
from pyspark.ml.linalg import Vectors, VectorUDT
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_ddl import ConfigError, SchemaError, TorchEstimator, TorchModel
from spark_ddl.driver import launcher
from tests.helpers import (BIG_ID, ImageProbe, TinyNet, TypeProbe, frame_with_partitions, ratings_frame,
                           regression_arrays, split_by_sizes, two_tower_predictions)
from tests.references import FLOAT32_PATHS

TYPE_INPUTS = {"user": "user", "k": "k", "flag": "flag", "price": "price", "vec": "vec", "ids": "ids",
               "tokens": "tokens", "img": "img", "v": "v"}


@pytest.fixture
def typed_frame(spark):
    schema = T.StructType([
        T.StructField("user", T.LongType()), T.StructField("k", T.LongType()), T.StructField("flag", T.BooleanType()),
        T.StructField("price", T.DoubleType()), T.StructField("vec", T.ArrayType(T.DoubleType())),
        T.StructField("ids", T.ArrayType(T.IntegerType())), T.StructField("tokens", T.ArrayType(T.IntegerType())),
        T.StructField("img", T.ArrayType(T.FloatType())), T.StructField("v", VectorUDT()),
        T.StructField("label", T.DoubleType()),
    ])
    rows = [(BIG_ID + k, k, k % 2 == 0, k * 0.5, [float(k), k + 1.0, k + 2.0], [k, 10 * k],
             list(range(1, k % 4 + 2)), [k / 16.0] * 16, Vectors.dense([k, 0.0, 1.0, -1.0]), float(k % 3))
            for k in range(48)]
    return spark.createDataFrame(rows, schema)


def test_every_input_type_reaches_the_model_as_the_table_says_in_training_and_transform(typed_frame):
    estimator = TorchEstimator(model=TypeProbe(), inputs=TYPE_INPUTS, input_shapes={"img": (1, 4, 4)}, loss="mse",
                               batch_size=8, epochs=2, lr=1e-3)
    model = estimator.fit(typed_frame)  # the probe raises inside the agents if anything is off
    ragged = {f.name: f.ragged for f in model.columns.batch.inputs}
    assert ragged["tokens"] and not ragged["vec"] and not ragged["ids"]
    scored = model.transform(typed_frame).select("k", "prediction").toPandas()  # the same probe, scoring
    assert len(scored) == 48 and np.isfinite(scored["prediction"]).all()
    assert model.getOrDefault("inputs") == TYPE_INPUTS


class NarrowTypesProbe(torch.nn.Module):
    """The type table's other rows: byte and short columns arrive as exact int64, decimal as
    float32 (checked inside every forward pass, training and scoring)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 1)

    def forward(self, small, medium, money):
        if not (small.dtype == medium.dtype == torch.int64 and money.dtype == torch.float32):
            raise ValueError(f"narrow types probe: {small.dtype} {medium.dtype} {money.dtype}")
        if bool((medium != 0).any()):  # not the driver's zero batch: medium = 30000 + k, small = k - 100
            k = medium - 30000
            if not torch.equal(small, k - 100) or not torch.equal(money, k.float() + 0.125):
                raise ValueError("narrow types probe: values changed on the way")
        return self.head(torch.stack([small.float(), medium.float(), money], dim=1))


def test_byte_short_and_decimal_columns_arrive_as_the_type_table_says(spark):
    schema = "small byte, medium short, money decimal(12, 3), label double"
    rows = [(k - 100, 30000 + k, Decimal(k) + Decimal("0.125"), float(k % 3)) for k in range(20)]
    frame = spark.createDataFrame(rows, schema)
    inputs = {"small": "small", "medium": "medium", "money": "money"}
    model = TorchEstimator(model=NarrowTypesProbe(), inputs=inputs, loss="mse", lr=1e-6, batch_size=4, epochs=1,
                           num_workers=2).fit(frame)  # the probe raises inside the agents if anything is off
    assert {f.name: f.dtype for f in model.columns.batch.inputs} == {"small": "int64", "medium": "int64",
                                                                      "money": "float32"}
    scored = model.transform(frame).toPandas()  # the same probe, scoring
    assert len(scored) == 20 and np.isfinite(scored["prediction"]).all()


def test_named_inputs_transform_matches_a_local_forward_and_survives_save_and_load(spark, tmp_path):
    frame = ratings_frame(spark)
    model = TorchEstimator(model="tests.helpers:TwoTower", model_kwargs={"users": 20, "items": 30},
                           inputs={"user": "user", "item": "item"}, label_col="rating", loss="mse", lr=0.05,
                           epochs=2, batch_size=16).fit(frame)
    scored = model.transform(frame).toPandas()
    np.testing.assert_allclose(scored["prediction"].to_numpy(), two_tower_predictions(model, scored), rtol=1e-5,
                               atol=1e-6)
    path = str(tmp_path / "recs")
    model.save(path)
    assert (tmp_path / "recs" / "model.pt2").exists()  # named inputs export too
    loaded = TorchModel.load(path)
    again = loaded.transform(frame).toPandas()
    np.testing.assert_allclose(again["prediction"].to_numpy(), scored["prediction"].to_numpy(), **FLOAT32_PATHS)
    assert loaded.getOrDefault("inputs") == {"user": "user", "item": "item"}


def write_images(directory, sizes):
    from PIL import Image

    directory.mkdir()
    for k, (height, width) in enumerate(sizes):
        Image.new("RGB", (width, height), (10 * k, 5, 20 * k)).save(directory / f"img_{k}.png")


def image_frame(spark, directory):
    images = spark.read.format("image").load(str(directory))
    k = F.regexp_extract(F.col("image.origin"), r"img_(\d+)\.png", 1).cast("long")
    return images.withColumn("k", k).withColumn("label", k % 4)


def test_spark_image_structs_become_float_rgb_tensors(spark, tmp_path):
    write_images(tmp_path / "images", [(5, 6)] * 12)
    frame = image_frame(spark, tmp_path / "images")
    model = TorchEstimator(model=ImageProbe(), inputs={"image": "image", "k": "k"}, loss="cross_entropy",
                           epochs=2, batch_size=4).fit(frame)
    assert model.row_shapes["image"] == (3, 5, 6) and "row_shapes" not in model.summary
    assert model.transform(frame).count() == 12


def test_images_of_different_sizes_are_refused_on_the_driver_naming_two_sizes(spark, tmp_path, monkeypatch):
    write_images(tmp_path / "images", [(5, 6)] * 3 + [(7, 7)])
    launched = []
    monkeypatch.setattr(launcher, "_run_barrier_job", lambda *a, **k: launched.append(1))
    with pytest.raises(SchemaError, match="images of different sizes") as info:
        TorchEstimator(model=ImageProbe(), inputs={"image": "image", "k": "k"}, loss="cross_entropy",
                       epochs=1).fit(image_frame(spark, tmp_path / "images"))
    assert "3x5x6" in str(info.value) and "3x7x7" in str(info.value)
    assert launched == []


PRELAUNCH = {
    "missing column": ({"inputs": {"user": "nope"}}, SchemaError, "Column(s) ['nope'] not found"),
    "string column": ({"inputs": {"user": "name"}}, SchemaError,
                      "reads column 'name' of type string, which a model cannot take: index strings with "
                      "StringIndexer or tokenise"),
    "map column": ({"inputs": {"user": "attrs"}}, SchemaError, "of type map<string,double>, which a model cannot"),
    "struct column": ({"inputs": {"user": "pair"}}, SchemaError, "of type struct<a:int,b:int>, which a model cannot"),
    "null ID": ({"inputs": {"user": "sparse_user"}}, SchemaError, "Input 'user' (column 'sparse_user') hold missing"),
    "null array element": ({"inputs": {"user": "holes"}}, SchemaError, "1 row(s) with a null, NaN or infinite element"),
    "both feature_cols and inputs": ({"inputs": {"user": "user"}, "feature_cols": ["x"]}, ConfigError,
                                     "Set feature_cols (one input, passed to the model positionally) or inputs"),
    "shape that does not fit": ({"inputs": {"user": "triples"}, "input_shapes": {"user": (2, 2)}}, SchemaError,
                                "cannot take input_shapes (2, 2)"),
    "unknown input option": ({"inputs": {"user": "user"}, "input_options": {"user": {"pad": 3}}}, ConfigError,
                             "unknown option(s) ['pad']"),
    "model that does not take the inputs": ({"inputs": {"wrong_name": "user"}}, ConfigError,
                                            "cannot run on a batch of the inputs (per-row shapes wrong_name=[]"),
}


@pytest.mark.parametrize("case", list(PRELAUNCH))
def test_bad_inputs_are_refused_on_the_driver_before_launch(spark, monkeypatch, case):
    settings, error, message = PRELAUNCH[case]
    frame = spark.createDataFrame(
        [(1, None if i == 3 else 1, "a", {"x": 1.0}, (1, 2), [1, None] if i == 2 else [1, 2], [1, 2, 3], 1.0)
         for i in range(6)],
        "user long, sparse_user long, name string, attrs map<string,double>, pair struct<a:int,b:int>, "
        "holes array<int>, triples array<int>, label double")
    launched = []
    monkeypatch.setattr(launcher, "_run_barrier_job", lambda *a, **k: launched.append(1))
    model = settings.pop("model", None) or UserNet()
    with pytest.raises(error) as info:
        TorchEstimator(model=model, loss="mse", epochs=1, **settings).fit(frame)
    assert message in str(info.value)
    assert launched == []


class UserNet(torch.nn.Module):
    """Takes one keyword input named ``user``."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 1)

    def forward(self, user):
        return self.embedding(user.clamp(0, 9).reshape(len(user), -1)[:, 0])


def huber_step(model, batch):
    """A custom step: Huber loss of the model's output (not a built-in loss)."""
    return torch.nn.functional.huber_loss(model(batch["features"]).reshape(-1), batch["label"], delta=0.5)


def mae_metric(model, batch):
    return {"mae": (model(batch["features"]).reshape(-1) - batch["label"]).abs().mean()}


def test_a_custom_step_on_two_agents_equals_one_process_on_the_combined_batch(spark):
    sizes, batch, epochs = [40, 40], 8, 2
    x, y = regression_arrays(80, seed=9)
    frame = frame_with_partitions(spark, split_by_sizes(x, y, sizes))
    torch.manual_seed(0)
    net = TinyNet()
    reference = TinyNet()
    reference.load_state_dict(net.state_dict())
    model = TorchEstimator(model=net, train_step=huber_step, loss="mse", optimizer="sgd", lr=0.1, batch_size=batch,
                           epochs=epochs, shuffle=False).fit(frame)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    parts = split_by_sizes(torch.from_numpy(x), torch.from_numpy(y), sizes)
    for _ in range(epochs):
        for step in range(math.ceil(40 / batch)):
            window = slice(step * batch, (step + 1) * batch)
            combined = {"features": torch.cat([p[0][window] for p in parts]),
                        "label": torch.cat([p[1][window] for p in parts])}
            optimizer.zero_grad()
            huber_step(reference, combined).backward()
            optimizer.step()
    trained, expected = model.get_module().state_dict(), reference.state_dict()
    assert set(trained) == set(expected)
    for name in expected:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-5, atol=1e-5)


def test_eval_step_metrics_join_each_epochs_validation_record(spark):
    x, y = regression_arrays(120, seed=2)
    rows = [([float(v) for v in features], float(label), i % 4 == 0) for i, (features, label) in enumerate(zip(x, y))]
    frame = spark.createDataFrame(rows, "features array<float>, label double, held boolean")
    model = TorchEstimator(model=TinyNet(), loss="mse", eval_step=mae_metric, validation_col="held", epochs=3,
                           batch_size=16, lr=0.05).fit(frame)
    assert [round(h["val_samples"]) for h in model.history] == [30, 30, 30]
    held = torch.tensor(x[::4]), torch.tensor(y[::4])
    with torch.no_grad():
        expected = (model.get_module()(held[0]).reshape(-1) - held[1]).abs().mean().item()
    assert model.history[-1]["val_mae"] == pytest.approx(expected, rel=1e-5)


def record_all_gathers(folder: str):
    """``_fail_hook`` and ``_final_hook`` that log, in each agent, every ``torch.distributed.all_gather``
    call's tensor (shape, dtype, bytes) into ``folder/rank<r>.txt`` from the first step until the end
    of the fit (the sparse exchange all-gathers row ids and rows; dense gradients go elsewhere)."""

    def before_step(rank: int, epoch: int, step: int, module) -> None:
        import torch.distributed as dist

        if epoch == 0 and step == 0 and not hasattr(dist.all_gather, "original"):
            original, log = dist.all_gather, open(f"{folder}/rank{rank}.txt", "w")

            def all_gather(tensors, tensor, *args, **kwargs):
                log.write(f"{list(tensor.shape)}|{tensor.dtype}|{tensor.numel() * tensor.element_size()}\n")
                return original(tensors, tensor, *args, **kwargs)

            all_gather.original, all_gather.log = original, log
            dist.all_gather = all_gather

    def at_the_end(rank: int, module) -> None:
        import torch.distributed as dist

        if hasattr(dist.all_gather, "original"):
            dist.all_gather.log.close()
            dist.all_gather = dist.all_gather.original

    return before_step, at_the_end


def gathered_rows(folder, rank: int, dim: int = 32) -> list[int]:
    """Per all_gather of float32 rows of ``dim`` values (the table's rows): how many rows."""
    rows = []
    for line in (folder / f"rank{rank}.txt").read_text().splitlines():
        shape, dtype, size = line.split("|")
        shape = eval(shape)  # noqa: S307 - our own log: a list of ints
        if dtype == "torch.float32" and len(shape) == 2 and shape[1] == dim:
            assert int(size) == shape[0] * dim * 4
            rows.append(shape[0])
    return rows


def matrix_factorization(policy: str, folder, **settings) -> TorchEstimator:
    torch.manual_seed(0)
    params = dict(model="spark_ddl.networks:MatrixFactorization", model_kwargs={"users": 10, "items": 140_000, "dim": 32},
                  inputs={"user": "user", "item": "item"}, label_col="rating", loss="mse", optimizer="sgd", lr=0.05,
                  optimizer_kwargs={"momentum": 0.9}, epochs=2, batch_size=16, shuffle=False, sparse_embeddings=policy,
                  num_workers=2, progress="off")
    params.update(settings)
    estimator = TorchEstimator(**params)
    folder.mkdir()
    estimator._fail_hook, estimator._final_hook = record_all_gathers(str(folder))
    return estimator


def test_large_tables_exchange_only_touched_rows_and_train_the_same(spark, tmp_path):
    rng = np.random.default_rng(4)
    rows = [(int(u), int(i), float(r)) for u, i, r in zip(rng.integers(0, 10, 96), rng.integers(0, 140_000, 96),
                                                          rng.normal(size=96))]
    frame = spark.createDataFrame(rows, "user long, item long, rating double")  # 2 partitions: 48 + 48 rows
    fits = {}
    for policy in ("auto", "never"):  # a 140,000 x 32 table is 17.9 MB: 'auto' makes it sparse
        fits[policy] = matrix_factorization(policy, tmp_path / policy).fit(frame)
    assert fits["auto"].summary["sparse_tables"] == 1 and fits["never"].summary["sparse_tables"] == 0
    sparse, dense = fits["auto"].get_module().state_dict(), fits["never"].get_module().state_dict()
    assert set(sparse) == set(dense)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-5, atol=1e-6)
    # what was exchanged, measured in the agents: per step, each agent all-gathers as many item
    # rows (32 float32 each) as the larger of the two agents' batches touched distinct items
    # (partition i, rows [48 i, 48 i + 48), is agent i's shard)
    assert fits["auto"].summary["shard_sizes"] == [48, 48]
    items = np.array([i for _, i, _ in rows])
    shards = [items[:48], items[48:]]
    touched = [max(len(np.unique(shard[s * 16:(s + 1) * 16])) for shard in shards) for s in range(3)] * 2
    for rank in (0, 1):
        assert gathered_rows(tmp_path / "auto", rank) == touched  # 16 rows = 2 KB a step, of a 17.9 MB table
        assert gathered_rows(tmp_path / "never", rank) == []  # dense: no rows all-gathered


@pytest.mark.parametrize("update", [{"optimizer_kwargs": {"momentum": 0.9, "weight_decay": 0.01}},
                                    {"grad_clip_norm": 1.0}], ids=["weight_decay", "grad_clip_norm"])
def test_auto_keeps_large_tables_dense_under_weight_decay_or_clipping(spark, tmp_path, update):
    """Weight decay and clipping read the whole gradient: 'auto' keeps the table dense (measured:
    no rows all-gathered) and trains it as plain torch would (not just without an error)."""
    rng = np.random.default_rng(4)
    rows = [(int(u), int(i), float(r)) for u, i, r in zip(rng.integers(0, 10, 32), rng.integers(0, 140_000, 32),
                                                          rng.normal(size=32))]
    frame = spark.createDataFrame(rows, "user long, item long, rating double")
    model = matrix_factorization("auto", tmp_path / "auto", epochs=1, **update).fit(frame)
    assert model.summary["sparse_tables"] == 0
    assert gathered_rows(tmp_path / "auto", 0) == gathered_rows(tmp_path / "auto", 1) == []


def test_sparse_tables_with_an_optimiser_that_cannot_take_them_are_refused_on_the_driver(spark):
    frame = spark.createDataFrame([(1, 2, 3.0)] * 8, "user long, item long, rating double")
    with pytest.raises(ConfigError, match="sparse gradients"):
        TorchEstimator(model="spark_ddl.networks:MatrixFactorization",
                       model_kwargs={"users": 5, "items": 5, "sparse": True}, inputs={"user": "user", "item": "item"},
                       label_col="rating", loss="mse", optimizer="adam").fit(frame)
    with pytest.raises(ConfigError, match="sparse_embeddings='always' needs"):
        TorchEstimator(model=TinyNet(), sparse_embeddings="always", optimizer="adam").train_config()
