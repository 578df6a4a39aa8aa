"""Benchmarks (``spark-ddl bench launch|inference|strategies``), each printing a table and a JSON result."""
