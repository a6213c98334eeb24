"""Any class-per-folder tree: DIR/<class>/<image>, or DIR/train/<class>/<image>.

An optional DIR/test/ folder (flat) holds unlabelled test images.
"""
from __future__ import annotations

from core import storage
from searchspace.config import Budget
from searchspace.data import Dataset, flat_test, folder_classes, image_files, require_dir
from searchspace.tasks._space import BASE_RECIPE, suggest_recipe
from searchspace.tasks.task import Task

METRIC = "accuracy"
BUDGET = Budget(trials=30, max_epochs=10, grace_period=2, reduction_factor=3, folds=5, crossfit_top=4)
ARCHS = {
    "resnet50": [224],
    "convnext_small.fb_in22k": [224],
    "vit_small_patch16_224": [224],
    "efficientnet_b0": [224],
}

# Known-good, mutually different configs tried first: four families at 224 px with the seeds'
# resized crop at min scale 0.75.
DEFAULT_RECIPE = dict(BASE_RECIPE)
PORTFOLIO = [
    dict(DEFAULT_RECIPE, arch="convnext_small.fb_in22k", image_size=224),
    dict(DEFAULT_RECIPE, arch="vit_small_patch16_224", image_size=224),
    dict(DEFAULT_RECIPE, arch="efficientnet_b0", image_size=224, lr=2e-3),
    dict(DEFAULT_RECIPE, arch="resnet50", image_size=224, optimizer="sgd", lr=3e-3),
]


def define_search_space(trial, archs: dict[str, list[int]] = ARCHS, pretrained: dict[str, bool] | None = None,
                        search_pretrained: bool = False) -> dict:
    return suggest_recipe(trial, archs, pretrained, search_pretrained)


def load(data: str) -> Dataset:
    require_dir(data, "the image folder")
    root = storage.join(data, "train") if storage.is_dir(storage.join(data, "train")) else data
    files = image_files(root, skip=("test/",))
    return Dataset(train=folder_classes(root, files), test=flat_test(storage.join(data, "test")))


TASK = Task("imagefolder", load=load, define_search_space=define_search_space, budget=BUDGET, archs=ARCHS,
            default_recipe=DEFAULT_RECIPE, metric=METRIC, portfolio=PORTFOLIO)
