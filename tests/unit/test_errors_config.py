import pytest

from spark_ddl.common.train_config import TrainConfig
from spark_ddl.common.wire import AgentFailure
from spark_ddl.driver.failures import training_error_from_spark
from spark_ddl.errors import ConfigError, TrainingError


def failure(rank, type_name, message, secondary):
    return str(AgentFailure({"rank": rank, "type": type_name, "message": message,
                             "traceback": f"Traceback...\n{type_name}: {message}\n", "secondary": secondary}))


def test_primary_failure_is_preferred_over_secondary_ones():
    text = "Job aborted\n" + failure(0, "RuntimeError", "Connection closed by peer", True) + "\n...\n" + \
        failure(1, "ValueError", "bad {json} inside", False)
    error = training_error_from_spark(Exception(text))
    assert isinstance(error, TrainingError) and isinstance(error, ValueError)
    assert error.rank == 1 and error.remote_message == "bad {json} inside"


def test_no_marker_means_not_an_agent_failure():
    assert training_error_from_spark(Exception("executor lost")) is None


@pytest.mark.parametrize("remote_type, typed_as", [
    ("FileNotFoundError", FileNotFoundError),  # an OSError subclass combines with TrainingError too
    ("KeyError", KeyError),
    ("ExceptionGroup", None),  # not constructible from a message: a plain TrainingError
    ("NoSuchError", None),  # not a builtin
])
def test_builtin_error_types_are_typed_or_fall_back_to_plain_training_error(remote_type, typed_as):
    error = training_error_from_spark(Exception(failure(0, remote_type, "x", False)))
    if typed_as is None:
        assert type(error) is TrainingError
    else:
        assert type(error).__name__ == f"Training{remote_type}" and isinstance(error, (TrainingError, typed_as))
        assert isinstance(error, typed_as)
    assert error.remote_type == remote_type and error.remote_message == "x" and error.rank == 0


@pytest.mark.parametrize("field, value, message", [
    ("num_workers", 0, "num_workers must be >= 1"), ("batch_size", 1.5, "batch_size must be an integer"),
    ("lr", 0, "lr must be a positive number"), ("timeout", -1, "timeout must be a positive"),
    ("sync", "gossip", "sync must be one of allreduce, parameter_server, local_sgd"), ("use_gpu", "yes", "use_gpu must be None"),
])
def test_config_validation_names_the_setting(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value}).validate()


def test_callable_loss_is_recorded_by_name():
    def my_loss(output, target):
        return (output - target).abs().mean()

    config = TrainConfig(loss=my_loss).validate()
    assert config.to_json_dict()["loss"].endswith("my_loss")
