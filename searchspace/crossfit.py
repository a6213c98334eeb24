"""The cross-fit: chosen configs retrained on every fold, so every training image gets an honest
out-of-fold prediction and every test image the mean of the fold models.

Which configs: by default the ones that complement each other (``choose``:
greedy ensemble selection on the trials' fold-0 holdout predictions), not the
top M by their own score, which are near-copies that give the ensemble
nothing to pick from; ``by="score"`` keeps the top-M rule for comparison.

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
from searchspace.tuner import trainable

# A config is eligible for the complementarity choice only when its fold-0
# score is within this fraction of the best one: the greedy pick must not
# chase a weak model whose holdout errors happen to fall elsewhere.
MIN_SCORE_FRACTION = 0.9


def eligible(trials: pd.DataFrame, mode: str, fraction: float = MIN_SCORE_FRACTION) -> pd.DataFrame:
    """Trials that ran their whole schedule, with a checkpoint, scoring within ``fraction`` of the best."""
    done = ranked(trials, mode)
    done = done[done["completed"] & done["checkpoint"].notna()]
    if done.empty:
        return done
    if fraction <= 0:
        return done
    best = float(done["score"].iloc[0])
    limit = best * fraction if mode == "max" else best / fraction
    return done[done["score"] >= limit] if mode == "max" else done[done["score"] <= limit]


def choose(trials: pd.DataFrame, experiment: Experiment, top: int, mode: str, metric: str,
           by: str = "complementarity") -> pd.DataFrame:
    """The configs to cross-fit, in order: trial_id, crossfit_rank, crossfit_gain, crossfit_reason.

    Complementarity: Caruana's greedy selection (the ensemble builder's own
    ``EnsembleSelection``, ties broken on log loss) over the eligible trials'
    fold-0 holdout predictions, at most ``top`` distinct members; a config's
    gain is how much the greedy ensemble's holdout score rose at the step it
    first joined. If the greedy ensemble stops improving with fewer than
    ``top`` members, or fewer are eligible, the rest are filled by score.
    """
    from ensemble_builder.greedy import EnsembleSelection

    rows, seen = [], set()
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
            if ids[c] not in seen:
                gain = None if previous is None else score - previous
                reason = (f"greedy step {step + 1}: ensemble {metric} {score:.4f}"
                          + (" (the best single config)" if gain is None else f" ({gain:+.4f})"))
                rows.append(dict(trial_id=ids[c], crossfit_gain=gain, crossfit_reason=reason))
                seen.add(ids[c])
            previous = score
    # The guard only keeps weak configs out of the greedy pick; the rest of the
    # budget goes by score, as the top-M rule would spend it.
    for row in eligible(trials, mode, 0.0).itertuples():
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


def crossfit_jobs(trials: pd.DataFrame, experiment: Experiment, chosen: list[str], folds: int
                  ) -> tuple[list[str], list[dict]]:
    """The chosen configs' candidate ids, and a job for every fold not yet done."""
    done = trials.set_index("trial_id", drop=False).loc[chosen]
    cids, jobs = [], []
    for row in done.itertuples():
        cid = f"cv-{row.trial_id}"
        cids.append(cid)
        config = experiment.candidate(row.trial_id).config()
        for fold in range(folds):
            if experiment.candidate(cid).fold(fold).done():
                continue
            job = {**config, "fold": fold, "epochs": int(row.epochs_run), "candidate": cid}
            if fold == 0:
                job["from_checkpoint"] = row.checkpoint
            jobs.append(job)
    return cids, jobs


def build_crossfit_tuner(ctx: TrialContext, jobs: list[dict], res: Resources):
    """Every fold job as one Tune trial (no early stopping), spread like the search."""
    from ray import tune

    fs, root = storage.resolve(ctx.experiment)
    return tune.Tuner(
        trainable(ctx, res, crossfit=True), param_space={"job": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=res.max_concurrent or None),
        run_config=tune.RunConfig(
            name=f"crossfit-{datetime.datetime.now():%Y%m%d-%H%M%S}", storage_path=root, storage_filesystem=fs,
            verbose=0, checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
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
             by: str | None = None) -> int:
    """Cross-fit the chosen configs of a finished search; 0 when every chosen config is complete."""
    meta = experiment.meta()
    trials, index = experiment.trials(), experiment.folds()
    top = top if top is not None else meta["budget"].get("crossfit_top", 0)
    if top <= 0:
        return 0
    by = by or meta.get("crossfit_by", "complementarity")
    if "crossfit_rank" in trials and trials["crossfit_rank"].notna().any() and by == meta.get("crossfit_by"):
        # Chosen before (an interrupted cross-fit): keep that choice, it is what the folds were trained for.
        kept = trials[trials["crossfit_rank"].notna()].sort_values("crossfit_rank")
        chosen = kept[["trial_id", "crossfit_rank", "crossfit_gain", "crossfit_reason"]].head(top)
    else:
        chosen = choose(trials, experiment, top, meta["mode"], meta["metric"], by)
        trials = record_choice(experiment, trials, chosen)
        meta["crossfit_by"] = by
        experiment.write_meta(meta)
    # The experiment may have moved (a synced bucket, a renamed folder): use where it is now.
    ctx = TrialContext.from_dict(meta["context"])
    ctx = replace(ctx, experiment=experiment.location, cpus_per_trial=res.cpus_per_trial, tta=ctx.tta and tta)
    cids, jobs = crossfit_jobs(trials, experiment, chosen["trial_id"].tolist(), meta["folds"])
    if not cids:
        print("cross-fit: no trial ran its whole schedule; nothing to cross-fit")
        return 0
    print(f"\ncross-fit: {len(cids)} config(s) chosen by {by}:")
    for row in chosen.itertuples():
        print(f"  {row.crossfit_rank}. {row.trial_id}: {row.crossfit_reason}")
    print(f"cross-fit: {len(cids)} config(s) x {meta['folds']} folds; {len(jobs)} fold job(s) to run "
          f"({len(cids) * meta['folds'] - len(jobs)} already done)", flush=True)
    if jobs:
        start = time.time()
        results = build_crossfit_tuner(ctx, jobs, res).fit()
        failed = [r for r in results if r.error]
        print(f"cross-fit ran {len(jobs)} job(s) in {time.time() - start:.0f} s"
              + (f", {len(failed)} failed (run --crossfit-only again to retry them)" if failed else ""))
    # Assemble what this pass changed or never assembled; leave finished candidates as they are.
    ran = {job["candidate"] for job in jobs}
    complete = [cid for cid in cids
                if (cid not in ran and experiment.candidate(cid).exists())
                or assemble(experiment, cid, index, meta["folds"])]
    labels = index.set_index("sample_id")["label"]
    for cid in complete:
        oof = experiment.candidate(cid).oof()
        y = labels.loc[oof.column("sample_id").to_pylist()].to_numpy()
        score = METRICS[meta["metric"]].fn(y, probs_array(oof))
        print(f"  {cid}: out-of-fold {meta['metric']} {score:.4f} over {len(y)} images")
    print(f"cross-fit: {len(complete)}/{len(cids)} config(s) complete in {experiment.candidates_dir}")
    return 0 if len(complete) == len(cids) else 1
