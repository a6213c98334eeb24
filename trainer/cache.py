"""The node image cache: decode and resize every image once, then memory-map it.

One cache entry is (dataset fingerprint, size, resize mode) -> an (N, S, S, 3)
uint8 array on local disk. It is built once per node under a file lock, so
concurrent trials on a node wait for the first builder and then share the
pages through the OS page cache. Each build appends a line to
``builds.jsonl`` (host, pid, images decoded), which is how tests and users can
see that nothing was decoded twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from filelock import FileLock

from trainer import images


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


def _complete(entry: str, shape: tuple) -> bool:
    meta = os.path.join(entry, "meta.json")
    if not os.path.exists(meta):
        return False
    with open(meta) as f:
        return tuple(json.load(f)["shape"]) == shape


def _build(locations, entry, shape, mode, cache_dir, workers) -> None:
    os.makedirs(entry, exist_ok=True)
    start = time.perf_counter()
    tmp = os.path.join(entry, "images.u8.tmp")
    out = np.memmap(tmp, np.uint8, "w+", shape=shape)
    size, n = shape[1], shape[0]

    def work(i: int) -> None:
        out[i] = images.load(locations[i], size, mode)

    # OpenCV releases the GIL while decoding and resizing, so threads scale.
    # Progress every 10% only where a build takes a while.
    step = max(1, n // 10) if n >= 5000 else n
    with ThreadPoolExecutor(workers) as pool:
        for done, _ in enumerate(pool.map(work, range(n)), 1):
            if done % step == 0:
                print(f"image cache {size}px/{mode}: {done}/{n} decoded", file=sys.stderr, flush=True)
    out.flush()
    os.replace(tmp, os.path.join(entry, "images.u8"))
    seconds = time.perf_counter() - start
    record = {"shape": list(shape), "mode": mode, "decoded": n, "seconds": round(seconds, 3),
              "host": socket.gethostname(), "pid": os.getpid(), "entry": entry}
    # meta.json last: its presence marks the entry complete.
    with open(os.path.join(entry, "meta.json"), "w") as f:
        json.dump(record, f)
    with open(os.path.join(cache_dir, "builds.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
