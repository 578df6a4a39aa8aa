"""spark_ddl.run: the user's own function in every agent, with and without a DataFrame."""

from __future__ import annotations

import math
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import spark_ddl
from spark_ddl import ConfigError, SchemaError, TrainingError
from spark_ddl.driver.monitor import StallError
from tests.helpers import BIG_ID, TinyNet, frame_with_partitions, regression_arrays, split_by_sizes

SIZES, BATCH, EPOCHS, LR = [30, 42], 8, 2, 0.1  # uneven: agent 0 runs out first


def hand_written_training(ctx):
    """A training loop of the user's own: SGD, the context's batches, weights and all-reduce."""
    torch.manual_seed(0)
    model = TinyNet().to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for epoch in range(EPOCHS):
        total = 0.0
        for batch in ctx.batches(epoch):
            optimizer.zero_grad()  # set_to_none: the helper copes
            if len(batch["label"]):
                loss = torch.nn.functional.mse_loss(model(batch["features"]).reshape(-1), batch["label"])
                (loss * ctx.batch_weight).backward()
                total += float(loss) * len(batch["label"])
            ctx.allreduce_gradients(model)  # every agent, every step (empty batches too)
            optimizer.step()
        ctx.report(epoch=epoch + 1, loss=total)
    return model.state_dict() if ctx.rank == 0 else None


def test_a_users_loop_on_two_agents_equals_one_process_on_the_combined_batches(spark):
    x, y = regression_arrays(sum(SIZES), seed=3)
    frame = frame_with_partitions(spark, split_by_sizes(x, y, SIZES))
    state, summary = spark_ddl.run(hand_written_training, frame, label_col="label", num_workers=2, batch_size=BATCH,
                                   shuffle=False,
                                   timeout=60, return_summary=True)
    torch.manual_seed(0)
    reference = TinyNet()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    parts = split_by_sizes(torch.from_numpy(x), torch.from_numpy(y), SIZES)
    for _ in range(EPOCHS):
        for step in range(math.ceil(max(SIZES) / BATCH)):
            window = slice(step * BATCH, (step + 1) * BATCH)
            xs, ys = torch.cat([p[0][window] for p in parts]), torch.cat([p[1][window] for p in parts])
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(reference(xs).reshape(-1), ys).backward()
            optimizer.step()
    assert set(state) == set(reference.state_dict())
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-5)
    assert [r["epoch"] for r in summary["history"]] == [1, 2] and summary["shard_sizes"] == SIZES


def who_is_there(ctx):
    ranks = torch.tensor([float(ctx.rank)])
    dist.all_reduce(ranks)  # the process group is up
    return {"rank": ctx.rank, "world_size": ctx.world_size, "rank_sum": float(ranks), "local_rank": ctx.local_rank,
            "steps": ctx.steps_per_epoch}


def a_tensor(ctx):
    return torch.arange(6, dtype=torch.float64).reshape(2, 3) * (ctx.rank + 1)


def test_without_a_dataframe_every_agent_runs_and_rank_zeros_value_comes_back(spark):
    assert spark_ddl.run(who_is_there, num_workers=2, timeout=60) == {
        "rank": 0, "world_size": 2, "rank_sum": 1.0, "local_rank": 0, "steps": 0}
    value = spark_ddl.run(a_tensor, num_workers=2, timeout=60)
    assert torch.equal(value, torch.arange(6, dtype=torch.float64).reshape(2, 3))  # rank 0's, not rank 1's


def fails_on_rank_one(ctx):
    if ctx.rank == 1:
        raise KeyError("rank 1 lost its key")
    time.sleep(0.5)
    dist.barrier()  # rank 0 waits for the peer that failed
    return "unreachable"


def test_a_failing_function_reaches_the_driver_with_its_own_error_long_before_the_timeout(spark):
    started = time.monotonic()
    with pytest.raises(TrainingError) as info:
        spark_ddl.run(fails_on_rank_one, num_workers=2, timeout=300)
    assert time.monotonic() - started < 150  # the error, not the 300 s collective timeout
    assert info.value.rank == 1 and info.value.remote_type == "KeyError"
    assert "fails_on_rank_one" in info.value.remote_traceback
    assert spark_ddl.run(who_is_there, num_workers=2, timeout=60)["world_size"] == 2  # the session still works


