"""Reading an experiment for the report: the files the search, the cross-fit and ``select`` wrote.

The contract's files are read through ``core.experiment`` (imported as
``contract``: this module's own ``Experiment`` is the report's view of one).
Ray's own trial folders (``result.json``) are read here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core import experiment as contract
from core import storage
from core.errors import BadInput
from core.metrics import METRICS
from ensemble_builder.stacking import stacked_proba

# trials.parquet columns that are results, not hyperparameters.
RESULT_COLUMNS = {"trial_id", "metric", "best_score", "best_epoch", "epochs_run", "stopped_early",
                  "seconds", "status", "error", "checkpoint", "score", "completed", "ensemble_gain",
                  "crossfit_rank", "crossfit_gain", "crossfit_reason"}
LOG_SCALE = {"lr", "weight_decay"}
MAX_CATEGORIES = 8     # an int column with more distinct values is numeric


@dataclass
class Experiment:
    location: str
    meta: dict                  # experiment.json
    trials: pd.DataFrame        # trials.parquet
    curves: pd.DataFrame        # one row per trial and epoch, from the Ray trial folders' result.json
    crossfit: pd.DataFrame      # one row per cross-fit fold job: trial_id, seconds, epochs
    ensemble: dict | None       # ensemble/ensemble.json
    files: list[str] = field(default_factory=list)   # every file under the experiment, relative

    @property
    def store(self) -> contract.Experiment:
        """The experiment's files, through the contract."""
        return contract.Experiment(self.location)

    @property
    def name(self) -> str:
        return storage.resolve(self.location)[1].rstrip("/").rsplit("/", 1)[-1]

    @property
    def metric(self) -> str:
        return self.meta.get("metric") or str(self.trials["metric"].dropna().iloc[0])

    @property
    def maximize(self) -> bool:
        return self.meta.get("mode", "max") == "max"

    @property
    def max_epochs(self) -> int:
        return int(self.meta.get("budget", {}).get("max_epochs") or self.trials["epochs_run"].max() or 1)

    def scored(self) -> pd.DataFrame:
        """The trials that have a best score."""
        return self.trials[self.trials["best_score"].notna()]

    def ranked(self) -> pd.DataFrame:
        """The scored trials, best first."""
        return self.scored().sort_values("best_score", ascending=not self.maximize)


def load(location: str) -> Experiment:
    store = contract.Experiment(location)
    if not store.exists():
        raise BadInput(f"{location}: not an experiment (no experiment.json); check --experiment")
    if not store.has_trials():
        raise BadInput(f"{location}: no trials.parquet; the search has not finished "
                       "(run or resume `python -m searchspace.run` first)")
    meta = store.meta()
    trials = store.trials()
    if trials.empty:
        raise BadInput(f"{store.trials_file}: no trials; run the search again")
    files = [rel for rel, _ in storage.list_files(location)]
    curves, crossfit = read_results(location, files)
    ensemble = store.ensemble() if store.has_ensemble() else None
    return Experiment(location, meta, trials, curves, crossfit, ensemble, files)


