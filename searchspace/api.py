"""The Python API under ``python -m searchspace.run``, for notebooks.

```python
import searchspace
exp = searchspace.search("paddy", data="/kaggle/input/paddy-disease-classification",
                         archs="convnext_small.fb_in22k,vit_small_patch16_224", trials=20,
                         weights_dir="/kaggle/input/timm-weights")
exp.trials()                 # trials.parquet as a DataFrame
```

Keyword arguments are the CLI's options with underscores; every check of
the CLI applies (``BadInput`` for bad input).
"""
from __future__ import annotations

import datetime
import os
import time

from searchspace.crossfit import crossfit
from searchspace.prepare import Resources, architectures, budget, prepare
from searchspace.resume import resume
from searchspace.storage_policy import prune
from searchspace.tasks import get_task
from searchspace.tuner import build_tuner, finish_search
from trainer import storage
from trainer.cache import default_cache_dir
from trainer.errors import BadInput
from trainer.experiment import DEFAULT_RUNS, Experiment

RESOURCE_KEYS = ("cpus_per_trial", "gpus_per_trial", "max_concurrent", "max_failures")


def start_ray() -> None:
    # Short trials checkpoint every few seconds by design; Ray warns about that.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}, log_to_driver=True)


def _resources(options: dict) -> Resources:
    return Resources(**{k: options.pop(k) for k in RESOURCE_KEYS if k in options}).check()


def crossfit_options(options: dict) -> dict:
    """The CLI's options that --crossfit-only uses."""
    keep = ("crossfit_top", "crossfit_by", "keep_checkpoints") + RESOURCE_KEYS
    return {**{k: options[k] for k in keep if k in options}, "tta": not options.get("no_tta", False)}


def resume_options(options: dict) -> dict:
    keep = ("name", "storage", "cache_dir", "crossfit_top", "crossfit_by", "keep_checkpoints") + RESOURCE_KEYS
    return {**{k: options[k] for k in keep if k in options}, "tta": not options.get("no_tta", False)}


OPTIONS = {"storage", "name", "seed", "cache_dir", "trials", "max_epochs", "grace_period", "reduction_factor",
           "folds", "crossfit_top", "archs", "image_sizes", "aug_backend", "weights_dir", "pretrained",
           "search_pretrained", "skip_unreadable", "tta", "crossfit_by", "portfolio", "objective",
           "keep_checkpoints", *RESOURCE_KEYS}


def _prepare(task_name: str, data: str | None, options: dict):
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(OPTIONS))}")
    task = get_task(task_name)
    options = {"storage": DEFAULT_RUNS, "cache_dir": default_cache_dir(), "seed": 0, **options}
    res = _resources(options)
    b = budget(task, **{k: options.pop(k, None) for k in ("trials", "max_epochs", "grace_period",
                                                          "reduction_factor", "folds", "crossfit_top")})
    archs = architectures(task, options.pop("archs", None), options.pop("image_sizes", None))
    root = storage.absolute(options.pop("storage"))
    name = options.pop("name", None) or f"{task_name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    experiment = Experiment(storage.join(root, name))
    if experiment.exists():
        raise BadInput(f"{experiment.location}: already exists; pass --resume to continue it, or choose another --name")
    cache_dir, seed = options.pop("cache_dir"), options.pop("seed")
    recorded = {**options, **{k: getattr(res, k) for k in RESOURCE_KEYS}, "task": task_name, "data": data,
                "storage": root, "name": name, "cache_dir": cache_dir, "seed": seed, "archs": archs}
    ctx = prepare(task, task_name, data, experiment, b, archs, cache_dir=cache_dir, seed=seed,
                  pretrained=options.get("pretrained"), weights_dir=options.get("weights_dir"),
                  search_pretrained=options.get("search_pretrained", False),
                  skip_unreadable=options.get("skip_unreadable", False), aug_backend=options.get("aug_backend"),
                  tta=options.get("tta", True), cpus_per_trial=res.cpus_per_trial, options=recorded)
    return task, b, archs, res, experiment, ctx, cache_dir, seed


