"""Every experiment and data read/write goes through pyarrow.fs.

A location is a plain string: a local path or a URI (``s3://bucket/prefix``,
``gs://...``, ``file:///...``). URIs may carry pyarrow query options such as
``?endpoint_override=127.0.0.1:9000&scheme=http``; ``join`` keeps them at the
end so a child location opens the same filesystem.
"""
from __future__ import annotations

import io
import json
import os
import uuid
from functools import lru_cache

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_uri(location: str) -> bool:
    return "://" in location


def is_local(location: str) -> bool:
    """On this machine's file system (a path or ``file://``), where a plain write can be cut half way."""
    return isinstance(resolve(location)[0], pafs.LocalFileSystem)


def absolute(location: str) -> str:
    """Local paths become absolute (Ray and pyarrow both need that); URIs pass."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def join(location: str, *parts: str) -> str:
    base, sep, query = location.partition("?")
    for part in parts:
        base = base.rstrip("/") + "/" + part.strip("/")
    return base + sep + query


@lru_cache(maxsize=32)
def _filesystem(root: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(root)[0]


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    location = absolute(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    base, _, query = location.partition("?")
    scheme, rest = base.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    bucket = rest.split("/", 1)[0]
    # One filesystem object per bucket and options, not per file.
    fs = _filesystem(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))
    return fs, pafs.FileSystem.from_uri(location)[1]


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(location: str, recursive: bool = True) -> list[tuple[str, int]]:
    """(relative path, size in bytes) of every file under a directory, sorted."""
    fs, root = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    prefix = root.rstrip("/") + "/"
    return sorted(
        (info.path[len(prefix):], info.size)
        for info in infos
        if info.type == pafs.FileType.File
    )


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    fs, path = resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    # Write then move, so a reader never sees half a file (on a local disk;
    # object stores commit a whole object on close anyway).
    # A name of this writer's own, so two processes writing one file never share a temporary.
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_json(location: str) -> dict:
    return json.loads(read_bytes(location))


def write_json(location: str, obj) -> None:
    write_bytes(location, json.dumps(obj, indent=2, default=str).encode())


def read_parquet(location: str) -> pa.Table:
    fs, path = resolve(location)
    return pq.read_table(path, filesystem=fs)


def write_parquet(location: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(location, buf.getvalue())


def delete_dir(location: str) -> None:
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)



def delete_file(location: str) -> bool:
    """Remove one file; False when there was none."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    fs.delete_file(path)
    return True
