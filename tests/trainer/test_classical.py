"""The classical ensemble members (probe, kNN, pixels): fold models as arrays, fitted on real images written to
disk through the experiment's own folds, their test predictions, and ``predict`` on new images."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_paddy

import ensemble_builder
from core import storage
from core.experiment import Experiment, aligned, probs_array
from core.metrics import accuracy
from searchspace import members
from searchspace.api import prepare_only
from trainer import classical
from trainer.features import cached_features, pixel_features


def blobs(n=240, d=40, C=4, seed=0, spread=1.0):
    """Gaussian classes around random centres: every kind should learn them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(C, d)) * 3
    y = np.arange(n) % C
    return (centres[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize("kind", classical.KINDS)
def test_each_kind_learns_separable_classes_and_is_its_arrays(kind):
    X, y = blobs(seed=1)
    train, held = np.arange(len(y)) % 3 != 0, np.arange(len(y)) % 3 == 0
    params = classical.fit(kind, X[train], y[train], num_classes=4, seed=0)
    P = classical.predict(kind, params, X[held])
    assert P.shape == (held.sum(), 4) and P.dtype == np.float32
    assert np.allclose(P.sum(1), 1, atol=1e-5) and (P > 0).all()   # never 0: log loss stays finite
    assert accuracy(y[held], P) > 0.9
    # a fold model is data: written and read back as arrays, it predicts the same
    again = classical.from_bytes(classical.to_bytes(params))
    assert all(isinstance(v, np.ndarray) for v in again.values())
    assert np.array_equal(classical.predict(kind, again, X[held]), P)


def test_the_inner_cv_chooses_the_hyperparameter_on_the_training_rows_alone():
    X, y = blobs(n=300, d=10, spread=6.0, seed=2)   # overlapping classes: many neighbours beat one
    params = classical.fit("knn", X, y, 4, seed=0)
    assert int(params["k"]) > 1
    assert classical.setting("knn", params) == {"k": int(params["k"])}
    C = float(classical.fit("probe", X, y, 4, seed=0)["C"])
    assert any(C == pytest.approx(c) for c in classical.C_GRID)


def test_a_class_missing_from_a_fold_gets_almost_no_probability():
    X, y = blobs(n=120, C=3, seed=3)
    keep = y != 2
    for kind in ("probe", "pixels"):
        P = classical.predict(kind, classical.fit(kind, X[keep], y[keep], num_classes=3), X)
        assert P[:, 2].max() < 1e-6, kind


def test_pixel_features_see_the_mirror_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(3, 40, 40, 3), dtype=np.uint8)
    F, Ff = pixel_features(images), pixel_features(images, flip=True)
    assert F.shape == (3, 516) and np.isfinite(F).all()
    assert np.allclose(pixel_features(images[:, :, ::-1]), Ff, atol=1e-5) and not np.allclose(F, Ff)


def test_unknown_kinds_are_refused():
    assert classical.parse_kinds(None) is None and classical.parse_kinds("none") == ()
    assert classical.parse_kinds("knn, probe,knn") == ("knn", "probe")
    with pytest.raises(ValueError, match="svm"):
        classical.parse_kinds("probe,svm")


# --- on real images, through the experiment's folds ---------------------------------------------------

@pytest.fixture(scope="module")
def member_experiment(tmp_path_factory, weights_dir):
    """A prepared paddy experiment (3 folds, test images) with every kind of member fitted on it."""
    root = tmp_path_factory.mktemp("members")
    data = make_paddy(root / "data", classes=3, per_class=10, test=6)
    ctx = prepare_only("paddy", str(data), storage=str(root / "runs"), name="m", archs="test_resnet",
                       image_sizes="24", folds=3, cache_dir=str(root / "cache"), weights_dir=str(weights_dir),
                       pretrained="yes")
    wanted = members.specs(None, {"test_resnet": [24]}, ctx)
    results = [classical.fit_member(spec, ctx) for spec in wanted]
    return Experiment(ctx.experiment), data, wanted, results, root


def test_every_kind_is_fitted_on_every_fold_as_a_candidate(member_experiment):
    exp, data, wanted, results, _ = member_experiment
    assert [s["kind"] for s in wanted] == ["probe", "knn", "pixels"]   # the backbone has weights: all three
    assert [r["candidate"] for r in results] == [s["candidate"] for s in wanted]
    index = exp.folds()
    test_ids = sorted(exp.test()["sample_id"])
    for spec in wanted:
        candidate = exp.candidate(spec["candidate"])
        oof = candidate.oof()
        # every training image exactly once, predicted by the fold model that did not see it
        assert sorted(oof.column("sample_id").to_pylist()) == sorted(index["sample_id"])
        record = candidate.members()
        assert record["config"]["kind"] == spec["kind"] and record["config"]["seconds"] > 0
        assert [m["fold"] for m in record["members"]] == [0, 1, 2]
        for k in range(3):
            fold = candidate.fold(k)
            held = set(index.loc[index["fold"] == k, "sample_id"])
            assert set(fold.holdout().column("sample_id").to_pylist()) == held
        P = probs_array(candidate.test())
        assert sorted(candidate.test().column("sample_id").to_pylist()) == test_ids
        assert np.allclose(P.sum(1), 1, atol=1e-4)
        # the test predictions are the mean of the fold models (each with flip TTA)
        folds = np.mean([aligned(candidate.fold(k).test(), test_ids) for k in range(3)], axis=0)
        assert np.allclose(aligned(candidate.test(), test_ids), folds, atol=1e-6)


def test_the_features_are_computed_once_per_node_and_backbone(member_experiment):
    exp, _, _, _, root = member_experiment
    records = sorted((root / "cache").rglob("features/*.json"))
    # the training images, the test images and their mirror images: one file each, shared by probe and knn
    assert sorted(r.stem.removeprefix("test_resnet-").split("-")[-1] == "flip" for r in records) == [False, False,
                                                                                                      True]
    before = {r: r.stat().st_mtime_ns for r in records}
    ctx, index = exp.meta()["context"], exp.folds()
    train = next(r for r in records if json.loads(r.read_text())["images"] == len(index))
    again = cached_features(index["path"].tolist(), ctx["data_key"], 24, "squish", ctx["cache_dir"], "test_resnet",
                            json.loads(train.read_text())["weights"])
    assert again.shape == tuple(json.loads(train.read_text())["shape"])
    assert {r: r.stat().st_mtime_ns for r in records} == before   # read from the cache, not computed again


def test_predict_on_new_images_reproduces_each_kind(member_experiment, tmp_path):
    exp, data, wanted, _, _ = member_experiment
    test_ids = sorted(exp.test()["sample_id"])
    for spec in wanted:
        # an ensemble of this member alone, as ensemble.json names its members
        storage.write_json(exp.ensemble_file(), dict(members=[dict(candidate=spec["candidate"], weight=1.0)]))
        got = ensemble_builder.predict(exp.location, str(data / "test_images"), cache_dir=str(tmp_path / "cache"))
        names = exp.meta()["class_names"]
        P = got.set_index("image").loc[test_ids, [f"p_{n}" for n in names]].to_numpy()
        assert np.allclose(P, aligned(exp.candidate(spec["candidate"]).test(), test_ids), atol=1e-4), spec["kind"]


def test_select_takes_the_members_as_candidates_and_reports_their_kind(member_experiment, capsys):
    exp, *_ = member_experiment
    from ensemble_builder.__main__ import main

    assert main(["select", "--experiment", exp.location, "--top", "3"]) == 0
    out = capsys.readouterr().out
    record = exp.ensemble()
    assert record["kinds"] == {s: s.split("-")[0] for s in record["candidates"]}
    assert all(m["candidate"] in record["kinds"] for m in record["members"])
    assert "kind" in out and exp.has_ensemble()
