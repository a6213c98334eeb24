"""The embedded default: scikit-learn's bundled 8x8 digits, as PNG files.

They are written once into the cache folder in the paddy layout (train.csv,
train_images/<label>/, test_images/, sample_submission.csv) with a fixed 20%
test split, then read by the paddy loader like any other data. The space uses
tiny timm models at 16-32 px so that a search finishes in minutes on 2 cores.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import pandas as pd
from filelock import FileLock
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from searchspace.config import Budget
from searchspace.data import Dataset
from searchspace.tasks import paddy
from searchspace.tasks._space import BASE_RECIPE, suggest_recipe
from searchspace.tasks.task import Task

METRIC = "accuracy"
BUDGET = Budget(trials=16, max_epochs=9, grace_period=1, reduction_factor=4, folds=5, crossfit_top=4)
ARCHS = {
    "test_resnet": [16, 24, 32],
    "test_efficientnet": [24, 32],
    "test_vit": [16, 32],
    "mobilenetv3_small_050": [32],
}
VERSION = "v1"
FLIP_TTA = False  # a mirrored digit is another glyph
# No downloads for the default task: its tiny models train from scratch.
PRETRAINED = "no"

# Mutually different configs tried first: each tiny architecture at its largest size, from scratch
# (the recipe's lr is a fine-tuning one: scratch trials take ten times it).
DEFAULT_RECIPE = dict(BASE_RECIPE, hflip=0.0, scale_min=0.8, rotate=10.0, batch_size=64, label_smoothing=0.05)
PORTFOLIO = []


def define_search_space(trial, archs: dict[str, list[int]] = ARCHS, pretrained: dict[str, bool] | None = None,
                        search_pretrained: bool = False) -> dict:
    # Digits are not mirror-symmetric: no flips.
    return suggest_recipe(trial, archs, pretrained, search_pretrained, rotate_max=15.0, jpeg=False, hflip=False,
                          vflip=False)


def default_data(cache_dir: str) -> str:
    """Write the digits as PNGs once (under a lock) and return the folder."""
    root = os.path.join(cache_dir, f"digits-{VERSION}")
    with FileLock(root + ".lock"):
        if not os.path.exists(os.path.join(root, "sample_submission.csv")):
            _write(root)
    return root


def load(data: str) -> Dataset:
    return paddy.load(data)


def _write(root: str) -> None:
    digits = load_digits()
    ids = [f"{i:04d}.png" for i in range(len(digits.target))]
    train_idx, test_idx = train_test_split(
        np.arange(len(ids)), test_size=0.2, stratify=digits.target, random_state=0)
    rows = []
    for i in train_idx:
        label = str(digits.target[i])
        _png(os.path.join(root, "train_images", label, ids[i]), digits.images[i])
        rows.append((ids[i], label, "digits", 0))
    for i in test_idx:
        _png(os.path.join(root, "test_images", ids[i]), digits.images[i])
    pd.DataFrame(rows, columns=["image_id", "label", "variety", "age"]).to_csv(
        os.path.join(root, "train.csv"), index=False)
    # Ground truth for the held-out split, so a submission can be scored.
    pd.DataFrame({"image_id": [ids[i] for i in test_idx],
                  "label": [str(digits.target[i]) for i in test_idx]}).to_csv(
        os.path.join(root, "test_labels.csv"), index=False)
    pd.DataFrame({"image_id": [ids[i] for i in sorted(test_idx)], "label": ""}).to_csv(
        os.path.join(root, "sample_submission.csv"), index=False)


def _png(path: str, img8x8: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Values are 0..16; upscale to 32 px so every image size in the space is a
    # real resize, as it is for photos.
    img = (img8x8 * (255 / 16)).astype(np.uint8)
    cv2.imwrite(path, cv2.resize(img, (32, 32), interpolation=cv2.INTER_CUBIC))


TASK = Task("digits", load=load, define_search_space=define_search_space, budget=BUDGET, archs=ARCHS,
            default_recipe=DEFAULT_RECIPE, metric=METRIC, portfolio=PORTFOLIO, pretrained=PRETRAINED, flip_tta=FLIP_TTA,
            default_data=default_data, budget_fallback=None)   # its own space is already the small one
