"""Continue a search whose driver died: finished trials stay, unfinished ones resume from their checkpoints."""
from __future__ import annotations

import time

from core import storage
from core.errors import BadInput
from core.experiment import Experiment, TrialContext
from searchspace.config import Resources
from searchspace.crossfit import crossfit
from searchspace.ray_start import start_ray
from searchspace.tuner import finish_search, trainable


def resume(experiment: Experiment, task_name: str, res: Resources, cache_dir: str,
           crossfit_top: int | None = None, tta: bool = True, crossfit_by: str | None = None) -> int:
    """``Tuner.restore`` keeps Tune's and the searcher's state (the Optuna study); then the cross-fit."""
    from ray import tune

    if not experiment.exists():
        raise BadInput(f"{experiment.location}: no experiment to resume; check --name and --storage")
    meta = experiment.meta()
    if meta["task"] != task_name:
        raise BadInput(f"{experiment.location}: is a {meta['task']!r} experiment, not {task_name!r}")
    if experiment.has_trials():
        print(f"{experiment.location}: the search had finished; going on with the cross-fit")
        start_ray()
        return crossfit(experiment, res, crossfit_top, tta, crossfit_by)
    fs, root = storage.resolve(experiment.location)
    if not tune.Tuner.can_restore(root, storage_filesystem=fs):
        raise BadInput(f"{experiment.location}: the search never started (no Ray Tune state); "
                       "start it again without --resume")
    start_ray()
    print(f"resuming {experiment.location}", flush=True)
    start = time.time()
    ctx = TrialContext.from_dict({**meta["context"], "experiment": experiment.location})
    # Unfinished trials continue from their checkpoints (one whose checkpoint is gone starts
    # again: tuner.restartable); a trial that had failed stays failed.
    tuner = tune.Tuner.restore(root, trainable(ctx, res), resume_unfinished=True, resume_errored=False,
                               restart_errored=False, storage_filesystem=fs)
    grid = tuner.fit()
    trials = finish_search(experiment, grid, meta["metric"], meta["budget"]["max_epochs"], start, cache_dir)
    return 1 if trials is None else crossfit(experiment, res, crossfit_top, tta, crossfit_by)
