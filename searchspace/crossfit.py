"""The cross-fit: chosen configs retrained on every fold, so every training image gets an honest
out-of-fold prediction and every test image the mean of the fold models.

Which configs: by default the ones that complement each other (``choose``:
greedy ensemble selection on the trials' fold-0 holdout predictions), not the
top M by their own score, which are near-copies that give the ensemble
nothing to pick from; ``by="score"`` keeps the top-M rule for comparison.
Under a time budget the task's default recipe goes first (``anchor``): the
final models train longer than the search did, and the search's few epochs
cannot rank a recipe that starts slowly.

Only trials that ran their whole schedule are cross-fitted, each at that
schedule's length, so every fold trains exactly the recipe whose fold-0 score
the search saw; fold 0 is that trial's final checkpoint. Each fold job writes
its own record (``done.json`` last); a rerun skips the finished ones.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa

from core import storage
from core.errors import BadInput
from core.experiment import Experiment, TrialContext, aligned, probs_array, probs_table, ranked
from core.metrics import METRICS
from searchspace.config import Resources
from searchspace.time_budget import SHORTER_FOR_BREADTH, Clock, Cost, Deadline, at, clock_text, makespan, plan_final
from searchspace.tuner import concurrency, trainable

# A config is eligible for the complementarity choice only when its fold-0
# score is within this fraction of the best one: the greedy pick must not
# chase a weak model whose holdout errors happen to fall elsewhere.
MIN_SCORE_FRACTION = 0.9


def eligible(trials: pd.DataFrame, mode: str, fraction: float = MIN_SCORE_FRACTION,
             partial: bool = False) -> pd.DataFrame:
    """Trials that ran their whole schedule, with a checkpoint, scoring within ``fraction`` of the best.

    ``partial``: trials stopped before the end of their schedule too, after
    those that ran it (``ranked``): when every fold, fold 0 included, is
    trained again at a planned length, a config needs no finished search trial.
    """
    done = ranked(trials, mode)
    done = done[(done["completed"] | partial) & done["checkpoint"].notna()]
    if done.empty:
        return done
    if fraction <= 0:
        return done
    best = float(done["score"].iloc[0])
    limit = best * fraction if mode == "max" else best / fraction
    return done[done["score"] >= limit] if mode == "max" else done[done["score"] <= limit]


ANCHOR_REASON = ("the task's default recipe, first: trained at the final length, where the search's few "
                 "epochs cannot rank it")


def default_recipe_trial(trials: pd.DataFrame, config: dict) -> str | None:
    """The search trial that ran ``config`` (the task's default recipe, the portfolio's first point), when one
    ran it and reported an epoch; None otherwise (``--no-portfolio``, or it failed)."""
    match = (trials["status"] == "ok") & (trials["epochs_run"] >= 1)
    for key, value in config.items():
        if key not in trials:
            continue
        column = trials[key]
        if isinstance(value, float):
            match &= np.isclose(pd.to_numeric(column, errors="coerce").to_numpy(float), value)
        else:
            match &= column == value
    hits = trials.loc[match, "trial_id"]
    return None if hits.empty else str(hits.iloc[0])


def choose(trials: pd.DataFrame, experiment: Experiment, top: int, mode: str, metric: str,
           by: str = "complementarity", partial: bool = False, anchor: str | None = None) -> pd.DataFrame:
    """The configs to cross-fit, in order: trial_id, crossfit_rank, crossfit_gain, crossfit_reason.

    ``anchor``: a trial that goes first whatever its search score (the task's
    default recipe under a time budget, ``default_recipe_trial``); the rest are
    chosen as below.

    Complementarity: Caruana's greedy selection (the ensemble builder's own
    ``EnsembleSelection``, ties broken on log loss) over the eligible trials'
    fold-0 holdout predictions, at most ``top`` distinct members; a config's
    gain is how much the greedy ensemble's holdout score rose at the step it
    first joined. If the greedy ensemble stops improving with fewer than
    ``top`` members, or fewer are eligible, the rest are filled by score
    (with ``partial``, by trials that did not run their whole schedule too).
    """
    from ensemble_builder.greedy import EnsembleSelection

    rows, seen = [], set()
    if anchor is not None and top > 0:
        rows.append(dict(trial_id=anchor, crossfit_gain=None, crossfit_reason=ANCHOR_REASON))
        seen.add(anchor)
    pool = eligible(trials, mode) if by == "complementarity" else trials.iloc[:0]
    if len(pool) > 1 and top > 1:
        index = experiment.folds()
        order = index.loc[index["fold"] == 0, "sample_id"].tolist()
        y = index.set_index("sample_id").loc[order, "label"].to_numpy()
        ids = pool["trial_id"].tolist()
        P = np.stack([aligned(experiment.candidate(t).oof(), order) for t in ids]).astype(np.float32)
        sel = EnsembleSelection(ensemble_size=max(10, 4 * top), metric=metric, max_members=top).fit(P, y)
        previous = None
        for step, c in enumerate(sel.indices_):
            score = sel.trajectory_[step]
            if ids[c] not in seen and len(rows) < top:
                gain = None if previous is None else score - previous
                reason = (f"greedy step {step + 1}: ensemble {metric} {score:.4f}"
                          + (" (the best single config)" if gain is None else f" ({gain:+.4f})"))
                rows.append(dict(trial_id=ids[c], crossfit_gain=gain, crossfit_reason=reason))
                seen.add(ids[c])
            previous = score
    # The guard only keeps weak configs out of the greedy pick; the rest of the
    # budget goes by score, as the top-M rule would spend it.
    for row in eligible(trials, mode, 0.0, partial).itertuples():
        if len(rows) >= top:
            break
        if row.trial_id not in seen:
            why = f"{metric} {row.score:.4f} on fold 0" + (
                "" if by == "score" else "; filled by score (the greedy ensemble stopped improving)")
            rows.append(dict(trial_id=row.trial_id, crossfit_gain=None, crossfit_reason=why))
            seen.add(row.trial_id)
    chosen = pd.DataFrame(rows[:top], columns=["trial_id", "crossfit_gain", "crossfit_reason"])
    chosen.insert(1, "crossfit_rank", np.arange(1, len(chosen) + 1))
    return chosen


def anchor(trials: pd.DataFrame, meta: dict) -> str | None:
    """Under a time budget, the trial of the task's default recipe: the final stage trains every chosen config
    longer than the search did, and a recipe that starts slowly (ASHA stops it at its grace period) may end
    best; the simplest alternative is that recipe trained long. docs/design.md, "The time budget", rule 5."""
    from searchspace.tasks import get_task
    from searchspace.tuner import first_config

    if not meta["options"].get("portfolio", True) or not meta["options"].get("archs"):
        return None
    ctx = TrialContext.from_dict(meta["context"])
    return default_recipe_trial(trials, first_config(get_task(meta["task"]), meta["options"]["archs"], ctx))


def crossfit_jobs(trials: pd.DataFrame, experiment: Experiment, chosen: list[str], folds: int,
                  epochs: int | None = None) -> tuple[list[str], list[dict]]:
    """The chosen configs' candidate ids, and a job for every fold not yet done, config by config.

    Each job trains its config's recipe at ``epochs`` (default: the length its
    search trial ran). Fold 0 reuses the search trial's final checkpoint only
    when that is the same training: a trial that ran its whole schedule, at
    that length; otherwise fold 0 is trained again like every other fold.
    """
    done = trials.set_index("trial_id", drop=False).loc[chosen]
    cids, jobs = [], []
    for row in done.itertuples():
        cid = f"cv-{row.trial_id}"
        cids.append(cid)
        config = experiment.candidate(row.trial_id).config()
        length = int(epochs or row.epochs_run)
        for fold in range(folds):
            if experiment.candidate(cid).fold(fold).done():
                continue
            job = {**config, "fold": fold, "epochs": length, "candidate": cid}
            if fold == 0 and row.completed and length == int(row.epochs_run):
                job["from_checkpoint"] = row.checkpoint
            jobs.append(job)
    return cids, jobs


def costs(trials: pd.DataFrame, chosen: list[str], n_hold: int, n_test: int, tta: bool) -> dict[str, Cost]:
    """Each chosen config's cost on one fold, as its search trial measured it: seconds per epoch, and per
    job the start-up (its first epoch's excess over the others) and the test set's predictions."""
    rows = trials.set_index("trial_id").loc[chosen]
    out = {}
    for tid, row in rows.iterrows():
        epoch_s = float(row.get("epoch_s") or row["seconds"] / max(1, row["epochs_run"]))
        startup = max(0.0, float(row.get("first_epoch_s") or epoch_s) - epoch_s)
        eval_s = float(row.get("eval_s") or 0.1 * epoch_s)
        out[tid] = Cost(epoch_s, startup + eval_s * n_test / max(1, n_hold) * (2 if tta else 1))
    return out


def build_crossfit_tuner(ctx: TrialContext, jobs: list[dict], res: Resources, deadline: Deadline | None = None):
    """Every fold job as one Tune trial (no early stopping), spread like the search, in order;
    ``deadline`` stops what still runs when the final stage's share of the time budget ends."""
    from ray import tune

    from searchspace.progress import FoldProgress

    fs, root = storage.resolve(ctx.experiment)
    return tune.Tuner(
        trainable(ctx, res, crossfit=True), param_space={"job": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=res.max_concurrent or None),
        run_config=tune.RunConfig(
            name=f"crossfit-{datetime.datetime.now():%Y%m%d-%H%M%S}", storage_path=root, storage_filesystem=fs,
            verbose=0, checkpoint_config=tune.CheckpointConfig(num_to_keep=1), stop=deadline,
            callbacks=[FoldProgress(jobs)],
            failure_config=tune.FailureConfig(max_failures=res.max_failures)))


def assemble(experiment: Experiment, cid: str, index: pd.DataFrame, folds: int) -> bool:
    """candidates/<cid>/{oof,test}.parquet and members.json from its finished folds."""
    candidate = experiment.candidate(cid)
    done = [candidate.fold(k) for k in range(folds)]
    if not all(f.done() for f in done):
        return False
    oof = pa.concat_tables([f.holdout() for f in done])
    if sorted(oof.column("sample_id").to_pylist()) != sorted(index["sample_id"]):
        raise BadInput(f"{candidate.location}: its folds' predictions do not cover every training sample exactly "
                       "once (folds.parquet changed?); delete the candidate and run --crossfit-only again")
    test = None
    if done[0].has_test():
        parts = [f.test() for f in done]
        test = probs_table(parts[0].column("sample_id").to_pylist(), np.mean([probs_array(t) for t in parts], axis=0))
    source = experiment.candidate(cid.removeprefix("cv-")).config()
    candidate.write([f.record() for f in done], oof, source, test)
    return True


def record_choice(experiment: Experiment, trials: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """The choice and its reasons as columns of trials.parquet (empty for the trials not chosen)."""
    trials = trials.drop(columns=[c for c in chosen.columns if c != "trial_id" and c in trials])
    trials = trials.merge(chosen, on="trial_id", how="left")
    experiment.write_trials(trials)
    return trials


def crossfit(experiment: Experiment, res: Resources, top: int | None = None, tta: bool = True,
             by: str | None = None, clock: Clock | None = None, until_s: float | None = None) -> int:
    """Cross-fit the chosen configs of a finished search; 0 when every chosen config is complete.

    With a time budget (``clock`` with a budget, ``until_s`` the final stage's
    end on the job's clock) the configs are trained at the length the rest of
    the budget allows (``time_budget.plan_final``; ``top``, when given, fixes
    how many), the plan is kept in experiment.json so that a resumed final
    stage trains the remaining folds the same way, and jobs still running at
    ``until_s`` are stopped: then 0 when at least one config is complete.
    """
    meta = experiment.meta()
    trials, index = experiment.trials(), experiment.folds()
    budgeted = clock is not None and clock.budget_s is not None and until_s is not None
    plan = meta.get("final_plan")
    top = top if top is not None else meta["budget"].get("crossfit_top", 0)
    if top <= 0 and plan is None:
        return 0
    by = by or meta.get("crossfit_by", "complementarity")
    if "crossfit_rank" in trials and trials["crossfit_rank"].notna().any() and (by == meta.get("crossfit_by")
                                                                               or plan is not None):
        # Chosen before (an interrupted cross-fit): keep that choice, it is what the folds were trained for.
        kept = trials[trials["crossfit_rank"].notna()].sort_values("crossfit_rank")
        chosen = kept[["trial_id", "crossfit_rank", "crossfit_gain", "crossfit_reason"]]
        chosen = chosen[chosen["trial_id"].isin(plan["configs"])] if plan else chosen.head(top)
    else:
        chosen = choose(trials, experiment, top, meta["mode"], meta["metric"], by, partial=budgeted,
                        anchor=anchor(trials, meta) if budgeted else None)
        trials = record_choice(experiment, trials, chosen)
        meta["crossfit_by"] = by
        experiment.write_meta(meta)
    # The experiment may have moved (a synced bucket, a renamed folder): use where it is now.
    ctx = TrialContext.from_dict(meta["context"])
    ctx = replace(ctx, experiment=experiment.location, cpus_per_trial=res.cpus_per_trial, tta=ctx.tta and tta)
    if chosen.empty:
        print("cross-fit: no trial ran its whole schedule; nothing to cross-fit")
        return 0
    folds = meta["folds"]
    if budgeted and plan is None:
        n_test = len(experiment.test()) if experiment.has_test() else 0
        given = meta["options"].get("crossfit_top")
        p = plan_final(costs(trials, chosen["trial_id"].tolist(), len(index) // folds, n_test, ctx.tta),
                       until_s - clock.used(), folds, slots(res), meta["budget"]["max_epochs"], given)
        plan = p.as_dict()
        chosen = chosen[chosen["trial_id"].isin(p.configs)]
        meta["final_plan"] = plan
        experiment.write_meta(meta)
        clock.save(phase="final stage", final_plan=plan)
        print(f"\nfinal stage planned: {p.describe()}", flush=True)
        if p.passed_over:
            print(f"  passed over for a later config: {', '.join(p.passed_over)} (too slow: beside it, every "
                  f"config would train less than {SHORTER_FOR_BREADTH:.0%} of the first one's length)", flush=True)
        if p.epochs < p.searched_epochs:
            print(f"  (the search overran its share: the final models get {p.epochs} epochs, fewer than the "
                  f"{p.searched_epochs} it searched)", flush=True)
    cids, jobs = crossfit_jobs(trials, experiment, chosen["trial_id"].tolist(), folds,
                               plan["epochs"] if plan else None)
    print(f"\ncross-fit: {len(cids)} config(s) chosen by {by}:")
    for row in chosen.itertuples():
        print(f"  {row.crossfit_rank}. {row.trial_id}: {row.crossfit_reason}")
    print(f"cross-fit: {len(cids)} config(s) x {folds} folds; {len(jobs)} fold job(s) to run "
          f"({len(cids) * folds - len(jobs)} already done)" + (f"; {estimate(trials, jobs, index, folds, res, ctx)}"
                                                             if jobs and plan is None else ""), flush=True)
    first = [experiment.candidate(cids[0]).fold(k) for k in range(folds)] if cids else []
    deadline = Deadline(experiment.location, until_s, unless=lambda: not all(f.done() for f in first)) \
        if budgeted else None
    if jobs:
        start = time.time()
        results = build_crossfit_tuner(ctx, jobs, res, deadline).fit()
        failed = [r for r in results if r.error]
        print(f"cross-fit ran {len(jobs)} job(s) in {time.time() - start:.0f} s"
              + (f", {len(failed)} failed (run --crossfit-only again to retry them)" if failed else ""))
    # Assemble what this pass changed or never assembled; leave finished candidates as they are.
    ran = {job["candidate"] for job in jobs}
    complete = [cid for cid in cids
                if (cid not in ran and experiment.candidate(cid).exists())
                or assemble(experiment, cid, index, folds)]
    labels = index.set_index("sample_id")["label"]
    for cid in complete:
        oof = experiment.candidate(cid).oof()
        y = labels.loc[oof.column("sample_id").to_pylist()].to_numpy()
        score = METRICS[meta["metric"]].fn(y, probs_array(oof))
        print(f"  {cid}: out-of-fold {meta['metric']} {score:.4f} over {len(y)} images")
    print(f"cross-fit: {len(complete)}/{len(cids)} config(s) complete in {experiment.candidates_dir}")
    missing = [c for c in cids if c not in complete]
    if deadline is not None and deadline.overrun:
        print(f"the final stage ran past its share of the time budget until its first config ({cids[0]}) was "
              "complete, so that the job ends with a submission", flush=True)
    if missing and deadline is not None and deadline.reached:
        unfinished = sum(not experiment.candidate(c).fold(k).done() for c in missing for k in range(folds))
        print(f"the time budget ended the final stage: skipped {', '.join(missing)} ({unfinished} fold job(s) "
              "not finished); the complete ones make the ensemble", flush=True)
        return 0 if complete else 1
    return 0 if len(complete) == len(cids) else 1


def estimate(trials: pd.DataFrame, jobs: list[dict], index: pd.DataFrame, folds: int, res: Resources,
             ctx: TrialContext) -> str:
    """The planned cost of these fold jobs, from their search trials' measured epochs."""
    n_test = len(Experiment(ctx.experiment).test()) if ctx.test_key else 0
    tids = list(dict.fromkeys(j["candidate"].removeprefix("cv-") for j in jobs))
    cost = costs(trials, tids, len(index) // folds, n_test, ctx.tta)
    n = slots(res)
    seconds = makespan([cost[j["candidate"].removeprefix("cv-")].job_s
                        + j["epochs"] * cost[j["candidate"].removeprefix("cv-")].epoch_s for j in jobs], n)
    return f"about {clock_text(seconds)} on {n} slot(s), ends about {at(seconds)}"


def slots(res: Resources) -> int:
    """Jobs that run at once: --max-concurrent, else what the cluster fits."""
    return res.max_concurrent or concurrency(res)
