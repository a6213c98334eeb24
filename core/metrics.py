"""Metrics on probability matrices: ``y`` int array (n,), ``P`` float array (n, C).

The count/column helpers are shared with the vectorised selector so that its
scores are bit-identical to calling these functions one candidate at a time.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EPS = 1e-15
_GROUP = 16


def mean_nll(p_true: np.ndarray, work: np.ndarray | None = None) -> np.ndarray:
    """Mean negative log of true-class probabilities along the last axis, clipped to [1e-15, 1].

    ``work``: optional float64 scratch array of ``p_true``'s shape (avoids a fresh allocation).
    """
    p = np.empty(p_true.shape) if work is None else work
    p[...] = p_true
    np.clip(p, EPS, 1.0, out=p)
    n = p.shape[-1]
    if n % _GROUP:
        p = np.concatenate([p, np.ones(p.shape[:-1] + (-n % _GROUP,))], axis=-1)
    # log of products of 16 values (>= 1e-240, no underflow): 16x fewer slow logs
    prods = p.reshape(p.shape[:-1] + (_GROUP, -1)).prod(axis=-2)
    return -np.log(prods).sum(axis=-1) / n


def f1_from_counts(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> np.ndarray:
    """Macro F1 from per-class counts; ``tp``/``n_pred`` are (k, C), ``n_true`` is (C,).

    Classes absent from both truth and prediction are left out of the mean, as
    scikit-learn does with its default labels.
    """
    denom = n_pred + n_true
    present = denom > 0
    f1 = np.where(present, 2.0 * tp / np.maximum(denom, 1), 0.0)
    return f1.sum(axis=-1) / present.sum(axis=-1)


def accuracy(y: np.ndarray, P: np.ndarray) -> float:
    """Fraction of samples whose argmax class (first on ties) is the true class."""
    return float(np.mean(np.argmax(P, axis=1) == y))


def log_loss(y: np.ndarray, P: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class, probabilities clipped at 1e-15."""
    return float(mean_nll(P[np.arange(len(y)), y]))


def f1_macro(y: np.ndarray, P: np.ndarray) -> float:
    """Unweighted mean of per-class F1 of the argmax predictions."""
    C = P.shape[1]
    pred = np.argmax(P, axis=1)
    tp = np.bincount(y[pred == y], minlength=C)
    return float(f1_from_counts(tp[None], np.bincount(pred, minlength=C)[None],
                                np.bincount(y, minlength=C))[0])


def roc_auc(y: np.ndarray, P: np.ndarray) -> float:
    """ROC AUC: positive-class column if binary, else one-vs-rest macro average.

    Classes with no positive or no negative sample are skipped (AUC undefined).
    """
    from sklearn.metrics import roc_auc_score

    if P.shape[1] == 2:
        return float(roc_auc_score(y, P[:, 1]))
    aucs = [roc_auc_score(y == c, P[:, c]) for c in range(P.shape[1])
            if 0 < np.count_nonzero(y == c) < len(y)]
    return float(np.mean(aucs))


@dataclass(frozen=True)
class Metric:
    """A metric on probabilities and its direction; ``sign`` makes "higher is better" of either."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    greater_is_better: bool

    def __call__(self, y: np.ndarray, P: np.ndarray) -> float:
        return self.fn(y, P)

    @property
    def mode(self) -> str:
        """Ray Tune's and Optuna's word for the direction: "max" or "min"."""
        return "max" if self.greater_is_better else "min"

    @property
    def sign(self) -> float:
        return 1.0 if self.greater_is_better else -1.0


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", accuracy, True),
    Metric("log_loss", log_loss, False),
    Metric("f1_macro", f1_macro, True),
    Metric("roc_auc", roc_auc, True),
)}
