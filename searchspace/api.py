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
from searchspace import members, time_budget
from searchspace.config import SearchConfig
from searchspace.crossfit import crossfit, slots
from searchspace.finish import final_stage
from searchspace.prepare import architectures, prepare, refold, resolve_weights
from searchspace.progress import Forecast
from searchspace.ray_start import start_ray
from searchspace.resume import resume
from searchspace.storage_policy import prune
from searchspace.tasks import Task, get_task
from searchspace.time_budget import UNLIMITED_TRIALS, Clock, Deadline, Measured, Split, TooSmall, at, clock_text
from searchspace.tuner import build_tuner, finish_search, first_config
from trainer.cache import default_cache_dir
from trainer.classical import parse_kinds


@dataclass(frozen=True)
class Prepared:
    """A search ready to start: its task, its config (the task's budget filled in), its architectures,
    its experiment (folds, test and experiment.json written), the context every trial shares, and the
    config as the user gave it."""

    task: Task
    config: SearchConfig
    archs: dict[str, list[int]]
    experiment: Experiment
    ctx: TrialContext
    given: SearchConfig

    @property
    def cache_dir(self) -> str:
        return self.config.options.cache_dir or default_cache_dir()


def prepare_search(task_name: str, data: str | None, config: SearchConfig) -> Prepared:
    """Check everything that can be checked before the search, write the experiment's index; no trial runs."""
    task = get_task(task_name)
    given = config
    budget = config.budget.over(task.budget)
    if budget.time_budget is not None and config.budget.trials is None:
        budget = dataclasses.replace(budget, trials=UNLIMITED_TRIALS)   # as many as the search's share allows
    config = dataclasses.replace(config, budget=budget)
    opts = config.options
    archs = architectures(task, opts.archs, opts.image_sizes)
    name = opts.name or f"{task_name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    experiment = Experiment(storage.join(storage.absolute(opts.storage), name))
    if experiment.exists():
        raise BadInput(f"{experiment.location}: already exists; pass --resume to continue it, or choose another --name")
    ctx = prepare(task, data, experiment, config, archs, given)
    return Prepared(task, config, archs, experiment, ctx, given)


def prepare_only(task_name: str, data: str | None = None, **options) -> TrialContext:
    """The data step alone (Ray only to check a bucket's images).

    Writes folds.parquet, test.parquet and experiment.json; returns the TrialContext.
    """
    return prepare_search(task_name, data, SearchConfig.from_kwargs(**options)).ctx


def run_search(task_name: str, data: str | None, config: SearchConfig) -> tuple[int, Experiment]:
    """Search, then cross-fit (and, under a time budget, select); (exit code, experiment). The CLI's main path."""
    started = time.time()
    p = prepare_search(task_name, data, config)
    b, opts = p.config.budget, p.config.options
    clock = Clock.start(p.experiment.location, b.time_budget, started)
    start_ray()
    split = None
    if b.time_budget is not None:
        p, split = budget_split(p, clock)
        b = p.config.budget
    trials = "as many trials as the search's share allows" if b.trials == UNLIMITED_TRIALS else f"{b.trials} trials"
    print(f"experiment {p.experiment.location}: {trials}, {', '.join(p.archs)}; "
          f"ASHA max {b.max_epochs} epochs, grace {b.grace_period}, reduction {b.reduction_factor}", flush=True)
    clock.save(phase="search", search_until_s=split.search_until_s if split else None)
    launched = members.launch(record_members(p), p.ctx, p.config.resources)   # beside the search
    start = time.time()
    deadline = Deadline(p.experiment.location, split.search_until_s, first_checkpoint=True) if split else None
    tuner = build_tuner(p.task, p.ctx, p.config, p.archs, p.cache_dir, deadline, forecast(p, clock, split))
    results = tuner.fit()
    ended = split is not None and clock.used() >= split.search_until_s - 1
    members.gather(launched)
    if finish_search(p.experiment, results, p.task.metric, b.max_epochs, start, p.cache_dir, ended) is None:
        return 1, p.experiment
    code = final_stage(p.experiment, p.config, clock)
    tidy(p.experiment, opts.keep_checkpoints)
    return code, p.experiment


def record_members(p: Prepared) -> list[dict]:
    """The classical members this run fits (``--members``), kept in experiment.json for a resumed job."""
    wanted = members.specs(parse_kinds(p.config.options.members), p.archs, p.ctx)
    meta = p.experiment.meta()
    meta["members"] = wanted
    p.experiment.write_meta(meta)
    return wanted


