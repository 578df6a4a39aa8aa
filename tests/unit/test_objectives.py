"""Objectives without Spark: each registered loss against torch's own, their checks, validation
counts and scoring heads; Huber is the objective added as one class; a class registered here
is a loss TrainConfig accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from spark_ddl.common.objectives import MSE, OBJECTIVES, Objective, Scoring, label_dtype_for, objective, register
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.errors import ConfigError, SchemaError

torch.manual_seed(0)
LOGITS, SCALARS = torch.randn(6, 3), torch.randn(6, 1)
CLASSES, TARGETS, BITS = torch.tensor([0, 2, 1, 1, 0, 2]), torch.randn(6), torch.tensor([0., 1, 1, 0, 1, 0])


@pytest.mark.parametrize("name, output, label, reference", [
    ("cross_entropy", LOGITS, CLASSES, functional.cross_entropy(LOGITS, CLASSES)),
    ("mse", SCALARS, TARGETS, functional.mse_loss(SCALARS[:, 0], TARGETS)),
    ("bce_with_logits", SCALARS, BITS, functional.binary_cross_entropy_with_logits(SCALARS[:, 0], BITS)),
    ("huber", SCALARS * 3, TARGETS, functional.huber_loss(SCALARS[:, 0] * 3, TARGETS, delta=1.0)),
])
def test_each_loss_equals_torch_on_a_label_column(name, output, label, reference):
    assert torch.allclose(objective(name).loss()(output, label), reference)


def test_huber_is_squared_error_near_the_target_and_absolute_beyond():
    huber = objective("huber").loss()
    near, far = torch.tensor([[0.5]]), torch.tensor([[10.0]])
    assert huber(near, torch.zeros(1)).item() == pytest.approx(0.5 * 0.25)
    assert huber(far, torch.zeros(1)).item() == pytest.approx(10.0 - 0.5)  # mse would say 100
    assert objective("huber").task_for(False) == "regression" and objective("huber").task_for(True) == "multi_regression"


def test_tasks_and_label_dtypes_come_from_the_objective():
    assert [objective(n).task for n in OBJECTIVES][:4] == ["multiclass", "regression", "binary", "regression"]
    assert label_dtype_for("cross_entropy") == torch.int64 and label_dtype_for("huber") == torch.float32
    assert label_dtype_for(functional.l1_loss, integer_labels=True) == torch.int64  # the user's loss: the column's
    assert label_dtype_for("cross_entropy", custom_step=True) == torch.float32


def test_label_checks_say_what_the_objective_needs():
    with pytest.raises(SchemaError, match="2 non-integer value.*class indices"):
        objective("cross_entropy").check_labels("Label column 'y'", 0.0, 3.0, 2)
    with pytest.raises(SchemaError, match="negative class -1"):
        objective("cross_entropy").check_labels("Label column 'y'", -1.0, 3.0, 0)
    with pytest.raises(SchemaError, match="between -0.5 and 1.*targets in \\[0, 1\\]"):
        objective("bce_with_logits").check_labels("Label column 'y'", -0.5, 1.0, 0)
    for name in ("mse", "huber"):  # any real value is a regression target
        objective(name).check_labels("Label column 'y'", -1e6, 1e6, 5)


def test_output_checks_name_the_shape_and_the_way_out():
    with pytest.raises(ConfigError, match="num_classes >= 2; it returns shape \\(2, 1\\)"):
        objective("cross_entropy").check_output(torch.zeros(2, 1), False, 1.0, "Label column 'y'")
    with pytest.raises(SchemaError, match="has class 3, but the model outputs 3 classes"):
        objective("cross_entropy").check_output(torch.zeros(2, 3), False, 3.0, "Label column 'y'")
    with pytest.raises(ConfigError, match="loss='huber' with a scalar label needs one output per row"):
        objective("huber").check_output(torch.zeros(2, 3), False, None, "Label column 'y'")
    objective("huber").check_output(torch.zeros(2, 3), True, None, "Label column 'y'")  # array labels of 3
    objective(functional.l1_loss).check_output(torch.zeros(2, 3), False, None, "Label column 'y'")  # the user's


def test_validation_counts_what_a_classifier_got_right_and_regression_nothing():
    assert objective("cross_entropy").correct(LOGITS, LOGITS.argmax(dim=1)).item() == 6
    assert objective("bce_with_logits").correct(torch.tensor([[2.0], [-1.0], [0.5]]),
                                                torch.tensor([1.0, 1.0, 0.0])).item() == 1
    assert objective("huber").correct(SCALARS, TARGETS) is None and not objective("huber").classifier


def test_scoring_heads_give_predictions_and_probabilities():
    prediction, probability = Scoring(objective("cross_entropy")).predict(LOGITS)
    np.testing.assert_allclose(probability, torch.softmax(LOGITS, dim=1).double().numpy(), rtol=1e-6)
    assert list(prediction) == list(LOGITS.argmax(dim=1).double().numpy())
    prediction, probability = Scoring(objective("bce_with_logits")).predict(torch.tensor([[2.0], [-1.0]]))
    assert list(prediction) == [1.0, 0.0] and probability[0, 1] == pytest.approx(torch.sigmoid(torch.tensor(2.0)))
    scoring = Scoring(objective("huber"), label_is_array=True)
    prediction, probability = scoring.predict(LOGITS)
    assert prediction.shape == (6, 3) and probability is None and scoring.return_type() == "prediction array<double>"
    assert Scoring(objective("mse")).predict(SCALARS)[0].shape == (6,)


def test_a_registered_class_is_a_loss_the_settings_accept():
    @register
    class MeanAbsolute(MSE):
        name, doc = "l1_for_test", "regression: mean absolute error"

        def loss(self):
            return lambda output, target: nn.functional.l1_loss(output, target.reshape(output.shape))

    try:
        TrainConfig(loss="l1_for_test").validate()
        assert objective("l1_for_test").loss()(torch.ones(2, 1), torch.zeros(2)).item() == 1.0
    finally:
        del OBJECTIVES["l1_for_test"]
    with pytest.raises(ConfigError, match="loss must be one of cross_entropy, mse, bce_with_logits, huber"):
        TrainConfig(loss="l1_for_test").validate()
    assert issubclass(MeanAbsolute, Objective)
