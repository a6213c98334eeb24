"""Ray's OptunaSearch, telling the study what Tune really did with each trial.

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

import logging

from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

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
