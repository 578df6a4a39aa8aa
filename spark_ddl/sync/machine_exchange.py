"""How the machines' leaders combine their machines' gradient sums over the network (step 3 of
``host_reduce``'s average), optionally compressed: the only place where gradient bytes cross
machines, so the only place where compression pays. Inside a machine the agents sum in shared
memory at full precision.

- ``none``: all-reduce the fp32 sums; every agent then divides by the world size.
- ``fp16`` / ``bf16``: each leader scales its machine's sum to its share of the mean (as torch's
  fp16 hook divides before casting: the shares fit in fp16 whenever the mean does), casts it,
  all-reduces in the low precision and casts the mean back. Summing in the low precision
  (gloo adds fp16/bf16 directly) keeps every byte of the ring half-size; gathering the shares
  and summing in fp32 would be more precise but sends (machines − 1) shares per leader instead
  of 2·(machines − 1)/machines of one.
- ``powersgd``: torch's own ``powerSGD_hook`` on the flat buffer, viewed as one matrix per
  parameter (rank 1, error feedback, warm start, after two plain all-reduces). Its state (the
  error feedback, the warm-start factors) lives on the leader, one per reducer: a new layout
  (another fit, another agent count, a fallback to gloo) builds a new reducer and a new state.
  A non-finite result resets it on every leader alike (they all see the same result), so one
  NaN step does not poison the error feedback for the rest of the fit.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

FLAT_COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")

# PowerSGD's divisor guard: a gradient matrix that is all zero (an unused layer, dead ReLUs) would
# otherwise be normalised by a zero norm into NaN (torch's own advice in ``_orthogonalize_gram_schmidt``)
POWERSGD_EPSILON = 1e-8

Mean = Callable[[torch.Tensor, torch.Tensor], None]  # (total, out): out = total / world size


def powersgd_state(process_group: Any) -> Any:
    """torch's PowerSGD state as this project uses it: rank-1 approximations with error feedback and
    warm start, after two plain all-reduces (the least torch allows with either)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    return powerSGD_hook.PowerSGDState(process_group=process_group, matrix_approximation_rank=1,
                                       start_powerSGD_iter=2, orthogonalization_epsilon=POWERSGD_EPSILON)


class MachineExchange:
    """``compression='none'``: all-reduce the machines' sums in place (the caller divides)."""

    compression = "none"
    gives_mean = False  # whether the buffer holds the mean afterwards (else: the sum)

    def __init__(self, group: Any) -> None:
        self.group = group
        self.payload_bytes = 0  # bytes of the tensors handed to gloo at the last exchange

    def __call__(self, total: torch.Tensor) -> None:
        dist.all_reduce(total, group=self.group)
        self.payload_bytes = total.numel() * total.element_size()


class CastExchange(MachineExchange):
    """``fp16`` / ``bf16``: each machine's share of the mean, all-reduced in the low precision."""

    gives_mean = True

    def __init__(self, group: Any, compression: str, numel: int, mean: Mean) -> None:
        super().__init__(group)
        self.compression = compression
        self._mean = mean
        self._low = torch.empty(numel, dtype=torch.float16 if compression == "fp16" else torch.bfloat16)

    def __call__(self, total: torch.Tensor) -> None:
        self._mean(total, total)  # this machine's share of the mean, in full precision
        self._low.copy_(total)
        dist.all_reduce(self._low, group=self.group)
        total.copy_(self._low)
        self.payload_bytes = self._low.numel() * self._low.element_size()


class _FlatBucket:
    """What torch's ``powerSGD_hook`` reads of a DDP ``GradBucket``: one flat buffer and a view
    into it per parameter (the matrices it compresses one by one)."""

    def __init__(self, buffer: torch.Tensor, shapes: Sequence[torch.Size]) -> None:
        self._buffer = buffer
        self._views, offset = [], 0
        for shape in shapes:
            numel = int(torch.Size(shape).numel())
            self._views.append(buffer[offset:offset + numel].view(shape))
            offset += numel

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return self._views

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:  # one bucket: every call is a whole step
        return True


class PowerSGDExchange(MachineExchange):
    """``powersgd``: torch's PowerSGD hook over the leaders' group, on the flat buffer."""

    compression = "powersgd"
    gives_mean = True

    def __init__(self, group: Any, shapes: Sequence[torch.Size], machines: int, world_size: int) -> None:
        super().__init__(group)
        self.state = powersgd_state(group)
        self._shapes = list(shapes)
        self._scale = machines / world_size  # the hook averages over machines; we want the mean over ranks
        self._bucket: _FlatBucket | None = None

    def __call__(self, total: torch.Tensor) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        if self._bucket is None or self._bucket.buffer() is not total:
            self._bucket = _FlatBucket(total, self._shapes)
        total.mul_(self._scale)
        counted = self.state.total_numel_after_compression
        # the hook's chained callbacks block gloo worker threads: wait here, one chain at a time
        mean = powerSGD_hook.powerSGD_hook(self.state, self._bucket).wait()
        if mean.data_ptr() != total.data_ptr():
            total.copy_(mean)
        counted = self.state.total_numel_after_compression - counted  # 0: a plain all-reduce step
        self.payload_bytes = (counted or total.numel()) * total.element_size()
        if not bool(torch.isfinite(total.sum())):
            self.reset()

    def reset(self) -> None:
        """Forget the error feedback and the warm-start factors (the next step starts afresh)."""
        self.state.error_dict.clear()
        self.state.p_memory_dict.clear()
        self.state.q_memory_dict.clear()


def make_exchange(compression: str, group: Any, shapes: Sequence[torch.Size], machines: int, world_size: int,
                  mean: Mean) -> MachineExchange:
    """The exchange of one leader for ``compression``."""
    if compression == "none":
        return MachineExchange(group)
    if compression in ("fp16", "bf16"):
        return CastExchange(group, compression, sum(int(torch.Size(s).numel()) for s in shapes), mean)
    if compression == "powersgd":
        return PowerSGDExchange(group, shapes, machines, world_size)
    raise ValueError(f"unknown compression {compression!r}; one of {FLAT_COMPRESSIONS}")


def ring_bytes_sent(payload_bytes: int, participants: int) -> int:
    """Bytes each participant of a ring all-reduce of ``payload_bytes`` sends: a reduce-scatter and an
    all-gather, each (n − 1) chunks of payload/n (n = 2: the payload once)."""
    if participants < 2:
        return 0
    return round(2 * (participants - 1) * payload_bytes / participants)
