"""The search: Ray Tune with Optuna's TPE sampling and ASHA early stopping, one trial = one config on fold 0.

``build_tuner`` puts the Tuner, the searcher and the scheduler together in
one visible place; ``collect`` turns the results into trials.parquet and one
candidate per trial (its final epoch's holdout predictions).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import time

import numpy as np
import pandas as pd

from core import storage
from core.experiment import HOLDOUT_FILE, MODEL_FILE, Checkpoint, Experiment, TrialContext, open_journal, ranked
from core.metrics import METRICS
from searchspace.config import Resources, SearchConfig
from searchspace.tasks import Task
from searchspace.time_budget import UNLIMITED_TRIALS


def study_file(experiment: Experiment, cache_dir: str) -> str:
    """The Optuna journal: in the experiment when local, else on this disk until the search ends."""
    if not storage.is_uri(experiment.location):
        os.makedirs(experiment.location, exist_ok=True)
        return experiment.study_file
    os.makedirs(os.path.join(cache_dir, "studies"), exist_ok=True)
    name = storage.resolve(experiment.location)[1].rsplit("/", 1)[-1]
    return os.path.join(cache_dir, "studies", name + ".log")


def concurrency(res: Resources) -> int:
    """Trials that fit the cluster now; 8 when it has none yet (an autoscaler will add nodes)."""
    import ray
    free = ray.cluster_resources()
    slots = free.get("CPU", 0) / max(res.cpus_per_trial, 1e-9)
    if res.gpus_per_trial:
        slots = min(slots, free.get("GPU", 0) / res.gpus_per_trial)
    return int(slots) if slots >= 1 else 8


def trainable(ctx: TrialContext, res: Resources, crossfit: bool = False):
    """The Tune trainable of a search trial (each epoch also reports its ensemble gain) or a cross-fit job."""
    from ray import tune

    from ensemble_builder.gain import PoolGain
    from trainer.fit import crossfit_fold, train_trial
    fn = (tune.with_parameters(crossfit_fold, ctx=ctx) if crossfit else
          tune.with_parameters(train_trial, ctx=ctx, epoch_metrics=PoolGain(ctx.experiment, ctx.metric)))
    return tune.with_resources(restartable(fn), {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})


def restartable(fn):
    """A Tune trainable class of ``fn`` that starts a trial again from its first epoch when the checkpoint
    it should resume from is gone.

    A resumed search's stored state can name a checkpoint that no longer
    exists: one Ray had replaced just before the driver died (a search of
    older code, whose Ray deleted it before its next snapshot), or a snapshot
    that never reached a bucket. Ray would fail that trial; here it runs again
    under its own id, so Tune and the Optuna study both see it finish. A trial
    that failed for a reason of its own is not resumed at all (``resume``).
    """
    import pyarrow.fs as pafs
    from ray.tune.trainable import wrap_function

    class Restartable(wrap_function(fn)):
        def restore(self, checkpoint_path):
            checkpoint = getattr(checkpoint_path, "checkpoint", None)
            if checkpoint is not None and \
                    checkpoint.filesystem.get_file_info(checkpoint.path).type == pafs.FileType.NotFound:
                print(f"trial {self.trial_id}: its checkpoint {checkpoint.path} is gone (replaced just before "
                      "the driver died); starting it again from its first epoch", flush=True)
                return None
            return super().restore(checkpoint_path)

    Restartable.__name__ = Restartable.__qualname__ = fn.__name__   # Tune names trials and folders by it
    return Restartable


def sampler(seed: int):
    """TPE for a parallel search: the constant liar gives a running trial a pessimistic value, so
    trials started together do not all sample the same region; multivariate with groups models
    parameters jointly within each conditional branch (the architecture's own image sizes)."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True, group=True)


def portfolio(task: Task, archs: dict, has_weights: dict, search_pretrained: bool, trials: int) -> list[dict]:
    """The task's portfolio as the first trials: a third of the budget, or every allowed architecture
    once when that is more and takes at most half the budget; at least one trial."""
    from searchspace.tasks._space import portfolio_points

    limit = max(1, trials // 3, min(len(archs), trials // 2))
    return portfolio_points(task.portfolio, task.default_recipe, archs, has_weights,
                            search_pretrained, limit=limit)


def first_config(task: Task, archs: dict, ctx: TrialContext) -> dict:
    """The config of the search's first trial: the portfolio's first point with the space's constants."""
    import optuna

    has_weights = {arch: ctx.weights.get(arch) is not None for arch in archs}
    point = portfolio(task, archs, has_weights, ctx.search_pretrained, trials=1)[0]
    constants = task.define_search_space(optuna.trial.FixedTrial(point), archs=archs, pretrained=has_weights,
                                         search_pretrained=ctx.search_pretrained)
    return {**point, **constants}


def build_tuner(task: Task, ctx: TrialContext, config: SearchConfig, archs: dict, cache_dir: str,
                deadline=None, forecast=None):
    """The Tuner, OptunaSearch and ASHAScheduler, built together in one place.

    ``objective="ensemble"``: the searcher maximises each trial's ``ensemble_gain``
    while ASHA keeps stopping trials on their own metric. Ray allows this: a
    searcher given its metric and mode itself keeps them (``set_search_properties``
    returns False), and the scheduler takes the TuneConfig's. A finished
    trial's value is its gain against the pool as it was when it finished;
    Optuna cannot change a told value, so older trials keep the larger gains of
    a smaller pool (their contribution at the time), which TPE ranks beside
    newer, smaller ones.

    ``deadline`` (``time_budget.Deadline``) stops the search when its share of
    the time budget ends (it hears of registered checkpoints as a callback);
    ``forecast`` gives the progress line its estimates.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from searchspace.progress import Progress
    from searchspace.searcher import SparedSearchGenerator, TruthfulOptunaSearch
    from searchspace.storage_policy import KeepLatest

    b, res, opts = config.budget, config.resources, config.options
    experiment = Experiment(ctx.experiment)
    metric, mode = task.metric, METRICS[task.metric].mode
    fs, root = storage.resolve(experiment.location)
    parent, name = root.rsplit("/", 1)
    # OptunaSearch needs metric and mode itself with a define-by-run space;
    # ASHA takes them from TuneConfig (giving them to it too is an error).
    # The study lives in a journal file that optuna-dashboard opens.
    # ASHA-stopped trials are told PRUNED, not COMPLETE with an early score.
    # The portfolio's known-good, mutually different configs are enqueued as the first trials.
    has_weights = {arch: ctx.weights.get(arch) is not None for arch in archs}
    first = portfolio(task, archs, has_weights, ctx.search_pretrained, b.trials) if opts.portfolio else []
    searcher = TruthfulOptunaSearch(
        space=functools.partial(task.define_search_space, archs=archs, pretrained=has_weights,
                                search_pretrained=ctx.search_pretrained),
        metric="ensemble_gain" if opts.objective == "ensemble" else metric,
        mode="max" if opts.objective == "ensemble" else mode, sampler=sampler(opts.seed),
        points_to_evaluate=first or None, study_name=name, storage=open_journal(study_file(experiment, cache_dir)),
        max_t=b.max_epochs)
    # The limiter also sets how many trials Tune samples ahead; without it
    # Tune keeps one pending trial and a second slot idles while actors start.
    searcher = ConcurrencyLimiter(searcher, max_concurrent=res.max_concurrent or concurrency(res))
    # Each snapshot of the search is also kept whole, so that a kill during Tune's copy cannot cut it.
    searcher = SparedSearchGenerator(searcher, experiment.tune_spare_file if storage.is_local(experiment.location)
                                     else None)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=b.max_epochs,
                              grace_period=b.grace_period, reduction_factor=b.reduction_factor)
    return tune.Tuner(
        trainable(ctx, res),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=b.trials, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=parent, storage_filesystem=fs, verbose=0,
            # The latest checkpoints only: a retry resumes from the last, a trial's candidate is
            # its final epoch (never an epoch picked on the holdout), and a completed trial's
            # final checkpoint is fold 0 of its cross-fit. KeepLatest deletes the older ones, not
            # Ray (num_to_keep would make Ray snapshot every trial at every checkpoint).
            callbacks=[Progress(metric, mode, b.max_epochs, None if b.trials == UNLIMITED_TRIALS else b.trials,
                                forecast=forecast), KeepLatest()] + ([deadline] if deadline is not None else []),
            stop=deadline, failure_config=tune.FailureConfig(max_failures=res.max_failures)))


def checkpoint_uri(experiment: Experiment, path_in_fs: str) -> str:
    """A checkpoint's path inside the storage filesystem -> a location under the experiment."""
    _, root = storage.resolve(experiment.location)
    return experiment.file(path_in_fs[len(root):]) if path_in_fs.startswith(root) else path_in_fs


def trial_config(result, trial=None) -> dict:
    """A trial's config: from its last result, else from Tune's ``trial`` (one the search ended before it
    started has no result), else from the params.json Tune wrote in its folder.

    A trial that had failed before a ``--resume`` comes back from Tune's stored state with a last
    result that holds no config; its row in trials.parquet would lose its architecture and settings.
    """
    if result.config:
        return result.config
    if getattr(trial, "config", None):
        return trial.config
    with contextlib.suppress(OSError, ValueError):
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
            return json.loads(f.read())
    return {}


TIME_BUDGET = "time budget"   # a trial's stop_reason when the search's share of the budget ended it
NOT_STARTED = "not started"   # ... and when it ended the search before the trial ran an epoch
CHECKPOINT_LOST = "checkpoint lost"   # its checkpoint went at a kill, and the search ended before it made another


def tune_trials(results) -> list:
    """Tune's trials of a ResultGrid, in its order: a trial the search ended before it started has no result
    of its own to give its id and config. [] where the grid does not hold them (a private attribute of Ray's)."""
    return list(getattr(getattr(results, "_experiment_analysis", None), "trials", None) or [])


def collect(results, metric: str, experiment: Experiment, max_epochs: int,
            reasons: dict[str, str] | None = None) -> pd.DataFrame:
    """trials.parquet and candidates/<trial_id>/ from a ResultGrid.

    ``score`` is the metric at a trial's last epoch and its candidate is that
    epoch's holdout prediction: choosing the best epoch by the holdout score
    and then ensembling those same predictions would be optimistic.
    ``best_score``/``best_epoch`` are kept to show the learning curve's peak.
    ``completed``: the trial ran its whole schedule (ASHA did not stop it).
    ``stop_reason``: completed, asha, time budget (the search's share ended
    while it ran) or error, from ``reasons`` (the study's record) where it has
    the trial; not started (the search ended first: its config, no epochs);
    checkpoint lost (a kill took the checkpoint its scores come from, and the
    search ended before it made another: no checkpoint, no candidate).
    ``epoch_s``: its median seconds per epoch after the first (the first also
    starts the actor), ``eval_s`` its holdout prediction's; the final stage is
    planned from them.
    """
    mode = METRICS[metric].mode
    rows = []
    tune_side = tune_trials(results)
    for i, result in enumerate(results):
        trial = tune_side[i] if len(tune_side) == len(results) else None
        config = {k: v for k, v in trial_config(result, trial).items() if not k.startswith("image_size_")}
        history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or getattr(trial, "trial_id", None)
        row = {"trial_id": trial_id or os.path.basename(result.path), **config,
               "metric": metric, "score": None, "best_score": None, "best_epoch": None, "epochs_run": 0,
               "completed": False, "stopped_early": False, "seconds": (result.metrics or {}).get("time_total_s"),
               "status": "error" if result.error else "ok",
               "error": str(result.error).strip().splitlines()[-1][:500] if result.error else None,
               "stop_reason": "error" if result.error else None, "checkpoint": None}
        if history is not None and metric in history and len(history):
            history = history.drop_duplicates("epoch", keep="last")   # a retried trial repeats epochs
            best = history[metric].idxmax() if mode == "max" else history[metric].idxmin()
            last = history["epoch"].idxmax()
            row.update(score=float(history[metric][last]), best_score=float(history[metric][best]),
                       best_epoch=int(history["epoch"][best]), epochs_run=int(history["epoch"][last]))
            if "ensemble_gain" in history:
                row["ensemble_gain"] = float(history["ensemble_gain"][last])
            row["completed"] = row["epochs_run"] >= max_epochs and not result.error
            reason = (reasons or {}).get(row["trial_id"])
            if reason is None:
                reason = "error" if result.error else "completed" if row["completed"] else "asha"
            row["stop_reason"] = "error" if result.error else reason
            row["stopped_early"] = row["stop_reason"] == "asha"
            if "time_this_iter_s" in history:
                times = history.sort_values("epoch")["time_this_iter_s"].to_numpy()
                row["epoch_s"] = float(np.median(times[1:] if len(times) > 1 else times))
                row["first_epoch_s"] = float(times[0])
            if "eval_s" in history:
                row["eval_s"] = float(history["eval_s"].median())
        elif not result.error:
            row["stop_reason"] = NOT_STARTED   # the search ended before it ran an epoch
        if result.checkpoint is not None and row["score"] is not None:
            uri = checkpoint_uri(experiment, result.checkpoint.path)
            checkpoint = Checkpoint(uri)
            if checkpoint.has(MODEL_FILE) and checkpoint.has(HOLDOUT_FILE):
                row["checkpoint"] = uri
                experiment.candidate(row["trial_id"]).write(
                    [dict(checkpoint=uri, fold=0)], checkpoint.holdout(), config)
            else:   # its scores stand; its model is gone, so it is no candidate and no cross-fit's starting point
                row["stop_reason"] = CHECKPOINT_LOST
                print(f"trial {row['trial_id']}: its checkpoint {uri} is gone (a kill took it) and the search "
                      "ended before the trial made another; kept with its scores, without a candidate", flush=True)
        rows.append(row)
    trials = pd.DataFrame(rows)
    experiment.write_trials(trials)
    return trials


def leaderboard(trials: pd.DataFrame, metric: str, mode: str, top: int = 15) -> str:
    ok = ranked(trials, mode)
    cols = ["trial_id", "arch", "image_size", "pretrained", "optimizer", "lr", "batch_size", "score", "best_epoch",
            "epochs_run", "stopped_early", "seconds"]
    table = ok[[c for c in cols if c in ok]].head(top).rename(columns={"score": metric})
    failed = trials[trials["status"] == "error"]
    text = table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    if len(failed):
        text += "\n" + "\n".join(f"failed {r.trial_id}: {r.error}" for r in failed.itertuples())
    return text


def close_study(journal_file: str, budget_ended: bool = False) -> dict[str, str]:
    """Tell the study how the trials it still holds as RUNNING ended; {tune trial id: stop reason}.

    When the search's share of the time budget ended (``budget_ended``), a
    trial that had reported epochs was stopped by it: PRUNED, with its
    intermediate values and ``stopped_by`` "time budget". A trial with no
    result (asked for, never run: the driver died, or the search ended first)
    is closed as FAIL, so the dashboard does not show it running for ever.
    Returns each trial's reason as the study records it: "completed", "asha"
    (pruned by ASHA), "time budget" or "error".
    """
    import optuna

    reasons: dict[str, str] = {}
    if not os.path.exists(journal_file):
        return reasons
    states = optuna.trial.TrialState
    journal = open_journal(journal_file)
    for summary in optuna.get_all_study_summaries(journal):
        study = optuna.load_study(study_name=summary.study_name, storage=journal)
        study_id = journal.get_study_id_from_name(summary.study_name)
        for t in study.get_trials(deepcopy=False):
            state, reason = t.state, t.user_attrs.get("stopped_by")
            if state == states.RUNNING:
                if budget_ended and t.intermediate_values:
                    journal.set_trial_user_attr(journal.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                                "stopped_by", TIME_BUDGET)
                    study.tell(t.number, state=states.PRUNED)
                    state, reason = states.PRUNED, TIME_BUDGET
                else:
                    study.tell(t.number, state=states.FAIL)
                    state = states.FAIL
            tune_id = t.user_attrs.get("tune_trial_id")
            if tune_id:
                reasons[tune_id] = {states.COMPLETE: "completed", states.PRUNED: reason or "asha"}.get(state, "error")
    return reasons


def finish_search(experiment: Experiment, results, metric: str, max_epochs: int, start: float,
                  cache_dir: str, budget_ended: bool = False) -> pd.DataFrame | None:
    """After the search: trials.parquet, candidates, the study in the experiment, the leaderboard.

    ``budget_ended``: the search's share of the time budget stopped it.
    Returns the trials, or None when every trial failed (said on stderr).
    """
    import sys

    journal_file = study_file(experiment, cache_dir)
    reasons = close_study(journal_file, budget_ended)
    trials = collect(results, metric, experiment, max_epochs, reasons)
    if trials["checkpoint"].isna().all():
        first = trials["error"].dropna().iloc[0] if trials["error"].notna().any() else "unknown"
        print(f"\nevery trial failed; nothing to cross-fit. First error: {first}", file=sys.stderr)
        return None
    if storage.is_uri(experiment.location) and os.path.exists(journal_file):
        with open(journal_file, "rb") as f:
            storage.write_bytes(experiment.study_file, f.read())
    print(f"\nsearch finished in {time.time() - start:.0f} s; leaderboard ({metric} on fold 0):")
    print(leaderboard(trials, metric, METRICS[metric].mode))
    print(f"\nwrote {experiment.trials_file} and {int(trials['checkpoint'].notna().sum())} candidates")
    return trials
