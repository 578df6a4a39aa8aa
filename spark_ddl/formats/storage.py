"""Model directories on any filesystem Spark can write, written all or nothing.

Each operation takes the store to use; without one, ``pyarrow.fs`` resolves the path (a local
path, or any URI it understands), which works anywhere, executors included. The driver picks
the store per session kind (``spark_ddl.driver.capabilities``): a classic session sends URIs
(``hdfs://``, ``s3a://``, ``abfs://`` …) through Hadoop's FileSystem in its JVM, so every scheme
Spark is configured for works; a Spark Connect session runs these same functions on the server
side (``spark_ddl.driver.server_files``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, BinaryIO, Callable, Protocol, Union


class Streamed(Protocol):
    """A file's content produced a piece at a time (``spark_ddl.formats.weights_stream.WeightsWriter``)."""

    size: int

    def write_to(self, write: Callable[[Any], Any]) -> int: ...


Content = Union[bytes, Streamed]
READ_CHUNK = 4 * 2**20


def _pieces(data: Content, write: Callable[[Any], Any]) -> None:
    if isinstance(data, (bytes, bytearray, memoryview)):
        write(data)
    elif hasattr(data, "write_to"):
        data.write_to(write)
    else:
        raise TypeError(f"a file's content must be bytes or written piece by piece, got {type(data).__name__}")


class Store(Protocol):
    """The few filesystem operations a model directory needs."""

    def exists(self, path: str) -> bool: ...
    def mkdirs(self, path: str) -> None: ...
    def write(self, path: str, data: Content) -> None: ...
    def read(self, path: str) -> bytes: ...
    def open(self, path: str) -> BinaryIO: ...
    def list(self, path: str) -> list[str]: ...
    def rename(self, source: str, target: str) -> None: ...
    def delete(self, path: str) -> None: ...


class ArrowStore:
    """A pyarrow filesystem (local, or whatever ``FileSystem.from_uri`` supports)."""

    def __init__(self, filesystem) -> None:
        self._fs = filesystem

    def exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self._fs.get_file_info(path).type != pafs.FileType.NotFound

    def mkdirs(self, path: str) -> None:
        self._fs.create_dir(path, recursive=True)

    def write(self, path: str, data: Content) -> None:
        with self._fs.open_output_stream(path) as out:
            _pieces(data, out.write)

    def read(self, path: str) -> bytes:
        with self._fs.open_input_stream(path) as stream:
            return stream.read()

    def open(self, path: str) -> BinaryIO:
        return self._fs.open_input_stream(path)

    def list(self, path: str) -> list[str]:
        import pyarrow.fs as pafs

        infos = self._fs.get_file_info(pafs.FileSelector(path))
        return sorted(os.path.basename(i.path) for i in infos)

    def rename(self, source: str, target: str) -> None:
        self._fs.move(source, target)

    def delete(self, path: str) -> None:
        import pyarrow.fs as pafs

        if self._fs.get_file_info(path).type == pafs.FileType.Directory:
            self._fs.delete_dir(path)
        elif self.exists(path):
            self._fs.delete_file(path)


class HadoopStore:
    """Hadoop's FileSystem through the driver JVM (every scheme Spark can write)."""

    def __init__(self, spark_context, uri: str) -> None:
        jvm = spark_context._jvm  # noqa: SLF001
        self._jvm = jvm
        self._path = jvm.org.apache.hadoop.fs.Path
        self._fs = self._path(uri).getFileSystem(spark_context._jsc.hadoopConfiguration())  # noqa: SLF001

    def exists(self, path: str) -> bool:
        return bool(self._fs.exists(self._path(path)))

    def mkdirs(self, path: str) -> None:
        self._fs.mkdirs(self._path(path))

    def write(self, path: str, data: Content) -> None:
        out = self._fs.create(self._path(path), False)
        try:
            _pieces(data, lambda piece: out.write(bytearray(piece)))
        finally:
            out.close()

    def open(self, path: str) -> BinaryIO:
        size = int(self._fs.getFileStatus(self._path(path)).getLen())
        return _JvmStream(self._jvm, self._fs.open(self._path(path)), size)

    def read(self, path: str) -> bytes:
        stream = self._fs.open(self._path(path))
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def list(self, path: str) -> list[str]:
        return sorted(s.getPath().getName() for s in self._fs.listStatus(self._path(path)))

    def rename(self, source: str, target: str) -> None:
        if not self._fs.rename(self._path(source), self._path(target)):
            raise OSError(f"could not rename {source} to {target}")

    def delete(self, path: str) -> None:
        self._fs.delete(self._path(path), True)


