"""Every task's loader on its real layout, the default digits data, and build_index's folds."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from helpers import PADDY_CLASSES, make_deepfake_csv, make_deepfake_folders, make_imagefolder, make_paddy

from core.errors import BadInput
from searchspace.data import build_index, match_ids, read_csv, safe_relative
from searchspace.tasks import TASKS, deepfake, digits, get_task, imagefolder, paddy


def _files_exist(df: pd.DataFrame) -> bool:
    return all(os.path.isfile(p) for p in df["path"])


# --- paddy -----------------------------------------------------------------------

def test_paddy_reads_csv_images_test_and_submission_order(tmp_path):
    root = make_paddy(tmp_path / "paddy", classes=3, per_class=4, test=5)
    ds = paddy.load(str(root))
    csv = pd.read_csv(root / "train.csv", dtype=str)
    assert len(ds.train) == 12
    assert list(ds.train["sample_id"]) == list(csv["image_id"])
    assert list(ds.train["label"]) == list(csv["label"])
    assert _files_exist(ds.train)
    for sid, path, label in ds.train[["sample_id", "path", "label"]].itertuples(index=False):
        assert Path(path) == root / "train_images" / label / sid
    assert sorted(ds.test["sample_id"]) == sorted(os.listdir(root / "test_images"))
    assert _files_exist(ds.test)
    assert ds.submission_order == list(pd.read_csv(root / "sample_submission.csv")["image_id"])
    assert ds.submission_order != sorted(ds.submission_order)
    assert (ds.id_column, ds.label_column) == ("image_id", "label")


def test_paddy_without_test_images(tmp_path):
    ds = paddy.load(str(make_paddy(tmp_path / "p", test=0)))
    assert ds.test is None and ds.submission_order is None
    assert len(ds.train) == 18


def test_paddy_image_in_the_wrong_label_folder_is_missing(tmp_path):
    root = make_paddy(tmp_path / "p", classes=2, per_class=3, test=0)
    df = pd.read_csv(root / "train.csv", dtype=str)
    image_id, label = df.loc[0, "image_id"], df.loc[0, "label"]
    other = next(c for c in df["label"].unique() if c != label)
    os.rename(root / "train_images" / label / image_id, root / "train_images" / other / image_id)
    with pytest.raises(BadInput, match=image_id):
        paddy.load(str(root))


# --- deepfake ----------------------------------------------------------------------

def test_deepfake_folders_fold_the_validation_split_into_training(tmp_path):
    root = make_deepfake_folders(tmp_path / "df", per_class=5, valid=2, test=2)
    ds = deepfake.load(str(root))
    assert len(ds.train) == 2 * (5 + 2)
    assert set(ds.train["label"]) == {"real", "fake"}
    splits = ds.train["sample_id"].str.split("/").str[0]
    assert splits.value_counts().to_dict() == {"train": 10, "valid": 4}
    assert ds.train["sample_id"].is_unique
    assert _files_exist(ds.train)
    # labels come from the class folder
    for sid, label in ds.train[["sample_id", "label"]].itertuples(index=False):
        assert sid.split("/")[1] == label
    assert len(ds.test) == 4 and _files_exist(ds.test)


@pytest.mark.parametrize("valid_name", ["validation", "val"])
def test_deepfake_folders_other_validation_names(tmp_path, valid_name):
    root = make_deepfake_folders(tmp_path / "df", per_class=3, valid=2, test=0, valid_name=valid_name)
    ds = deepfake.load(str(root))
    assert len(ds.train) == 10
    assert ds.test is None


def test_deepfake_folders_flat_test(tmp_path):
    root = make_deepfake_folders(tmp_path / "df", per_class=3, valid=0, test=2, test_classes=False)
    ds = deepfake.load(str(root))
    assert len(ds.train) == 6
    assert sorted(ds.test["sample_id"]) == sorted(os.listdir(root / "test"))


@pytest.mark.parametrize("with_ext", [True, False])
def test_deepfake_csv_ids_with_and_without_extension(tmp_path, with_ext):
    root = make_deepfake_csv(tmp_path / "df", with_ext=with_ext, per_class=5, valid=2, test=3)
    ds = deepfake.load(str(root))
    assert len(ds.train) == 2 * (5 + 2)  # validation.csv is part of the index
    assert set(ds.train["label"]) == {"FAKE", "REAL"}
    assert _files_exist(ds.train)
    train_csv = pd.read_csv(root / "train.csv", dtype=str)
    valid_csv = pd.read_csv(root / "validation.csv", dtype=str)
    expected_ids = ["train/" + i for i in train_csv["image_id"]] + ["validation/" + i for i in valid_csv["image_id"]]
    assert list(ds.train["sample_id"]) == expected_ids
    for sid, path in ds.train[["sample_id", "path"]].itertuples(index=False):
        split, image_id = sid.split("/", 1)
        assert Path(path) == root / split / (image_id if with_ext else image_id + ".jpg")
    # test.csv decides the ids (as written there) and their order
    test_csv = pd.read_csv(root / "test.csv", dtype=str)
    assert list(ds.test["sample_id"]) == list(test_csv["image_id"])
    assert [Path(p).stem for p in ds.test["path"]] == [Path(i).stem for i in test_csv["image_id"]]
    assert _files_exist(ds.test)


def test_deepfake_csv_without_test_csv_lists_the_test_folder(tmp_path):
    root = make_deepfake_csv(tmp_path / "df", test_csv=False, test=3)
    ds = deepfake.load(str(root))
    assert sorted(ds.test["sample_id"]) == ["test_0.jpg", "test_1.jpg", "test_2.jpg"]


def test_deepfake_csv_without_validation_csv(tmp_path):
    root = make_deepfake_csv(tmp_path / "df", per_class=4)
    os.remove(root / "validation.csv")
    ds = deepfake.load(str(root))
    assert len(ds.train) == 8
    assert ds.train["sample_id"].str.startswith("train/").all()


def test_deepfake_csv_test_csv_naming_a_missing_image(tmp_path):
    root = make_deepfake_csv(tmp_path / "df", test=2)
    with open(root / "test.csv", "a") as f:
        f.write("ghost.jpg\n")
    with pytest.raises(BadInput, match="ghost.jpg"):
        deepfake.load(str(root))


def test_deepfake_test_csv_without_a_test_folder(tmp_path):
    root = make_deepfake_csv(tmp_path / "df", test=1)
    os.remove(root / "test" / "test_0.jpg")
    os.rmdir(root / "test")
    with pytest.raises(BadInput, match="test.csv"):
        deepfake.load(str(root))


def test_deepfake_folds_cover_validation_images_too(tmp_path):
    root = make_deepfake_csv(tmp_path / "df", per_class=5, valid=3)
    index, classes = build_index(deepfake.load(str(root)).train, folds=3, seed=0)
    assert classes == ["FAKE", "REAL"]
    assert len(index) == 16
    validation = index[index["sample_id"].str.startswith("validation/")]
    assert len(validation) == 6 and (validation["fold"] >= 0).all()
    assert set(index["fold"]) == {0, 1, 2}


# --- imagefolder -------------------------------------------------------------------

@pytest.mark.parametrize("train_subdir", [False, True])
def test_imagefolder_with_a_test_folder(tmp_path, train_subdir):
    root = make_imagefolder(tmp_path / "if", classes=3, per_class=4, test=True, train_subdir=train_subdir)
    ds = imagefolder.load(str(root))
    assert len(ds.train) == 12  # the test/ images are not a class
    assert sorted(set(ds.train["label"])) == ["class_a", "class_b", "class_c"]
    assert _files_exist(ds.train)
    for sid, label in ds.train[["sample_id", "label"]].itertuples(index=False):
        assert sid.startswith(label + "/")
    assert sorted(ds.test["sample_id"]) == ["t0.png", "t1.png", "t2.png"]
    assert _files_exist(ds.test)


def test_imagefolder_without_a_test_folder(tmp_path):
    ds = imagefolder.load(str(make_imagefolder(tmp_path / "if", classes=2, per_class=3, test=False)))
    assert len(ds.train) == 6 and ds.test is None


def test_imagefolder_ignores_non_images(tmp_path):
    root = make_imagefolder(tmp_path / "if", classes=2, per_class=3, test=False)
    (root / "class_a" / "README.txt").write_text("notes")
    (root / "class_a" / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning, match="skipping 2 file"):
        assert len(imagefolder.load(str(root)).train) == 6


# --- digits --------------------------------------------------------------------------

def test_digits_default_data_is_written_once_in_the_paddy_layout(tmp_path):
    cache = tmp_path / "cache"
    root = Path(digits.default_data(str(cache)))
    assert root.parent == cache
    train_csv = pd.read_csv(root / "train.csv", dtype=str)
    assert list(train_csv.columns) == ["image_id", "label", "variety", "age"]
    test_files = sorted(os.listdir(root / "test_images"))
    # 1797 digits, a fixed 20% held out
    assert len(train_csv) + len(test_files) == 1797
    assert len(test_files) == 360
    assert not set(test_files) & set(train_csv["image_id"])
    assert sorted(pd.read_csv(root / "sample_submission.csv")["image_id"]) == test_files
    truth = pd.read_csv(root / "test_labels.csv", dtype=str)
    assert sorted(truth["image_id"]) == test_files
    assert sorted(os.listdir(root / "train_images")) == [str(d) for d in range(10)]

    ds = digits.load(str(root))
    assert len(ds.train) == len(train_csv) and len(ds.test) == 360
    assert _files_exist(ds.train.head(20))
    index, classes = build_index(ds.train, folds=5, seed=0)
    assert classes == [str(d) for d in range(10)]

    # the images are real PNGs
    from trainer.images import decode_rgb
    img = decode_rgb((root / "test_images" / test_files[0]).read_bytes())
    assert img.shape == (32, 32, 3)

    # a second call writes nothing
    files = [p for p in root.rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert Path(digits.default_data(str(cache))) == root
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert len([p for p in root.rglob("*") if p.is_file()]) == len(files)


# --- build_index ---------------------------------------------------------------------

def _train(counts: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{label}_{i}", f"/data/{label}/{i}.jpg", label) for label, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["sample_id", "path", "label"])


def test_build_index_labels_in_sorted_class_order():
    train = _train({"zebra": 6, "ant": 6, "moth": 6})
    index, classes = build_index(train, folds=3, seed=0)
    assert classes == ["ant", "moth", "zebra"]
    assert list(index.columns) == ["sample_id", "path", "label", "fold"]
    assert index["label"].dtype == np.int64 and index["fold"].dtype == np.int64
    expected = train["label"].map({"ant": 0, "moth": 1, "zebra": 2})
    assert list(index["label"]) == list(expected)
    assert list(index["sample_id"]) == list(train["sample_id"])
    assert list(index["path"]) == list(train["path"])


def test_build_index_stratified_every_class_in_every_fold():
    train = _train({"a": 20, "b": 10, "c": 5})
    index, _ = build_index(train, folds=5, seed=0)
    assert set(index["fold"]) == set(range(5))
    table = pd.crosstab(index["fold"], index["label"])
    assert (table > 0).all().all()
    # stratified: each class spread evenly over the folds
    assert (table.max() - table.min() <= 1).all()
    assert index["fold"].value_counts().to_dict() == {k: 7 for k in range(5)}


def test_build_index_is_reproducible_with_a_seed_and_changes_with_it():
    train = _train({"a": 12, "b": 12})
    first, _ = build_index(train, folds=3, seed=7)
    again, _ = build_index(train, folds=3, seed=7)
    other, _ = build_index(train, folds=3, seed=8)
    assert first.equals(again)
    assert not first["fold"].equals(other["fold"])


def test_build_index_of_a_real_task_layout(tmp_path):
    root = make_paddy(tmp_path / "p", classes=4, per_class=5, test=0)
    index, classes = build_index(paddy.load(str(root)).train, folds=5, seed=0)
    assert classes == sorted(PADDY_CLASSES[:4])
    assert (pd.crosstab(index["fold"], index["label"]) == 1).all().all()


def test_build_index_rejects_a_class_smaller_than_the_folds():
    with pytest.raises(BadInput, match=r"'b' \(2\).*3 folds"):
        build_index(_train({"a": 5, "b": 2}), folds=3, seed=0)


def test_build_index_rejects_duplicate_ids_and_no_data():
    train = _train({"a": 4, "b": 4})
    train.loc[1, "sample_id"] = train.loc[0, "sample_id"]
    with pytest.raises(BadInput, match="a_0"):
        build_index(train, folds=2, seed=0)
    with pytest.raises(BadInput, match="no labelled"):
        build_index(_train({}), folds=2, seed=0)


# --- the shared helpers ------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "C:/x.jpg", "..\\x.jpg",
                                 "s3://bucket/x.jpg"])
def test_safe_relative_rejects_ids_outside_the_folder(bad):
    with pytest.raises(BadInput, match="outside the data folder"):
        safe_relative(bad, "train.csv")


def test_safe_relative_accepts_nested_ids():
    assert safe_relative("a/b.jpg", "t.csv") == "a/b.jpg"
    assert safe_relative("./a/b.jpg", "t.csv") == "a/b.jpg"


def test_match_ids_with_and_without_extension():
    files = ["a.jpg", "sub/b.png", "c.jpeg"]
    assert match_ids(["a.jpg", "sub/b", "c"], "/d", files, "x.csv") == ["/d/a.jpg", "/d/sub/b.png", "/d/c.jpeg"]
    with pytest.raises(BadInput, match=r"2 image\(s\).*zz.*yy"):
        match_ids(["a", "zz", "yy.jpg"], "/d", files, "x.csv")


def test_read_csv_names_missing_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("image_id,lbl\na.jpg,x\n")
    with pytest.raises(BadInput, match=r"t\.csv: missing column\(s\) label"):
        read_csv(str(path), ["image_id", "label"])
    with pytest.raises(BadInput, match="file not found"):
        read_csv(str(tmp_path / "none.csv"), ["image_id"])


def test_read_csv_keeps_ids_as_strings(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("image_id,label\n00012,NA\n")
    df = read_csv(str(path), ["image_id", "label"])
    assert df.loc[0, "image_id"] == "00012" and df.loc[0, "label"] == "NA"


# --- the task registry and search spaces ---------------------------------------------------

def test_get_task_knows_every_task_and_rejects_others():
    assert set(TASKS) == {"digits", "paddy", "deepfake", "imagefolder"}
    assert get_task("paddy") is paddy.TASK and get_task("paddy").load is paddy.load
    with pytest.raises(BadInput, match="'nope'"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_default_architecture_is_a_timm_model(name):
    from trainer.model import check_arch
    for arch in TASKS[name].archs:
        check_arch(arch)
    assert all(sizes and min(sizes) >= 8 for sizes in TASKS[name].archs.values())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_search_space_samples_a_trainable_config(name):
    task = TASKS[name]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    archs = {"test_resnet": [16, 24], "test_vit": [32]}
    for _ in range(5):
        trial = study.ask()
        constants = task.define_search_space(trial, archs=archs)
        config = {**trial.params, **constants}
        assert config["image_size"] in archs[config["arch"]]
        assert config["resize_mode"] in ("squish", "crop", "letterbox")
        assert config["mix"] in ("none", "mixup", "cutmix")
        assert 0.0 <= config["scale_min"] <= 1.0
        study.tell(trial, 0.5)
    assert task.metric == "accuracy"
    # every budget value is set, and valid
    assert None not in (task.budget.trials, task.budget.max_epochs, task.budget.grace_period,
                        task.budget.reduction_factor, task.budget.folds, task.budget.crossfit_top)
    assert task.budget.check() == task.budget
