"""The storage policy on real searches: what is kept and what is dropped, and that select, predict
and --crossfit-only still work on what is left."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers import make_paddy

import ensemble_builder
from searchspace.run import main


def run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0, out.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_session):
    base = tmp_path_factory.mktemp("policy")
    data = make_paddy(base / "data", classes=3, per_class=8, test=4)
    common = ["paddy", "--data", str(data), "--storage", str(base / "runs"), "--cache-dir", str(base / "cache"),
              "--archs", "test_resnet,test_efficientnet", "--image-sizes", "16", "--trials", "6", "--max-epochs", "3",
              "--grace-period", "1", "--reduction-factor", "2", "--folds", "2", "--pretrained", "no"]
    out = run(common + ["--name", "pruned", "--crossfit-top", "1"])
    run(common + ["--name", "kept", "--crossfit-top", "1", "--keep-checkpoints"])
    return base / "runs", data, out


def files(root: Path, name: str) -> list[Path]:
    return sorted(root.rglob(name))


def test_what_is_kept_and_what_is_dropped(searched):
    runs, _, out = searched
    exp = runs / "pruned"
    trials = pd.read_parquet(exp / "trials.parquet")
    assert trials["stopped_early"].any() and trials["completed"].any()
    assert "storage: removed" in out
    assert files(exp, "train_state.pt") == []                      # no trial can resume any more
    for row in trials.itertuples():
        ckpt = Path(row.checkpoint)
        assert (ckpt / "holdout.parquet").exists() and (ckpt / "config.json").exists()
        assert (exp / "candidates" / row.trial_id / "oof.parquet").exists()
        assert (ckpt / "model.pt").exists() == bool(row.completed)   # stopped trials lose their weights
    assert [p for p in files(exp, "*.pt") if "crossfit-" in str(p)] == []   # fold records hold the weights
    fold_models = files(exp / "candidates", "model.pt")
    assert len(fold_models) == 1   # 2 folds: fold 1 retrained, fold 0 = the search trial's checkpoint


def test_keep_checkpoints_keeps_everything_and_the_policy_cuts_the_size(searched):
    runs, _, _ = searched
    kept = files(runs / "kept", "train_state.pt")
    assert kept and [p for p in files(runs / "kept", "*.pt") if "crossfit-" in str(p)]
    size = {name: sum(p.stat().st_size for p in (runs / name).rglob("*") if p.is_file()) for name in ("kept", "pruned")}
    assert size["pruned"] < size["kept"]


def test_select_predict_and_crossfit_only_work_after_pruning(searched, tmp_path):
    runs, data, _ = searched
    exp = shutil.copytree(runs / "pruned", tmp_path / "pruned")
    sel = ensemble_builder.select(str(exp), top=2)
    assert sel.members
    preds = ensemble_builder.predict(str(exp), str(data / "test_images"))
    assert len(preds) == 4
    cand = next((exp / "candidates").glob("cv-*"))
    shutil.rmtree(cand / "folds" / "1")
    for name in ("oof.parquet", "test.parquet", "members.json"):
        (cand / name).unlink()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["paddy", "--crossfit-only", "--experiment", str(exp)]) == 0, out.getvalue()
    assert (cand / "folds" / "1" / "done.json").exists() and (cand / "oof.parquet").exists()


def test_a_moved_experiment_is_pruned_where_it_is_and_the_original_is_left_alone(searched, tmp_path):
    runs, _, _ = searched
    before = sorted(p.relative_to(runs / "kept") for p in (runs / "kept").rglob("*.pt"))
    moved = shutil.copytree(runs / "kept", tmp_path / "moved")
    from core.experiment import Experiment
    from searchspace.storage_policy import prune

    freed = prune(Experiment(str(moved)))
    assert freed["files"] > 0 and freed["bytes"] > 0
    assert files(moved, "train_state.pt") == []
    assert sorted(p.relative_to(runs / "kept") for p in (runs / "kept").rglob("*.pt")) == before


def checkpoint_dirs(exp: Path) -> dict[str, list[str]]:
    """{search trial folder: its checkpoint_* folders that hold files}."""
    return {d.name: sorted(c.name for c in d.glob("checkpoint_*") if any(c.iterdir()))
            for d in exp.glob("train_trial_*") if d.is_dir()}


@pytest.mark.parametrize("name", ["pruned", "kept"])
def test_a_trial_keeps_only_the_checkpoint_of_its_candidate(searched, name):
    # KeepLatest deleted the superseded ones during the search (Ray keeps them all, so it never
    # snapshots the whole experiment at each checkpoint); --keep-checkpoints does not bring them back.
    runs, _, _ = searched
    trials = pd.read_parquet(runs / name / "trials.parquet")
    dirs = checkpoint_dirs(runs / name)
    assert len(dirs) == len(trials)
    for row in trials.itertuples():
        ckpt = Path(row.checkpoint)
        assert dirs[ckpt.parent.name] == [ckpt.name], (row.trial_id, dirs[ckpt.parent.name])
    assert (trials["epochs_run"] > 1).any()   # some trial did supersede a checkpoint


def test_prune_removes_checkpoints_a_resume_left_behind(searched, tmp_path):
    runs, _, _ = searched
    moved = Path(shutil.copytree(runs / "kept", tmp_path / "moved"))
    from core.experiment import Experiment
    from searchspace.storage_policy import prune

    row = pd.read_parquet(moved / "trials.parquet").iloc[0]
    kept = moved / Path(row.checkpoint).parent.name / Path(row.checkpoint).name
    stale = shutil.copytree(kept, kept.parent / "checkpoint_000099")   # one a resumed trial no longer names
    prune(Experiment(str(moved)))
    assert not any(p.is_file() for p in stale.rglob("*"))
    assert (kept / "holdout.parquet").exists() and (kept / "config.json").exists()
