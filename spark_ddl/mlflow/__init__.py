"""MLflow for spark_ddl (``pip install 'spark_ddl[mlflow]'``): a model flavor ``spark_ddl`` with
``python_function`` beside it, and autologging of fits.

- ``log_model(model, name)`` logs a fitted ``TorchModel`` in spark_ddl's own saved format (the
  directory ``model.save(path)`` writes, under the artifact's ``model/``) and returns MLflow's
  ``ModelInfo``; ``load_model(uri)`` gives the ``TorchModel`` back (no pickle unless
  ``allow_pickle=True``, as ``TorchModel.load``).
- Through pyfunc, ``mlflow.pyfunc.load_model(uri).predict(pandas_df)`` scores in this process
  (``TorchModel.predict_pandas``: the columns ``transform`` adds) and
  ``mlflow.pyfunc.spark_udf(spark, uri)`` scores a DataFrame; the signature holds the training
  DataFrame's input columns and the prediction columns.
- ``autolog()``: every ``fit`` then logs its settings, per-epoch metrics while it trains, its
  summary, history plot and (``log_models``) model into the active MLflow run or one of its own;
  ``spark_ddl.run`` its ``report()`` records at their step; ``fit_stream`` its versions
  (``stream_*`` metrics, ``step=version``) into one run that ends with the stream; inside a
  pyspark.ml ``CrossValidator``/``TrainValidationSplit`` each fit is a child run of the tuning
  run (``autologging``, ``tuning``; the calls are made off the fit's thread by ``runlog``).
- ``fit_stream(..., registered_model_name=...)`` registers each version (``registry``);
  ``TorchModel.load_latest``/``LatestModel`` read ``models:/name@latest`` (``registered``).

Only the driver talks to MLflow; nothing else in spark_ddl imports it. A tracking server that is
down or refuses costs a fit one warning, never its result.
"""

from __future__ import annotations

try:
    import mlflow  # noqa: F401
    import mlflow.pyfunc  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "spark_ddl.mlflow needs MLflow, which is not installed here: pip install 'spark_ddl[mlflow]' "
        f"(from a checkout: pip install -c constraints.txt -e '.[mlflow]'). ({exc})"
    ) from exc

from spark_ddl.mlflow.autologging import autolog, autologging, last_run_id, log_to_last_run, use
from spark_ddl.mlflow.flavor import FLAVOR_NAME, _load_pyfunc, load_model, log_model, save_model, signature_of

__all__ = ["FLAVOR_NAME", "autolog", "autologging", "last_run_id", "log_to_last_run", "use", "load_model", "log_model",
           "save_model", "signature_of", "_load_pyfunc"]
