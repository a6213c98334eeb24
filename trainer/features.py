"""Features for the classical ensemble members: frozen backbone features, and features of the pixels themselves.

- ``cached_features``: timm's pooled pre-logits of every image (the model
  created with ``num_classes=0``, pretrained weights from a resolved local
  file), computed once per node, backbone, weights, size and resize mode, and
  kept in the node cache beside the decoded images (``.../features/``), under
  the same kind of file lock. ``flip=True`` is the mirror images' features,
  for the test set's flip TTA.
- ``pixel_features``: what seed 001's SVM saw, with no weights at all: a
  HOG descriptor of the grayscale image and a tiny colour thumbnail.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import cv2
import numpy as np
import torch
from filelock import FileLock

from trainer.cache import cached_images, check_free_space
from trainer.inference import norm_stats, to_input
from trainer.model import create

PIXEL_SIZE = 32      # the pixel features' working size: HOG of 32 x 32 gray, ...
THUMBNAIL = 8        # ... and an 8 x 8 colour thumbnail


def weights_tag(weights: str | None) -> str:
    """Names the weights a feature file was computed with (their path and size; 'scratch' for none)."""
    if not weights:
        return "scratch"
    return hashlib.sha1(f"{os.path.abspath(weights)}\0{os.path.getsize(weights)}".encode()).hexdigest()[:10]


@torch.no_grad()
def backbone_features(images: np.ndarray, arch: str, weights: str | None, flip: bool = False,
                      batch_size: int = 128) -> np.ndarray:
    """(N, D) float32 pooled pre-logits of uint8 (N, S, S, 3) images through the frozen backbone."""
    model = create(arch, 0, images.shape[1], weights=weights).eval()
    mean, std = norm_stats(model, torch.device("cpu"))
    out = np.empty((len(images), model.num_features), np.float32)
    for lo in range(0, len(images), batch_size):
        x = to_input(torch.from_numpy(np.array(images[lo:lo + batch_size])), mean, std)
        out[lo:lo + len(x)] = model(x.flip(3) if flip else x).float().numpy()
    return out


def cached_features(locations: list[str], key: str, size: int, mode: str, cache_dir: str, arch: str,
                    weights: str | None, flip: bool = False, workers: int = 2) -> np.ndarray:
    """The backbone features of the images, from this node's cache or computed into it once.

    Returns a read-only memory map, like ``cached_images``. The record
    ``<name>.json`` (shape, seconds) is written last: its presence marks the entry complete.
    """
    images = cached_images(locations, key, size, mode, cache_dir, workers=workers)
    folder = os.path.join(cache_dir, key, f"{size}-{mode}", "features")
    name = f"{arch}-{weights_tag(weights)}" + ("-flip" if flip else "")
    path, record = os.path.join(folder, name + ".npy"), os.path.join(folder, name + ".json")
    os.makedirs(folder, exist_ok=True)
    with FileLock(os.path.join(folder, name + ".lock")):
        if not os.path.exists(record):
            t0 = time.perf_counter()
            features = backbone_features(images, arch, weights, flip)
            check_free_space(cache_dir, features.nbytes, f"the {arch} features")
            np.save(path + ".tmp.npy", features)
            os.replace(path + ".tmp.npy", path)
            with open(record + ".tmp", "w") as f:
                json.dump(dict(shape=list(features.shape), arch=arch, weights=weights, flip=flip,
                               seconds=round(time.perf_counter() - t0, 3), images=len(images)), f)
            os.replace(record + ".tmp", record)
    return np.load(path, mmap_mode="r")


def hog(gray: np.ndarray, cell: int = 8, bins: int = 9) -> np.ndarray:
    """(N, 324) HOG descriptors of (N, 32, 32) float gray images: unsigned gradient orientations in ``bins``
    bins per ``cell`` x ``cell`` cell, each 2 x 2 block of cells L2-normalised (Dalal and Triggs)."""
    gy, gx = np.gradient(gray, axis=(1, 2))
    magnitude = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    index = np.minimum((angle / np.pi * bins).astype(int), bins - 1)
    n, h, w = gray.shape
    cells = np.zeros((n, h // cell, w // cell, bins), np.float32)
    rows, cols = np.arange(h) // cell, np.arange(w) // cell
    np.add.at(cells, (np.arange(n)[:, None, None], rows[None, :, None], cols[None, None, :], index), magnitude)
    blocks = np.concatenate([cells[:, :-1, :-1], cells[:, 1:, :-1], cells[:, :-1, 1:], cells[:, 1:, 1:]], axis=-1)
    blocks /= np.sqrt((blocks ** 2).sum(-1, keepdims=True) + 1e-6)
    return blocks.reshape(n, -1)


def pixel_features(images: np.ndarray, flip: bool = False) -> np.ndarray:
    """(N, 516) float32: HOG of the 32 px gray image and an 8 x 8 RGB thumbnail, both in [0, 1] scale."""
    small = np.stack([cv2.resize(np.asarray(img), (PIXEL_SIZE, PIXEL_SIZE), interpolation=cv2.INTER_AREA)
                      for img in images]) if len(images) else np.zeros((0, PIXEL_SIZE, PIXEL_SIZE, 3), np.uint8)
    if flip:
        small = small[:, :, ::-1]
    gray = small.astype(np.float32).mean(-1) / 255
    thumbs = np.stack([cv2.resize(np.ascontiguousarray(img), (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
                       for img in small]).astype(np.float32) / 255 if len(small) else np.zeros((0, 8, 8, 3))
    return np.concatenate([hog(gray), thumbs.reshape(len(small), -1)], axis=1).astype(np.float32)
