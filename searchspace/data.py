"""What every task's loader returns, and the index with stratified folds."""
from __future__ import annotations

import io
import posixpath
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from core import storage
from core.errors import BadInput
from trainer.images import IMAGE_SUFFIXES


@dataclass
class Dataset:
    """A task's data as found on disk (or in a bucket).

    train: sample_id, path, label (class name as str); test: sample_id, path.
    The submission is written as ``id_column,label_column`` with test rows in
    ``submission_order`` when the data gives one (sample_submission.csv).
    """

    train: pd.DataFrame
    test: pd.DataFrame | None = None
    id_column: str = "image_id"
    label_column: str = "label"
    submission_order: list[str] | None = None


def read_csv(location: str, columns: list[str]) -> pd.DataFrame:
    if not storage.exists(location):
        raise BadInput(f"{location}: file not found; the task expects it in the data folder")
    try:
        df = pd.read_csv(io.BytesIO(storage.read_bytes(location)), dtype=str, keep_default_na=False)
    except Exception as e:
        raise BadInput(f"{location}: not a readable CSV ({e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise BadInput(
            f"{location}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)} "
            f"(found {', '.join(df.columns) or 'none'})"
        )
    return df


def safe_relative(image_id: str, csv: str) -> str:
    """An id from a CSV as a path inside the data folder, or BadInput."""
    p = image_id.replace("\\", "/")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":") or ".." in p.split("/") or "://" in p:
        raise BadInput(
            f"{csv}: image_id {image_id!r} points outside the data folder; "
            "use a file name relative to the image folder"
        )
    return posixpath.normpath(p)


def require_dir(location: str, what: str) -> None:
    if not storage.is_dir(location):
        raise BadInput(f"{location}: {what} not found; check --data")


class SkippedFiles(UserWarning):
    """Files in an image folder that are not images; searchspace.run prints each such warning as one line."""


def image_files(location: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Relative paths of the image files under a folder (recursive); other files are skipped with a warning.

    ``skip``: relative path prefixes left out altogether (a subfolder read on its own).
    """
    files = [p for p, _ in storage.list_files(location) if not p.startswith(skip)]
    images = [p for p in files if p.lower().endswith(IMAGE_SUFFIXES)]
    other = [p for p in files if not p.lower().endswith(IMAGE_SUFFIXES)]
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        warnings.warn(SkippedFiles(f"{location}: skipping {len(other)} file(s) that are not images "
                                   f"({', '.join(IMAGE_SUFFIXES)}): {shown}"), stacklevel=2)
    return images


def match_ids(ids: list[str], folder: str, files: list[str], csv: str) -> list[str]:
    """Map CSV ids (with or without extension) to files in ``folder``; BadInput if any is missing."""
    by_name = {f: f for f in files}
    by_stem = {posixpath.splitext(f)[0]: f for f in files}
    found, missing = [], []
    for i in ids:
        rel = safe_relative(i, csv)
        hit = by_name.get(rel) or by_stem.get(rel)
        (found if hit else missing).append(storage.join(folder, hit) if hit else i)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BadInput(f"{csv}: {len(missing)} image(s) listed with no file in {folder}: {shown}; "
                       "fix the CSV or add the images")
    return found


def folder_classes(location: str, files: list[str]) -> pd.DataFrame:
    """A class-per-folder tree -> sample_id, path, label."""
    rows = [(f, storage.join(location, f), f.split("/", 1)[0]) for f in files if "/" in f]
    return pd.DataFrame(rows, columns=["sample_id", "path", "label"])


def flat_test(location: str) -> pd.DataFrame | None:
    if not storage.is_dir(location):
        return None
    files = image_files(location)
    return pd.DataFrame({"sample_id": files, "path": [storage.join(location, f) for f in files]})


def build_index(train: pd.DataFrame, folds: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """sample_id, path, label (int, in sorted class-name order), fold; and the class names."""
    if train.empty:
        raise BadInput("the data holds no labelled training images; check --data")
    if train["sample_id"].duplicated().any():
        dup = train["sample_id"][train["sample_id"].duplicated()].iloc[0]
        raise BadInput(f"training image id {dup!r} appears twice; ids must be unique")
    classes = sorted(train["label"].astype(str).unique())
    counts = train["label"].value_counts()
    small = counts[counts < folds]
    if len(small):
        listed = ", ".join(f"{c!r} ({n})" for c, n in small.items())
        raise BadInput(f"class {listed} has fewer images than the {folds} folds; "
                       f"add images or lower --folds")
    index = pd.DataFrame({
        "sample_id": train["sample_id"].astype(str).to_numpy(),
        "path": train["path"].astype(str).to_numpy(),
        "label": train["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64).to_numpy(),
    })
    return assign_folds(index, folds, seed), classes


def assign_folds(index: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    """The index with its ``fold`` column (stratified by label, shuffled with ``seed``) set for K = ``folds``."""
    index = index.copy()
    index["fold"] = -1
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, holdout) in enumerate(splitter.split(index, index["label"])):
        index.loc[holdout, "fold"] = k
    index["fold"] = index["fold"].astype(np.int64)
    return index
