"""Separate machines on one Linux host, for tests, benchmarks and trying spark_ddl across a real
network: ``spark_ddl.testbed.cluster.MachineCluster`` (a Spark standalone cluster whose workers
are network namespaces) and ``python -m spark_ddl.testbed`` / ``spark-ddl testbed``."""
