"""The cross-fit: the best configs retrained on every fold, so every training image gets an honest
out-of-fold prediction and every test image the mean of the fold models.

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

from searchspace.prepare import Resources
from searchspace.search import trainable
from trainer import storage
from trainer.errors import BadInput
from trainer.experiment import Experiment, TrialContext, probs_array, probs_table, ranked
from trainer.metrics import METRICS


def crossfit_jobs(trials: pd.DataFrame, experiment: Experiment, top: int, folds: int, mode: str
                  ) -> tuple[list[str], list[dict]]:
    """The top configs' candidate ids, and a job for every fold not yet done."""
    done = ranked(trials, mode)
    done = done[done["completed"] & done["checkpoint"].notna()].head(top)
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


def crossfit(experiment: Experiment, res: Resources, top: int | None = None, tta: bool = True) -> int:
    """Cross-fit the top configs of a finished search; 0 when every chosen config is complete."""
    meta = experiment.meta()
    trials, index = experiment.trials(), experiment.folds()
    top = top if top is not None else meta["budget"].get("crossfit_top", 0)
    if top <= 0:
        return 0
    # The experiment may have moved (a synced bucket, a renamed folder): use where it is now.
    ctx = TrialContext.from_dict(meta["context"])
    ctx = replace(ctx, experiment=experiment.location, cpus_per_trial=res.cpus_per_trial, tta=ctx.tta and tta)
    cids, jobs = crossfit_jobs(trials, experiment, top, meta["folds"], meta["mode"])
    if not cids:
        print("cross-fit: no trial ran its whole schedule; nothing to cross-fit")
        return 0
    print(f"\ncross-fit: {len(cids)} config(s) x {meta['folds']} folds; {len(jobs)} fold job(s) to run "
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
        score = METRICS[meta["metric"]][0](y, probs_array(oof))
        print(f"  {cid}: out-of-fold {meta['metric']} {score:.4f} over {len(y)} images")
    print(f"cross-fit: {len(complete)}/{len(cids)} config(s) complete in {experiment.candidates_dir}")
    return 0 if len(complete) == len(cids) else 1
