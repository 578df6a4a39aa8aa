"""A central node, literally: gradients reduced to rank 0 (aggregation), averaged there, rank 0
applies the optimiser (update), and the new parameters and buffers are broadcast to every
agent (model broadcast).

Same maths as all-reduce, more traffic through one node: rank 0 receives and sends the whole
model every step. Offered for fidelity to the algorithm and as a baseline.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from spark_ddl.sync.base import LockstepStrategy, StrategyEnv, StrategySettings, broadcast_state, flatten, unflatten
from spark_ddl.sync.finite import all_finite
from spark_ddl.sync.sparse_rows import dense_gradient


class ParameterServerStrategy(LockstepStrategy):
    """Rank 0's optimiser applies the updates; everyone else only computes gradients (their
    optimisers exist for learning-rate schedulers but never step)."""

    name = "parameter_server"
    description = "gradients reduced to rank 0, which updates and broadcasts the parameters"

    @classmethod
    def create(cls, settings: StrategySettings, env: StrategyEnv) -> "ParameterServerStrategy":
        return cls(env.device)

    def step(self, loss: torch.Tensor, sync: bool = True) -> None:
        module, optimizer = self.module, self.optimizer
        loss.backward()
        if not sync:
            return  # accumulate locally; the next sync step sends the sum
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [dense_gradient(p) for p in params]
        flat = flatten(grads)
        if self.nonfinite is not None:
            self.nonfinite.note_local_gradients([flat])
        with self.timed_exchange():
            dist.reduce(flat, dst=0, op=dist.ReduceOp.SUM)  # step 4: gradients to the master
            apply = True
            if self.nonfinite is not None:  # the master's verdict on the summed gradient, for every rank
                verdict = torch.tensor([1 if dist.get_rank() != 0 or all_finite([flat]) else 0], device=flat.device)
                dist.broadcast(verdict, src=0)
                apply = self.nonfinite.resolve(bool(verdict.item()))
        if dist.get_rank() == 0 and apply:
            flat /= dist.get_world_size()
            for param, grad in zip(params, unflatten(flat, grads)):
                param.grad = grad
            optimizer.step()  # step 5: the master updates
        if apply:
            with self.timed_exchange():
                broadcast_state(module)  # step 6: everyone gets the master's parameters
        optimizer.zero_grad(set_to_none=True)
