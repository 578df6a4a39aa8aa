"""Optimisers, losses and clipping against plain PyTorch: 2 agents on uneven shards (13 and 27
rows, so most steps weight the agents' losses by their rows, and the last ones hold one agent's
rows only) equal one process on the combined batch with Adam, AdamW's weight decay,
cross-entropy, BCE-with-logits and gradient clipping; ReduceLROnPlateau is fed the validation
loss. One local[2] session, a tiny network, 2 epochs a fit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from spark_ddl import TorchEstimator
from tests.helpers import TinyNet, frame_with_partitions, regression_arrays, split_by_sizes
from tests.references import LOSSES, _tensors, combined_batch_training, max_relative_difference, steps_per_epoch

pytestmark = pytest.mark.timeout(300)

SIZES = (13, 27)
BATCH, EPOCHS = 8, 2

# name: (estimator settings, network outputs, labels, the reference's optimiser, its clip, and the
# setting whose absence the control shows matters)
CASES = {
    "adam_cross_entropy": (dict(loss="cross_entropy", optimizer="adam", lr=0.03), 3, "classes",
                           lambda p: torch.optim.Adam(p, lr=0.03), None, None),
    "adamw_weight_decay_bce_with_logits": (
        dict(loss="bce_with_logits", optimizer="adamw", lr=0.03, optimizer_kwargs={"weight_decay": 2.0}), 1, "binary",
        lambda p: torch.optim.AdamW(p, lr=0.03, weight_decay=2.0), None,
        lambda p: torch.optim.AdamW(p, lr=0.03, weight_decay=0.0)),
    "sgd_momentum_clipped_mse": (
        dict(loss="mse", optimizer="sgd", lr=0.1, optimizer_kwargs={"momentum": 0.9}, grad_clip_norm=0.2), 1,
        "values", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 0.2, "no clip"),
}


def labelled_parts(kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
    x, y = regression_arrays(sum(SIZES), seed=21)
    if kind == "classes":
        y = np.digitize(y, np.quantile(y, [1 / 3, 2 / 3])).astype(np.float32)  # 0, 1, 2
    elif kind == "binary":
        y = (y > np.median(y)).astype(np.float32)
    return split_by_sizes(x, y, SIZES)


def equally_weighted_agents(module, parts, optimizer, loss) -> torch.nn.Module:
    """The wrong reference: each agent's batch-mean loss counted equally (no row weighting)."""
    model, shards = copy.deepcopy(module).train(), _tensors(parts)
    opt = optimizer(model.parameters())
    for _ in range(EPOCHS):
        for step in range(steps_per_epoch(parts, BATCH)):
            window = slice(step * BATCH, (step + 1) * BATCH)
            losses = [LOSSES[loss](model(x[window]), y[window]) for x, y in shards if len(x[window])]
            opt.zero_grad()
            (sum(losses) / len(shards)).backward()
            opt.step()
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_agents_on_uneven_shards_equal_plain_torch_on_the_combined_batch(spark, case):
    settings, outputs, labels, optimizer, clip, control = CASES[case]
    parts = labelled_parts(labels)
    torch.manual_seed(13)
    net = TinyNet(out_features=outputs)
    initial = copy.deepcopy(net)
    trained = TorchEstimator(model=net, batch_size=BATCH, epochs=EPOCHS, num_workers=2, shuffle=False, seed=0,
                             timeout=60, progress="off", **settings).fit(frame_with_partitions(spark, parts))
    assert trained.summary["shard_sizes"] == list(SIZES)
    reference, _ = combined_batch_training(initial, parts, BATCH, EPOCHS, optimizer, settings["loss"], clip)
    assert max_relative_difference(initial, reference) > 1e-2  # training moved the weights
    assert max_relative_difference(trained.get_module(), reference) <= 1e-5
    # controls: the references this must not equal
    unweighted = equally_weighted_agents(initial, parts, optimizer, settings["loss"])
    assert max_relative_difference(unweighted, reference) > 1e-3  # uneven shards: row weighting matters
    if control == "no clip":
        unclipped, _ = combined_batch_training(initial, parts, BATCH, EPOCHS, optimizer, settings["loss"])
        assert max_relative_difference(unclipped, reference) > 1e-3  # the clip was active
    elif control is not None:
        other, _ = combined_batch_training(initial, parts, BATCH, EPOCHS, control, settings["loss"], clip)
        assert max_relative_difference(other, reference) > 1e-3  # weight decay was applied


def test_reduce_lr_on_plateau_is_fed_the_validation_loss(spark):
    """The validation rows' labels are the negated target: as the training loss falls, the
    validation loss rises, so the two would lower the rate at different epochs."""
    x, y = regression_arrays(64, seed=22)
    held = np.arange(64) % 4 == 0
    rows = [([float(v) for v in f], float(-t if h else t), bool(h)) for f, t, h in zip(x, y, held)]
    frame = spark.createDataFrame(rows, "features array<float>, label float, is_val boolean")
    plateau = {"mode": "min", "factor": 0.5, "patience": 0}
    torch.manual_seed(2)
    model = TorchEstimator(model=TinyNet(), loss="mse", optimizer="sgd", lr=0.05, batch_size=8, epochs=4,
                           validation_col="is_val", lr_scheduler="ReduceLROnPlateau", lr_scheduler_kwargs=plateau,
                           progress="off", timeout=60).fit(frame)

    def rates(losses: list[float]) -> list[float]:  # torch's own scheduler stepped with these losses
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **plateau)
        seen = []
        for loss in losses:
            seen.append(optimizer.param_groups[0]["lr"])
            scheduler.step(loss)
        return seen

    history = model.history
    by_validation, by_training = rates([h["val_loss"] for h in history]), rates([h["train_loss"] for h in history])
    assert by_validation != by_training  # the data tells them apart
    assert [h["lr"] for h in history] == pytest.approx(by_validation)
