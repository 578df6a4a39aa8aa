"""Weights on their way from the driver to the executors without a model-sized object in the
driver's memory: written a chunk at a time to a local file that Spark's file server streams to
each executor once (``SparkContext.addFile``). A broadcast would build the whole serialised value
in the driver's JVM heap first, and a pickled module is one object in Python."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import uuid

from spark_ddl.formats.weights_stream import ShippedWeights, WeightsWriter, write_file

INLINE_BYTES = 16 * 2**20  # weights up to this size travel inside the (pickled) job or payload

_lock = threading.Lock()
_directory: str | None = None


def _spool() -> str:
    global _directory
    with _lock:
        if _directory is None:
            _directory = tempfile.mkdtemp(prefix="spark_ddl-shipped-")
            atexit.register(shutil.rmtree, _directory, True)
        return _directory


def ship_weights(spark_context, writer: WeightsWriter) -> ShippedWeights:
    """Write ``writer``'s safetensors file under a unique name and register it with Spark's
    file server; executors open it with ``ShippedWeights.open``."""
    name = f"spark_ddl-weights-{uuid.uuid4().hex}.safetensors"
    path = os.path.join(_spool(), name)
    write_file(writer, path)
    spark_context.addFile(path)
    return ShippedWeights(name, writer.size)
