"""The command-line applications behind ``spark-ddl`` and the spark-submit scripts in jobs/."""
