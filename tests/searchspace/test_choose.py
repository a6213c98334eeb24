"""Which configs the cross-fit retrains: complementary ones, or the top M by score.

Hand-made fold-0 holdout predictions, written as a real experiment folder
(folds.parquet, trials.parquet, candidates/<trial>/oof.parquet): config A is
the strongest, A2 a near-copy of A (the same mistakes), B and C weaker but
right where A is wrong. The top-M rule picks A and A2; the complementarity
rule picks configs whose blend is right more often.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.experiment import Experiment, probs_table
from core.metrics import accuracy
from searchspace.crossfit import ANCHOR_REASON, choose, crossfit_jobs, default_recipe_trial, eligible

N = 100


def probs(right: np.ndarray, y: np.ndarray, p_right: float, p_wrong_true: float) -> np.ndarray:
    """Two-class probabilities: p_right on the true class where right, p_wrong_true where wrong."""
    p_true = np.where(right, p_right, p_wrong_true)
    P = np.empty((len(y), 2), np.float32)
    P[np.arange(len(y)), y] = p_true
    P[np.arange(len(y)), 1 - y] = 1 - p_true
    return P


@pytest.fixture
def experiment(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, N)
    ids = [f"s{i:03d}" for i in range(N)]
    idx = np.arange(N)
    preds = {
        "A": probs(idx < 80, y, 0.9, 0.4),                     # 0.80, wrong on 80..99
        "A2": probs(idx < 79, y, 0.88, 0.4),                   # 0.79, a near-copy of A
        "B": probs(idx >= 25, y, 0.7, 0.45),                   # 0.75, wrong on 0..24 only
        "C": probs((idx >= 10) & (idx < 85) | (idx >= 95), y, 0.65, 0.45),  # 0.80 on other samples
        "weak": probs(idx % 2 == 0, y, 0.6, 0.45),             # 0.50: below the guard
    }
    exp = Experiment(str(tmp_path / "exp"))
    exp.write_folds(pd.DataFrame({"sample_id": ids + ["t0", "t1"], "path": "", "label": list(y) + [0, 1],
                                  "fold": [0] * N + [1, 1]}))
    rows = []
    for tid, P in preds.items():
        exp.candidate(tid).write([dict(checkpoint=f"/ckpt/{tid}", fold=0)], probs_table(ids, P), {"arch": tid})
        rows.append(dict(trial_id=tid, score=accuracy(y, P), completed=True, checkpoint=f"/ckpt/{tid}",
                         epochs_run=3))
    exp.write_trials(pd.DataFrame(rows))
    return exp, y, preds


def blend_accuracy(y, preds, chosen):
    return accuracy(y, np.mean([preds[t] for t in chosen], axis=0))


def test_complementary_configs_beat_a_stronger_near_copy(experiment):
    exp, y, preds = experiment
    trials = exp.trials()
    by_score = choose(trials, exp, 2, "max", "accuracy", by="score")
    assert by_score["trial_id"].tolist() == ["A", "C"] or by_score["trial_id"].tolist()[0] == "A"
    top2 = trials.sort_values("score", ascending=False, kind="stable")["trial_id"].head(2).tolist()
    complementary = choose(trials, exp, 2, "max", "accuracy")
    picked = complementary["trial_id"].tolist()
    assert "A2" not in picked and len(picked) == 2
    assert blend_accuracy(y, preds, picked) > blend_accuracy(y, preds, ["A", "A2"])
    assert blend_accuracy(y, preds, picked) > blend_accuracy(y, preds, top2)
    # the reason names the greedy step and the gain it brought
    assert complementary["crossfit_rank"].tolist() == [1, 2]
    assert "best single config" in complementary["crossfit_reason"].iloc[0]
    assert complementary["crossfit_gain"].iloc[1] > 0
    assert "greedy step" in complementary["crossfit_reason"].iloc[1]


def test_the_score_rule_takes_the_top_m(experiment):
    exp, _, _ = experiment
    chosen = choose(exp.trials(), exp, 3, "max", "accuracy", by="score")
    assert chosen["trial_id"].tolist() == ["A", "C", "A2"]
    assert chosen["crossfit_gain"].isna().all()


def test_a_weak_config_is_never_eligible_for_complementarity(experiment):
    exp, _, _ = experiment
    trials = exp.trials()
    assert "weak" not in eligible(trials, "max")["trial_id"].tolist()
    assert "weak" not in choose(trials, exp, 4, "max", "accuracy")["trial_id"].tolist()
    # ... but it may still fill the budget by score when nothing better is left
    last = choose(trials, exp, 5, "max", "accuracy").iloc[-1]
    assert last["trial_id"] == "weak" and "filled by score" in last["crossfit_reason"]


def test_when_the_greedy_ensemble_stops_improving_the_rest_is_filled_by_score(experiment):
    exp, _, _ = experiment
    chosen = choose(exp.trials(), exp, 4, "max", "accuracy")
    assert len(chosen) == 4 and chosen["trial_id"].is_unique
    filled = chosen[chosen["crossfit_reason"].str.contains("filled by score")]
    assert (filled["crossfit_gain"].isna()).all()


def test_stopped_trials_are_never_chosen(experiment):
    exp, _, _ = experiment
    trials = exp.trials()
    trials.loc[trials["trial_id"] == "B", "completed"] = False
    assert "B" not in choose(trials, exp, 3, "max", "accuracy")["trial_id"].tolist()


def test_jobs_cover_every_fold_of_the_chosen_configs_at_the_searched_length(experiment):
    exp, _, _ = experiment
    cids, jobs = crossfit_jobs(exp.trials(), exp, ["B", "A"], folds=3)
    assert cids == ["cv-B", "cv-A"]
    assert [(j["candidate"], j["fold"]) for j in jobs] == [("cv-B", 0), ("cv-B", 1), ("cv-B", 2),
                                                           ("cv-A", 0), ("cv-A", 1), ("cv-A", 2)]
    assert all(j["epochs"] == 3 for j in jobs)
    assert [j.get("from_checkpoint") for j in jobs if j["fold"] == 0] == ["/ckpt/B", "/ckpt/A"]


def test_an_anchor_goes_first_whatever_its_score_and_the_rest_are_chosen_as_before(experiment):
    """Under a time budget the task's default recipe leads the final stage: ASHA may have stopped it early
    (here: 'weak', stopped), yet trained long it can be the best network."""
    exp, _, _ = experiment
    trials = exp.trials()
    trials.loc[trials["trial_id"] == "weak", "completed"] = False
    without = choose(trials, exp, 2, "max", "accuracy", partial=True)["trial_id"].tolist()
    chosen = choose(trials, exp, 3, "max", "accuracy", partial=True, anchor="weak")
    assert chosen["trial_id"].tolist() == ["weak", *without]
    assert chosen["crossfit_rank"].tolist() == [1, 2, 3]
    assert chosen["crossfit_reason"].iloc[0] == ANCHOR_REASON and pd.isna(chosen["crossfit_gain"].iloc[0])
    # one config: the anchor alone; and the anchor is never chosen twice
    assert choose(trials, exp, 1, "max", "accuracy", partial=True, anchor="weak")["trial_id"].tolist() == ["weak"]
    twice = choose(trials, exp, 3, "max", "accuracy", partial=True, anchor="A")["trial_id"].tolist()
    assert twice[0] == "A" and twice.count("A") == 1 and len(twice) == 3


def test_the_default_recipe_s_trial_is_found_by_its_config_and_only_when_it_ran():
    default = {"arch": "test_resnet", "lr": 0.01, "batch_size": 32, "label_smoothing": 0.1,
               "image_size_test_resnet": 48}   # (a parameter that is no column of trials.parquet is not compared)
    trials = pd.DataFrame([
        dict(trial_id="t1", arch="test_resnet", lr=0.0279, batch_size=32, label_smoothing=0.1, status="ok",
             epochs_run=10),
        dict(trial_id="t2", arch="test_resnet", lr=0.01 + 1e-12, batch_size=32, label_smoothing=0.1, status="ok",
             epochs_run=2),
        dict(trial_id="t3", arch="test_efficientnet", lr=0.01, batch_size=32, label_smoothing=0.1, status="ok",
             epochs_run=10)])
    assert default_recipe_trial(trials, default) == "t2"
    trials.loc[1, "status"] = "error"
    assert default_recipe_trial(trials, default) is None
    trials.loc[1, ["status", "epochs_run"]] = ["ok", 0]
    assert default_recipe_trial(trials, default) is None
