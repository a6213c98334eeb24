"""Placeholder replaced by the selector's metrics module."""
import numpy as np


def accuracy(y, P):
    return float((np.asarray(P).argmax(1) == np.asarray(y)).mean())


def log_loss(y, P):
    P = np.asarray(P)
    return float(-np.log(np.clip(P[np.arange(len(y)), y], 1e-15, 1)).mean())


METRICS = {"accuracy": (accuracy, True), "log_loss": (log_loss, False)}
