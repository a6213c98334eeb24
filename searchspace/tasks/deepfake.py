"""Real/fake face images, binary or multi-class (the labels decide).

Two layouts are read:
- folders: {train,valid,test}/<class>/<image> (valid may also be named
  validation or val; test may be flat or have class folders);
- CSVs: train.csv and validation.csv (image_id,label) with train/,
  validation/ and test/ folders; a test.csv may list the test ids. Ids may
  come with or without their file extension.
A given validation split is folded into the index, so the K folds cover every
labelled image. Recipe from the seeds: efficientnet/xception/inception-resnet
backbones, JPEG compression, noise, blur, grayscale, flips and small rotations
(the DFDC augmentation set), centre crops on faces.
"""
from __future__ import annotations

import pandas as pd

from core import storage
from core.errors import BadInput
from searchspace.config import Budget
from searchspace.data import Dataset, folder_classes, image_files, match_ids, read_csv, require_dir
from searchspace.tasks._space import BASE_RECIPE, suggest_recipe
from searchspace.tasks.task import Task

METRIC = "accuracy"
BUDGET = Budget(trials=40, max_epochs=12, grace_period=2, reduction_factor=3, folds=5, crossfit_top=5)
ARCHS = {
    "resnet50": [128, 224],
    "convnext_small.fb_in22k": [224],
    "vit_small_patch16_224": [224],
    "efficientnet_b0": [128, 224],
    "efficientnet_b3": [256, 300],
    "tf_efficientnetv2_s": [256, 300],
    "xception41": [256, 299],
    "inception_resnet_v2": [256, 299],
}
VALID_NAMES = ("valid", "validation", "val")

# Known-good, mutually different configs from the seeds, tried first: the DFDC augmentation recipe
# (JPEG compression p 0.5, noise, blur, flips, colour, grayscale 0.2, small rotations) on
# efficientnet, xception and inception-resnet backbones; a plain crop recipe for contrast.
DEFAULT_RECIPE = dict(BASE_RECIPE, resize_mode="crop", scale_min=0.8, rotate=10.0, color_jitter=0.3,
                      grayscale=0.2, noise=0.1, blur=0.05, jpeg=0.5)
PORTFOLIO = [
    dict(DEFAULT_RECIPE, arch="efficientnet_b0", image_size=224),
    dict(DEFAULT_RECIPE, arch="xception41", image_size=299, lr=5e-4),
    dict(DEFAULT_RECIPE, arch="tf_efficientnetv2_s", image_size=300),
    dict(DEFAULT_RECIPE, arch="inception_resnet_v2", image_size=299, lr=5e-4),
    dict(BASE_RECIPE, arch="efficientnet_b3", image_size=300, resize_mode="crop"),
]


def define_search_space(trial, archs: dict[str, list[int]] = ARCHS, pretrained: dict[str, bool] | None = None,
                        search_pretrained: bool = False) -> dict:
    # Faces are upright and left-right symmetric: no vertical flips.
    return suggest_recipe(trial, archs, pretrained, search_pretrained, rotate_max=10.0, vflip=False)


def load(data: str) -> Dataset:
    require_dir(data, "the deepfake data folder")
    if storage.exists(storage.join(data, "train.csv")):
        return _load_csv(data)
    return _load_folders(data)


def _load_folders(data: str) -> Dataset:
    require_dir(storage.join(data, "train"), "train/<class>/ folder (or a train.csv)")
    parts = [_labelled(data, "train")]
    for name in VALID_NAMES:
        if storage.is_dir(storage.join(data, name)):
            parts.append(_labelled(data, name))
    test = None
    test_dir = storage.join(data, "test")
    if storage.is_dir(test_dir):
        files = image_files(test_dir)
        test = pd.DataFrame({"sample_id": files, "path": [storage.join(test_dir, f) for f in files]})
    return Dataset(train=pd.concat(parts, ignore_index=True), test=test)


def _labelled(data: str, split: str) -> pd.DataFrame:
    root = storage.join(data, split)
    df = folder_classes(root, image_files(root))
    df["sample_id"] = split + "/" + df["sample_id"]
    return df


def _load_csv(data: str) -> Dataset:
    parts = []
    for split, folder in (("train", "train"), ("validation", "validation")):
        csv = storage.join(data, f"{split}.csv")
        if split == "validation" and not storage.exists(csv):
            continue
        df = read_csv(csv, ["image_id", "label"])
        root = storage.join(data, folder)
        require_dir(root, f"{folder}/ (the images that {split}.csv lists)")
        paths = match_ids(df["image_id"].tolist(), root, image_files(root), csv)
        parts.append(pd.DataFrame({"sample_id": split + "/" + df["image_id"], "path": paths,
                                   "label": df["label"]}))
    test = None
    test_dir = storage.join(data, "test")
    if storage.is_dir(test_dir):
        files = image_files(test_dir)
        test_csv = storage.join(data, "test.csv")
        if storage.exists(test_csv):
            ids = read_csv(test_csv, ["image_id"])["image_id"].tolist()
            paths = match_ids(ids, test_dir, files, test_csv)
        else:
            ids, paths = files, [storage.join(test_dir, f) for f in files]
        test = pd.DataFrame({"sample_id": ids, "path": paths})
    elif storage.exists(storage.join(data, "test.csv")):
        raise BadInput(f"{storage.join(data, 'test.csv')}: lists test images but there is no test/ folder")
    return Dataset(train=pd.concat(parts, ignore_index=True), test=test)


TASK = Task("deepfake", load=load, define_search_space=define_search_space, budget=BUDGET, archs=ARCHS,
            default_recipe=DEFAULT_RECIPE, metric=METRIC, portfolio=PORTFOLIO)