def prepare_only(task_name: str, data: str | None = None, **options):
    """The data step alone (Ray only to check a bucket's images).

    Writes folds.parquet, test.parquet and experiment.json; returns the TrialContext.
    """
    return _prepare(task_name, data, options)[5]


def run_search(task_name: str, data: str | None = None, **options) -> tuple[int, Experiment]:
    """Search, then cross-fit; (exit code, experiment). The CLI's main path."""
    task, b, archs, res, experiment, ctx, cache_dir, seed = _prepare(task_name, data, options)
    start_ray()
    print(f"experiment {experiment.location}: {b['trials']} trials, {', '.join(archs)}; "
          f"ASHA max {b['max_epochs']} epochs, grace {b['grace_period']}, reduction {b['reduction_factor']}",
          flush=True)
    start = time.time()
    results = build_tuner(task, ctx, b, archs, res, seed, cache_dir, options.get("portfolio", True),
                          options.get("objective", "own")).fit()
    if finish_search(experiment, results, task.METRIC, b["max_epochs"], start, cache_dir) is None:
        return 1, experiment
    code = crossfit(experiment, res, b["crossfit_top"], options.get("tta", True), options.get("crossfit_by"))
    tidy(experiment, options.get("keep_checkpoints", False))
    return code, experiment


def tidy(experiment: Experiment, keep_checkpoints: bool) -> None:
    """The storage policy, unless --keep-checkpoints; says what it freed."""
    if keep_checkpoints or not experiment.has_trials():
        return
    freed = prune(experiment)
    if freed["files"]:
        print(f"storage: removed {freed['files']} checkpoint file(s) that nothing can use any more "
              f"({freed['bytes'] / 1e6:.1f} MB; --keep-checkpoints keeps them)")


def search(task: str, data: str | None = None, **options) -> Experiment:
    """Run the search and the cross-fit; returns the experiment. Raises RuntimeError if it did not complete."""
    code, experiment = run_search(task, data, **options)
    if code != 0:
        raise RuntimeError(f"{experiment.location}: the search or the cross-fit did not complete (see the output); "
                           "searchspace.crossfit_only() retries the unfinished folds")
    return experiment


def crossfit_only(task_name: str, experiment: str | None, crossfit_top: int | None = None, tta: bool = True,
                  crossfit_by: str | None = None, keep_checkpoints: bool = False, **resources) -> int:
    """Cross-fit an existing experiment; finished folds are kept."""
    get_task(task_name)
    res = Resources(**resources).check()
    if not experiment:
        raise BadInput("--crossfit-only needs --experiment (the experiment folder or URI)")
    exp = Experiment(storage.absolute(experiment))
    if not exp.has_trials():
        raise BadInput(f"{exp.location}: no trials.parquet; run the search first")
    start_ray()
    code = crossfit(exp, res, crossfit_top, tta, crossfit_by)
    tidy(exp, keep_checkpoints)
    return code


def resume_search(task_name: str, name: str | None, storage: str = DEFAULT_RUNS, cache_dir: str | None = None,
                  crossfit_top: int | None = None, tta: bool = True, crossfit_by: str | None = None,
                  keep_checkpoints: bool = False, **resources) -> int:
    get_task(task_name)
    res = Resources(**resources).check()
    if not name:
        raise BadInput("--resume needs --name (the experiment to continue) and the same --storage")
    exp = Experiment(_under(storage, name))
    code = resume(exp, task_name, res, cache_dir or default_cache_dir(), start_ray, crossfit_top, tta, crossfit_by)
    tidy(exp, keep_checkpoints)
    return code


def _under(root: str, name: str) -> str:
    """``name`` under the storage root (a folder or URI); a module function, as ``storage`` is shadowed above."""
    return storage.join(storage.absolute(root), name)
