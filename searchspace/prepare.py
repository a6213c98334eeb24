"""Before any trial: the budget, the architectures, the data check, the index and the weights.

Everything that can be checked before the search is checked here and raised
as ``BadInput`` (one line at the CLI edge). Only data in a bucket needs Ray
here: its images are checked on the cluster's nodes.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import asdict, dataclass

from searchspace.data import SkippedFiles, build_index
from trainer import storage
from trainer import weights as weights_mod
from trainer.cache import fingerprint
from trainer.errors import BadInput
from trainer.experiment import Experiment, TrialContext
from trainer.images import scan
from trainer.metrics import METRICS
from trainer.model import check_arch

BUDGET_KEYS = ("trials", "max_epochs", "grace_period", "reduction_factor", "folds", "crossfit_top")
BUDGET_MINIMA = dict(trials=1, max_epochs=1, grace_period=1, reduction_factor=2, folds=2, crossfit_top=0)


@dataclass(frozen=True)
class Resources:
    """What each trial asks Ray for, and how the run treats failures."""

    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent: int = 0      # 0: as many as the cluster fits
    max_failures: int = 2

    def check(self) -> Resources:
        for name, low, strict in (("cpus_per_trial", 0, True), ("gpus_per_trial", 0, False),
                                  ("max_concurrent", 0, False), ("max_failures", 0, False)):
            value = getattr(self, name)
            if value < low or (strict and value == low):
                bound = "more than" if strict else "at least"
                raise BadInput(f"--{name.replace('_', '-')} {value}: must be {bound} {low}")
        return self


def mode_of(metric: str) -> str:
    return "max" if METRICS[metric][1] else "min"


def budget(task, **overrides) -> dict:
    """The task's budget with the given overrides (None keeps the task's value), checked."""
    b = dict(task.BUDGET)
    b.update({k: v for k, v in overrides.items() if k in BUDGET_KEYS and v is not None})
    for key, low in BUDGET_MINIMA.items():
        if b[key] < low:
            raise BadInput(f"--{key.replace('_', '-')} {b[key]}: must be at least {low}")
    b["grace_period"] = min(b["grace_period"], b["max_epochs"])
    return b


def architectures(task, archs: str | None = None, image_sizes: str | None = None) -> dict[str, list[int]]:
    """The task's {arch: sizes}, narrowed or replaced by comma-separated names and sizes."""
    sizes = None
    if image_sizes:
        try:
            sizes = sorted({int(s) for s in image_sizes.split(",") if s.strip()})
        except ValueError:
            raise BadInput(f"--image-sizes {image_sizes!r}: give integers such as 128,224") from None
        if not sizes or min(sizes) < 8:
            raise BadInput(f"--image-sizes {image_sizes!r}: sizes must be 8 px or more")
    names = [a.strip() for a in archs.split(",") if a.strip()] if archs else list(task.ARCHS)
    for name in names:
        check_arch(name)
    fallback = sorted({s for v in task.ARCHS.values() for s in v})
    return {name: sizes or task.ARCHS.get(name, fallback) for name in names}


def resolve_weights(archs: list[str], weights_dir: str | None, mode: str, experiment: Experiment
                    ) -> dict[str, str | None]:
    """{arch: weights location or None}, found before any trial; one line per architecture.

    Trials get a file to load and never go to the hub themselves. When the
    experiment lives in a bucket, each file is copied into it once, so that
    every node of a cluster can read it.
    """
    resolved = weights_mod.resolve(archs, weights_dir, mode)
    out = {}
    for arch, r in resolved.items():
        if mode != "no":
            print(weights_mod.describe(r), flush=True)
        location = r.file
        if location and storage.is_uri(experiment.location):
            location = experiment.weights_file(arch, os.path.splitext(r.file)[1])
            with open(r.file, "rb") as f:
                storage.write_bytes(location, f.read())
        out[arch] = location
    return out


