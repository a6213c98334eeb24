"""Classical ensemble members: cheap models that see the images differently from the fine-tuned networks.

Three kinds, each fitted on the experiment's own K folds like a cross-fitted
network, so its out-of-fold predictions are honest:

- ``probe``: a regularised multinomial logistic regression on a pretrained
  backbone's frozen features (``trainer.features``);
- ``knn``: k nearest neighbours on the same features, by cosine similarity;
- ``pixels``: a kernel model on the pixels (HOG and a colour thumbnail): an RBF
  kernel approximated by Nystroem components, then a logistic regression, in
  the spirit of seed 001's SVM. It needs no weights at all.

Each fold's hyperparameter (C for the regressions, k for the neighbours) is
chosen by an inner stratified CV on that fold's training images alone, by log
loss. A fitted fold model is a handful of arrays (``model.npz``, never a
pickle: a member read from a bucket cannot run code), and ``predict`` gives
its probabilities again from them. Test predictions average the image and its
mirror when the task uses flip TTA.
"""
from __future__ import annotations

import io
import os
import time

import numpy as np
import pyarrow as pa
from sklearn.model_selection import StratifiedKFold

from core.experiment import MEMBER_FILE, Experiment, TrialContext, probs_table
from core.logistic import fit_logistic, softmax
from core.metrics import log_loss

KINDS = ("probe", "knn", "pixels")
FEATURE_KINDS = ("probe", "knn")     # these need a pretrained backbone
C_GRID = (0.01, 0.1, 1.0, 10.0)
K_GRID = (1, 3, 5, 10, 20, 40)
KNN_SMOOTHING = 0.5                  # pseudo-votes per class: no probability is 0 (log loss)
NYSTROEM_COMPONENTS = 400
PROBE_DIMS = 256                     # a probe first projects wider features onto their top principal axes
INNER_FOLDS = 3
BLOCK = 2048                         # rows of similarities computed at once by the neighbours


def parse_kinds(text: str | None) -> tuple[str, ...] | None:
    """'probe,knn' -> ('probe', 'knn'); 'none' -> (); None -> None (the default). ValueError on an unknown kind."""
    if text is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names:
        raise ValueError(f"unknown member kind(s) {', '.join(unknown) or repr(text)}")
    return names


# --- the models, as arrays ---------------------------------------------------------------------

def _standardise(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (np.asarray(X, np.float32) - mean) / scale


def _sq_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return np.maximum((A ** 2).sum(1)[:, None] + (B ** 2).sum(1)[None, :] - 2 * A @ B.T, 0)


def _kernel(X: np.ndarray, params: dict) -> np.ndarray:
    """The Nystroem map of standardised X: exp(-gamma |x - c|^2) against the components, normalised
    (scikit-learn's ``Nystroem.transform``, from its arrays)."""
    Z = _standardise(X, params["mean"], params["scale"])
    return np.exp(-params["gamma"] * _sq_distances(Z, params["components"])) @ params["normalization"].T


def _project(X: np.ndarray, params: dict) -> np.ndarray:
    """X on the probe's principal axes (when it has them)."""
    if "axes" not in params:
        return np.asarray(X, np.float32)
    return (np.asarray(X, np.float32) - params["center"]) @ params["axes"].T


def predict(kind: str, params: dict, X: np.ndarray) -> np.ndarray:
    """(n, C) float32 probabilities of a fitted fold model (its arrays) on features X."""
    if kind == "probe":
        Z = _standardise(_project(X, params), params["mean"], params["scale"])
        return softmax(Z @ params["coef"].T + params["intercept"]).astype(np.float32)
    if kind == "pixels":
        return softmax(_kernel(X, params) @ params["coef"].T + params["intercept"]).astype(np.float32)
    if kind == "knn":
        return _neighbours(params["train"], params["labels"], _unit(X), int(params["k"]),
                           int(params["num_classes"])).astype(np.float32)
    raise ValueError(f"unknown member kind {kind!r}; one of {', '.join(KINDS)}")


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _neighbours(train: np.ndarray, labels: np.ndarray, X: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """Class shares among each row's k most similar training rows (unit vectors), smoothed."""
    k = min(k, len(train))
    out = np.empty((len(X), num_classes))
    for lo in range(0, len(X), BLOCK):
        sims = X[lo:lo + BLOCK] @ train.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(top), num_classes))
        np.add.at(votes, (np.repeat(np.arange(len(top)), k), labels[top].ravel()), 1.0)
        out[lo:lo + BLOCK] = (votes + KNN_SMOOTHING) / (k + KNN_SMOOTHING * num_classes)
    return out


def _inner_choice(X: np.ndarray, y: np.ndarray, grid, fit_score, seed: int):
    """The grid value with the lowest mean log loss over an inner stratified CV of (X, y)."""
    n_splits = max(2, min(INNER_FOLDS, int(np.bincount(y).min()) if len(y) else 2))
    if np.bincount(y).min() < 2:
        return grid[len(grid) // 2]
    splits = list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(X, y))
    losses = [np.mean([fit_score(X[a], y[a], X[b], y[b], value) for a, b in splits]) for value in grid]
    return grid[int(np.argmin(losses))]


