"""A regularised multinomial logistic regression as two arrays, for every class of the task.

Used by the classical members (``trainer.classical``) and by stacking
(``ensemble_builder.stacking``): scikit-learn fits it; what is kept is
``coef`` (C, d) and ``intercept`` (C,), so a model is data, not a pickle, and
a class missing from the training rows gets a probability of about zero
instead of a shifted column.
"""
from __future__ import annotations

import numpy as np

ABSENT = -30.0   # the intercept of a class the training rows never showed


def fit_logistic(Z: np.ndarray, y: np.ndarray, C: float, num_classes: int, seed: int = 0,
                 max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(coef (num_classes, d), intercept (num_classes,)) of an L2 logistic regression of y on Z."""
    from sklearn.linear_model import LogisticRegression

    coef = np.zeros((num_classes, Z.shape[1]), np.float32)
    intercept = np.full(num_classes, ABSENT, np.float32)
    classes = np.unique(y)
    if len(classes) == 1:
        intercept[classes[0]] = 0.0
        return coef, intercept
    model = LogisticRegression(C=C, max_iter=max_iter, tol=1e-3, random_state=seed).fit(Z, y)
    if model.coef_.shape[0] == 1:   # scikit-learn's binary model: one row, the second class's log-odds
        coef[model.classes_[1]], intercept[model.classes_[1]] = model.coef_[0], model.intercept_[0]
        intercept[model.classes_[0]] = 0.0
    else:
        coef[model.classes_], intercept[model.classes_] = model.coef_, model.intercept_
    return coef, intercept


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def logistic_proba(Z: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    return softmax(np.asarray(Z, np.float32) @ coef.T + intercept)
