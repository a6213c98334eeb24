"""What an experiment keeps once the search and the cross-fit are over.

Every trial keeps its config and its holdout predictions (its candidate). The
rest of a checkpoint is kept only while it can still matter:

- the optimiser state (``train_state.pt``) only while a trial may resume: it
  goes when the search is over;
- a search trial's weights only if the cross-fit may use them: trials that
  ran their whole schedule (the only ones the cross-fit chooses from; fold 0
  of a cross-fitted config is its search trial's final checkpoint). A trial
  ASHA stopped loses its weights, unless nothing was cross-fitted, when every
  search candidate may be an ensemble member that ``predict`` must load;
- a cross-fit job's own Ray checkpoints: the fold records
  (``candidates/cv-*/folds/<k>/``) hold those weights, and a rerun of the
  cross-fit trains an unfinished fold from the start.

- a search trial's superseded checkpoints (``checkpoint_*`` folders older
  than the one its candidate came from): during the search ``KeepLatest``
  deletes them once no snapshot of the experiment names them; what a resume
  left goes here.

``--keep-checkpoints`` keeps everything the search left.
"""
from __future__ import annotations

import contextlib

import pandas as pd
from ray.tune import Callback

from core import storage
from core.experiment import MODEL_FILE, TRAIN_STATE_FILE, Checkpoint, Experiment


def prune(experiment: Experiment, trials: pd.DataFrame | None = None) -> dict:
    """Apply the policy; returns {"files": removed, "bytes": freed}."""
    trials = experiment.trials() if trials is None else trials
    cross_fitted = any(c.startswith("cv-") for c in experiment.candidate_ids())
    sizes = dict(storage.list_files(experiment.location))
    here = rebase(experiment)
    doomed = []
    for row in trials[trials["checkpoint"].notna()].itertuples():
        checkpoint = Checkpoint(here(row.checkpoint))
        doomed.append(checkpoint.file(TRAIN_STATE_FILE))
        if cross_fitted and not row.completed:
            doomed.append(checkpoint.model)
        kept = checkpoint.location[len(experiment.location.rstrip("/")) + 1:].rstrip("/")
        trial_dir = kept.rsplit("/", 1)[0]
        doomed += [experiment.file(rel) for rel in sizes
                   if rel.startswith(trial_dir + "/checkpoint_") and not rel.startswith(kept + "/")]
    doomed += [experiment.file(rel) for rel in sizes
               if rel.startswith("crossfit-") and rel.rsplit("/", 1)[-1] in (MODEL_FILE, TRAIN_STATE_FILE)]
    freed, removed = 0, 0
    prefix = experiment.location.rstrip("/") + "/"
    for location in doomed:
        # Never outside the experiment: a moved copy must not reach back into the original.
        if location.startswith(prefix) and storage.delete_file(location):
            removed += 1
            freed += sizes.get(location[len(prefix):], 0)
    return {"files": removed, "bytes": freed}


def rebase(experiment: Experiment):
    """location -> the same place in the experiment where it is now (trials.parquet records where it was)."""
    origin = experiment.meta().get("context", {}).get("experiment", experiment.location).rstrip("/")
    now = experiment.location.rstrip("/")

    def here(location: str) -> str:
        return now + location[len(origin):] if location.startswith(origin + "/") else location
    return here


class KeepLatest(Callback):
    """Deletes a search trial's superseded checkpoints, once no snapshot of the experiment can name them.

    Ray does this itself with ``CheckpointConfig(num_to_keep)``, but then it
    snapshots the whole experiment state, every trial so far, each time a trial
    checkpoints: O(trials) of driver time per checkpoint, quadratic over a
    search (bench/driver_cost.py). Here Ray keeps every checkpoint it knows of
    and snapshots on its own period. A checkpoint is superseded when its trial
    reports a newer one (or ends with a newer one); Ray calls ``get_state``
    while it writes each snapshot, after the trials' states, so what was
    superseded before one snapshot is deleted at the next: by then the
    previous snapshot, which names only newer checkpoints, has been written
    too (and, on a bucket, uploaded unless that took a whole period). Should a
    resumed trial still name a deleted checkpoint, searchspace.resume runs it
    again from its first epoch.
    """

    def __init__(self):
        self.latest: dict[str, object] = {}   # trial id -> its newest checkpoint
        self.superseded: list = []            # since the last snapshot
        self.named_by_none: list = []         # superseded before the last snapshot: deleted at the next

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        old = self.latest.get(trial.trial_id)
        if old is not None:
            self.superseded.append(old)
        self.latest[trial.trial_id] = checkpoint

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.latest.pop(trial.trial_id, None)   # its final checkpoint stays: its candidate

    def get_state(self):
        for checkpoint in self.named_by_none:
            _delete(checkpoint)
        self.named_by_none, self.superseded = self.superseded, []
        return None   # nothing to restore: a resumed search starts with nothing to delete

    def on_experiment_end(self, trials, **info):
        for checkpoint in self.named_by_none + self.superseded:
            _delete(checkpoint)
        self.named_by_none, self.superseded = [], []


def _delete(checkpoint) -> None:
    with contextlib.suppress(OSError):   # gone already (a resumed trial's older one): nothing to free
        checkpoint.filesystem.delete_dir(checkpoint.path)
