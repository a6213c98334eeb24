"""python -m ensemble_builder select / predict, end to end on a real tiny search experiment."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.experiment import aligned, probs_table
from ensemble_builder.__main__ import main


@pytest.fixture
def experiment(tiny_experiment, tmp_path):
    """A private copy of the session's experiment (select writes into it)."""
    return shutil.copytree(tiny_experiment.experiment, tmp_path / "runs" / "tiny")


def rewrite_probs(path, change) -> None:
    table = pq.read_table(path)
    P = np.stack(table.column("probs").to_numpy(zero_copy_only=False))
    pq.write_table(probs_table(table.column("sample_id").to_pylist(), change(P)), path)


def run_bad(argv, capsys, experiment) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (experiment / "ensemble").exists()   # nothing half-written
    return err


def test_select_then_predict(experiment, tiny_experiment, tmp_path, capsys):
    assert main(["select", "--experiment", str(experiment), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "cross-fitted" in out and "more than the 2 candidate(s); using them all" in out
    for section in ("members:", "out-of-fold scores", "per-class report", "confusion matrix"):
        assert section in out

    report = json.loads((experiment / "ensemble" / "ensemble.json").read_text())
    assert {m["candidate"] for m in report["members"]} <= {"cv-" + t for t in _trial_ids(experiment)}
    assert sum(m["weight"] for m in report["members"]) == pytest.approx(1.0)
    assert set(report["scores"]) == {"ensemble", "best_single", "uniform_top2"}
    assert report["full_coverage"] is True

    sub = pd.read_csv(experiment / "ensemble" / "submission.csv", dtype=str)
    order = pd.read_csv(tiny_experiment.data / "sample_submission.csv", dtype=str)["image_id"].tolist()
    assert list(sub.columns) == ["image_id", "label"]
    assert sub["image_id"].tolist() == order
    classes = json.loads((experiment / "experiment.json").read_text())["class_names"]
    assert set(sub["label"]) <= set(classes)
    # the ensemble's test probabilities, kept beside the submission, are what its labels came from
    probs = pq.read_table(experiment / "ensemble" / "test.parquet")
    P = aligned(probs, order)
    assert np.allclose(P.sum(1), 1, atol=1e-4) and [classes[i] for i in P.argmax(1)] == sub["label"].tolist()

    preds = tmp_path / "preds.csv"
    assert main(["predict", "--experiment", str(experiment), "--images", str(tiny_experiment.data / "test_images"),
                 "--out", str(preds), "--cache-dir", str(tmp_path / "cache")]) == 0
    got = pd.read_csv(preds, dtype={"image": str, "label": str})
    assert len(got) == tiny_experiment.test_images
    assert list(got.columns) == ["image", "label"] + [f"p_{c}" for c in classes]
    assert np.allclose(got[[f"p_{c}" for c in classes]].sum(axis=1), 1, atol=1e-4)
    # The same fold models and TTA as the cross-fit's test predictions: the same labels.
    merged = got.merge(sub, left_on="image", right_on="image_id")
    assert len(merged) == len(sub) and (merged["label_x"] == merged["label_y"]).all()


def test_newest_experiment_is_the_default(experiment, capsys):
    assert main(["select", "--runs", str(experiment.parent), "--top", "1"]) == 0
    assert str(experiment) in capsys.readouterr().out
    assert (experiment / "ensemble" / "ensemble.json").exists()


def test_alignment_is_by_sample_id(experiment, capsys):
    assert main(["select", "--experiment", str(experiment), "--top", "2"]) == 0
    before = json.loads((experiment / "ensemble" / "ensemble.json").read_text())
    shutil.rmtree(experiment / "ensemble")
    rng = np.random.default_rng(0)
    for path in experiment.glob("candidates/*/oof.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.take(pa.array(rng.permutation(len(table)))), path)
    assert main(["select", "--experiment", str(experiment), "--top", "2"]) == 0
    after = json.loads((experiment / "ensemble" / "ensemble.json").read_text())
    assert after["members"] == before["members"]
    for name, scores in before["scores"].items():
        assert after["scores"][name] == pytest.approx(scores)


def test_holdout_candidates_when_nothing_was_cross_fitted(experiment, capsys):
    for path in experiment.glob("candidates/cv-*"):
        shutil.rmtree(path)
    assert main(["select", "--experiment", str(experiment), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "holdout fold only" in out and "no submission" in out
    folds = pd.read_parquet(experiment / "folds.parquet")
    assert f"{int((folds['fold'] == 0).sum())} training images" in out
    assert not (experiment / "ensemble" / "submission.csv").exists()


def test_top_zero(experiment, capsys):
    assert "--top 0" in run_bad(["select", "--experiment", str(experiment), "--top", "0"], capsys, experiment)


def test_no_candidates(experiment, capsys):
    shutil.rmtree(experiment / "candidates")
    assert "no candidates" in run_bad(["select", "--experiment", str(experiment)], capsys, experiment)


def test_mismatched_class_count(experiment, capsys):
    path = next(experiment.glob("candidates/cv-*/oof.parquet"))
    rewrite_probs(path, lambda P: np.hstack([P, np.zeros((len(P), 1), P.dtype)]))
    err = run_bad(["select", "--experiment", str(experiment)], capsys, experiment)
    assert str(path) in err and "4 classes" in err


@pytest.mark.parametrize("change, words", [
    (lambda P: np.where(np.arange(P.size).reshape(P.shape) == 0, np.nan, P), "NaN"),
    (lambda P: P * 0.5, "sum to 1"),
])
def test_invalid_probabilities(experiment, capsys, change, words):
    path = next(experiment.glob("candidates/cv-*/oof.parquet"))
    rewrite_probs(path, change)
    err = run_bad(["select", "--experiment", str(experiment)], capsys, experiment)
    assert str(path) in err and words in err


def test_missing_member_checkpoint(experiment, tiny_experiment, tmp_path, capsys):
    assert main(["select", "--experiment", str(experiment), "--top", "2"]) == 0
    member = json.loads((experiment / "ensemble" / "ensemble.json").read_text())["members"][0]["candidate"]
    info_path = experiment / "candidates" / member / "members.json"
    info = json.loads(info_path.read_text())
    info["members"][1]["checkpoint"] = str(tmp_path / "gone")
    info_path.write_text(json.dumps(info))
    out = tmp_path / "preds.csv"
    code = main(["predict", "--experiment", str(experiment), "--images", str(tiny_experiment.data / "test_images"),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "member checkpoint missing" in err and str(tmp_path / "gone") in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def _trial_ids(experiment) -> list[str]:
    return pd.read_parquet(experiment / "trials.parquet")["trial_id"].tolist()
