"""Decode any image to RGB uint8, resize it one of three ways, and scan for bad files."""
from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from PIL import Image

from trainer import storage

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


def _check(location: str) -> tuple[int, str | None]:
    """(size in bytes, None) if the file decodes completely, else (size, the reason)."""
    try:
        data = storage.read_bytes(location)
    except Exception as e:
        return 0, f"cannot read: {e}".splitlines()[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            # draft() lets JPEG decode at 1/8 scale: the whole entropy-coded
            # stream is still read, so truncation is caught, at a fraction of
            # the cost of a full decode.
            im.draft("RGB", (64, 64))
            im.load()
        return len(data), None
    except Exception as e:  # PIL raises many types for broken files
        return len(data), f"{type(e).__name__}: {e}".splitlines()[0]


def scan(locations: list[str], workers: int = 8) -> tuple[list[int], dict[str, str]]:
    """Decode-check every file: (byte sizes, {location: reason} for the unreadable ones)."""
    with ThreadPoolExecutor(workers) as pool:
        checked = list(pool.map(_check, locations))
    bad = {loc: why for loc, (_, why) in zip(locations, checked) if why is not None}
    return [size for size, _ in checked], bad
