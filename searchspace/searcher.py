"""Ray's OptunaSearch, telling the study what Tune really did with each trial; and Tune's snapshot, kept whole.

Ray's ``OptunaSearch.on_trial_complete`` tells the study COMPLETE, with the
last reported value, for a trial that the scheduler (ASHA) stopped. TPE then
ranks an epoch-1 score of a stopped trial beside the final scores of trials
that ran their whole schedule, as if both were final. Here a trial that ends
before its schedule's last epoch without an error is told PRUNED; Optuna keeps
its intermediate values (reported every epoch by ``on_trial_result``) and TPE
treats it the way it treats pruned trials. Failed trials stay FAIL.

Each study trial carries its Tune trial id (user attribute ``tune_trial_id``),
so that what Tune did and what the study holds can be matched afterwards
(``searchspace.tuner.close_study``).
"""
from __future__ import annotations

import io
import logging
import os
import zipfile

from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.search_generator import SearchGenerator

from core import storage
from core.experiment import Experiment

logger = logging.getLogger(__name__)


class TruthfulOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that records scheduler-stopped trials as PRUNED.

    ``max_t``: the number of results (epochs) of a trial that runs its whole
    schedule, the scheduler's ``max_t``.
    """

    def __init__(self, *args, max_t: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_t = max_t

    def suggest(self, trial_id: str):
        params = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict):
        if trial_id in self._ot_trials:   # else: told already (see on_trial_complete)
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id not in self._ot_trials:
            # Told already and its handle dropped: a trial started again from its first epoch
            # on --resume, after its restore failed and the study recorded it as FAIL.
            logger.info("trial %s: the study was told its outcome already", trial_id)
            return
        try:
            self._tell(trial_id, result, error)
        finally:
            # A told trial's Optuna handle is never used again (the study holds the trial), but
            # Tune pickles this searcher's __dict__ into every experiment snapshot: kept handles
            # made each snapshot cost O(trials so far), ~110 ms at 1,000 trials (bench/driver_cost.py).
            self._ot_trials.pop(trial_id, None)

    def _tell(self, trial_id: str, result: dict | None, error: bool) -> None:
        stopped = (not error and result is not None and trial_id in self._ot_trials
                   and trial_id not in self._completed_trials
                   and int(result.get(TRAINING_ITERATION, self.max_t)) < self.max_t)
        if not stopped:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        try:
            # The result on which the scheduler decided to stop reaches the searcher only
            # here, not through on_trial_result: record it as the last intermediate value.
            if self.metric in result:
                ot_trial.report(result[self.metric], int(result[TRAINING_ITERATION]))
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        except Exception as exc:  # as Ray does: never let the study break the run
            logger.warning(exc)
        self._completed_trials.add(trial_id)


# --- Tune's snapshot, kept whole ----------------------------------------------------------

def snapshot_names(session_str: str) -> list[str]:
    """The files of one Tune snapshot in the driver's staging folder (TuneController.save_to_dir)."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search.searcher import Searcher
    return [TuneController.CKPT_FILE_TMPL.format(session_str), SearchGenerator.CKPT_FILE_TMPL.format(session_str),
            Searcher.CKPT_FILE_TMPL.format(session_str)]


class SparedSearchGenerator(SearchGenerator):
    """Ray's ``SearchGenerator`` that also keeps each snapshot of the search whole, in one file.

    Tune writes a snapshot (the trials, the search's counter and the sampler's
    state) in a local staging folder, then copies it to the storage file by
    file with plain writes. A driver killed during that copy leaves a cut
    file; ``Tuner.restore`` then fails to load it and starts the whole search
    again ("Restarting experiment"), and nothing names the trials that ran.
    This generator is saved last, after the snapshot's other files are
    complete and before the copy starts: it writes them together into
    ``spare`` (a zip, written then moved, so never cut), and ``restore_spare``
    puts them back before a ``--resume``. ``spare`` is None where the storage
    is a bucket (``storage.is_local``): an object store commits each file whole.
    """

    def __init__(self, searcher, spare: str | None):
        super().__init__(searcher)
        self.spare = spare

    def save_to_dir(self, dirpath: str, session_str: str):
        super().save_to_dir(dirpath, session_str)
        if self.spare is None:
            return
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            for name in snapshot_names(session_str):
                if os.path.exists(os.path.join(dirpath, name)):
                    z.write(os.path.join(dirpath, name), name)
        storage.write_bytes(self.spare, buffer.getvalue())


def restore_spare(experiment: Experiment) -> list[str]:
    """Put the newest whole snapshot back over the storage's copy (before ``Tuner.restore``); the files that
    differed, which a kill during Tune's copy had cut (or not yet written)."""
    if not storage.is_local(experiment.location) or not storage.exists(experiment.tune_spare_file):
        return []
    repaired = []
    with zipfile.ZipFile(io.BytesIO(storage.read_bytes(experiment.tune_spare_file))) as z:
        for name in z.namelist():
            data, there = z.read(name), experiment.file(name)
            if not storage.exists(there) or storage.read_bytes(there) != data:
                storage.write_bytes(there, data)
                repaired.append(name)
    return repaired
