"""Paddy disease classification (Kaggle): 10 classes of rice-leaf images.

Layout: train.csv (image_id,label,variety,age), train_images/<label>/<image_id>,
test_images/<image_id>, sample_submission.csv (image_id,label).
Recipe from the seeds: convnext_small (in22k) and vit_small beat the resnets
(error 0.024 against 0.14 at 224 px); larger sizes (299, 320) helped; a
resized crop at min scale 0.75; an ensemble of sizes and architectures won.
"""
from __future__ import annotations

import pandas as pd

from core import storage
from searchspace.config import Budget
from searchspace.data import Dataset, flat_test, image_files, match_ids, read_csv, require_dir, safe_relative
from searchspace.tasks._space import BASE_RECIPE, suggest_recipe
from searchspace.tasks.task import Task

METRIC = "accuracy"
BUDGET = Budget(trials=40, max_epochs=12, grace_period=2, reduction_factor=3, folds=5, crossfit_top=5)
ARCHS = {
    "resnet50": [224, 256],
    "resnet101": [224, 256],
    "convnext_small.fb_in22k": [224, 288, 320],
    "vit_small_patch16_224": [224],
    "efficientnet_b0": [224, 256],
    "efficientnet_b2": [256, 288],
    "tf_efficientnetv2_s": [288, 320],
}

# Known-good, mutually different configs from the seeds, tried first: convnext_small (in22k) at
# 224/288/320 and vit_small at 224, a resized crop at min scale 0.75 (error 0.024-0.029), resnet50
# and an efficientnet as different families.
DEFAULT_RECIPE = dict(BASE_RECIPE, rotate=10.0)
PORTFOLIO = [
    dict(DEFAULT_RECIPE, arch="convnext_small.fb_in22k", image_size=224),
    dict(DEFAULT_RECIPE, arch="vit_small_patch16_224", image_size=224),
    dict(DEFAULT_RECIPE, arch="convnext_small.fb_in22k", image_size=288),
    dict(DEFAULT_RECIPE, arch="convnext_small.fb_in22k", image_size=320, color_jitter=0.2),
    dict(DEFAULT_RECIPE, arch="efficientnet_b2", image_size=288, lr=2e-3),
    dict(DEFAULT_RECIPE, arch="resnet50", image_size=224, optimizer="sgd", lr=3e-3),
]


def define_search_space(trial, archs: dict[str, list[int]] = ARCHS, pretrained: dict[str, bool] | None = None,
                        search_pretrained: bool = False) -> dict:
    return suggest_recipe(trial, archs, pretrained, search_pretrained, rotate_max=20.0)


def load(data: str) -> Dataset:
    require_dir(data, "the paddy data folder")
    csv = storage.join(data, "train.csv")
    df = read_csv(csv, ["image_id", "label", "variety", "age"])
    root = storage.join(data, "train_images")
    require_dir(root, "train_images/ (train_images/<label>/<image_id>)")
    ids = [f"{label}/{safe_relative(image_id, csv)}" for image_id, label in zip(df["image_id"], df["label"])]
    paths = match_ids(ids, root, image_files(root), csv)
    train = pd.DataFrame({"sample_id": df["image_id"], "path": paths, "label": df["label"]})
    test = flat_test(storage.join(data, "test_images"))
    order = None
    sample = storage.join(data, "sample_submission.csv")
    if storage.exists(sample):
        order = read_csv(sample, ["image_id", "label"])["image_id"].tolist()
    return Dataset(train=train, test=test, submission_order=order)


TASK = Task("paddy", load=load, define_search_space=define_search_space, budget=BUDGET, archs=ARCHS,
            default_recipe=DEFAULT_RECIPE, metric=METRIC, portfolio=PORTFOLIO)
