"""The cross-fit phase: every config of the top M over all K folds, test predictions, resuming."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from searchspace.run import main


def probs(path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path)
    return table.column("sample_id").to_pylist(), np.stack(table.column("probs").to_numpy(zero_copy_only=False))


def cv_candidates(experiment) -> list:
    return sorted((experiment / "candidates").glob("cv-*"))


def test_each_config_covers_every_training_sample_exactly_once(tiny_experiment):
    exp = tiny_experiment.experiment
    folds = pd.read_parquet(exp / "folds.parquet")
    trials = pd.read_parquet(exp / "trials.parquet")
    classes = len(json.loads((exp / "experiment.json").read_text())["class_names"])
    cands = cv_candidates(exp)
    assert len(cands) == tiny_experiment.crossfit_top
    # The configs chosen (by complementarity) are recorded in trials.parquet with their reason;
    # the first is the best final score among the trials that ran their whole schedule.
    chosen = trials[trials["crossfit_rank"].notna()].sort_values("crossfit_rank")
    assert {c.name for c in cands} == {f"cv-{t}" for t in chosen["trial_id"]}
    assert chosen["completed"].all() and chosen["crossfit_reason"].str.len().gt(0).all()
    assert chosen["score"].iloc[0] == trials.loc[trials["completed"], "score"].max()
    for cand in cands:
        ids, P = probs(cand / "oof.parquet")
        assert len(ids) == len(set(ids)) == len(folds) and set(ids) == set(folds["sample_id"])
        assert P.shape == (len(folds), classes)
        assert np.isfinite(P).all() and (P >= 0).all() and np.allclose(P.sum(1), 1, atol=1e-5)
        members = json.loads((cand / "members.json").read_text())["members"]
        assert sorted(m["fold"] for m in members) == list(range(tiny_experiment.folds))
        # Each fold model predicted exactly its own holdout fold.
        for k in range(tiny_experiment.folds):
            fold_ids, _ = probs(cand / "folds" / str(k) / "holdout.parquet")
            assert set(fold_ids) == set(folds.loc[folds["fold"] == k, "sample_id"])
        # Fold 0 is the search trial itself: its final checkpoint, not a retrained model;
        # every fold trains the searched schedule's full length.
        trial = trials.set_index("trial_id").loc[cand.name.removeprefix("cv-")]
        fold0 = next(m for m in members if m["fold"] == 0)
        assert fold0["checkpoint"] == trial["checkpoint"]
        assert trial["completed"] and trial["epochs_run"] == tiny_experiment.max_epochs
        assert all(m["epochs"] == tiny_experiment.max_epochs for m in members)


def test_test_predictions_are_the_mean_over_fold_models(tiny_experiment):
    exp = tiny_experiment.experiment
    test_ids = pd.read_parquet(exp / "test.parquet")["sample_id"].tolist()
    assert len(test_ids) == tiny_experiment.test_images
    for cand in cv_candidates(exp):
        ids, P = probs(cand / "test.parquet")
        assert ids == test_ids
        assert np.isfinite(P).all() and np.allclose(P.sum(1), 1, atol=1e-5)
        per_fold = [probs(cand / "folds" / str(k) / "test.parquet")[1] for k in range(tiny_experiment.folds)]
        assert np.allclose(P, np.mean(per_fold, axis=0), atol=1e-6)


@pytest.mark.slow
def test_crossfit_only_finishes_an_interrupted_crossfit(tiny_experiment, tmp_path):
    # A copy, moved elsewhere: the cross-fit must write where the experiment is now.
    exp = shutil.copytree(tiny_experiment.experiment, tmp_path / "moved")
    cand = cv_candidates(exp)[0]
    # The state an interrupted cross-fit leaves: fold 2 never finished, the candidate never assembled.
    shutil.rmtree(cand / "folds" / "2")
    for name in ("oof.parquet", "test.parquet", "members.json"):
        (cand / name).unlink()
    kept = {p: p.stat().st_mtime_ns for p in (exp / "candidates").rglob("*") if p.is_file()}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["paddy", "--crossfit-only", "--experiment", str(exp), "--crossfit-top", "2",
                     "--cache-dir", str(tiny_experiment.cache_dir)])
    assert code == 0, out.getvalue()
    folds = tiny_experiment.folds
    assert f"1 fold job(s) to run ({2 * folds - 1} already done)" in out.getvalue()
    assert (cand / "folds" / "2" / "done.json").exists()
    # Nothing that was finished was trained or written again.
    changed = [str(p.relative_to(exp)) for p, t in kept.items() if p.stat().st_mtime_ns != t]
    assert not changed, changed
    ids, _ = probs(cand / "oof.parquet")
    assert sorted(ids) == sorted(pd.read_parquet(exp / "folds.parquet")["sample_id"])
    assert (cand / "test.parquet").exists()
    # The original experiment was left alone.
    assert (tiny_experiment.experiment / "candidates" / cand.name / "folds" / "2" / "done.json").exists()
