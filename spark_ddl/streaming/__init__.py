"""Continuous training from Structured Streaming (driver side): ``TorchEstimator.fit_stream``
trains every micro-batch with the batch engine, warm-started from the previous version, and
publishes versions into a ``VersionStore``; ``LatestModel`` scores with the newest one."""
