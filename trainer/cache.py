"""The node image cache: decode and resize every image once, then memory-map it.

One cache entry is (dataset fingerprint, size, resize mode) -> an (N, S, S, 3)
uint8 array on local disk. It is built once per node under a file lock, so
concurrent trials on a node wait for the first builder and then share the
pages through the OS page cache. Each build appends a line to
``builds.jsonl`` (host, pid, images decoded), which is how tests and users can
see that nothing was decoded twice.

A build streams: a chunk of images (a few MB of pixels) is decoded into a
buffer and written at its offset in ``images.u8.tmp`` while the next chunk is
decoded into a second buffer, so memory does not grow with N. Every few
seconds the file is synced and ``progress.json`` records how far it got; a
build killed half-way resumes there on the next call (the lock is an OS lock,
released when its holder dies). Only a finished file is renamed
to ``images.u8``, and ``meta.json``, written last, marks the entry complete:
a reader never sees a partial array. Space for the whole entry is checked and
reserved before the first image is decoded.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from filelock import FileLock

from core.errors import BadInput
from trainer import images

CHUNK_BYTES = 8 << 20     # decoded pixels held in memory at once
CHECKPOINT_S = 5.0        # seconds between syncs of the partial file (a killed build loses at most this)
SPARE_BYTES = 256 << 20   # left free on the cache's disk after a new entry


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(base, "searchspace")


def fingerprint(locations: list[str], sizes: list[int]) -> str:
    """Identifies a list of image files by name, order and byte size."""
    h = hashlib.sha1()
    for loc, size in zip(locations, sizes):
        h.update(f"{loc}\0{size}\n".encode())
    return h.hexdigest()[:16]


def cached_images(
    locations: list[str], key: str, size: int, mode: str, cache_dir: str, workers: int = 2
) -> np.ndarray:
    """Read-only (N, size, size, 3) uint8 array of the images, built on first use."""
    entry = os.path.join(cache_dir, key, f"{size}-{mode}")
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    shape = (len(locations), size, size, 3)
    with FileLock(entry + ".lock"):
        if not _complete(entry, shape):
            _build(locations, entry, shape, mode, cache_dir, workers)
    return np.memmap(os.path.join(entry, "images.u8"), np.uint8, "r", shape=shape)


def check_free_space(cache_dir: str, needed: int, what: str = "the image cache") -> None:
    """Raise BadInput, naming the disk and the numbers, if ``needed`` bytes (plus a margin) do not fit in cache_dir."""
    existing = os.path.abspath(cache_dir)
    while not os.path.exists(existing):  # a cache dir not made yet: the disk it will be on
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if needed + SPARE_BYTES > free:
        raise BadInput(_no_room(cache_dir, needed, free, what))


def _no_room(cache_dir: str, needed: int, free: int, what: str) -> str:
    def gb(b: int) -> str:
        return f"{b / 1e9:.2f} GB ({b:,} bytes)"
    return (f"{cache_dir}: no room for {what}: it needs {gb(needed)} plus {SPARE_BYTES / 1e9:.2f} GB spare, "
            f"and {gb(free)} is free; use a bigger disk, point --cache-dir at a disk with room, "
            f"or search fewer image sizes or resize modes")


def _complete(entry: str, shape: tuple) -> bool:
    try:
        with open(os.path.join(entry, "meta.json")) as f:
            return tuple(json.load(f)["shape"]) == shape
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(locations, entry, shape, mode, cache_dir, workers) -> None:
    os.makedirs(entry, exist_ok=True)
    start = time.perf_counter()
    n, size = shape[0], shape[1]
    row = size * size * 3
    tmp = os.path.join(entry, "images.u8.tmp")
    first = _resume_point(entry, shape, mode)
    if first == 0:
        _allocate(tmp, n * row, cache_dir, f"{n:,} images at {size} px ({mode})")
    chunk = max(1, min(1024, CHUNK_BYTES // row))
    bounds = [(lo, min(n, lo + chunk)) for lo in range(first, n, chunk)]
    bufs = [np.empty((chunk, size, size, 3), np.uint8) for _ in range(2)]

    def work(buf: np.ndarray, i: int, lo: int) -> None:
        buf[i - lo] = images.load(locations[i], size, mode)

    def submit(k: int) -> list:
        lo, hi = bounds[k]
        return [pool.submit(work, bufs[k % 2], i, lo) for i in range(lo, hi)]

    progress = images.Progress(f"image cache {size}px/{mode}" + (f", resumed at {first:,}" if first else ""),
                               n, start=first)
    synced = time.perf_counter()
    # OpenCV releases the GIL while decoding and resizing, so threads scale.
    # Two chunk buffers: the threads decode chunk k+1 into one while chunk k
    # is written (and synced) from the other; memory stays at two chunks.
    with open(tmp, "r+b") as f, ThreadPoolExecutor(workers) as pool:
        futures = submit(0) if bounds else []
        for k, (lo, hi) in enumerate(bounds):
            for future in futures:
                future.result()
            if k + 1 < len(bounds):
                futures = submit(k + 1)
            f.seek(lo * row)
            f.write(bufs[k % 2][:hi - lo].data)
            if hi < n and time.perf_counter() - synced >= CHECKPOINT_S:
                _sync(f)  # the rows are on disk before progress.json says so
                _write_json(os.path.join(entry, "progress.json"), {"shape": list(shape), "mode": mode, "done": hi})
                synced = time.perf_counter()
            progress.update(hi)
        _sync(f)
    os.replace(tmp, os.path.join(entry, "images.u8"))
    _remove(_progress_files(entry))
    seconds = time.perf_counter() - start
    record = {"shape": list(shape), "mode": mode, "decoded": n - first, "resumed_from": first,
              "seconds": round(seconds, 3), "host": socket.gethostname(), "pid": os.getpid(), "entry": entry}
    # meta.json last: its presence marks the entry complete.
    _write_json(os.path.join(entry, "meta.json"), record)
    with open(os.path.join(cache_dir, "builds.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _resume_point(entry: str, shape: tuple, mode: str) -> int:
    """Images a killed build already wrote and synced; 0 (and its leftovers removed) when none can be trusted."""
    tmp, record = os.path.join(entry, "images.u8.tmp"), os.path.join(entry, "progress.json")
    try:
        with open(record) as f:
            done = json.load(f)
        if done["shape"] == list(shape) and done["mode"] == mode and os.path.getsize(tmp) == math.prod(shape):
            return int(done["done"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    _remove([tmp, *_progress_files(entry)])
    return 0


def _progress_files(entry: str) -> list[str]:
    """The build's record and the half-written one ``_write_json`` leaves when a build is killed mid-write."""
    record = os.path.join(entry, "progress.json")
    return [record, record + ".tmp"]


def _remove(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _allocate(path: str, nbytes: int, cache_dir: str, what: str) -> None:
    """Create ``path`` with ``nbytes`` reserved, or raise BadInput when the disk cannot hold them."""
    check_free_space(cache_dir, nbytes, what)
    with open(path, "wb") as f:
        try:
            # Reserve the blocks now: a disk that fills up later fails here, not half-way through a build.
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except (AttributeError, OSError) as e:  # no fallocate on this OS or filesystem, or an empty entry
            if getattr(e, "errno", None) == errno.ENOSPC:
                f.close()
                os.remove(path)
                raise BadInput(_no_room(cache_dir, nbytes, shutil.disk_usage(cache_dir).free, what)) from None
            f.truncate(nbytes)


def _sync(f) -> None:
    f.flush()
    getattr(os, "fdatasync", os.fsync)(f.fileno())  # macOS has no fdatasync


def _write_json(path: str, obj: dict) -> None:
    """Write then rename, so a reader (or a resumed build) never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)
