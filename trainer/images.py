"""Decode any image to RGB uint8, resize it one of three ways, and scan for bad files."""
from __future__ import annotations

import io
import sys
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from core import storage
from trainer.scan_cache import CheckCache, Identity

RESIZE_MODES = ("squish", "crop", "letterbox")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_reduction(data: bytes, min_side: int) -> int:
    """1, 2, 4 or 8: the largest JPEG DCT-domain downscale that keeps the short side >= min_side."""
    if not min_side or data[:2] != b"\xff\xd8":
        return 1
    try:
        w, h = Image.open(io.BytesIO(data)).size   # header only
    except Exception:
        return 1
    r = 1
    while r < 8 and min(w, h) // (2 * r) >= min_side:
        r *= 2
    return r


def decode_rgb(data: bytes, name: str = "image", min_side: int = 0) -> np.ndarray:
    """Bytes -> HxWx3 uint8 RGB. Grayscale, RGBA, palette and 16-bit become RGB.

    With ``min_side``, a large JPEG is decoded at 1/2, 1/4 or 1/8 scale inside
    the decoder (far cheaper than a full decode and a resize), never below
    ``min_side`` on its short side.
    """
    r = jpeg_reduction(data, min_side)
    # IMREAD_COLOR expands gray and palette and drops alpha; ANYDEPTH keeps
    # 16-bit so that we scale it rather than let OpenCV clip it.
    flags = _REDUCED[r] if r > 1 else cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        # Formats OpenCV lacks (TGA, ICO, PCX, ...) but the scan's Pillow reads:
        # what the scan lets through, training must decode.
        try:
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except Exception:
            raise ValueError(f"{name}: not a readable image") from None
    if img.dtype == np.uint16:
        img = (img.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize to size x size: squish (ignore aspect), crop (centre) or letterbox (pad)."""
    h, w = img.shape[:2]
    if mode == "squish":
        return _resize(img, size, size)
    if mode == "crop":
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        out = _resize(img, nw, nh)
        top, left = (nh - size) // 2, (nw - size) // 2
        return np.ascontiguousarray(out[top:top + size, left:left + size])
    if mode == "letterbox":
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        out = np.zeros((size, size, 3), np.uint8)
        top, left = (size - nh) // 2, (size - nw) // 2
        out[top:top + nh, left:left + nw] = _resize(img, nw, nh)
        return out
    raise ValueError(f"unknown resize mode {mode!r}; use one of {RESIZE_MODES}")


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    shrinking = w * h < img.shape[0] * img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def load(location: str, size: int, mode: str) -> np.ndarray:
    return resize(decode_rgb(storage.read_bytes(location), location, min_side=size), size, mode)


# --- scan ----------------------------------------------------------------------

# Bump when _check changes what it accepts: verdicts of another version are checked again.
CHECK_VERSION = 1
_UNREADABLE = "cannot read: "
_SCAN_CHUNK = 500  # files per batch: one progress step and one commit of verdicts
_checks = 0
_checks_lock = threading.Lock()
_cluster_checks: Counter[str] = Counter()


def decode_checks() -> int:
    """How many files this process has read and decode-checked so far (a scan cache hit reads none)."""
    return _checks


def cluster_checks() -> dict[str, int]:
    """{Ray node id: files} checked by the Ray tasks of this process's cluster scans so far."""
    return dict(_cluster_checks)


def _check(location: str) -> tuple[int, str | None]:
    """(size in bytes, None) if the file decodes completely, else (size, the reason)."""
    global _checks
    with _checks_lock:
        _checks += 1
    try:
        data = storage.read_bytes(location)
    except Exception as e:
        return 0, f"{_UNREADABLE}{e}".splitlines()[0]
    buf = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(buf)
            # draft() lets JPEG decode at 1/8 scale: the whole entropy-coded
            # stream is still read, so truncation is caught, at a fraction of
            # the cost of a full decode.
            im.draft("RGB", (64, 64))
            im.load()
        return len(data), None
    except Exception as e:  # PIL raises many types for broken files
        # Pillow may name the buffer with its memory address; a verdict is the same on every node and run.
        return len(data), f"{type(e).__name__}: {e}".replace(repr(buf), "the file").splitlines()[0]


def file_identities(locations: list[str], workers: int = 8) -> list[Identity | None]:
    """(size, mtime in ns) of each file; None where it is missing or has no mtime.

    Local files: a stat each (pyarrow, one call per folder). In a bucket: one
    listing per folder (1,000 objects a request), not a request per object.
    """
    folders = defaultdict(list)  # parent location -> [(file name, index)]
    for i, loc in enumerate(locations):
        base, sep, query = storage.absolute(loc).partition("?")
        parent, _, name = base.rpartition("/")
        folders[(parent or "/") + sep + query].append((name, i))
    out: list[Identity | None] = [None] * len(locations)

    def identify(parent: str) -> None:
        fs, root = storage.resolve(parent)
        named = folders[parent]
        if isinstance(fs, pafs.LocalFileSystem):
            infos = fs.get_file_info([f"{root.rstrip('/')}/{name}" for name, _ in named])
        else:
            listed = {info.base_name: info for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
            infos = [listed.get(name) for name, _ in named]
        for (_, i), info in zip(named, infos):
            if info is not None and info.type == pafs.FileType.File and info.mtime_ns is not None:
                out[i] = (info.size, info.mtime_ns)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(identify, folders))
    return out


class Progress:
    """A line on stderr at every 10% (or every ``every_s`` seconds) of a long job; silent below ``min_total``."""

    def __init__(self, what: str, total: int, start: int = 0, min_total: int = 2000, every_s: float = 15.0):
        self.what, self.total, self.start, self.every_s = what, total, start, every_s
        self.on = total >= min_total
        self.t0 = self.last = time.perf_counter()
        self.next_pct = 100 * start // max(total, 1) // 10 * 10 + 10

    def update(self, done: int) -> None:
        if not self.on:
            return
        now = time.perf_counter()
        pct = 100 * done // self.total
        if pct < self.next_pct and now - self.last < self.every_s:
            return
        self.next_pct, self.last = pct // 10 * 10 + 10, now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        tail = (f"done in {now - self.t0:.0f} s" if done >= self.total
                else f"~{(self.total - done) / max(rate, 1e-9):.0f} s left")
        print(f"{self.what}: {done:,}/{self.total:,} ({pct}%), {rate:,.0f}/s, {tail}", file=sys.stderr, flush=True)


