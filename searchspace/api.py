"""The driver: the Python API under ``python -m searchspace.run``, for notebooks.

```python
import searchspace
exp = searchspace.search("paddy", data="/kaggle/input/paddy-disease-classification",
                         archs="convnext_small.fb_in22k,vit_small_patch16_224", trials=20,
                         weights_dir="/kaggle/input/timm-weights")
exp.trials()                 # trials.parquet as a DataFrame
```

Keyword arguments are the CLI's options with underscores
(``searchspace.config``); every check of the CLI applies (``BadInput`` for bad input).
"""
from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass

from core import storage
from core.errors import BadInput
from core.experiment import Experiment, TrialContext
from searchspace.config import SearchConfig
from searchspace.crossfit import crossfit
from searchspace.prepare import architectures, prepare
from searchspace.ray_start import start_ray
from searchspace.resume import resume
from searchspace.storage_policy import prune
from searchspace.tasks import Task, get_task
from searchspace.tuner import build_tuner, finish_search
from trainer.cache import default_cache_dir


@dataclass(frozen=True)
class Prepared:
    """A search ready to start: its task, its config (the task's budget filled in), its architectures,
    its experiment (folds, test and experiment.json written) and the context every trial shares."""

    task: Task
    config: SearchConfig
    archs: dict[str, list[int]]
    experiment: Experiment
    ctx: TrialContext

    @property
    def cache_dir(self) -> str:
        return self.config.options.cache_dir or default_cache_dir()


def prepare_search(task_name: str, data: str | None, config: SearchConfig) -> Prepared:
    """Check everything that can be checked before the search, write the experiment's index; no trial runs."""
    task = get_task(task_name)
    config = dataclasses.replace(config, budget=config.budget.over(task.budget))
    opts = config.options
    archs = architectures(task, opts.archs, opts.image_sizes)
    name = opts.name or f"{task_name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    experiment = Experiment(storage.join(storage.absolute(opts.storage), name))
    if experiment.exists():
        raise BadInput(f"{experiment.location}: already exists; pass --resume to continue it, or choose another --name")
    ctx = prepare(task, data, experiment, config, archs)
    return Prepared(task, config, archs, experiment, ctx)


def prepare_only(task_name: str, data: str | None = None, **options) -> TrialContext:
    """The data step alone (Ray only to check a bucket's images).

    Writes folds.parquet, test.parquet and experiment.json; returns the TrialContext.
    """
    return prepare_search(task_name, data, SearchConfig.from_kwargs(**options)).ctx


def run_search(task_name: str, data: str | None, config: SearchConfig) -> tuple[int, Experiment]:
    """Search, then cross-fit; (exit code, experiment). The CLI's main path."""
    p = prepare_search(task_name, data, config)
    b, opts = p.config.budget, p.config.options
    start_ray()
    print(f"experiment {p.experiment.location}: {b.trials} trials, {', '.join(p.archs)}; "
          f"ASHA max {b.max_epochs} epochs, grace {b.grace_period}, reduction {b.reduction_factor}", flush=True)
    start = time.time()
    results = build_tuner(p.task, p.ctx, p.config, p.archs, p.cache_dir).fit()
    if finish_search(p.experiment, results, p.task.metric, b.max_epochs, start, p.cache_dir) is None:
        return 1, p.experiment
    code = crossfit(p.experiment, p.config.resources, b.crossfit_top, opts.tta, opts.crossfit_by)
    tidy(p.experiment, opts.keep_checkpoints)
    return code, p.experiment


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
    code, experiment = run_search(task, data, SearchConfig.from_kwargs(**options))
    if code != 0:
        raise RuntimeError(f"{experiment.location}: the search or the cross-fit did not complete (see the output); "
                           "searchspace.crossfit_only() retries the unfinished folds")
    return experiment


def crossfit_only(task_name: str, experiment: str | None, config: SearchConfig) -> int:
    """Cross-fit an existing experiment; finished folds are kept.

    Uses the config's resources, ``crossfit_top``, ``crossfit_by``, ``tta``
    and ``keep_checkpoints``; the experiment keeps the rest as it was searched.
    """
    get_task(task_name)
    if not experiment:
        raise BadInput("--crossfit-only needs --experiment (the experiment folder or URI)")
    exp = Experiment(storage.absolute(experiment))
    if not exp.has_trials():
        raise BadInput(f"{exp.location}: no trials.parquet; run the search first")
    opts = config.options
    start_ray()
    code = crossfit(exp, config.resources, config.budget.crossfit_top, opts.tta, opts.crossfit_by)
    tidy(exp, opts.keep_checkpoints)
    return code


def resume_search(task_name: str, config: SearchConfig) -> int:
    """Continue the search ``config.options.name`` under ``config.options.storage``, then cross-fit.

    Uses the config's resources, ``cache_dir``, ``crossfit_top``, ``crossfit_by``,
    ``tta`` and ``keep_checkpoints``; the search goes on as it was started.
    """
    get_task(task_name)
    opts = config.options
    if not opts.name:
        raise BadInput("--resume needs --name (the experiment to continue) and the same --storage")
    exp = Experiment(storage.join(storage.absolute(opts.storage), opts.name))
    code = resume(exp, task_name, config.resources, opts.cache_dir or default_cache_dir(),
                  config.budget.crossfit_top, opts.tta, opts.crossfit_by)
    tidy(exp, opts.keep_checkpoints)
    return code
