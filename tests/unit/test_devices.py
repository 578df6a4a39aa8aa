import pytest

from spark_ddl.common.devices import DevicePlan, select_device


def test_cpu_when_gpu_not_wanted_or_absent():
    assert select_device(False, ["0"], True, 4, 0) == DevicePlan("cpu", "gloo")
    assert select_device(None, [], False, 0, 1) == DevicePlan("cpu", "gloo")


def test_gpu_address_comes_from_spark_resources():
    assert select_device(None, ["3"], True, 4, 0) == DevicePlan("cuda:3", "nccl")
    assert select_device(True, ["1"], True, 2, 5) == DevicePlan("cuda:1", "nccl")


def test_local_mode_uses_local_rank_modulo_device_count():
    assert select_device(None, [], True, 2, 3) == DevicePlan("cuda:1", "nccl")


def test_address_beyond_visible_devices_wraps():
    assert select_device(True, ["5"], True, 1, 0) == DevicePlan("cuda:0", "nccl")


def test_required_gpu_missing_says_why():
    with pytest.raises(RuntimeError, match=r"Spark assigned GPU address\(es\) \['0'\]"):
        select_device(True, ["0"], False, 0, 0)
    with pytest.raises(RuntimeError, match="Spark assigned no GPU to the task"):
        select_device(True, [], False, 0, 0)
