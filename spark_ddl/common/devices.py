"""Which device an agent trains on, and which process-group backend goes with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class DevicePlan:
    """The torch device string (``cpu`` or ``cuda:N``) and the matching backend."""

    device: str
    backend: str  # "gloo" | "nccl"


def select_device(
    use_gpu: bool | None,
    gpu_addresses: Sequence[str],
    cuda_available: bool,
    cuda_device_count: int,
    local_rank: int,
) -> DevicePlan:
    """Pick the device of one agent.

    - ``use_gpu=False``: CPU with gloo.
    - ``use_gpu=None``: a GPU if this executor has one, else CPU.
    - ``use_gpu=True``: a GPU, or a RuntimeError that says why there is none.

    The GPU index comes from the task's Spark resources (``resources()["gpu"]``) when Spark
    assigned one, else (local mode) ``local_rank % cuda_device_count``.
    """
    if use_gpu is False:
        return DevicePlan("cpu", "gloo")
    if not cuda_available or cuda_device_count == 0:
        if use_gpu:
            detail = (
                f"Spark assigned GPU address(es) {list(gpu_addresses)}"
                if gpu_addresses
                else "Spark assigned no GPU to the task"
            )
            raise RuntimeError(
                "use_gpu=True but torch.cuda.is_available() is False on this executor "
                f"({detail}). Install a CUDA build of torch on the executors, or set use_gpu=False."
            )
        return DevicePlan("cpu", "gloo")
    if gpu_addresses:
        index = int(gpu_addresses[0])
        if index >= cuda_device_count:  # e.g. CUDA_VISIBLE_DEVICES already narrowed the view
            index = index % cuda_device_count
    else:
        index = local_rank % cuda_device_count
    return DevicePlan(f"cuda:{index}", "nccl")


def task_gpu_addresses(task_context) -> list[str]:
    """The GPU addresses Spark assigned to this task (empty when none)."""
    try:
        resources = task_context.resources()
    except Exception:  # older Spark or no resources configured
        return []
    gpu = resources.get("gpu") if resources else None
    return list(gpu.addresses) if gpu is not None else []