def read_results(location: str, files: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-epoch rows of the search trials, and one row per cross-fit fold job."""
    search, crossfit = [], []
    for rel in files:
        parts = rel.split("/")
        if parts[-1] != "result.json" or not parts[-2].startswith("train_trial_"):
            continue
        lines = [json.loads(line) for line in storage.read_bytes(storage.join(location, rel)).splitlines()
                 if line.strip()]
        if len(parts) == 2:
            search.extend(lines)
        elif len(parts) == 3 and parts[0].startswith("crossfit-") and lines:
            last = lines[-1]
            crossfit.append(dict(trial_id=last.get("trial_id"), seconds=last.get("time_total_s"),
                                 epochs=last.get("epoch", last.get("training_iteration"))))
    curves = pd.DataFrame(search)
    if not curves.empty and {"trial_id", "epoch"} <= set(curves):
        # A trial retried from a checkpoint reports some epochs twice: keep the latest.
        curves = (curves.drop(columns=["config"], errors="ignore")
                  .drop_duplicates(["trial_id", "epoch"], keep="last").sort_values(["trial_id", "epoch"]))
    else:
        curves = pd.DataFrame(columns=["trial_id", "epoch"])
    return curves.reset_index(drop=True), pd.DataFrame(crossfit, columns=["trial_id", "seconds", "epochs"])


def blended_oof(exp: Experiment, members: list[dict], stacking: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, the members' blend) over the samples every member predicted, by sample_id: their weighted
    mean, or the ``stacking`` model of ensemble.json on their probabilities."""
    store = exp.store
    index = store.folds()
    tables, weights = [], []
    for m in members:
        candidate = store.candidate(m["candidate"])
        if not candidate.has_oof():
            raise BadInput(f"{candidate.file('oof.parquet')}: missing; the ensemble names a candidate that is gone "
                           "(run `python -m ensemble_builder select` again)")
        tables.append(candidate.oof())
        weights.append(float(m["weight"]))
    common = set.intersection(*(set(t.column("sample_id").to_pylist()) for t in tables))
    order = [s for s in index["sample_id"] if s in common]
    if stacking:
        P = stacked_proba(stacking, {m["candidate"]: contract.aligned(t, order) for m, t in zip(members, tables)})
    else:
        w = np.array(weights) / sum(weights)
        P = sum(wi * contract.aligned(t, order) for wi, t in zip(w, tables))
    y = index.set_index("sample_id").loc[order, "label"].to_numpy()
    return y, P


def candidate_pool(exp: Experiment) -> tuple[pd.DataFrame, np.ndarray]:
    """The candidates ``select`` chose among (all of them before it ran), one row each: kind, what it is,
    out-of-fold score, what it cost (seconds of training or fitting, every fold), its weight in the ensemble;
    and the share of images each pair gets wrong together, over the images every candidate predicted."""
    store = exp.store
    ids = list((exp.ensemble or {}).get("candidates") or store.candidate_ids())
    weights = {m["candidate"]: float(m["weight"]) for m in (exp.ensemble or {}).get("members", [])}
    labels = store.folds().set_index("sample_id")["label"]
    trial_seconds = exp.trials.set_index("trial_id")["seconds"].to_dict() if "seconds" in exp.trials else {}
    score = METRICS[exp.metric].fn
    rows, wrong, common = [], {}, None
    for cid in ids:
        candidate = store.candidate(cid)
        if not candidate.has_oof():
            continue
        oof = candidate.oof()
        order = oof.column("sample_id").to_pylist()
        P, y = contract.probs_array(oof), labels.loc[order].to_numpy()
        config = candidate.config()
        rows.append(dict(candidate=cid, kind=config.get("kind", "network"),
                         model=f"{config.get('arch') or 'pixels'}@{config.get('image_size', '?')}",
                         images=len(order), score=float(score(y, P)),
                         seconds=_cost(candidate, config, trial_seconds), weight=weights.get(cid, 0.0)))
        wrong[cid] = pd.Series(P.argmax(1) != y, index=order)
        common = set(order) if common is None else common & set(order)
    table = pd.DataFrame(rows, columns=["candidate", "kind", "model", "images", "score", "seconds", "weight"])
    shared = [s for s in labels.index if s in (common or set())]
    W = np.array([wrong[c].loc[shared].to_numpy() for c in table["candidate"]], float) if shared else np.zeros((0, 0))
    overlap = W @ W.T / len(shared) if shared else np.zeros((len(table), len(table)))
    return table, overlap


def _cost(candidate, config: dict, trial_seconds: dict) -> float | None:
    """Seconds a candidate cost: a classical member's fit (every fold), or its networks' fold jobs (fold 0 may
    be its search trial's, which recorded its own seconds)."""
    if config.get("seconds") is not None:
        return float(config["seconds"])
    if not candidate.exists():
        return trial_seconds.get(candidate.cid)
    total = 0.0
    for record in candidate.members()["members"]:
        seconds = record.get("seconds")
        if seconds is None:
            seconds = trial_seconds.get(candidate.cid.removeprefix("cv-"))
        if seconds is None:
            return None
        total += float(seconds)
    return total


# --- hyperparameter columns ----------------------------------------------------------

def hyperparameters(trials: pd.DataFrame) -> list[str]:
    """Columns of trials.parquet that are hyperparameters and vary between trials."""
    return [c for c in trials if c not in RESULT_COLUMNS and trials[c].dropna().astype(str).nunique() > 1]


def is_categorical(s: pd.Series) -> bool:
    s = s.dropna()
    if s.dtype == bool or s.dtype == object or pd.api.types.is_string_dtype(s):
        return True
    return pd.api.types.is_integer_dtype(s) and s.nunique() <= MAX_CATEGORIES


def is_text(s: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s))


def python_value(v):
    return v.item() if isinstance(v, np.generic) else v


def sort_key(v) -> tuple:
    """Numbers in numeric order, then text: choices of one column may mix both."""
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


# --- numbers from the experiment --------------------------------------------------

def asha_savings(exp: Experiment) -> dict:
    """Trial-epochs run against every trial running max_epochs, and the seconds that saved."""
    ok = exp.trials[(exp.trials["status"] == "ok") & (exp.trials["epochs_run"] > 0)]
    full = len(ok) * exp.max_epochs
    run = int(ok["epochs_run"].sum())
    per_epoch = ok["seconds"].fillna(0) / ok["epochs_run"]
    saved_s = float((per_epoch * (exp.max_epochs - ok["epochs_run"]).clip(lower=0)).sum())
    spent_s = float(ok["seconds"].fillna(0).sum())
    return dict(trials=len(ok), stopped=int(ok["stopped_early"].sum()), max_epochs=exp.max_epochs,
                epochs_full=full, epochs_run=run, epochs_saved=full - run,
                seconds_run=spent_s, seconds_saved=saved_s)


def search_wall_seconds(curves: pd.DataFrame) -> float | None:
    if curves.empty or not {"timestamp", "time_total_s"} <= set(curves):
        return None
    start = (curves["timestamp"] - curves["time_total_s"]).min()
    return float(curves["timestamp"].max() - start)


def cv_score(ens: dict, predictor: str) -> tuple[float, float] | None:
    """(pooled cross-validated score, std over folds) of a predictor in ensemble.json, if it has one."""
    est = (ens.get("cv") or {}).get("estimate", {}).get(predictor)
    value = (est or {}).get("scores", {}).get(ens.get("metric"))
    return None if value is None else (value, est.get("std", 0.0))
