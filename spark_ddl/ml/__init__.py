"""The pyspark.ml face (driver side): the estimator and model, their Params and persistence,
scoring, warm start and the training summary."""
