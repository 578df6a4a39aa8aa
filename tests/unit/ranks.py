"""How the unit tests start the ranks of their gloo groups: forked from a fork server that has
imported torch and the loops once, rather than a fresh interpreter per rank (which imports torch
again: half of these tests' time)."""

from __future__ import annotations

import multiprocessing

START_METHOD = "forkserver"

# before the fork server starts (the first group of the run); in a rank it changes nothing
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "numpy", "spark_ddl.agent.loops",
                                        "spark_ddl.sync"])
