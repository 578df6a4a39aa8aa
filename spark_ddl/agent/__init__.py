"""Executor side: one barrier task is one agent.

``entry.run_agent`` is the function the driver's barrier job runs for each partition; it is
the only name the driver imports from this package. ``training`` meets the peers and builds
the model and strategy, ``loops`` train (lock-step or async), ``shard``/``disk_shard`` hold the
partition's rows, ``heartbeat`` reports to the driver, ``rendezvous`` forms the process group.
"""
