"""searchspace.run: bad inputs stop at the CLI edge with one line; a real tiny search writes the experiment.

The bad-input tests deliberately do not request ``ray_session``: every check
happens before ray.init, and each test asserts that Ray's state did not
change and that no trial was started (no trials.parquet).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import ray
from helpers import class_pixels, make_deepfake_csv, make_paddy, prepare_experiment, truncate_file, write_image
from PIL import Image

from core import storage
from searchspace.config import Budget
from searchspace.prepare import architectures
from searchspace.run import main
from searchspace.tasks import get_task
from trainer.cache import cached_images


def _argv(task: str, data, tmp_path, *extra: str) -> list[str]:
    return [task, "--data", str(data), "--storage", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
            "--name", "exp", "--archs", "test_resnet", "--image-sizes", "16", "--trials", "1", "--max-epochs", "1",
            *extra]


def _fails_cleanly(argv: list[str], tmp_path, capsys) -> str:
    """Run main(argv); assert exit 2, one 'error:' line on stderr, no traceback, no trial, Ray untouched."""
    ray_was_up = ray.is_initialized()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert not (tmp_path / "runs" / "exp" / "trials.parquet").exists()
    assert ray.is_initialized() == ray_was_up
    return lines[0]


# --- options -----------------------------------------------------------------------

def test_budget_takes_the_task_defaults_and_the_overrides():
    paddy = get_task("paddy")
    assert Budget().over(paddy.budget) == paddy.budget
    b = Budget(trials=3, max_epochs=2, grace_period=5, folds=4, crossfit_top=None).over(paddy.budget)
    assert (b.trials, b.max_epochs, b.folds, b.crossfit_top) == (3, 2, 4, paddy.budget.crossfit_top)
    assert b.grace_period == 2  # never more than max_epochs


def test_architectures_narrow_or_replace_the_tasks_space():
    digits = get_task("digits")
    assert architectures(digits) == digits.archs
    archs = architectures(digits, "test_resnet, test_vit", "24,16,24")
    assert archs == {"test_resnet": [16, 24], "test_vit": [16, 24]}
    # an architecture the task does not list gets every size the task uses
    archs = architectures(digits, "test_convnext")
    assert archs == {"test_convnext": sorted({s for v in digits.archs.values() for s in v})}


# --- bad inputs ----------------------------------------------------------------------

def test_missing_data_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_folder"
    line = _fails_cleanly(_argv("paddy", missing, tmp_path), tmp_path, capsys)
    assert str(missing) in line and "not found" in line


@pytest.mark.parametrize("task", ["deepfake", "imagefolder"])
def test_missing_data_folder_other_tasks(tmp_path, capsys, task):
    missing = tmp_path / "nothing_here"
    line = _fails_cleanly(_argv(task, missing, tmp_path), tmp_path, capsys)
    assert str(missing) in line


def test_paddy_folder_without_train_csv(tmp_path, capsys):
    root = make_paddy(tmp_path / "data", test=0)
    os.remove(root / "train.csv")
    line = _fails_cleanly(_argv("paddy", root, tmp_path), tmp_path, capsys)
    assert "train.csv" in line and "not found" in line


def test_csv_without_the_expected_columns(tmp_path, capsys):
    root = make_paddy(tmp_path / "data", test=0)
    df = pd.read_csv(root / "train.csv", dtype=str).drop(columns=["variety"]).rename(columns={"label": "disease"})
    df.to_csv(root / "train.csv", index=False)
    line = _fails_cleanly(_argv("paddy", root, tmp_path), tmp_path, capsys)
    assert "train.csv" in line and "label" in line and "variety" in line


def test_deepfake_csv_without_the_expected_columns(tmp_path, capsys):
    root = make_deepfake_csv(tmp_path / "data")
    (root / "validation.csv").write_text("file,target\nvalidation_fake_0.jpg,FAKE\n")
    line = _fails_cleanly(_argv("deepfake", root, tmp_path), tmp_path, capsys)
    assert "validation.csv" in line and "image_id" in line


def test_labels_in_the_csv_with_no_image(tmp_path, capsys):
    root = make_paddy(tmp_path / "data", classes=3, per_class=4, test=0)
    with open(root / "train.csv", "a") as f:
        f.write("999999.jpg,blast,ADT45,50\n")
        f.write("888888.jpg,normal,ADT45,50\n")
    line = _fails_cleanly(_argv("paddy", root, tmp_path), tmp_path, capsys)
    assert "999999.jpg" in line and "888888.jpg" in line and "train.csv" in line


def test_unknown_task(tmp_path, capsys):
    line = _fails_cleanly(_argv("cifar1000", tmp_path, tmp_path), tmp_path, capsys)
    assert "cifar1000" in line and "paddy" in line


def test_unknown_timm_model(tmp_path, capsys):
    root = make_paddy(tmp_path / "data", test=0)
    argv = _argv("paddy", root, tmp_path)
    argv[argv.index("--archs") + 1] = "test_resnet,resnet_of_dreams"
    line = _fails_cleanly(argv, tmp_path, capsys)
    assert "resnet_of_dreams" in line


def test_a_class_with_fewer_images_than_folds(tmp_path, capsys):
    root = make_paddy(tmp_path / "data", classes=3, per_class=5, test=0)
    line = _fails_cleanly(_argv("paddy", root, tmp_path, "--folds", "6"), tmp_path, capsys)
    assert "6 folds" in line and "(5)" in line


@pytest.mark.parametrize("option,value", [("--folds", "1"), ("--image-sizes", "big"), ("--image-sizes", "4"),
                                          ("--max-epochs", "0"), ("--trials", "0"), ("--max-concurrent", "-1"),
                                          ("--gpus-per-trial", "-0.5"), ("--cpus-per-trial", "0"),
                                          ("--max-failures", "-1")])
def test_bad_option_values(tmp_path, capsys, option, value):
    root = make_paddy(tmp_path / "data", test=0)
    argv = _argv("paddy", root, tmp_path)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    line = _fails_cleanly(argv, tmp_path, capsys)
    assert option in line and value in line


@pytest.mark.parametrize("escape", ["../outside.jpg", "ABSOLUTE"])
def test_image_id_escaping_the_data_folder_deepfake_csv(tmp_path, capsys, escape):
    outside = write_image(tmp_path / "outside.jpg", "rgb")
    image_id = str(outside) if escape == "ABSOLUTE" else escape
    root = make_deepfake_csv(tmp_path / "data")
    df = pd.read_csv(root / "train.csv", dtype=str)
    df.loc[0, "image_id"] = image_id
    df.to_csv(root / "train.csv", index=False)
    line = _fails_cleanly(_argv("deepfake", root, tmp_path), tmp_path, capsys)
    assert repr(image_id) in line and "outside the data folder" in line


@pytest.mark.parametrize("escape", ["../../outside.jpg", "ABSOLUTE"])
def test_image_id_escaping_the_data_folder_paddy(tmp_path, capsys, escape):
    outside = write_image(tmp_path / "outside.jpg", "rgb")
    image_id = str(outside) if escape == "ABSOLUTE" else escape
    root = make_paddy(tmp_path / "data", test=0)
    df = pd.read_csv(root / "train.csv", dtype=str)
    df.loc[0, "image_id"] = image_id
    df.to_csv(root / "train.csv", index=False)
    line = _fails_cleanly(_argv("paddy", root, tmp_path), tmp_path, capsys)
    assert image_id in line


def _with_bad_images(root: Path) -> list[Path]:
    """Break two training images (truncated JPEG, text named .jpg) and one test image; return them."""
    df = pd.read_csv(root / "train.csv", dtype=str)
    first, second = (root / "train_images" / df.loc[i, "label"] / df.loc[i, "image_id"] for i in (0, 1))
    truncate_file(first)
    second.write_text("this is a text file, not a JPEG\n")
    test_bad = sorted((root / "test_images").iterdir())[0]
    truncate_file(test_bad)
    return [first, second, test_bad]


def test_unreadable_images_are_all_listed(tmp_path, capsys):
    root = make_paddy(tmp_path / "data", classes=3, per_class=4, test=3, size=(96, 64))
    bad = _with_bad_images(root)
    ray_was_up = ray.is_initialized()
    code = main(_argv("paddy", root, tmp_path))
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("error: 3 unreadable image(s)")
    assert "--skip-unreadable" in err.splitlines()[0]
    for path in bad:
        assert str(path) in err
    # one line per bad file after the summary line, nothing else
    assert len([line for line in err.splitlines() if line.strip()]) == 1 + len(bad)
    assert not (tmp_path / "runs" / "exp" / "trials.parquet").exists()
    assert ray.is_initialized() == ray_was_up


def test_an_image_only_pillow_reads_is_decoded_for_training(tmp_path):
    # The scan checks files with Pillow; training decodes with OpenCV and falls
    # back to Pillow, so whatever the scan lets through, the cache can build.
    root = make_paddy(tmp_path / "data", classes=2, per_class=3, test=0)
    df = pd.read_csv(root / "train.csv", dtype=str)
    odd = root / "train_images" / df.loc[0, "label"] / df.loc[0, "image_id"]
    Image.fromarray(class_pixels(0)).save(odd, "TGA")  # a Targa file under a .jpg name
    experiment = str(tmp_path / "runs" / "exp")
    ctx = prepare_experiment(_argv("paddy", root, tmp_path, "--folds", "2"), experiment)
    index = storage.read_parquet(storage.join(experiment, "folds.parquet")).to_pandas()
    assert str(odd) in set(index["path"])
    images = cached_images(index["path"].tolist(), ctx.data_key, 16, "squish", ctx.cache_dir)
    assert images[index["path"].tolist().index(str(odd))].max() > 0


def test_gray_rgba_palette_and_16bit_images_are_accepted(tmp_path):
    root = make_paddy(tmp_path / "data", classes=2, per_class=5, test=0,
                      kinds=["gray", "rgba", "palette", "16bit", "rgb"])
    experiment = str(tmp_path / "runs" / "exp")
    ctx = prepare_experiment(_argv("paddy", root, tmp_path, "--folds", "2"), experiment)
    index = storage.read_parquet(storage.join(experiment, "folds.parquet")).to_pandas()
    assert len(index) == 10
    meta = storage.read_json(storage.join(experiment, "experiment.json"))
    assert meta["skipped_unreadable"] == {}
    images = cached_images(index["path"].tolist(), ctx.data_key, 16, "squish", ctx.cache_dir)
    assert images.shape == (10, 16, 16, 3)
    assert all(images[i].max() > 0 for i in range(10))  # every kind decoded to something visible


# --- prepare -----------------------------------------------------------------------

def test_prepare_writes_the_index_and_context_without_ray(tmp_path):
    root = make_paddy(tmp_path / "data", classes=3, per_class=4, test=4)
    experiment = str(tmp_path / "runs" / "exp")
    ray_was_up = ray.is_initialized()
    ctx = prepare_experiment(_argv("paddy", root, tmp_path, "--folds", "2", "--seed", "3"), experiment)
    assert ctx.num_classes == 3 and ctx.max_epochs == 1 and ctx.seed == 3
    assert ctx.experiment == experiment and ctx.cache_dir == str(tmp_path / "cache")
    assert ctx.data_key and ctx.test_key and ctx.data_key != ctx.test_key
    folds = storage.read_parquet(storage.join(experiment, "folds.parquet"))
    for column in ("sample_id", "path"):  # str (pandas 3 writes large_string)
        t = folds.schema.field(column).type
        assert pa.types.is_string(t) or pa.types.is_large_string(t), (column, t)
    assert folds.schema.field("label").type == pa.int64() and folds.schema.field("fold").type == pa.int64()
    meta = storage.read_json(storage.join(experiment, "experiment.json"))
    assert meta["class_names"] == ["blast", "normal", "tungro"]
    assert meta["folds"] == 2 and meta["seed"] == 3 and meta["task"] == "paddy" and meta["mode"] == "max"
    assert meta["data"] == str(root)
    test = storage.read_parquet(storage.join(experiment, "test.parquet")).to_pandas()
    assert list(test["sample_id"]) == list(pd.read_csv(root / "sample_submission.csv")["image_id"])
    assert ray.is_initialized() == ray_was_up  # prepare never starts Ray


def test_the_summary_counts_only_the_images_kept(tmp_path, capsys):
    root = make_paddy(tmp_path / "data", classes=2, per_class=5, test=3, size=(96, 64))
    _with_bad_images(root)  # 2 training images and 1 test image
    prepare_experiment(_argv("paddy", root, tmp_path, "--folds", "2", "--skip-unreadable"), tmp_path / "runs" / "exp")
    out = capsys.readouterr().out
    assert "leaving out 3 unreadable image(s)" in out
    assert "8 training images in 2 classes, 2 folds, 2 test images" in out, out


# --- a real search -------------------------------------------------------------------

def _probs(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("probs").to_numpy(zero_copy_only=False))


def _progress_lines(out: str) -> list[str]:
    """The search's Progress callback's status lines: '[   12s] 1 running, 2/3 finished (...) | best ...' (the
    final stage's own lines, '[    7s] final stage: ...', are FoldProgress's)."""
    return [line for line in out.splitlines() if re.match(r"^\[\s*\d+s\] (?!final stage:)", line)]


@pytest.mark.slow
def test_the_final_stage_reports_its_fold_jobs_as_they_finish(tiny_experiment):
    final = [line for line in tiny_experiment.stdout.splitlines() if re.match(r"^\[\s*\d+s\] final stage:", line)]
    assert final, tiny_experiment.stdout[-2000:]
    done = [tuple(map(int, re.search(r"(\d+)/(\d+) fold jobs done", line).groups())) for line in final]
    assert done == sorted(done) and done[-1][0] == done[-1][1]   # counts up to every fold job


@pytest.mark.slow
def test_search_writes_the_experiment(tiny_experiment):
    exp = tiny_experiment.experiment
    train_csv = pd.read_csv(tiny_experiment.data / "train.csv", dtype=str)

    meta = json.loads((exp / "experiment.json").read_text())
    assert meta["task"] == "paddy" and meta["folds"] == 3 and meta["seed"] == 0
    assert meta["class_names"] == sorted(train_csv["label"].unique())

    folds = storage.read_parquet(str(exp / "folds.parquet")).to_pandas()
    assert sorted(folds["sample_id"]) == sorted(train_csv["image_id"])
    assert set(folds["fold"]) == {0, 1, 2}
    assert (pd.crosstab(folds["fold"], folds["label"]) > 0).all().all()
    names = dict(zip(train_csv["image_id"], train_csv["label"]))
    assert all(meta["class_names"][label] == names[sid] for sid, label in zip(folds["sample_id"], folds["label"]))

    trials = storage.read_parquet(str(exp / "trials.parquet")).to_pandas()
    assert len(trials) == tiny_experiment.trials
    assert trials["trial_id"].is_unique
    for column in ("trial_id", "arch", "image_size", "score", "best_score", "best_epoch", "epochs_run", "completed",
                   "stopped_early", "seconds", "checkpoint", "resize_mode", "lr", "pretrained"):
        assert column in trials.columns, column
    assert not any(c.startswith("image_size_") for c in trials.columns)
    assert set(trials["arch"]) == {"test_resnet"}
    assert set(trials["image_size"]) <= {16, 24}
    ok = trials[trials["checkpoint"].notna()]
    assert len(ok) >= 1
    assert ok["best_score"].between(0, 1).all() and ok["score"].between(0, 1).all()
    assert (ok["completed"] == (ok["epochs_run"] == tiny_experiment.max_epochs)).all()
    assert (ok["epochs_run"].between(1, tiny_experiment.max_epochs)).all()
    assert (ok["best_epoch"] <= ok["epochs_run"]).all() and (ok["best_epoch"] >= 1).all()
    assert (ok["stopped_early"] == (ok["epochs_run"] < tiny_experiment.max_epochs)).all()
    assert (ok["seconds"] > 0).all()

    fold0 = folds[folds["fold"] == 0]
    for row in ok.itertuples():
        cand = exp / "candidates" / row.trial_id
        oof = storage.read_parquet(str(cand / "oof.parquet"))
        assert oof.column_names == ["sample_id", "probs"]
        assert oof.schema.field("probs").type == pa.list_(pa.float32(), 3)
        probs = _probs(oof)
        assert probs.shape == (len(fold0), 3)
        assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs >= 0).all()
        assert sorted(oof.column("sample_id").to_pylist()) == sorted(fold0["sample_id"])
        members = json.loads((cand / "members.json").read_text())
        assert members["members"][0]["checkpoint"] == row.checkpoint
        assert members["config"]["arch"] == "test_resnet"
        # the checkpoint is the trial's last epoch (never one picked on the holdout), inside the experiment
        assert storage.exists(storage.join(row.checkpoint, "model.pt"))
        assert row.checkpoint.startswith(str(exp))
        config = storage.read_json(storage.join(row.checkpoint, "config.json"))
        assert config["epoch"] == row.epochs_run
        assert config["accuracy"] == pytest.approx(row.score)

    test = storage.read_parquet(str(exp / "test.parquet")).to_pandas()
    assert list(test.columns) == ["sample_id", "path"]
    assert list(test["sample_id"]) == list(pd.read_csv(tiny_experiment.data / "sample_submission.csv")["image_id"])
    assert all(os.path.isfile(p) for p in test["path"])


@pytest.mark.slow
def test_search_prints_progress_and_the_leaderboard(tiny_experiment):
    out = tiny_experiment.stdout
    assert "checking 36 images" in out
    assert "30 training images in 3 classes, 3 folds, 6 test images" in out
    progress = _progress_lines(out)
    assert progress and all(f"/{tiny_experiment.trials} finished" in line for line in progress)
    assert "best accuracy" in progress[-1]
    assert "leaderboard" in out
    header = next(line for line in out.splitlines() if line.split()[:2] == ["trial_id", "arch"])
    assert "accuracy" in header.split() and "epochs_run" in header.split()
    trials = storage.read_parquet(str(tiny_experiment.experiment / "trials.parquet")).to_pandas()
    for trial_id in trials.loc[trials["score"].notna(), "trial_id"]:
        assert trial_id in out


@pytest.mark.slow
def test_the_last_progress_line_counts_every_trial_finished(tiny_experiment):
    # on_trial_complete runs while Tune still has the trial RUNNING; the callback must count it itself
    last = _progress_lines(tiny_experiment.stdout)[-1]
    assert f" 0 running, {tiny_experiment.trials}/{tiny_experiment.trials} finished" in last, last


@pytest.mark.slow
def test_a_finished_experiment_is_not_overwritten(tiny_experiment, capsys):
    before = (tiny_experiment.experiment / "trials.parquet").stat().st_mtime_ns
    code = main(tiny_experiment.argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and str(tiny_experiment.experiment) in lines[0], err
    assert (tiny_experiment.experiment / "trials.parquet").stat().st_mtime_ns == before


def test_skip_unreadable_runs_and_records_the_skipped_files(tmp_path, capsys, ray_session, weights_dir):
    root = make_paddy(tmp_path / "data", classes=2, per_class=5, test=3, size=(96, 64))
    bad = _with_bad_images(root)
    argv = _argv("paddy", root, tmp_path, "--folds", "2", "--skip-unreadable", "--crossfit-top", "0",
                 "--weights-dir", str(weights_dir))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "leaving out 3 unreadable image(s)" in out
    assert re.search(r"^\[\s*\d+s\] \d+ running, \d/1 finished", out, re.M)  # the progress line
    assert re.search(r"trial \w+ ran all 1 epochs: accuracy", out)
    assert "leaderboard" in out
    exp = tmp_path / "runs" / "exp"
    meta = json.loads((exp / "experiment.json").read_text())
    assert set(meta["skipped_unreadable"]) == {str(p) for p in bad}
    assert all(meta["skipped_unreadable"].values())  # each with its reason
    assert meta["options"]["skip_unreadable"] is True
    folds = storage.read_parquet(str(exp / "folds.parquet")).to_pandas()
    assert len(folds) == 8 and not set(folds["path"]) & {str(p) for p in bad}
    test = storage.read_parquet(str(exp / "test.parquet")).to_pandas()
    assert len(test) == 2 and str(bad[2]) not in set(test["path"])
    trials = storage.read_parquet(str(exp / "trials.parquet")).to_pandas()
    assert len(trials) == 1 and trials.loc[0, "checkpoint"] is not None
