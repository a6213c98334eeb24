"""Distillation: the ensemble's soft targets, a student trained through the accelerator branch with its honest
score, size and speed, ``predict --model student`` on new images, and a kill and resume in the middle."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import BadInput
from core.experiment import Experiment, aligned, probs_table
from ensemble_builder.__main__ import main as ensemble_main
from ensemble_builder.ensemble import shipped_oof
from ensemble_builder.stacking import stacked_proba
from trainer.fit import Teacher

REPO = Path(__file__).resolve().parents[2]


def selected_copy(tiny_experiment, tmp_path, *select_args) -> Path:
    exp = shutil.copytree(tiny_experiment.experiment, tmp_path / "runs" / "tiny")
    with contextlib.redirect_stdout(io.StringIO()):
        assert ensemble_main(["select", "--experiment", str(exp), *select_args]) == 0
    return exp


# --- the soft targets ----------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["accuracy", "log_loss"])
def test_soft_targets_are_the_shipped_blend_of_the_members_out_of_fold(tiny_experiment, tmp_path, objective):
    exp = Experiment(str(selected_copy(tiny_experiment, tmp_path, "--metric", objective)))
    record, order = exp.ensemble(), exp.folds()["sample_id"].tolist()
    ids, P = shipped_oof(exp.location)
    assert ids == order and P.shape == (len(order), 3) and np.allclose(P.sum(1), 1, atol=1e-5)
    oof = {m["candidate"]: aligned(exp.candidate(m["candidate"]).oof(), order) for m in record["members"]}
    if record.get("stacking"):   # the stacker's arrays on its inputs' log-probabilities
        direct = stacked_proba(record["stacking"], oof)
    else:                        # the weights of ensemble.json, applied by hand
        direct = sum(m["weight"] * oof[m["candidate"]] for m in record["members"])
    assert np.allclose(P, direct, atol=1e-6)


def test_a_hand_made_stacker_and_weights_give_their_own_blend(tmp_path):
    """Hand-made candidates and ensemble.json: weights, then a stacker, against numpy written out."""
    from core import storage

    rng = np.random.default_rng(0)
    root = tmp_path / "exp"
    ids = [f"s{i}" for i in range(12)]
    exp = Experiment(str(root))
    storage.write_json(exp.file("experiment.json"), dict(task="handmade", metric="accuracy", class_names=["a", "b"]))
    labels, folds = np.arange(12) % 2, np.arange(12) % 3
    exp.write_folds(pd.DataFrame({"sample_id": ids, "path": ids, "label": labels, "fold": folds}))
    P = rng.dirichlet([1, 1], size=(2, 12)).astype(np.float32)
    for c in range(2):
        exp.candidate(f"c{c}").write([], probs_table(ids[::-1], P[c][::-1]), {})   # rows in another order
    storage.write_json(exp.ensemble_file(), dict(members=[dict(candidate="c0", weight=0.25),
                                                          dict(candidate="c1", weight=0.75)]))
    assert np.allclose(shipped_oof(str(root))[1], 0.25 * P[0] + 0.75 * P[1], atol=1e-6)
    coef, intercept = rng.normal(size=(2, 4)), rng.normal(size=2)
    storage.write_json(exp.ensemble_file(), dict(members=[dict(candidate="c0", weight=0.5),
                                                          dict(candidate="c1", weight=0.5)],
                                                 stacking=dict(inputs=["c1", "c0"], coef=coef.tolist(),
                                                               intercept=intercept.tolist(), C=1.0, log_floor=1e-6)))
    X = np.log(np.clip(np.concatenate([P[1], P[0]], axis=1), 1e-6, 1))
    z = X @ coef.T + intercept
    expect = np.exp(z - z.max(1, keepdims=True))
    assert np.allclose(shipped_oof(str(root))[1], expect / expect.sum(1, keepdims=True), atol=1e-5)


def test_teacher_softening_is_a_tempered_softmax():
    p = np.array([[0.7, 0.2, 0.1]])
    soft = Teacher(p, temperature=2.0).softened()
    expect = np.sqrt(p) / np.sqrt(p).sum()
    assert np.allclose(soft, expect, atol=1e-6) and np.allclose(Teacher(p, temperature=1.0).softened(), p, atol=1e-6)


def test_distilling_without_an_ensemble_is_one_clear_line(tiny_experiment, tmp_path, capsys):
    exp = shutil.copytree(tiny_experiment.experiment, tmp_path / "runs" / "tiny")
    shutil.rmtree(exp / "ensemble", ignore_errors=True)
    assert ensemble_main(["distill", "--experiment", str(exp)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ensemble_builder select" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(BadInput, match="--temperature"):
        selected = selected_copy(tiny_experiment, tmp_path / "b")
        from searchspace.distill import plan
        plan(Experiment(str(selected)), None, None, None, 0.0, 0.5)


# --- a student, through the accelerator branch ----------------------------------------------------

@pytest.fixture(scope="module")
def distilled(tiny_experiment, tmp_path_factory):
    """A copy of the tiny experiment, selected, its trials' context switched to the accelerator branch on the
    CPU, then distilled through the CLI (6 epochs of test_resnet)."""
    base = tmp_path_factory.mktemp("distill")
    exp = selected_copy(tiny_experiment, base)
    meta = json.loads((exp / "experiment.json").read_text())
    meta["context"]["gpu_path_on_cpu"] = True
    (exp / "experiment.json").write_text(json.dumps(meta))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ensemble_main(["distill", "--experiment", str(exp), "--epochs", "6"]) == 0
    return Experiment(str(exp)), out.getvalue()


def test_the_student_is_a_candidate_with_an_honest_score_size_and_speed(distilled):
    exp, text = distilled
    record = exp.ensemble()["student"]
    cid = record["candidate"]
    assert cid == "student-test_resnet-" + str(record["image_size"]) and record["epochs"] == 6
    student = exp.candidate(cid)
    config = student.members()["config"]
    assert config["kind"] == "student" and config["holdout_fold"] == record["holdout_fold"] == 2
    # trained through the accelerator branch: kornia on the tensor's device, bfloat16 autocast
    for part in ("holdout", "all"):
        fold_config = json.loads(Path(student.fold(part).file("config.json")).read_text())
        assert fold_config["accelerated"] is True and fold_config["aug_backend"] == "kornia"
        assert student.fold(part).record()["epochs"] == 6
    # the scored student never saw its fold: its out-of-fold predictions are exactly that fold
    index = exp.folds()
    held = set(index.loc[index["fold"] == 2, "sample_id"])
    assert set(student.oof().column("sample_id").to_pylist()) == held and record["images"] == len(held)
    assert set(record["scores"]) == {"student", "best_single", "ensemble_in_sample"}
    # select never blends it back in
    assert cid not in exp.ensemble()["candidates"]
    # size and speed, measured side by side
    assert record["params"] > 0 and record["mb"] > 0 and record["ensemble_params"] >= record["params"]
    assert record["images_per_s"] > 0 and record["ensemble_images_per_s"] > 0
    assert record["speedup"] == pytest.approx(record["images_per_s"] / record["ensemble_images_per_s"], rel=0.01)
    assert f"student {cid}:" in text and "which the scored student never trained on" in text
    # its own submission, from its test predictions
    sub = pd.read_csv(record["submission"], dtype=str)
    names = exp.meta()["class_names"]
    order = sub.iloc[:, 0].tolist()
    assert sub["label"].tolist() == [names[i] for i in aligned(student.test(), order).argmax(1)]


def test_the_report_shows_the_student_against_the_ensemble_and_the_best_single(distilled):
    """searchspace.report's ensemble section: the student's and the ensemble's size and images per second, and
    the three scores on the student's held-out fold, each cell read back against ensemble.json."""
    from helpers import parse

    from searchspace.report import main as report_main

    exp, _ = distilled
    record = exp.ensemble()["student"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert report_main(["--experiment", exp.location]) == 0
    index = Path(exp.location) / "report" / "index.html"
    text = index.read_text()
    part = text[text.index("<h3>Distilled student</h3>"):]
    table = next(t for t in parse(index).tables if t[0] == ["", "accuracy", "log loss", "parameters", "MB", "images/s"])
    student, single, ensemble = table[1:4]
    s = record["scores"]
    assert student[0] == f"student test_resnet@{record['image_size']}"
    assert [float(v) for v in student[1:3]] == pytest.approx([s["student"]["accuracy"], s["student"]["log_loss"]],
                                                             abs=1e-4)
    assert student[3] == f"{record['params']:,}"
    assert float(student[5]) == pytest.approx(record["images_per_s"], rel=1e-3)
    assert float(single[1]) == pytest.approx(s["best_single"]["accuracy"], abs=1e-4) and single[3:] == ["", "", ""]
    assert ensemble[0] == f"ensemble: {record['ensemble_models']} models"
    assert ensemble[3] == f"{record['ensemble_params']:,}"
    assert float(ensemble[5]) == pytest.approx(record["ensemble_images_per_s"], rel=1e-3)
    assert f"fold {record['holdout_fold']} ({record['images']} images)" in part
    assert f"the student is {record['speedup']:g}x the ensemble" in part


def test_predict_with_the_student_alone_on_new_images(distilled, tiny_experiment, tmp_path):
    exp, _ = distilled
    out = tmp_path / "student.csv"
    assert ensemble_main(["predict", "--experiment", exp.location, "--images",
                          str(tiny_experiment.data / "test_images"), "--out", str(out), "--model", "student",
                          "--cache-dir", str(tmp_path / "cache")]) == 0
    got = pd.read_csv(out, dtype={"image": str})
    names = exp.meta()["class_names"]
    P = got.set_index("image").loc[exp.test()["sample_id"], [f"p_{n}" for n in names]].to_numpy()
    student = exp.candidate(exp.ensemble()["student"]["candidate"])
    saved = aligned(student.test(), exp.test()["sample_id"].tolist())
    # the same model: predict runs it in float32, the job wrote its predictions under bfloat16 autocast
    assert np.abs(P - saved).max() < 0.05
    ensemble = tmp_path / "ensemble.csv"
    assert ensemble_main(["predict", "--experiment", exp.location, "--images",
                          str(tiny_experiment.data / "test_images"), "--out", str(ensemble)]) == 0
    assert not np.allclose(P, pd.read_csv(ensemble, dtype={"image": str}).set_index("image").loc[
        exp.test()["sample_id"], [f"p_{n}" for n in names]].to_numpy())   # not the ensemble's predictions


def test_a_killed_distillation_resumes_where_it_was(tiny_experiment, tmp_path, ray_session):
    """The CLI in a process of its own, killed once a student has saved its third epoch's state; run again,
    it continues both students from their saved states rather than from epoch 1."""
    exp = selected_copy(tiny_experiment, tmp_path)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "ensemble_builder", "distill", "--experiment", str(exp), "--epochs", "40"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    states = list((exp / "candidates").glob("student-*/folds/*/train_state.pt"))
    deadline = time.time() + 300
    try:
        while time.time() < deadline:   # wait on the event itself: a saved state at epoch 3 or later
            states = list((exp / "candidates").glob("student-*/folds/*/train_state.pt"))
            epochs = [torch.load(s, weights_only=True)["epoch"] for s in states if s.stat().st_size]
            if epochs and max(epochs) >= 3:
                break
            assert proc.poll() is None, "distill ended before the kill"
            time.sleep(0.2)
        else:
            pytest.fail("no student state at epoch 3 within 300 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = {s.parent.name: torch.load(s, weights_only=True)["epoch"] for s in states}
    assert saved   # killed part way: at least one student left its state
    with contextlib.redirect_stdout(io.StringIO()):
        assert ensemble_main(["distill", "--experiment", str(exp), "--epochs", "40"]) == 0
    student = Experiment(str(exp)).candidate(Experiment(str(exp)).ensemble()["student"]["candidate"])
    for part, epoch in saved.items():
        record = student.fold(part).record()
        assert record["epochs"] == 40 and record["resumed_at"] >= epoch >= 1, (part, record, saved)
    assert not list((exp / "candidates").glob("student-*/folds/*/train_state.pt"))   # finished: state cleared
