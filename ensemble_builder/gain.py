"""A trial's ensemble gain: how much its holdout predictions raise the greedy ensemble of the
trials finished so far, on fold 0, in the task's metric (positive = better).

The pool is the experiment's ``pool/`` folder (``core.experiment``): every
search trial that runs its whole schedule adds its final holdout predictions
there, so trials on any node read the same pool through the experiment's
storage. A trial reads the folder's listing once per report and only the
entries it has not read before (``Pool.refresh``), so a report costs one
listing plus the new files, not the whole pool. The ensemble is the
ensemble builder's own ``EnsembleSelection`` (Caruana, with replacement).

The empty ensemble predicts the class prior: the first trials' gain is their
score over that baseline, later ones' their marginal contribution.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from core.experiment import Experiment, aligned, probs_table
from core.metrics import METRICS
from ensemble_builder.greedy import EnsembleSelection

GREEDY_STEPS = 10


def prior_score(y: np.ndarray, num_classes: int, metric: str) -> float:
    """The metric of always predicting the training prior (the empty ensemble)."""
    prior = np.bincount(y, minlength=num_classes) / len(y)
    return float(METRICS[metric].fn(y, np.tile(prior.astype(np.float32), (len(y), 1))))


def greedy_score(P: np.ndarray, y: np.ndarray, metric: str, steps: int = GREEDY_STEPS) -> float:
    """The best score of Caruana's greedy selection over candidates P (m, n, C)."""
    sel = EnsembleSelection(ensemble_size=steps, metric=metric).fit(P, y)
    return float(sel.trajectory_[sel.best_step_])


def ensemble_gain(pool: np.ndarray, probs: np.ndarray, y: np.ndarray, metric: str,
                  steps: int = GREEDY_STEPS) -> float:
    """greedy(pool + probs) - greedy(pool), signed so that positive is better; pool (m, n, C), m may be 0."""
    sign = METRICS[metric].sign
    base = greedy_score(pool, y, metric, steps) if len(pool) else prior_score(y, probs.shape[1], metric)
    both = np.concatenate([pool, probs[None]]) if len(pool) else probs[None]
    return sign * (greedy_score(both, y, metric, steps) - base)


class Pool:
    """The finished trials' holdout predictions, read incrementally from the experiment."""

    def __init__(self, experiment: str, sample_ids, labels: np.ndarray, metric: str):
        self.experiment, self.order, self.y, self.metric = Experiment(experiment), list(sample_ids), labels, metric
        self.members: dict[str, np.ndarray] = {}

    def refresh(self, exclude: str | None = None) -> np.ndarray:
        """(m, n, C) of every pooled trial but ``exclude``; reads only entries not seen before."""
        for tid in self.experiment.pool_ids():
            if tid not in self.members:
                self.members[tid] = aligned(self.experiment.pool(tid), self.order).astype(np.float32)
        kept = [P for tid, P in sorted(self.members.items()) if tid != exclude]
        return np.stack(kept) if kept else np.zeros((0, len(self.order), 0), np.float32)

    def gain(self, probs: np.ndarray, exclude: str | None = None) -> tuple[float, int, float]:
        """(ensemble gain of probs, pool size, seconds taken)."""
        t0 = time.perf_counter()
        pool = self.refresh(exclude)
        if len(pool) == 0:
            pool = pool.reshape(0, len(self.order), probs.shape[1])
        return ensemble_gain(pool, probs, self.y, self.metric), len(pool), time.perf_counter() - t0


_POOLS: dict[str, Pool] = {}   # per experiment: a reused actor reads only the new pool entries


@dataclass(frozen=True)
class PoolGain:
    """The search trials' per-epoch ``epoch_metrics`` (``trainer.fit.train_trial``).

    Each epoch: ``ensemble_gain`` of the holdout predictions against the pool,
    the pool's size and the seconds that took. A trial that runs its whole
    schedule joins the pool with its final epoch.
    """

    experiment: str
    metric: str

    def __call__(self, trial_id: str, sample_ids, labels: np.ndarray, probs: np.ndarray, final: bool) -> dict:
        pool = _POOLS.get(self.experiment)
        if pool is None:
            pool = _POOLS[self.experiment] = Pool(self.experiment, sample_ids, labels, self.metric)
        gain, pooled, seconds = pool.gain(probs, exclude=trial_id)
        if final:
            pool.experiment.write_pool(trial_id, probs_table(sample_ids, probs))
        return {"ensemble_gain": gain, "pool_size": pooled, "ensemble_gain_s": seconds}
