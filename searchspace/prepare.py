"""Before any trial: the budget, the architectures, the data check, the index and the weights.

Everything that can be checked before the search is checked here and raised
as ``BadInput`` (one line at the CLI edge). Only data in a bucket needs Ray
here: its images are checked on the cluster's nodes.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import asdict

from core import storage
from core.errors import BadInput
from core.experiment import Experiment, TrialContext
from core.metrics import METRICS
from searchspace.config import SearchConfig
from searchspace.data import SkippedFiles, assign_folds, build_index
from searchspace.ray_start import start_ray
from searchspace.tasks import Task
from trainer import weights as weights_mod
from trainer.cache import default_cache_dir, fingerprint
from trainer.images import scan
from trainer.model import check_arch


def architectures(task: Task, archs: str | None = None, image_sizes: str | None = None) -> dict[str, list[int]]:
    """The task's {arch: sizes}, narrowed or replaced by comma-separated names and sizes."""
    sizes = None
    if image_sizes:
        try:
            sizes = sorted({int(s) for s in image_sizes.split(",") if s.strip()})
        except ValueError:
            raise BadInput(f"--image-sizes {image_sizes!r}: give integers such as 128,224") from None
        if not sizes or min(sizes) < 8:
            raise BadInput(f"--image-sizes {image_sizes!r}: sizes must be 8 px or more")
    names = [a.strip() for a in archs.split(",") if a.strip()] if archs else list(task.archs)
    for name in names:
        check_arch(name)
    fallback = sorted({s for v in task.archs.values() for s in v})
    return {name: sizes or task.archs.get(name, fallback) for name in names}


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


def load_dataset(task: Task, data: str):
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


def prepare(task: Task, data: str | None, experiment: Experiment, config: SearchConfig, archs: dict,
            given: SearchConfig | None = None) -> TrialContext:
    """Load and check the data and the weights, write folds/test/experiment.json; returns the trial context.

    ``config.budget`` is complete (the task's values filled in); ``given`` is
    the config as the user gave it (recorded in experiment.json as ``options``).
    """
    b, opts, res = config.budget, config.options, config.resources
    cache_dir = opts.cache_dir or default_cache_dir()
    if data is None:
        if task.default_data is None:
            raise BadInput(f"task {task.name!r} needs --data (a folder or URI with the images)")
        data = task.default_data(cache_dir)
    data = storage.absolute(data)
    dataset = load_dataset(task, data)

    train_paths = dataset.train["path"].tolist()
    test_paths = dataset.test["path"].tolist() if dataset.test is not None else []
    print(f"checking {len(train_paths) + len(test_paths)} images in {data} ...", flush=True)
    in_bucket = storage.is_uri(data) and not data.startswith("file:")
    if in_bucket:
        # A bucket is checked by Ray tasks on the cluster's nodes, not all read
        # through this one: Ray starts here, with the search's own settings.
        start_ray()
    sizes, bad = scan(train_paths + test_paths, cache_dir=cache_dir, cluster=in_bucket)
    if bad and not opts.skip_unreadable:
        listed = "\n".join(f"  {path}: {why}" for path, why in bad.items())
        raise BadInput(f"{len(bad)} unreadable image(s); fix or remove them, or pass --skip-unreadable:\n{listed}")
    if bad:
        print(f"leaving out {len(bad)} unreadable image(s) (--skip-unreadable); listed in experiment.json")
    train = dataset.train[[p not in bad for p in train_paths]]
    index, classes = build_index(train.reset_index(drop=True), b.folds, opts.seed)
    size_of = dict(zip(train_paths + test_paths, sizes))
    mode = opts.pretrained or task.pretrained
    weights = resolve_weights(list(archs), opts.weights_dir, mode, experiment)
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
        experiment=experiment.location, cache_dir=os.path.abspath(cache_dir), metric=task.metric,
        data_key=fingerprint(index["path"].tolist(), [size_of[p] for p in index["path"]]),
        num_classes=len(classes), max_epochs=b.max_epochs, seed=opts.seed, test_key=test_key,
        aug_backend=opts.aug_backend, weights=weights, search_pretrained=opts.search_pretrained,
        tta=task.flip_tta and opts.tta, cpus_per_trial=res.cpus_per_trial, gpu_path_on_cpu=opts.gpu_path_on_cpu)
    recorded = {**(given or config).flat(), "task": task.name, "data": data, "storage": storage.absolute(opts.storage),
                "name": experiment.location.rstrip("/").rsplit("/", 1)[-1], "cache_dir": cache_dir, "archs": archs}
    experiment.write_meta(dict(
        task=task.name, data=data, options=recorded, budget=b.as_dict(), class_names=classes, folds=b.folds,
        seed=opts.seed, metric=task.metric, mode=METRICS[task.metric].mode, pretrained=mode,
        id_column=dataset.id_column, label_column=dataset.label_column,
        skipped_unreadable=bad, context=asdict(ctx), versions=versions(),
        created=datetime.datetime.now().isoformat(timespec="seconds")))
    print(f"{len(index)} training images in {len(classes)} classes, {b.folds} folds"
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


def refold(experiment: Experiment, folds: int) -> TrialContext:
    """Assign K = ``folds`` folds to a prepared experiment (same images, same seed); returns its context.

    Under a time budget K is fixed after a first measurement of what an epoch
    costs, but still before the search (fold 0 is its holdout).
    """
    meta = experiment.meta()
    index = assign_folds(experiment.folds(), folds, int(meta["seed"]))
    experiment.write_folds(index)
    meta["folds"] = folds
    meta["budget"]["folds"] = folds
    experiment.write_meta(meta)
    return TrialContext.from_dict(meta["context"])
