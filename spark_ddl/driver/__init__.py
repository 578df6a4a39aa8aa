"""Driver side: check the cluster and the input, prepare the partitions, launch the barrier
job, watch the agents (progress, stalls), retry, and reassemble rank 0's result.

``launcher.run_training`` is the entry point the estimator calls; the agents' side is
imported only for its entry function (``spark_ddl.agent.entry.run_agent``).
"""
