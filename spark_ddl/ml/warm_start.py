"""Warm starts on the driver: the weights and optimiser state a fit continues from
(``TorchEstimator(initial_model=model_or_path)``), checked against the model before launch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from spark_ddl.common.optimizers import load_optimizer_state, make_optimizer
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.errors import ConfigError
from spark_ddl.formats import model_bytes
from spark_ddl.ml.model import TorchModel
from spark_ddl.ml.persistence import saved_training_state

log = logging.getLogger("spark_ddl")


@dataclass(frozen=True)
class WarmStart:
    """What the agents load: weights (safetensors) and, when it fits, the optimiser state."""

    weights: bytes
    optimizer: bytes | None
    origin: str  # "TorchModel" or the path, for the summary
    optimizer_note: str  # why the optimiser state is (not) carried

    def summary(self) -> dict[str, Any]:
        """The record kept in the trained model's summary."""
        return {"from": self.origin, "optimizer_state": self.optimizer is not None, "note": self.optimizer_note}


def resolve_initial_model(value: Any, template: nn.Module, config: TrainConfig) -> WarmStart | None:
    """The warm start ``initial_model`` asks for (None: none), checked on the driver: its
    weights must fit ``template`` (loaded into it), and its optimiser state is carried only when
    it was made by the same optimiser for the same parameters. Raises ConfigError with the fix."""
    if value is None:
        return None
    if isinstance(value, TorchModel):
        weights = model_bytes.state_dict_to_bytes(value.get_module())
        optimizer, settings, origin = value.optimizer_state, value.training_config, "TorchModel"
    elif isinstance(value, str):
        try:
            weights, optimizer, settings = saved_training_state(value)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"initial_model={value!r} is not a saved spark_ddl model ({exc}). Pass a TorchModel "
                              "or the path of one saved with model.save(path).") from exc
        origin = value
    else:
        raise ConfigError(f"initial_model must be a TorchModel or the path of a saved one, got {type(value).__name__}.")
    try:
        template.load_state_dict(model_bytes.state_dict_from_bytes(weights))
    except RuntimeError as exc:
        detail = " ".join(str(exc).split()).rstrip(".")
        raise ConfigError(f"initial_model ({origin}) does not fit the estimator's model ({detail}). Warm-start from a "
                          "model of the same architecture (same class and model_kwargs).") from None
    note = "carried"
    if optimizer is None:
        note = "the initial model has no optimiser state"
    elif settings.get("optimizer") != config.optimizer:
        note = f"it was made by optimizer={settings.get('optimizer')!r}, this fit uses {config.optimizer!r}"
    else:
        try:
            state = model_bytes.optimizer_state_from_bytes(optimizer)
            load_optimizer_state(make_optimizer(config.optimizer, template.parameters(), config.lr,
                                                config.optimizer_kwargs), state)
        except Exception as exc:  # noqa: BLE001 - any mismatch means: not this optimiser's state
            raise ConfigError(f"initial_model ({origin}): its optimiser state does not fit this model's optimiser "
                              f"({exc}).") from None
    if note != "carried":
        log.warning("warm start from %s: weights only, the optimiser starts fresh (%s)", origin, note)
        optimizer = None
    return WarmStart(weights, optimizer, origin, note)
