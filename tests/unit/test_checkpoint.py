"""Checkpoint files and their sidecars (no Spark)."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch

from spark_ddl.common.train_config import TrainConfig
from spark_ddl.driver import launcher
from spark_ddl.errors import ConfigError
from spark_ddl.formats.checkpoint import (incompatibilities, list_checkpoints, read_checkpoint, read_checkpoint_facts,
                                          write_checkpoint)
from tests.tamper import Payload, torch_saved


def state(config: TrainConfig, epoch: int) -> dict:
    return {"model": {"w": torch.randn(1000)}, "settings": config.resume_record(), "epoch": epoch,
            "step": 0, "shard_sizes": [5, 6]}


def test_each_checkpoint_has_a_sidecar_with_what_the_driver_checks_and_pruning_removes_both(tmp_path):
    config = TrainConfig(optimizer="adam", optimizer_kwargs={"betas": (0.9, 0.99)})
    for epoch in range(1, 4):
        write_checkpoint(str(tmp_path), state(config, epoch), updates=10 * epoch, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-u000000020.json", "checkpoint-u000000020.pt",
                     "checkpoint-u000000030.json", "checkpoint-u000000030.pt"]
    newest = f"{tmp_path}/{list_checkpoints(str(tmp_path))[-1]}"
    facts = read_checkpoint_facts(newest)
    assert facts["epoch"] == read_checkpoint(newest)["epoch"] == 3 and facts["shard_sizes"] == [5, 6]
    assert incompatibilities(facts["settings"], config.resume_record()) == []  # (0.9, 0.99) == [0.9, 0.99]
    assert incompatibilities(facts["settings"], replace(config, lr=0.5).resume_record()) == [
        "lr: checkpoint 0.1, this fit 0.5"]


def test_the_resume_check_reads_the_sidecar_not_the_model_sized_file(tmp_path):
    config = TrainConfig(checkpoint_dir=str(tmp_path), resume=True)
    path = write_checkpoint(str(tmp_path), state(config, 1), updates=7, keep=2)
    with open(path, "wb") as damaged:  # the driver must not need it
        damaged.write(b"not a checkpoint")
    assert launcher.check_checkpoint_dir(config) == path
    sidecar = tmp_path / "checkpoint-u000000007.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "settings": {"lr": 9.0}}))
    try:
        launcher.check_checkpoint_dir(config)
    except Exception as error:  # noqa: BLE001
        assert "lr: checkpoint 9.0" in str(error)
    else:
        raise AssertionError("a checkpoint with other settings was accepted")


@pytest.mark.parametrize("changed, named", [
    ({"optimizer_kwargs": {"weight_decay": 0.1}}, "optimizer_kwargs: checkpoint {'weight_decay': 0.01}, this fit "
                                                   "{'weight_decay': 0.1}"),
    ({"optimizer": "adam"}, "optimizer: checkpoint 'adamw', this fit 'adam'"),
])
def test_resuming_an_adamw_run_with_another_weight_decay_or_optimiser_is_refused(tmp_path, changed, named):
    """AdamW's weight decay is part of the optimiser state's meaning: a resume that changes it
    (or the optimiser) would continue the moments under another update rule."""
    run = TrainConfig(optimizer="adamw", optimizer_kwargs={"weight_decay": 0.01}, checkpoint_dir=str(tmp_path))
    write_checkpoint(str(tmp_path), state(run, 1), updates=7, keep=2)
    assert launcher.check_checkpoint_dir(replace(run, resume=True)).endswith("checkpoint-u000000007.pt")  # control
    with pytest.raises(ConfigError) as info:
        launcher.check_checkpoint_dir(replace(run, resume=True, **changed))
    assert named in str(info.value)


def test_a_pickle_planted_in_a_checkpoint_is_refused_without_running_it(tmp_path):
    """Rank 0 reads checkpoints with weights_only=True (also the driver, for a checkpoint
    without its sidecar): a planted payload fails to load and never runs."""
    marker = tmp_path / "pwned"
    planted = tmp_path / "checkpoint-u000000005.pt"
    planted.write_bytes(torch_saved({"format": 1, "epoch": 1, "step": 0, "model": Payload(marker)}))
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(str(planted))  # what the resuming agent calls
    with pytest.raises(pickle.UnpicklingError):
        launcher.check_checkpoint_dir(TrainConfig(checkpoint_dir=str(tmp_path), resume=True))  # no sidecar
    assert not marker.exists()
    torch.load(planted, weights_only=False)  # control: a full unpickler runs it
    assert marker.exists()
