"""Objectives: what a network is trained for, one class each, found by the name ``loss`` gives.

An objective holds everything that follows from its loss, so that no other module tests a loss
by name:

- ``loss()``: the batch-mean loss function ``(output, label) -> scalar``;
- ``task`` and ``label_dtype``: what ``transform`` adds and the label tensor's dtype;
- ``check_labels`` / ``check_output``: the driver's checks of the label column's values and of
  the model's output on a dummy batch, raising errors that say how to fix them;
- ``correct``: the validation metric (``val_accuracy``) of classifiers;
- ``predict``: the scoring head, a prediction (and a probability per class) from the output.

``OBJECTIVES`` maps each name to its class; ``objective(loss)`` resolves a name, and a callable
loss (the user's own) to ``CustomLoss``. A new objective is one subclass with a ``name``,
registered with ``@register``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn

from spark_ddl.errors import ConfigError, SchemaError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TASKS = ("multiclass", "binary", "regression", "multi_regression")  # model.task: what transform adds


class Objective:
    """A loss and what follows from it (see the module docstring). Subclasses set the class
    attributes and ``loss``; regression is the default for the rest."""

    name: ClassVar[str]
    doc: ClassVar[str]
    task: ClassVar[str] = "regression"  # with array labels: multi_regression
    label_dtype: ClassVar[torch.dtype] = torch.float32

    def loss(self) -> LossFn:
        raise NotImplementedError

    @property
    def classifier(self) -> bool:
        return self.task in ("multiclass", "binary")

    def task_for(self, label_is_array: bool) -> str:
        """``model.task``: the objective's task; regression on array labels is multi_regression."""
        return "multi_regression" if self.task == "regression" and label_is_array else self.task

    def check_labels(self, column: str, min_label: float | None, max_label: float | None, fractional: int) -> None:
        """Raise SchemaError when the label column's values cannot be this objective's targets."""

    def check_output(self, output: torch.Tensor, label_is_array: bool, max_label: float | None, column: str) -> None:
        """Raise ConfigError (or SchemaError, for labels the output cannot hold) when the model's
        output on a batch of 2 rows does not fit this objective."""
        if not label_is_array and math.prod(output.shape[1:]) != 1:
            raise ConfigError(
                f"loss={self.name!r} with a scalar label needs one output per row; the model returns "
                f"shape {tuple(output.shape)} for a batch of 2. Give it one output, or use array labels of that width.")

    def correct(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor | None:
        """How many rows of a validation batch the model got right (classifiers), else None."""
        return None

    def predict(self, output: torch.Tensor, multi_output: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The prediction per row (a column; with ``multi_output``, a (rows, k) matrix) and the
        probability per class (classifiers, else None) from the (rows, k) outputs."""
        values = output.double().numpy()
        return (values if multi_output else values[:, 0]), None


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` the objective of ``loss=cls.name``."""
    OBJECTIVES[cls.name] = cls
    return cls


def objective_descriptions() -> dict[str, str]:
    """Each objective's name and one-line description, in the registry's order."""
    return {name: cls.doc for name, cls in OBJECTIVES.items()}


def objective(loss: object) -> Objective:
    """The objective of ``loss``: a registered name, or a callable (the user's own loss)."""
    if callable(loss):
        return CustomLoss(loss)
    if loss not in OBJECTIVES:
        raise ValueError(f"unknown loss {loss!r}: one of {', '.join(OBJECTIVES)} or a callable(output, target)")
    return OBJECTIVES[loss]()  # type: ignore[index]


def _shaped(fn: nn.Module) -> LossFn:
    """``fn`` with the target reshaped like the output (a scalar label column is (rows,))."""
    return lambda output, target: fn(output, target.reshape(output.shape))


@register
class CrossEntropy(Objective):
    name, doc = "cross_entropy", "classes 0..k-1 from k logits per row (softmax cross-entropy)"
    task, label_dtype = "multiclass", torch.int64

    def loss(self) -> LossFn:
        return nn.CrossEntropyLoss()

    def check_labels(self, column: str, min_label: float | None, max_label: float | None, fractional: int) -> None:
        if fractional:
            raise SchemaError(
                f"{column} has {fractional} non-integer value(s); loss='cross_entropy' needs "
                "class indices 0, 1, …, num_classes-1 (index string labels with StringIndexer).")
        if min_label is not None and min_label < 0:
            raise SchemaError(f"{column} has negative class {min_label:g}; loss='cross_entropy' needs class "
                              "indices in [0, num_classes).")

    def check_output(self, output: torch.Tensor, label_is_array: bool, max_label: float | None, column: str) -> None:
        if output.dim() != 2 or output.shape[1] < 2:
            raise ConfigError(
                f"loss='cross_entropy' needs the model to return (batch, num_classes) logits with "
                f"num_classes >= 2; it returns shape {tuple(output.shape)} for a batch of 2.")
        if max_label is not None and max_label >= output.shape[1]:
            raise SchemaError(
                f"{column} has class {max_label:g}, but the model outputs {output.shape[1]} classes (labels must "
                f"be in [0, {output.shape[1]})). Widen the model's last layer or re-index the labels.")

    def correct(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return (output.argmax(dim=1) == label).sum()

    def predict(self, output: torch.Tensor, multi_output: bool = False) -> tuple[np.ndarray, np.ndarray]:
        scores = softmax_rows(output.float())  # float32: several times faster than float64
        return scores.argmax(dim=1).double().numpy(), scores.double().numpy()


@register
class MSE(Objective):
    name, doc = "mse", "regression: mean squared error (array labels: one output per element)"

    def loss(self) -> LossFn:
        return _shaped(nn.MSELoss())


@register
class BCEWithLogits(Objective):
    name, doc = "bce_with_logits", "two classes from one logit per row, targets in [0, 1]"
    task = "binary"

    def loss(self) -> LossFn:
        return _shaped(nn.BCEWithLogitsLoss())

    def check_labels(self, column: str, min_label: float | None, max_label: float | None, fractional: int) -> None:
        if min_label is not None and (min_label < 0 or (max_label or 0) > 1):
            raise SchemaError(f"{column} has values between {min_label:g} and {max_label:g}; "
                              "loss='bce_with_logits' needs targets in [0, 1].")

    def correct(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return ((output.reshape(-1) > 0) == (label.reshape(-1) > 0.5)).sum()

    def predict(self, output: torch.Tensor, multi_output: bool = False) -> tuple[np.ndarray, np.ndarray]:
        positive = torch.sigmoid(output[:, 0].double()).numpy()
        return (positive > 0.5).astype(np.float64), np.stack([1 - positive, positive], axis=1)


@register
class Huber(MSE):
    name, doc = "huber", "regression robust to outliers: squared error within 1, absolute error beyond"

    def loss(self) -> LossFn:
        return _shaped(nn.HuberLoss(delta=1.0))


class CustomLoss(Objective):
    """The user's callable ``loss(output, target)``: regression's checks and head, and the label
    column's own dtype (int64 for an integer column, else float32: see ``label_dtype_for``)."""

    name, doc = "custom", "the user's callable(output, target) returning the batch-mean loss"

    def __init__(self, fn: LossFn | None = None) -> None:
        self.fn = fn  # None: a saved model's record of the user's loss (it scores; it does not train)

    def loss(self) -> LossFn:
        if self.fn is None:
            raise ValueError("this objective records the user's own loss by name only; pass the callable to train")
        return self.fn

    def check_output(self, output: torch.Tensor, label_is_array: bool, max_label: float | None, column: str) -> None:
        return None  # the user's loss decides what it accepts


@dataclass(frozen=True)
class Scoring:
    """What ``transform`` adds for a model: its objective's head, on array labels one output each."""

    objective: Objective
    label_is_array: bool = False

    @property
    def task(self) -> str:
        return self.objective.task_for(self.label_is_array)

    @property
    def multi_output(self) -> bool:
        return self.task == "multi_regression"

    @property
    def columns(self) -> tuple[str, ...]:
        return ("prediction", "probability") if self.objective.classifier else ("prediction",)

    def return_type(self) -> str:
        """The Spark type of the scoring UDF's struct."""
        if self.objective.classifier:
            return "prediction double, probability array<double>"
        return "prediction array<double>" if self.multi_output else "prediction double"

    def predict(self, output: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        return self.objective.predict(output, self.multi_output)


def label_dtype_for(loss: object, integer_labels: bool = False, custom_step: bool = False) -> torch.dtype:
    """The label tensor's dtype: the objective's (class indices for cross_entropy, floats
    otherwise); the user's loss or ``train_step`` gets the column's own kind."""
    if callable(loss) or custom_step:
        return torch.int64 if integer_labels else torch.float32
    return objective(loss).label_dtype


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(logits, dim=1)`` (equal to ~1e-7) in three vectorised passes: several
    times faster on one thread for the few classes per row a classifier has."""
    scores = (logits - logits.amax(dim=1, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=1, keepdim=True))
