"""Training checkpoints: written by rank 0 (agent side), found and checked by the driver.

A checkpoint is one file ``checkpoint-u<updates>.pt`` (``torch.save`` of tensors, numbers
and strings only, read back with ``weights_only=True``) in ``checkpoint_dir``, a local path
or any URI ``pyarrow.fs`` understands. It holds everything a resumed run needs to continue
exactly: model and optimiser state (per rank where replicas differ), scheduler and
early-stopping state, the strategy's own counters, every rank's RNG state, the epoch and
step to continue from (the data order is a function of seed, epoch and rank), the loss sums
of the epoch in progress and the history so far. It is written under a temporary name and
renamed, so a file with the final name is always complete; only the newest
``keep_checkpoints`` are kept. Beside each one, ``checkpoint-u<updates>.json`` (written first)
holds what the driver checks before a resume — settings, epoch, step — so it need not read a
model-sized file for that.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from typing import Any

import torch

from spark_ddl.formats.storage import arrow_store_for

CHECKPOINT_RE = re.compile(r"^checkpoint-u(\d{9})\.pt$")
FORMAT = 1

FACTS = ("settings", "epoch", "step", "shard_sizes")  # what the sidecar repeats

def checkpoint_name(updates: int) -> str:
    return f"checkpoint-u{updates:09d}.pt"


def list_checkpoints(path: str, files: Any = None) -> list[str]:
    """Complete checkpoints in ``path`` (names), oldest first; [] if it does not exist.
    ``files``: the driver's view of the directory (``list_directory``/``read_file``; a Spark
    Connect client looks through the server), default pyarrow.fs in this process."""
    if files is not None:
        return sorted(n for n in files.list_directory(path) if CHECKPOINT_RE.match(n))
    store, inner = arrow_store_for(path)
    if not store.exists(inner):
        return []
    return sorted(n for n in store.list(inner) if CHECKPOINT_RE.match(n))


def newest_checkpoint(path: str, files: Any = None) -> str | None:
    """The full path of the newest complete checkpoint in ``path``, or None."""
    names = list_checkpoints(path, files)
    return f"{path.rstrip('/')}/{names[-1]}" if names else None


def write_checkpoint(path: str, state: dict[str, Any], updates: int, keep: int) -> str:
    """Write ``state`` atomically as the checkpoint after ``updates`` updates; prune old ones."""
    store, inner = arrow_store_for(path)
    store.mkdirs(inner)
    buffer = io.BytesIO()
    torch.save(dict(state, format=FORMAT), buffer)
    facts = json.dumps({name: state.get(name) for name in FACTS}, default=str).encode()
    _write_atomically(store, inner, _facts_name(checkpoint_name(updates)), facts)  # first: a .pt always has one
    final = _write_atomically(store, inner, checkpoint_name(updates), buffer.getvalue())
    for old in list_checkpoints(path)[:-keep]:
        store.delete(f"{inner}/{old}")
        if store.exists(f"{inner}/{_facts_name(old)}"):
            store.delete(f"{inner}/{_facts_name(old)}")
    return final


def unwritable_reason(path: str) -> str | None:
    """Why this process cannot create ``path`` and write a file in it, or None when it can (or
    when ``path`` is a URI whose filesystem this process cannot open at all: not checked here)."""
    try:
        store, inner = arrow_store_for(path)
        if "://" in path:
            store.exists(inner.rsplit("/", 1)[0] or "/")  # reachable at all?
    except Exception:  # noqa: BLE001 - a scheme or credentials only the executors have
        return None
    probe = f"{inner}/.spark_ddl-write-probe-{uuid.uuid4().hex[:12]}"
    try:
        store.mkdirs(inner)
        store.write(probe, b"spark_ddl")
        store.delete(probe)
    except Exception as exc:  # noqa: BLE001 - named in the driver's error
        return f"{type(exc).__name__}: {exc}"
    return None


def _facts_name(checkpoint: str) -> str:
    return checkpoint[: -len(".pt")] + ".json"


def _write_atomically(store, inner: str, name: str, data: bytes) -> str:
    final = f"{inner}/{name}"
    temporary = f"{inner}/.tmp-{uuid.uuid4().hex[:12]}-{name}"
    try:
        store.write(temporary, data)
        store.rename(temporary, final)
    except BaseException:
        try:
            store.delete(temporary)
        except OSError:
            pass
        raise
    return final


def read_checkpoint_facts(full_path: str, files: Any = None) -> dict[str, Any]:
    """Settings, epoch and step of a checkpoint, from its small sidecar file when there is one
    (``files`` as for ``list_checkpoints``)."""
    if files is not None:
        folder, name = full_path.rstrip("/").rsplit("/", 1)
        facts = files.read_file(folder, _facts_name(name))
        if facts is not None:
            return json.loads(facts)
        data = files.read_file(folder, name)
        if data is None:
            raise FileNotFoundError(full_path)
        return _load(data, full_path)
    store, inner = arrow_store_for(full_path)
    sidecar = _facts_name(inner)
    if store.exists(sidecar):
        return json.loads(store.read(sidecar))
    return read_checkpoint(full_path)


def read_checkpoint(full_path: str) -> dict[str, Any]:
    """Load a checkpoint written by ``write_checkpoint`` (tensors and plain values only)."""
    store, inner = arrow_store_for(full_path)
    return _load(store.read(inner), full_path)


def _load(data: bytes, full_path: str) -> dict[str, Any]:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{full_path} is not a spark_ddl checkpoint of format {FORMAT}")
    return state


def incompatibilities(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's settings and this fit's
    (``TrainConfig.resume_record``), compared as JSON values, the form the sidecar keeps: a
    tuple equals the list it becomes."""
    def plain(value: Any) -> Any:
        return json.loads(json.dumps(value, sort_keys=True, default=str))

    return [f"{name}: checkpoint {saved.get(name)!r}, this fit {current.get(name)!r}"
            for name in current if plain(saved.get(name)) != plain(current.get(name))]