def load_dataset(task, data: str):
    """The task's Dataset; each non-image file warning printed as one line; an empty test folder dropped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedFiles)
        dataset = task.load(data)
    for w in caught:
        print(f"warning: {w.message}", flush=True)
    if dataset.test is not None and dataset.test.empty:
        print("the test folder holds no images: no test set, so no test predictions and no submission", flush=True)
        dataset.test = None
    return dataset


def prepare(task, task_name: str, data: str | None, experiment: Experiment, b: dict, archs: dict, *,
            cache_dir: str, seed: int = 0, pretrained: str | None = None, weights_dir: str | None = None,
            search_pretrained: bool = False, skip_unreadable: bool = False, aug_backend: str | None = None,
            tta: bool = True, cpus_per_trial: float = 1, options: dict | None = None) -> TrialContext:
    """Load and check the data and the weights, write folds/test/experiment.json; returns the trial context."""
    if data is None:
        if not hasattr(task, "default_data"):
            raise BadInput(f"task {task_name!r} needs --data (a folder or URI with the images)")
        data = task.default_data(cache_dir)
    data = storage.absolute(data)
    dataset = load_dataset(task, data)

    train_paths = dataset.train["path"].tolist()
    test_paths = dataset.test["path"].tolist() if dataset.test is not None else []
    print(f"checking {len(train_paths) + len(test_paths)} images in {data} ...", flush=True)
    in_bucket = storage.is_uri(data) and not data.startswith("file:")
    if in_bucket:
        # A bucket is checked by Ray tasks on the cluster's nodes, not all read
        # through this one: Ray starts here, with the search's own ray.init.
        from searchspace.api import start_ray
        start_ray()
    sizes, bad = scan(train_paths + test_paths, cache_dir=cache_dir, cluster=in_bucket)
    if bad and not skip_unreadable:
        listed = "\n".join(f"  {path}: {why}" for path, why in bad.items())
        raise BadInput(f"{len(bad)} unreadable image(s); fix or remove them, or pass --skip-unreadable:\n{listed}")
    if bad:
        print(f"leaving out {len(bad)} unreadable image(s) (--skip-unreadable); listed in experiment.json")
    train = dataset.train[[p not in bad for p in train_paths]]
    index, classes = build_index(train.reset_index(drop=True), b["folds"], seed)
    size_of = dict(zip(train_paths + test_paths, sizes))
    mode = pretrained or getattr(task, "PRETRAINED", "auto")
    weights = resolve_weights(list(archs), weights_dir, mode, experiment)
    experiment.write_folds(index)

    test_key = None
    if dataset.test is not None:
        test = dataset.test[[p not in bad for p in test_paths]].reset_index(drop=True)
        if dataset.submission_order is not None:
            rank = {s: i for i, s in enumerate(dataset.submission_order)}
            test = test.sort_values("sample_id", key=lambda s: s.map(rank).fillna(len(rank))).reset_index(drop=True)
        experiment.write_test(test)
        test_key = fingerprint(test["path"].tolist(), [size_of[p] for p in test["path"]])

    ctx = TrialContext(
        experiment=experiment.location, cache_dir=os.path.abspath(cache_dir), metric=task.METRIC,
        data_key=fingerprint(index["path"].tolist(), [size_of[p] for p in index["path"]]),
        num_classes=len(classes), max_epochs=b["max_epochs"], seed=seed, test_key=test_key,
        aug_backend=aug_backend, weights=weights, search_pretrained=search_pretrained,
        tta=getattr(task, "FLIP_TTA", True) and tta, cpus_per_trial=cpus_per_trial)
    experiment.write_meta(dict(
        task=task_name, data=data, options=options or {}, budget=b, class_names=classes, folds=b["folds"],
        seed=seed, metric=task.METRIC, mode=mode_of(task.METRIC), pretrained=mode,
        id_column=dataset.id_column, label_column=dataset.label_column,
        skipped_unreadable=bad, context=asdict(ctx), versions=versions(),
        created=datetime.datetime.now().isoformat(timespec="seconds")))
    print(f"{len(index)} training images in {len(classes)} classes, {b['folds']} folds"
          + (f", {len(test)} test images" if dataset.test is not None else ", no test set"), flush=True)
    return ctx


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("ray", "optuna", "torch", "timm", "kornia", "albumentations", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
