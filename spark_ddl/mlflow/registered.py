"""Where a stream that ``fit_stream`` registered in MLflow keeps its versions: what
``TorchModel.load_latest`` and ``LatestModel`` read for a ``models:/`` URI (kept apart from
the flavor, which imports the model classes)."""

from __future__ import annotations

from mlflow import MlflowClient


def resolve_model_dir(model_uri: str) -> tuple[str, dict[str, str]]:
    """``models:/name@alias`` (or ``models:/name/version``) of a version ``fit_stream``
    registered: its version store's directory and the registered version's tags."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    target = model_uri[len("models:/"):]
    try:
        if "@" in target:
            name, alias = target.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = target.split("/", 1)
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        raise FileNotFoundError(f"No registered model version at {model_uri}: {exc.message}") from exc
    model_dir = version.tags.get("model_dir")
    if not model_dir:
        raise ValueError(f"{model_uri} was not registered by fit_stream (no model_dir tag): load it with "
                         "spark_ddl.mlflow.load_model.")
    return model_dir, dict(version.tags)
