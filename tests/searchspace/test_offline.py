"""Real data, offline, small data: what can be checked before the search is checked there.

- pretrained weights resolve before any trial: ``--pretrained yes`` stops with
  one line, ``auto`` fine-tunes what has weights and trains the rest from
  scratch with a scratch learning-rate range, and no trial fails on weights;
- Optuna's study records ASHA-stopped trials as PRUNED, finished ones as
  COMPLETE with their final score, failed ones as FAIL;
- an empty test folder means no test set; non-image files are skipped with a warning.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import threading

import huggingface_hub.constants
import optuna
import pandas as pd
import pytest
from helpers import (
    make_deepfake_folders,
    make_imagefolder,
    make_paddy,
    prepare_experiment,
    ray_temp_dir,
    without_session_ray,
)

from core.experiment import STUDY_FILE, open_journal
from searchspace.data import SkippedFiles
from searchspace.run import main
from searchspace.searcher import TruthfulOptunaSearch
from searchspace.tasks import deepfake, imagefolder, paddy
from searchspace.tasks._space import LR_FINETUNE, LR_SCRATCH


@pytest.fixture
def offline(monkeypatch):
    """No hub for this test, whatever the machine's network: the resolver must not depend on it."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


class Tripwire(threading.Thread):
    """A local port that stands in for the hub: it records every connection and closes it at once."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list[str] = []

    def run(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.connections.append(f"{peer[0]}:{peer[1]}")
            conn.close()


@pytest.fixture
def offline_ray(tmp_path_factory, tmp_path):
    """A local Ray whose workers find the hub at a tripwire (HF_ENDPOINT) and an empty Hugging Face
    cache: a worker that tries to download anything is seen. Yields the tripwire."""
    import ray

    wire = Tripwire()
    wire.start()
    env = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{wire.port}",
           "HF_HOME": str(tmp_path / "hf-home"), "TORCH_HOME": str(tmp_path / "torch-home"),
           "HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    with without_session_ray(tmp_path_factory):
        temp, fallback = ray_temp_dir(tmp_path_factory)
        ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env})
        try:
            yield wire
        finally:
            ray.shutdown()
            wire.sock.close()
            if fallback:
                shutil.rmtree(temp, ignore_errors=True)


def _argv(data, tmp_path, *extra: str) -> list[str]:
    return ["paddy", "--data", str(data), "--storage", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
            "--name", "exp", *extra]


# --- weights before the search ------------------------------------------------------

def test_pretrained_yes_without_weights_stops_before_any_trial(tmp_path, capsys, offline, weights_dir):
    data = make_paddy(tmp_path / "data", test=0)
    code = main(_argv(data, tmp_path, "--archs", "test_resnet,test_efficientnet", "--pretrained", "yes",
                      "--weights-dir", str(weights_dir)))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "no pretrained weights for test_efficientnet" in err and "python -m trainer.weights fetch" in err
    assert not (tmp_path / "runs" / "exp" / "experiment.json").exists()


def test_auto_says_once_per_architecture_where_its_weights_come_from(tmp_path, offline, weights_dir):
    data = make_paddy(tmp_path / "data", test=0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ctx = prepare_experiment(_argv(data, tmp_path, "--archs", "test_resnet,test_efficientnet",
                                       "--weights-dir", str(weights_dir)), tmp_path / "runs" / "exp")
    lines = out.getvalue().splitlines()
    assert lines.count("test_efficientnet: no pretrained weights found offline; trains from scratch") == 1
    assert sum(line.startswith("test_resnet: pretrained weights from weights-dir") for line in lines) == 1
    assert ctx.weights == {"test_resnet": str(weights_dir / "test_resnet.pth"), "test_efficientnet": None}


def test_pretrained_no_resolves_nothing_and_says_nothing(tmp_path, weights_dir, capsys):
    data = make_paddy(tmp_path / "data", test=0)
    ctx = prepare_experiment(_argv(data, tmp_path, "--archs", "test_resnet", "--weights-dir", str(weights_dir),
                                   "--pretrained", "no"), tmp_path / "runs" / "exp")
    assert ctx.weights == {"test_resnet": None}
    assert "pretrained weights" not in capsys.readouterr().out


@pytest.mark.parametrize("search", [False, True])
def test_the_space_fine_tunes_what_has_weights_with_the_fine_tuning_range(search):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        constants = paddy.define_search_space(
            trial, archs={"test_resnet": [16], "test_efficientnet": [16]},
            pretrained={"test_resnet": True, "test_efficientnet": False}, search_pretrained=search)
        config = {**trial.params, **constants}
        if config["arch"] == "test_efficientnet":
            assert config["pretrained"] is False and "pretrained" not in trial.params
        if config["pretrained"]:
            assert LR_FINETUNE[0] <= config["lr"] <= LR_FINETUNE[1] and "lr_scratch" not in config
            assert "freeze_fraction" in config
        else:
            assert LR_SCRATCH[0] <= config["lr_scratch"] == config["lr"] <= LR_SCRATCH[1]
            assert "freeze_fraction" not in config
        seen.add((config["arch"], config["pretrained"]))
        study.tell(trial, 0.5)
    # Not searched by default: an architecture with weights always fine-tunes.
    expected = {("test_resnet", True), ("test_efficientnet", False)} | ({("test_resnet", False)} if search else set())
    assert seen == expected


# --- Optuna is told the truth -----------------------------------------------------------

def _space(trial):
    trial.suggest_float("x", 0.0, 1.0)


def test_the_searcher_records_stopped_trials_as_pruned():
    """Tune's calls, in Tune's order, on the real searcher and a real in-memory study."""
    searcher = TruthfulOptunaSearch(space=_space, metric="accuracy", mode="max", max_t=3,
                                    sampler=optuna.samplers.TPESampler(seed=0))
    for tid in ("stopped", "finished", "failed"):
        assert "x" in searcher.suggest(tid)
    # The result ASHA stops a trial on goes to on_trial_complete only (Tune's order).
    searcher.on_trial_result("stopped", {"accuracy": 0.2, "training_iteration": 1})
    searcher.on_trial_complete("stopped", {"accuracy": 0.25, "training_iteration": 2})
    for epoch, acc in ((1, 0.3), (2, 0.5), (3, 0.6)):
        searcher.on_trial_result("finished", {"accuracy": acc, "training_iteration": epoch})
    searcher.on_trial_complete("finished", {"accuracy": 0.6, "training_iteration": 3})
    searcher.on_trial_result("failed", {"accuracy": 0.9, "training_iteration": 1})
    searcher.on_trial_complete("failed", error=True)
    trials = searcher._ot_study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE,
                      optuna.trial.TrialState.FAIL]
    assert trials[0].intermediate_values == {1: 0.2, 2: 0.25}
    assert trials[1].value == 0.6 and trials[1].intermediate_values == {1: 0.3, 2: 0.5, 3: 0.6}


@pytest.mark.slow
def test_an_offline_search_fails_no_trial_and_the_study_matches_tune(tmp_path, offline_ray, offline, weights_dir):
    """Weights for test_resnet only, an empty test folder, ASHA that stops trials: no trial fails,
    test_resnet fine-tunes and test_efficientnet trains from scratch, every Optuna trial's
    state is what Tune did with it, and no worker ever reaches for the hub."""
    import ray

    # The tripwire sees a worker that goes to the hub: timm's own download of test_resnet
    @ray.remote
    def download_in_a_worker() -> str:
        import timm
        try:
            timm.create_model("test_resnet", pretrained=True)
            return "downloaded"
        except Exception as e:
            return type(e).__name__
    assert ray.get(download_in_a_worker.remote()) != "downloaded"
    assert offline_ray.connections, "a worker's download did not reach the tripwire"
    offline_ray.connections.clear()

    data = make_paddy(tmp_path / "data", classes=3, per_class=8, test=0)
    (data / "test_images").mkdir()
    argv = _argv(data, tmp_path, "--archs", "test_resnet,test_efficientnet", "--image-sizes", "16",
                 "--trials", "6", "--max-epochs", "3", "--grace-period", "1", "--reduction-factor", "2",
                 "--folds", "2", "--crossfit-top", "0", "--weights-dir", str(weights_dir), "--max-failures", "0")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    stdout = out.getvalue()
    assert code == 0, stdout
    assert "the test folder holds no images: no test set" in stdout
    assert stdout.count("test_efficientnet: no pretrained weights found offline; trains from scratch") == 1
    exp = tmp_path / "runs" / "exp"
    assert not (exp / "test.parquet").exists()

    trials = pd.read_parquet(exp / "trials.parquet")
    assert (trials["status"] == "ok").all() and trials["error"].isna().all()
    assert (trials["pretrained"] == (trials["arch"] == "test_resnet")).all()
    scratch = trials[~trials["pretrained"]]
    assert scratch["lr"].between(*LR_SCRATCH).all()
    assert trials[trials["pretrained"]]["lr"].between(*LR_FINETUNE).all()

    study = optuna.load_study(study_name="exp", storage=open_journal(str(exp / STUDY_FILE)))
    # The portfolio came first: one default recipe per architecture (6 trials -> at most 2 points).
    first = sorted(study.trials, key=lambda t: t.number)[:2]
    assert [t.params["arch"] for t in first] == ["test_resnet", "test_efficientnet"]
    assert [t.params["scale_min"] for t in first] == [paddy.DEFAULT_RECIPE["scale_min"]] * 2
    assert "lr" in first[0].params and "lr_scratch" in first[1].params
    # keyed by architecture and learning rate: the portfolio's default recipes share their lr
    by_lr = {(t.params["arch"], t.params.get("lr", t.params.get("lr_scratch"))): t for t in study.trials}
    assert len(by_lr) == len(trials) == 6
    for row in trials.itertuples():
        t = by_lr[(row.arch, row.lr)]
        if row.completed:
            assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(row.score)
        else:
            assert row.stopped_early
            assert t.state == optuna.trial.TrialState.PRUNED and max(t.intermediate_values) == row.epochs_run
    # No trial, cross-fit job or data check on a worker went to the hub
    assert offline_ray.connections == []


# --- bad input found on real data --------------------------------------------------------

def test_an_empty_test_folder_means_no_test_set(tmp_path, capsys):
    data = make_paddy(tmp_path / "data", test=0)
    (data / "test_images").mkdir()
    ctx = prepare_experiment(_argv(data, tmp_path, "--pretrained", "no"), tmp_path / "runs" / "exp")
    out = capsys.readouterr().out
    assert "the test folder holds no images: no test set, so no test predictions and no submission" in out
    assert "no test set" in out.splitlines()[-1]
    assert ctx.test_key is None and not (tmp_path / "runs" / "exp" / "test.parquet").exists()


def test_an_empty_deepfake_test_folder_means_no_test_set(tmp_path, capsys):
    data = make_deepfake_folders(tmp_path / "data", test=0)
    (data / "test").mkdir()
    argv = ["deepfake", "--data", str(data), "--storage", str(tmp_path / "runs"), "--cache-dir",
            str(tmp_path / "cache"), "--name", "exp", "--pretrained", "no", "--folds", "2"]
    assert prepare_experiment(argv, tmp_path / "runs" / "exp").test_key is None
    assert "no test set" in capsys.readouterr().out


def test_non_image_files_are_skipped_with_a_warning(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "if", classes=2, per_class=3, test=True)
    (root / "class_a" / "README.txt").write_text("notes")
    (root / "test" / "labels.csv").write_text("x")
    with pytest.warns(SkippedFiles) as caught:
        ds = imagefolder.load(str(root))
    assert sorted(str(w.message).rsplit(": ", 1)[-1] for w in caught) == ["class_a/README.txt", "labels.csv"]
    assert len(ds.train) == 6 and len(ds.test) == 3
    folders = make_deepfake_folders(tmp_path / "df")
    (folders / "train" / "fake" / "thumbs.db").write_bytes(b"\0")
    with pytest.warns(SkippedFiles, match="thumbs.db"):
        assert len(deepfake.load(str(folders)).train) == 14
    # searchspace.run prints each warning as one line and goes on
    argv = ["imagefolder", "--data", str(root), "--storage", str(tmp_path / "runs"), "--cache-dir",
            str(tmp_path / "cache"), "--name", "exp", "--pretrained", "no", "--folds", "2"]
    prepare_experiment(argv, tmp_path / "runs" / "exp")
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 2 and "class_a/README.txt" in warned[0] and "labels.csv" in warned[1]
    assert "skipping 1 file(s) that are not images" in warned[0]
    assert json.loads((tmp_path / "runs" / "exp" / "experiment.json").read_text())["task"] == "imagefolder"