def budget_split(p: Prepared, clock: Clock) -> tuple[Prepared, Split]:
    """Measure the first config, fix K and the search's share (``time_budget.split``).

    When the budget cannot hold one final config of the task's own
    architectures and the user named none, the search narrows to the task's
    ``budget_fallback`` space if that fits. Otherwise BadInput, and the
    experiment just prepared is removed again.
    """
    try:
        try:
            split, epoch = _split(p, clock)
        except TooSmall as refused:
            p, split, epoch = fall_back(p, clock, refused)
    except BadInput:
        storage.delete_dir(p.experiment.location)   # nothing ran: the same --name can be used again
        raise
    b = p.config.budget
    ctx = p.ctx
    if split.folds != b.folds:
        ctx = refold(p.experiment, split.folds)
    config = dataclasses.replace(p.config, budget=dataclasses.replace(b, folds=split.folds))
    print(f"time budget {clock_text(b.time_budget)}: {clock_text(clock.used())} used by the data check; "
          f"one epoch of the first config takes about {epoch:.1f} s on a fold; {split.folds} folds; the search "
          f"gets {clock_text(split.search_s)} (until ~{at(split.search_until_s - clock.used())}), the final models "
          f"{clock_text(split.final_s)}, the selection and the margin {clock_text(split.reserve_s)}", flush=True)
    return dataclasses.replace(p, config=config, ctx=ctx), split


def fall_back(p: Prepared, clock: Clock, refused: TooSmall) -> tuple[Prepared, Split, float]:
    """The search on the task's small space instead of its own, measured and split, when the user named no
    architectures or sizes and it fits (said in one line); else ``refused``, with what the small space needs."""
    small, opts = p.task.budget_fallback, p.given.options
    if not small or opts.archs or opts.image_sizes or small == p.archs:
        raise refused
    sizes = sorted({s for v in small.values() for s in v})
    space = f"{', '.join(small)} at {sizes[0]}-{sizes[-1]} px"
    p = narrow(p, small)
    try:
        split, epoch = _split(p, clock)
    except TooSmall as again:
        raise BadInput(f"{refused}; the small space it falls back to ({space}) needs at least "
                       f"--time-budget {clock_text(again.enough_s)}") from None
    print(f"time budget {clock_text(p.config.budget.time_budget)}: one final config of the {p.task.name} task's "
          f"own architectures needs at least --time-budget {clock_text(refused.enough_s)} on this machine; "
          f"searching the small space that fits instead: {space} (--archs chooses)", flush=True)
    return p, split, epoch


def _split(p: Prepared, clock: Clock) -> tuple[Split, float]:
    """The first config measured, and the split; with the seconds of one of its epochs on a fold."""
    b, res = p.config.budget, p.config.resources
    measured = calibrate(p)
    n_images, n_test = len(p.experiment.folds()), len(p.experiment.test()) if p.experiment.has_test() else 0
    split = time_budget.split(b.time_budget, clock.used(), measured, n_images, n_test, p.ctx.tta, b.max_epochs,
                              slots(res), p.given.budget.folds, b.folds)
    return split, measured.on_fold(n_images, split.folds, n_test, p.ctx.tta).epoch_s


def narrow(p: Prepared, archs: dict[str, list[int]]) -> Prepared:
    """The prepared search on other architectures: their weights resolved before any trial, the context and
    experiment.json (which a resumed job reads) updated."""
    meta = p.experiment.meta()
    weights = resolve_weights(list(archs), p.config.options.weights_dir, meta["pretrained"], p.experiment)
    ctx = dataclasses.replace(p.ctx, weights=weights)
    meta["options"]["archs"] = archs
    meta["context"] = dataclasses.asdict(ctx)
    p.experiment.write_meta(meta)
    return dataclasses.replace(p, archs=archs, ctx=ctx)


def calibrate(p: Prepared) -> Measured:
    """The first config (the portfolio's first, or the task's default recipe) measured on a worker with a
    trial's resources: seconds per training and per predicted image, and a job's set-up."""
    import ray

    from trainer.fit import measure

    res = p.config.resources
    remote = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial)(measure)
    return Measured(**ray.get(remote.remote(first_config(p.task, p.archs, p.ctx), p.ctx)))


def forecast(p: Prepared, clock: Clock, split: Split | None) -> Forecast:
    """The progress line's estimate of the search's and the job's end."""
    b = p.config.budget
    n = slots(p.config.resources)
    trials = None if b.trials == UNLIMITED_TRIALS else b.trials
    if split is not None:
        return Forecast(clock, n, trials, split.search_until_s, lambda epoch_s: split.final_s, split.reserve_s)
    jobs = b.crossfit_top * (b.folds - 1)   # fold 0 is the search trial's own checkpoint
    return Forecast(clock, n, trials, None,
                    lambda epoch_s: time_budget.makespan([b.max_epochs * epoch_s] * jobs, n))


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
    ``tta`` and ``keep_checkpoints``; the search goes on as it was started, and
    a job with a time budget with what is left of it.
    """
    get_task(task_name)
    opts = config.options
    if not opts.name:
        raise BadInput("--resume needs --name (the experiment to continue) and the same --storage")
    exp = Experiment(storage.join(storage.absolute(opts.storage), opts.name))
    code = resume(exp, task_name, config, opts.cache_dir or default_cache_dir())
    tidy(exp, opts.keep_checkpoints)
    return code