def scan(locations: list[str], workers: int = 8, cache_dir: str | None = None,
         cluster: bool = False) -> tuple[list[int], dict[str, str]]:
    """Decode-check every file: (byte sizes, {location: reason} for the unreadable ones).

    With ``cache_dir`` (the node cache), each verdict is kept by (location,
    size, mtime) in a small sqlite file there (trainer.scan_cache): a file
    unchanged since its last check is not read again; a new or changed one
    is. Progress goes to stderr when 2,000 files or more are read.

    With ``cluster`` (Ray initialised: a bucket's files), the files to read
    are checked by Ray tasks of a few hundred files each, spread over the
    cluster's nodes, so the bytes go from the bucket to many nodes rather than
    all to this one; the verdicts come back and are recorded here as above.
    Otherwise ``workers`` threads read them (a local disk).
    """
    n = len(locations)
    sizes, reasons = [0] * n, [None] * n
    identities: list[Identity | None] = [None] * n
    store, known = None, {}
    if cache_dir is not None:
        identities = file_identities(locations, workers)
        store = CheckCache(cache_dir, CHECK_VERSION)
        known = store.known(locations, identities)
        for i, reason in known.items():
            sizes[i], reasons[i] = identities[i][0], reason
    todo = [i for i in range(n) if i not in known]
    parts = [todo[start:start + _SCAN_CHUNK] for start in range(0, len(todo), _SCAN_CHUNK)]
    what = ("checking images" + (" on the cluster" if cluster else "")
            + (f" ({len(known):,} unchanged since their last check)" if known else ""))
    progress = Progress(what, len(todo))
    done = 0
    try:
        checked = _on_cluster(locations, parts, workers) if cluster else _on_threads(locations, parts, workers)
        for part, verdicts in checked:
            fresh = []
            for i, (size, why) in zip(part, verdicts):
                sizes[i], reasons[i] = size, why
                # Keep only a verdict on the bytes the identity describes; a file
                # that could not be read (permissions, network) is tried again.
                ident = identities[i]
                if ident is not None and ident[0] == size and not (why or "").startswith(_UNREADABLE):
                    fresh.append((locations[i], ident, why))
            if store is not None:
                store.record(fresh)  # one commit per chunk: a killed scan keeps what it checked
            done += len(part)
            progress.update(done)
    finally:
        if store is not None:
            store.close()
    bad = {loc: why for loc, why in zip(locations, reasons) if why is not None}
    return sizes, bad


Verdicts = list[tuple[int, str | None]]


def _on_threads(locations: list[str], parts: list[list[int]], workers: int) -> Iterator[tuple[list[int], Verdicts]]:
    """(part, its verdicts) for each part of the files, read by threads of this process."""
    with ThreadPoolExecutor(workers) as pool:
        for part in parts:
            yield part, list(pool.map(_check, [locations[i] for i in part]))


def _check_on_node(locations: list[str], workers: int) -> tuple[str, Verdicts]:
    """A Ray task's body: (the node it ran on, the verdicts of its files)."""
    import ray
    with ThreadPoolExecutor(workers) as pool:
        return ray.get_runtime_context().get_node_id(), list(pool.map(_check, locations))


def _on_cluster(locations: list[str], parts: list[list[int]], workers: int) -> Iterator[tuple[list[int], Verdicts]]:
    """(part, its verdicts) for each part, checked by one Ray task each, in the order they finish.

    SPREAD puts the tasks on every node with a free CPU rather than filling
    this one first; inside a task, threads overlap the bucket's latency.
    """
    import ray
    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_check_on_node)
    pending = {task.remote([locations[i] for i in part], workers): part for part in parts}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                node, verdicts = ray.get(ref)
                _cluster_checks[node] += len(verdicts)
                yield pending.pop(ref), verdicts
    finally:
        for ref in pending:  # a scan stopped half-way (an error, Ctrl-C) leaves no tasks behind
            ray.cancel(ref)
