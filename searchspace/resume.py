"""Continue a search whose driver died: finished trials stay, unfinished ones resume from their checkpoints."""
from __future__ import annotations

import time

from core import storage
from core.errors import BadInput
from core.experiment import Experiment, TrialContext
from searchspace.config import SearchConfig
from searchspace.finish import final_stage
from searchspace.ray_start import start_ray
from searchspace.searcher import restore_spare
from searchspace.time_budget import Clock, clock_text
from searchspace.tuner import finish_search, trainable


def resume(experiment: Experiment, task_name: str, config: SearchConfig, cache_dir: str) -> int:
    """``Tuner.restore`` keeps Tune's and the searcher's state (the Optuna study); then the final stage.

    A job with a time budget goes on with what is left of it: the clock counts
    on from what the killed session had used (the time in between is not
    counted), the search keeps its deadline, and a final stage already planned
    trains its remaining folds as planned.
    """
    from ray import tune

    if not experiment.exists():
        raise BadInput(f"{experiment.location}: no experiment to resume; check --name and --storage")
    meta = experiment.meta()
    if meta["task"] != task_name:
        raise BadInput(f"{experiment.location}: is a {meta['task']!r} experiment, not {task_name!r}")
    clock = Clock.resume(experiment)
    if clock.budget_s is not None:
        print(f"time budget {clock_text(clock.budget_s)}: {clock_text(clock.used())} used before the resume, "
              f"{clock_text(max(0.0, clock.left()))} left", flush=True)
    if experiment.has_trials():
        print(f"{experiment.location}: the search had finished; going on with the cross-fit")
        start_ray()
        return final_stage(experiment, config, clock)
    fs, root = storage.resolve(experiment.location)
    if not tune.Tuner.can_restore(root, storage_filesystem=fs):
        raise BadInput(f"{experiment.location}: the search never started (no Ray Tune state); "
                       "start it again without --resume")
    repaired = restore_spare(experiment)
    if repaired:
        print(f"{experiment.location}: Tune's snapshot in storage was cut by the kill ({', '.join(repaired)}); "
              "put back from its whole copy", flush=True)
    start_ray()
    print(f"resuming {experiment.location}", flush=True)
    start = time.time()
    ctx = TrialContext.from_dict({**meta["context"], "experiment": experiment.location})
    # Unfinished trials continue from their checkpoints (one whose checkpoint is gone starts
    # again: tuner.restartable); a trial that had failed stays failed. The search's deadline
    # (time_budget.Deadline, restored with it) finds this session's clock.
    tuner = tune.Tuner.restore(root, trainable(ctx, config.resources), resume_unfinished=True,
                               resume_errored=False, restart_errored=False, storage_filesystem=fs)
    grid = tuner.fit()
    until = clock.state.get("search_until_s")
    ended = until is not None and clock.used() >= until - 1
    trials = finish_search(experiment, grid, meta["metric"], meta["budget"]["max_epochs"], start, cache_dir, ended)
    return 1 if trials is None else final_stage(experiment, config, clock)
