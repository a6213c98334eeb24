"""Blenders the cross-validation chooses among, beside Caruana's greedy weights.

Each is fitted on some samples' out-of-fold predictions and blends any samples'
(``predict_proba(P)``, P of shape (candidates, samples, classes)):

- ``Weighted``: a fixed convex combination (the best single candidate, the
  uniform mean of the top K, or greedy selection's weights);
- ``Stacker``: a regularised multinomial logistic regression on the
  log-probabilities of the best ``max_inputs`` candidates (ranked on the
  samples it is fitted on), which can learn, say, that one member is right
  about two classes the others confuse. Its model is arrays (``record``).

Both expose ``weights_`` (a share per candidate, for reports: for the stacker,
each input's share of the coefficients' absolute sum), ``indices_``,
``trajectory_`` and ``best_step_`` like ``EnsembleSelection``.
"""
from __future__ import annotations

import numpy as np

from core.logistic import fit_logistic, logistic_proba

LOG_FLOOR = 1e-6


class Weighted:
    def __init__(self, weights: np.ndarray):
        self.weights_ = np.asarray(weights, float)
        self.indices_ = [int(i) for i in np.flatnonzero(self.weights_)]
        self.trajectory_, self.best_step_ = [], 0

    def predict_proba(self, P: np.ndarray) -> np.ndarray:
        members = np.flatnonzero(self.weights_)
        return np.tensordot(self.weights_[members], np.asarray(P)[members], axes=1)


def stack_inputs(P: np.ndarray, members) -> np.ndarray:
    """(samples, len(members) x classes): the members' log-probabilities side by side."""
    X = np.log(np.clip(np.asarray(P[list(members)], np.float32), LOG_FLOOR, 1.0))
    return X.transpose(1, 0, 2).reshape(X.shape[1], -1)


class Stacker:
    """Multinomial logistic regression on the top candidates' log-probabilities (``C``: its inverse L2 strength)."""

    def __init__(self, C: float = 1.0, max_inputs: int = 8, random_state: int = 0):
        self.C, self.max_inputs, self.random_state = C, max_inputs, random_state

    def fit(self, P: np.ndarray, y: np.ndarray, order: np.ndarray) -> Stacker:
        """Fit on P (candidates, samples, classes) and labels y; ``order``: the candidates, best first."""
        self.members_ = [int(i) for i in order[:self.max_inputs]]
        self.coef_, self.intercept_ = fit_logistic(stack_inputs(P, self.members_), np.asarray(y), self.C, P.shape[2],
                                                   self.random_state)
        share = np.abs(self.coef_).reshape(P.shape[2], len(self.members_), P.shape[2]).sum(axis=(0, 2))
        self.weights_ = np.zeros(len(P))
        self.weights_[self.members_] = share / share.sum() if share.sum() > 0 else 1 / len(self.members_)
        self.indices_, self.trajectory_, self.best_step_ = list(self.members_), [], 0
        return self

    def predict_proba(self, P: np.ndarray) -> np.ndarray:
        return logistic_proba(stack_inputs(P, self.members_), self.coef_, self.intercept_)

    def record(self, ids: list[str]) -> dict:
        """The model as ensemble.json keeps it: the inputs by candidate id, and the arrays."""
        return dict(inputs=[ids[i] for i in self.members_], coef=self.coef_.tolist(),
                    intercept=self.intercept_.tolist(), C=self.C, log_floor=LOG_FLOOR)


def stacked_proba(record: dict, probs: dict[str, np.ndarray]) -> np.ndarray:
    """A stacker from ensemble.json applied to its inputs' probabilities ({candidate id: (n, C)})."""
    P = np.stack([probs[c] for c in record["inputs"]])
    return logistic_proba(stack_inputs(P, range(len(P))), np.asarray(record["coef"], np.float32),
                          np.asarray(record["intercept"], np.float32))
