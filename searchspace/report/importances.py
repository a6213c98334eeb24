"""Optuna hyperparameter importances: from the search's own study, or a study rebuilt from trials.parquet."""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd

from core import storage
from core.experiment import STUDY_FILE, TRIALS_FILE
from searchspace.report.load import LOG_SCALE, Experiment, hyperparameters, is_categorical, python_value, sort_key

# Optuna storage files that the search may leave in the experiment, first found wins.
STUDY_FILES = (STUDY_FILE,)
# The source of a study rebuilt from the trials rather than read from the search's storage.
REBUILT = TRIALS_FILE   # the study was rebuilt from trials.parquet


class Study(NamedTuple):
    importances: dict[str, float]   # normalised importance per hyperparameter; empty when there is nothing to measure
    evaluator: str                  # the evaluator's name, or the reason there are no importances
    finished: int                   # finished trials
    source: str                     # the study's file in the experiment, or REBUILT

    @property
    def from_storage(self) -> bool:
        """Whether the study is the search's own (the experiment holds its Optuna storage)."""
        return self.source != REBUILT


def study_importances(exp: Experiment) -> Study:
    """(importances, evaluator or the reason there are none, finished trials, the study's source file).

    The search's own Optuna storage when the experiment has one, else a study
    rebuilt from trials.parquet. The storage file is read from a private local
    copy: that works for a bucket too and never touches the search's file.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="report-study-") as tmp:
        for name in STUDY_FILES:
            if name not in exp.files:
                continue
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(storage.read_bytes(storage.join(exp.location, name)))
            if name.endswith(".log"):
                store = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                    path, lock_obj=optuna.storages.journal.JournalFileOpenLock(path)))
            else:
                store = f"sqlite:///{path}"
            names = optuna.get_all_study_names(store)
            if names:
                study = optuna.load_study(study_name=exp.name if exp.name in names else names[0], storage=store)
                return Study(*importances(study), name)
        return Study(*importances(study_from_trials(exp)), REBUILT)


def param_importance(imp: dict[str, float], param: str) -> float:
    """A trials.parquet column's importance; image_size is image_size_<arch> in the search's own study."""
    if param in imp:
        return imp[param]
    return max((v for k, v in imp.items() if k.startswith(f"{param}_")), default=-1.0)


def study_from_trials(exp: Experiment):
    """An in-memory study: one finished trial per row of trials.parquet, value = its best score."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    ok = exp.trials[(exp.trials["status"] == "ok") & exp.trials["best_score"].notna()]
    distributions = {}
    for c in hyperparameters(ok):
        values = ok[c].dropna()
        if is_categorical(values):
            distributions[c] = CategoricalDistribution(sorted({python_value(v) for v in values}, key=sort_key))
        elif pd.api.types.is_integer_dtype(values):
            distributions[c] = IntDistribution(int(values.min()), int(values.max()))
        else:
            low, high = float(values.min()), float(values.max())
            distributions[c] = FloatDistribution(low, high, log=c in LOG_SCALE and low > 0)
    study = optuna.create_study(direction="maximize" if exp.maximize else "minimize",
                                study_name=exp.name)
    for _, row in ok.iterrows():
        params = {c: python_value(row[c]) for c in distributions if pd.notna(row[c])}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={c: distributions[c] for c in params}, value=float(row["best_score"])))
    return study


def importances(study) -> tuple[dict[str, float], str, int]:
    """(normalised importance per hyperparameter, evaluator name, finished trials).

    The dict is empty, and the name a reason, when there is nothing to measure.

    fANOVA (scikit-learn's random forest, runs offline) rather than Optuna 5's
    default PED-ANOVA: PED-ANOVA compares the top 10 % of trials with the rest,
    which is one or two trials in a search of a few dozen.
    """
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return {}, f"needs at least 2 finished trials (has {len(done)})", len(done)
    if len({t.value for t in done}) < 2:
        return {}, "every finished trial has the same score", len(done)
    errors = []
    for evaluator in (optuna.importance.FanovaImportanceEvaluator(seed=0),
                      optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except Exception as e:  # an evaluator that cannot handle this study: try the next
            errors.append(f"{type(evaluator).__name__}: {e}")
            continue
        found = {k: float(v) for k, v in found.items() if np.isfinite(v)}
        if found:
            return found, type(evaluator).__name__.removesuffix("ImportanceEvaluator"), len(done)
    return {}, "; ".join(errors) or "no hyperparameter varies across finished trials", len(done)