def fit(kind: str, X: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0) -> dict:
    """One fold model: its arrays, its hyperparameter chosen by the inner CV on (X, y) alone."""
    X = np.asarray(X, np.float32)
    if kind == "knn":
        U = _unit(X)
        ks = [k for k in K_GRID if k < len(y)] or [1]

        def score(Ua, ya, Ub, yb, k):
            return log_loss(yb, _neighbours(Ua, ya, Ub, k, num_classes))
        k = _inner_choice(U, y, ks, score, seed)
        return dict(train=U, labels=y.astype(np.int64), k=np.int64(k), num_classes=np.int64(num_classes))

    base = {}
    if kind == "probe" and X.shape[1] > PROBE_DIMS and len(X) > PROBE_DIMS:
        from sklearn.decomposition import PCA

        pca = PCA(PROBE_DIMS, svd_solver="randomized", random_state=seed).fit(X)
        base.update(center=pca.mean_.astype(np.float32), axes=pca.components_.astype(np.float32))
        X = _project(X, base)
    mean, scale = X.mean(0), X.std(0) + 1e-6
    base.update(mean=mean.astype(np.float32), scale=scale.astype(np.float32))
    if kind == "pixels":
        from sklearn.kernel_approximation import Nystroem

        Z = _standardise(X, mean, scale)
        rng = np.random.default_rng(seed)
        sample = Z[rng.choice(len(Z), min(500, len(Z)), replace=False)]
        d2 = _sq_distances(sample, sample)
        gamma = 1.0 / max(float(np.median(d2[d2 > 0])) if (d2 > 0).any() else 1.0, 1e-6)   # the median heuristic
        ny = Nystroem(gamma=gamma, n_components=min(NYSTROEM_COMPONENTS, len(Z)), random_state=seed).fit(Z)
        base.update(components=ny.components_.astype(np.float32), gamma=np.float32(gamma),
                    normalization=ny.normalization_.astype(np.float32))
        Z = _kernel(X, base)
    elif kind == "probe":
        Z = _standardise(X, mean, scale)
    else:
        raise ValueError(f"unknown member kind {kind!r}; one of {', '.join(KINDS)}")

    def score(Za, ya, Zb, yb, C):
        coef, intercept = fit_logistic(Za, ya, C, num_classes, seed)
        return log_loss(yb, softmax(Zb @ coef.T + intercept))
    C = _inner_choice(Z, y, list(C_GRID), score, seed)
    coef, intercept = fit_logistic(Z, y, C, num_classes, seed)
    return dict(base, coef=coef, intercept=intercept, C=np.float32(C))


def to_bytes(params: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **params)
    return buf.getvalue()


def from_bytes(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def setting(kind: str, params: dict) -> dict:
    """The hyperparameter a fold chose (from its arrays or its record), for members.json."""
    return {"k": int(params["k"])} if kind == "knn" else {"C": float(params["C"])}


# --- one member on every fold (a Ray task) --------------------------------------------------------

def features_of(spec: dict, locations: list[str], key: str, cache_dir: str, weights: str | None,
                flip: bool = False) -> np.ndarray:
    """What member ``spec`` reads of these images: the backbone's features (``weights``: its local file)
    or the pixel features; from this node's cache ``cache_dir``."""
    from trainer.cache import cached_images
    from trainer.features import cached_features, pixel_features

    workers = os.cpu_count() or 1
    if spec["kind"] == "pixels":
        images = cached_images(locations, key, spec["image_size"], spec["resize_mode"], cache_dir, workers)
        return pixel_features(images, flip)
    return cached_features(locations, key, spec["image_size"], spec["resize_mode"], cache_dir, spec["arch"],
                           weights, flip, workers)


def fit_member(spec: dict, ctx: TrialContext) -> dict:
    """Fit ``spec`` (kind, candidate, arch, image_size, resize_mode) on every fold; write its fold records
    and its candidate (oof, test, members.json). Returns {candidate, seconds, settings}."""
    import torch

    from trainer.fit import node_cache_dir, weights_file

    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    t0 = time.perf_counter()
    exp = Experiment(ctx.experiment)
    index = exp.folds()
    y, folds = index["label"].to_numpy(), index["fold"].to_numpy()
    cache = node_cache_dir(ctx)
    weights = weights_file(ctx.weights.get(spec.get("arch")), cache) if spec["kind"] in FEATURE_KINDS else None
    X = features_of(spec, index["path"].tolist(), ctx.data_key, cache, weights)
    T = Tf = None
    if ctx.test_key:
        test = exp.test()
        T = features_of(spec, test["path"].tolist(), ctx.test_key, cache, weights)
        Tf = features_of(spec, test["path"].tolist(), ctx.test_key, cache, weights, flip=True) if ctx.tta else None
    candidate = exp.candidate(spec["candidate"])
    records, holds, tests = [], [], []
    for k in range(int(folds.max()) + 1):
        train, held = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        params = fit(spec["kind"], X[train], y[train], int(ctx.num_classes), int(ctx.seed) + k)
        hold = probs_table(index["sample_id"].to_numpy()[held], predict(spec["kind"], params, X[held]))
        test_table = None
        if T is not None:
            P = predict(spec["kind"], params, T)
            if Tf is not None:
                P = (P + predict(spec["kind"], params, Tf)) / 2
            test_table = probs_table(test["sample_id"], P)
            tests.append(P)
        fold = candidate.fold(k)
        record = dict(checkpoint=fold.location, fold=k, **setting(spec["kind"], params))
        fold.write(hold, test_table, record, model=to_bytes(params), config=spec, model_file=MEMBER_FILE)
        records.append(record)
        holds.append(hold)
    test_mean = probs_table(test["sample_id"], np.mean(tests, axis=0)) if tests else None
    seconds = time.perf_counter() - t0
    candidate.write(records, pa.concat_tables(holds), {**spec, "seconds": round(seconds, 2)}, test_mean)
    return dict(candidate=spec["candidate"], seconds=seconds, settings=[setting(spec["kind"], r) for r in records])
