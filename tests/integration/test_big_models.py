"""Models bigger than the driver can collect as rows: the weights stream to the driver over the
status channel and are read into the module a piece at a time; scoring ships them as a file;
save/load stream them too. Runs on local[2] with the default 1 GB driver."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spark_ddl import TorchEstimator, TorchModel, TrainingError
from spark_ddl.driver import capabilities
from tests.references import assert_same_state


def mlp(hidden: int, layers: int = 3, seed: int = 0) -> nn.Module:
    """64 → hidden (× layers) → 10: 4096 and 3 layers are the issue's 135 MB (33.9M parameters)."""
    torch.manual_seed(seed)
    parts: list[nn.Module] = [nn.Linear(64, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        parts += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*parts, nn.Linear(hidden, 10))


def rows_frame(spark, count: int = 256):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=count)
    frame = spark.createDataFrame([(list(map(float, f)), int(t)) for f, t in zip(x, y)],
                                  "features array<double>, label long")
    return frame, x


def save_rank_0(path: str):
    """A ``_final_hook``: rank 0 saves its trained module's state (after the replica check)."""

    def hook(rank: int, module: nn.Module) -> None:
        if rank == 0:
            torch.save(module.state_dict(), path)

    return hook


def test_the_issues_135mb_mlp_fits_scores_saves_and_loads_on_default_settings(spark, tmp_path):
    assert spark.sparkContext.getConf().get("spark.driver.memory", "1g") == "1g"
    frame, x = rows_frame(spark)
    net = mlp(4096)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    estimator = TorchEstimator(model=net, loss="cross_entropy", lr=0.01, batch_size=32, epochs=1)
    estimator._final_hook = save_rank_0(str(tmp_path / "rank0.pt"))
    model = estimator.fit(frame)
    assert model.summary["result_route"]["weights"] == "stream"
    trained = model.get_module()
    assert not torch.equal(trained[0].weight, before["0.weight"])  # training moved the weights
    rank_0 = torch.load(str(tmp_path / "rank0.pt"), weights_only=True)
    assert_same_state(trained.state_dict(), rank_0)  # the streamed weights are rank 0's, bit for bit
    del rank_0
    (tmp_path / "rank0.pt").unlink()

    scored = model.transform(frame).select("prediction").collect()
    with torch.no_grad():
        expected = trained(torch.from_numpy(x)).argmax(dim=1).double().numpy()
    assert np.array_equal([r.prediction for r in scored], expected)

    model.save(str(tmp_path / "m"))
    loaded = TorchModel.load(str(tmp_path / "m"), module=mlp(4096, seed=1))
    assert_same_state(loaded.get_module().state_dict(), trained.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging left behind


def test_streamed_weights_and_optimizer_state_are_what_the_result_rows_bring(spark):
    frame, _ = rows_frame(spark, 64)
    fitted = []
    for stream in (True, False):  # 12.6 MiB of weights and as much momentum: both over one row's 4 MiB
        estimator = TorchEstimator(model=mlp(1024, layers=4), loss="cross_entropy", lr=0.01, batch_size=16, epochs=1,
                                   optimizer_kwargs={"momentum": 0.9})
        estimator._stream_results = stream  # noqa: SLF001 - False: the fallback route
        fitted.append(estimator.fit(frame))
    assert [m.summary["result_route"] for m in fitted] == [{"weights": "stream", "optimizer": "stream"},
                                                            {"weights": "rows", "optimizer": "rows"}]
    assert_same_state(fitted[0].get_module().state_dict(), fitted[1].get_module().state_dict())
    momentum = [m.optimizer_state_dict()["state"] for m in fitted]
    parameters = len(list(fitted[0].get_module().parameters()))
    assert sorted(momentum[0]) == list(range(parameters)) and float(momentum[0][0]["momentum_buffer"].abs().sum()) > 0
    assert_same_state({k: v["momentum_buffer"] for k, v in momentum[0].items()},
                      {k: v["momentum_buffer"] for k, v in momentum[1].items()})


def test_weights_that_cannot_reach_the_driver_are_refused_with_their_size_and_the_settings(spark, monkeypatch):
    monkeypatch.setattr(capabilities, "ROWS_HEAP_FACTOR", 2**20)  # as if the driver's heap were ~1 KB
    frame, _ = rows_frame(spark, 64)
    estimator = TorchEstimator(model=mlp(1024, layers=4), loss="cross_entropy", batch_size=16, epochs=1)
    estimator._stream_results = False  # noqa: SLF001 - the channel "fails": only the rows are left
    with pytest.raises(TrainingError) as caught:
        estimator.fit(frame)
    message = str(caught.value)
    # the agent's own refusal (a failure to connect also says "cannot reach the driver")
    assert "ResultTooLargeError" in message
    assert "The trained weights (" in message
    assert "cannot reach the driver: streaming them failed (turned off)" in message
    assert "MiB" in message and "spark.driver.memory" in message


@pytest.mark.slow
def test_a_half_gigabyte_model_fits_scores_saves_and_loads_on_default_settings(spark, tmp_path):
    frame, x = rows_frame(spark, 64)
    net = mlp(8000, layers=3)  # two 8000x8000 layers: 0.51 GB of float32
    assert sum(p.numel() for p in net.parameters()) * 4 > 0.5e9
    model = TorchEstimator(model=net, loss="cross_entropy", optimizer="sgd", lr=0.001, batch_size=16,
                           epochs=1).fit(frame)
    assert model.summary["result_route"]["weights"] == "stream"
    scored = model.transform(frame).select("prediction").collect()
    assert len(scored) == 64
    model.save(str(tmp_path / "m"))
    loaded = TorchModel.load(str(tmp_path / "m"), module=mlp(8000, layers=3, seed=1))
    assert_same_state(loaded.get_module().state_dict(), model.get_module().state_dict())


def a_big_tensor(ctx):
    return torch.arange(6_000_000, dtype=torch.float64) + ctx.rank  # 48 MB: more than one result row


def test_a_big_value_returned_by_run_is_streamed_back_whole(spark):
    import spark_ddl

    value, summary = spark_ddl.run(a_big_tensor, num_workers=2, timeout=60, return_summary=True)
    assert torch.equal(value, torch.arange(6_000_000, dtype=torch.float64))  # rank 0's
    assert summary["result_route"] == {"result": "stream"}