class _JvmStream:
    """A Hadoop input stream read from Python a bounded piece at a time."""

    def __init__(self, jvm, stream, size: int) -> None:
        self._io, self._stream, self._left = jvm.org.apache.commons.io.IOUtils, stream, size

    def readinto(self, view: Any) -> int:
        count = min(len(view), self._left, READ_CHUNK)
        if count <= 0:
            return 0
        data = bytes(self._io.toByteArray(self._stream, count))
        memoryview(view)[:count] = data
        self._left -= count
        return count

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(min(self._left, READ_CHUNK) if size < 0 else min(size, self._left))
        return bytes(buffer[: self.readinto(buffer)])

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "_JvmStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def arrow_store_for(path: str) -> tuple[ArrowStore, str]:
    """A pyarrow store for a local path or any URI ``pyarrow.fs`` understands (no Spark needed,
    so it also works on executors), and the path in that store's terms."""
    import pyarrow.fs as pafs

    if "://" not in path:
        return ArrowStore(pafs.LocalFileSystem()), os.path.abspath(path)
    filesystem, inner = pafs.FileSystem.from_uri(path)
    return ArrowStore(filesystem), inner


def write_directory(path: str, files: dict[str, Content], overwrite: bool,
                    store: tuple[Store, str] | None = None) -> None:
    """Write ``files`` (relative names, '/' for sub-directories) as the directory ``path``.

    All files go to a temporary sibling first; only when every one is written is it renamed
    into place. With ``overwrite`` an existing directory is moved aside and deleted only after
    the new one is in place; without it an existing path is an error and stays untouched.
    ``store``: the store and the path in its terms (default: ``arrow_store_for(path)``).
    """
    store, target = store or arrow_store_for(path)
    if store.exists(target) and not overwrite:
        raise FileExistsError(f"{path} already exists; use overwrite (save(path, overwrite=True) "
                              "or write().overwrite().save(path)) to replace it.")
    token = uuid.uuid4().hex[:12]
    staging, retired = f"{target}.tmp-{token}", f"{target}.old-{token}"
    store.mkdirs(staging)
    try:
        for name, data in files.items():
            if "/" in name:
                store.mkdirs(f"{staging}/{name.rsplit('/', 1)[0]}")
            store.write(f"{staging}/{name}", data)
        if store.exists(target):
            store.rename(target, retired)
        store.rename(staging, target)
    except BaseException:
        if store.exists(retired) and not store.exists(target):
            store.rename(retired, target)
        if store.exists(staging):
            store.delete(staging)
        raise
    if store.exists(retired):
        store.delete(retired)


def read_file(path: str, name: str, store: tuple[Store, str] | None = None) -> bytes | None:
    """One file of the directory ``path`` (``name`` may contain '/'), or None if absent."""
    store, target = store or arrow_store_for(path)
    file_path = f"{target}/{name}"
    return store.read(file_path) if store.exists(file_path) else None


def open_file(path: str, name: str, store: tuple[Store, str] | None = None) -> BinaryIO | None:
    """One file of the directory ``path`` as a binary stream (read a piece at a time), or None."""
    store, target = store or arrow_store_for(path)
    file_path = f"{target}/{name}"
    return store.open(file_path) if store.exists(file_path) else None


def list_directory(path: str, name: str = "", store: tuple[Store, str] | None = None) -> list[str]:
    """Entry names in ``path/name`` (empty if it does not exist)."""
    store, target = store or arrow_store_for(path)
    folder = f"{target}/{name}" if name else target
    return store.list(folder) if store.exists(folder) else []