def test_bad_calls_are_refused_on_the_driver(spark):
    frame = spark.createDataFrame([([1.0, 2.0], 1.0)], "features array<float>, label double")
    with pytest.raises(ConfigError, match="has no setting"):
        spark_ddl.run(who_is_there, num_workers=2, epochs=3)
    with pytest.raises(ConfigError, match="needs a function"):
        spark_ddl.run(42)
    with pytest.raises(SchemaError, match=r"Column\(s\) \['pixels'\] not found"):
        spark_ddl.run(who_is_there, frame, feature_cols="pixels")
    with pytest.raises(ConfigError, match="pass df too"):
        spark_ddl.run(who_is_there, label_col="label")


def named_inputs_seen(ctx):
    """Every row each agent received through ``inputs=``, with the tensors' dtypes and shapes."""
    seen = []
    for batch in ctx.batches(0):
        assert set(batch) == {"user", "price", "vec", "label"}, sorted(batch)
        assert batch["user"].dtype == torch.int64 and batch["user"].dim() == 1, batch["user"].dtype
        assert batch["price"].dtype == torch.float32 and batch["vec"].shape[1:] == (2,), batch["vec"].shape
        seen += [[int(u), float(p), [float(v) for v in row], float(y)]
                 for u, p, row, y in zip(batch["user"], batch["price"], batch["vec"], batch["label"])]
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, seen)
    return everyone if ctx.rank == 0 else None


def test_named_inputs_reach_the_function_as_typed_tensors(spark):
    rows = [(BIG_ID + k, k / 4, [float(k), -float(k)], float(k % 3)) for k in range(10)]
    frame = spark.createDataFrame(rows, "id long, cost double, v array<float>, y double").repartition(2)
    everyone = spark_ddl.run(named_inputs_seen, frame, inputs={"user": "id", "price": "cost", "vec": "v"},
                             label_col="y", num_workers=2, batch_size=3, timeout=60)
    assert len(everyone) == 2 and all(everyone)  # both agents had rows
    received = sorted(row for agent in everyone for row in agent)
    assert received == [[BIG_ID + k, k / 4, [float(k), -float(k)], float(k % 3)] for k in range(10)]  # once each, exact


class Tally:
    """A return value that is neither tensors nor JSON: it comes back as a pickle."""

    def __init__(self, ranks: set, share: Fraction) -> None:
        self.ranks, self.share = ranks, share


def a_tally(ctx):
    ranks = [None] * ctx.world_size
    dist.all_gather_object(ranks, ctx.rank)
    return Tally(set(ranks), Fraction(1, ctx.world_size)) if ctx.rank == 0 else "rank 1's"


def test_a_value_neither_tensors_nor_json_comes_back_pickled(spark):
    value, summary = spark_ddl.run(a_tally, num_workers=2, timeout=60, return_summary=True)
    assert "result_format" not in summary  # the driver reads it from the agents' report; a Tally only unpickles
    assert isinstance(value, Tally) and value.ranks == {0, 1} and value.share == Fraction(1, 2)


def stall_on_rank_one(marker: str):
    def stalls(ctx):
        if ctx.rank == 1:
            Path(marker).write_text(repr(time.time()))  # when the stall began (same machine, same clock)
            time.sleep(600)
        dist.barrier()  # rank 0 waits for the stalled peer
        return "unreachable"

    return stalls


def test_a_stalled_function_is_stopped_by_stall_detection_not_the_timeout(spark, tmp_path):
    marker = tmp_path / "stalled_at"
    with pytest.raises(StallError) as info:
        spark_ddl.run(stall_on_rank_one(str(marker)), num_workers=2, stall_timeout=3, timeout=180)
    stalled_for = time.time() - float(marker.read_text())
    assert 3 <= stalled_for < 90, stalled_for  # stall_timeout after the stall; the timeout path takes 180 s
    assert "stall_timeout=3" in str(info.value) and "rank 1: the user's function" in str(info.value)
    assert spark_ddl.run(who_is_there, num_workers=2, timeout=60)["world_size"] == 2  # the slots were freed
