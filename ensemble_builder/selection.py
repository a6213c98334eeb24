"""Greedy forward ensemble selection with replacement (Caruana et al., 2004).

Each step adds the candidate whose blend ``(S + P[c]) / (k + 1)`` with the
running sum ``S`` of the ``k`` members so far scores best. The vectorised
scorer evaluates every candidate of a step in a few large numpy operations and
gives exactly the scores of the per-candidate loop (``vectorised=False``).

``P`` may be float16, half the memory at scale (1,000 candidates x 100,000
samples x 10 classes: 2 GB). The running sums and blends are then float32, so
it selects exactly as ``P.astype(np.float32)`` would, without that copy.
"""
from __future__ import annotations

import numpy as np

from trainer.metrics import METRICS, f1_from_counts, log_loss, mean_nll

_BLOCK_BYTES = 1 << 22  # ~4 MiB working blocks stay in cache between numpy calls


class _LoopScorer:
    """Reference scorer: one metric call per candidate blend."""

    def __init__(self, P: np.ndarray, y: np.ndarray, metric: str):
        self.P, self.y, self.metric = P, y, metric
        self.fn = METRICS[metric][0]
        self.dtype = np.promote_types(P.dtype, np.float32)   # of the sums and blends: float16 P sums in float32
        self.reset()

    def reset(self) -> None:
        self.S = np.zeros(self.P.shape[1:], self.dtype)

    def add(self, c: int) -> None:
        self.S += self.P[c]

    def _blend(self, c: int, k: int) -> np.ndarray:
        return (self.S + self.P[c]) / (k + 1)

    def scores(self, cands: np.ndarray, k: int) -> np.ndarray:
        return np.array([self.fn(self.y, self._blend(c, k)) for c in cands])

    def log_losses(self, cands: np.ndarray, k: int) -> np.ndarray:
        return np.array([log_loss(self.y, self._blend(c, k)) for c in cands])


class _VectorScorer(_LoopScorer):
    """Scores all candidates at once; falls back to the loop for other metrics."""

    def __init__(self, P: np.ndarray, y: np.ndarray, metric: str):
        super().__init__(P, y, metric)
        m, n, C = P.shape
        self.Py = np.take(P.reshape(m, -1), np.arange(n) * C + y, axis=1)  # true-class columns (m, n)
        if metric not in ("accuracy", "f1_macro"):
            return
        # Sample-major copy (n, C, m), samples sorted by label: a block of rows is
        # contiguous, and each label group compares whole (rows, m) slabs.
        self.order = np.argsort(y, kind="stable")
        self.ys = y[self.order]
        rank = np.empty(n, np.intp)
        rank[self.order] = np.arange(n)
        self.Pc = np.empty((n, C, m), P.dtype)
        for a in range(0, n, 64):  # blocks of contiguous source samples, rows scattered
            self.Pc[rank[a:a + 64]] = P[:, a:a + 64].transpose(1, 2, 0)
        # Per sample, the most any candidate can raise another class over the
        # true one (rise) or the true class over another (fall); see scores().
        hi, lo = self.Pc.max(axis=2), self.Pc.min(axis=2)
        self.is_y = is_y = self.ys[:, None] == np.arange(C)
        hi_y, lo_y = hi[is_y].astype(np.float64), lo[is_y].astype(np.float64)
        self.rise = np.where(is_y, -np.inf, hi).max(axis=1) - lo_y
        self.fall = hi_y - np.where(is_y, np.inf, lo).min(axis=1)
        self.pabs = float(max(np.abs(hi).max(), np.abs(lo).max()))
        self.rows = max(1, _BLOCK_BYTES // (C * m * self.dtype.itemsize))

    def reset(self) -> None:
        super().reset()
        self.sy = np.zeros(self.P.shape[1], self.dtype)  # == S[arange(n), y]

    def add(self, c: int) -> None:
        super().add(c)
        self.sy += self.Py[c]

    def log_losses(self, cands: np.ndarray, k: int) -> np.ndarray:
        out = np.empty(len(cands))
        step = 32  # candidates per block: (32, n) temporaries stay in cache
        buf = np.empty((min(step, len(cands)), len(self.y)), self.dtype)
        work = np.empty(buf.shape)
        for a in range(0, len(cands), step):
            c = cands[a:a + step]
            rows = self.Py[c[0]:c[-1] + 1] if c[-1] - c[0] == len(c) - 1 else self.Py[c]
            b = buf[:len(c)]
            np.divide(np.add(self.sy, rows, out=b), k + 1, out=b)
            out[a:a + step] = mean_nll(b, work[:len(c)])
        return out

    def scores(self, cands: np.ndarray, k: int) -> np.ndarray:
        if self.metric == "log_loss":
            return self.log_losses(cands, k)
        if self.metric not in ("accuracy", "f1_macro"):
            return super().scores(cands, k)
        # A sample whose ensemble margin (true class over the best other class)
        # exceeds what any candidate can take away (rise) is right for every
        # candidate; one whose deficit exceeds what any can add (fall) is wrong
        # for every candidate. tol covers float32 rounding of the blends.
        Ss = self.S[self.order]
        Sd = Ss.astype(np.float64)
        margin = Sd[self.is_y] - np.where(self.is_y, -np.inf, Sd).max(axis=1)
        tol = 16 * np.finfo(Ss.dtype).eps * (np.abs(Ss).max() + self.pabs + 1)
        right = margin > self.rise + tol
        if self.metric == "accuracy":
            todo = np.flatnonzero(~right & ~(-margin > self.fall + tol))
            return (np.count_nonzero(right) + self._correct(Ss, cands, k, todo)) / len(self.y)
        return self._f1(Ss, cands, k, right)

    def _blocks(self, Ss: np.ndarray, cands: np.ndarray, todo: np.ndarray):
        """Yield (labels, unnormalised blends (rows, C, len(cands))) over sample blocks."""
        full = len(cands) == self.Pc.shape[2]
        buf = np.empty((min(self.rows, len(todo)), Ss.shape[1], len(cands)), Ss.dtype)
        for a in range(0, len(todo), self.rows):
            idx = todo[a:a + self.rows]
            if not full:
                blk = self.Pc[np.ix_(idx, np.arange(self.Pc.shape[1]), cands)]
            elif idx[-1] - idx[0] == len(idx) - 1:
                blk = self.Pc[idx[0]:idx[-1] + 1]
            else:
                blk = self.Pc[idx]
            yield self.ys[idx], np.add(blk, Ss[idx][:, :, None], out=buf[:len(idx)])

    def _correct(self, Ss: np.ndarray, cands: np.ndarray, k: int, todo: np.ndarray) -> np.ndarray:
        """Per candidate, how many ``todo`` samples have argmax == label (first max wins)."""
        counts = np.zeros(len(cands), np.int64)
        d, C = k + 1, Ss.shape[1]
        for labels, B in self._blocks(Ss, cands, todo):
            bounds = np.searchsorted(labels, np.arange(C + 1))
            for c in np.unique(labels):
                r = slice(bounds[c], bounds[c + 1])
                # x -> fl(x / d) is monotone, so max and division commute and
                # only the reduced slabs need dividing.
                t = B[r, c] / d
                ok = B[r, c + 1:].max(axis=1) / d <= t if c < C - 1 else np.ones_like(t, bool)
                if c > 0:
                    ok &= B[r, :c].max(axis=1) / d < t
                counts += np.count_nonzero(ok, axis=0)
        return counts

    def _f1(self, Ss: np.ndarray, cands: np.ndarray, k: int, right: np.ndarray) -> np.ndarray:
        m, C = len(cands), Ss.shape[1]
        sure = np.bincount(self.ys[right], minlength=C)[:, None]  # predicted == label
        tp, n_pred = np.repeat(sure, m, 1), np.repeat(sure, m, 1)
        for labels, B in self._blocks(Ss, cands, np.flatnonzero(~right)):
            B /= k + 1
            flat = B.argmax(axis=1) * m + np.arange(m)
            n_pred += np.bincount(flat.ravel(), minlength=C * m).reshape(C, m)
            hit = flat // m == labels[:, None]
            tp += np.bincount(flat[hit], minlength=C * m).reshape(C, m)
        # contiguous rows so the class sums round exactly as in metrics.f1_macro
        return f1_from_counts(tp.T.copy(), n_pred.T.copy(), np.bincount(self.y, minlength=C))


class EnsembleSelection:
    """Caruana greedy ensemble selection with replacement on candidates' OOF probabilities.

    ``ensemble_size`` is the total number of picks, the first ``n_init`` being the
    best single candidates; the pick sequence is then cut back to its best score.
    Ties between candidates go to the lower log loss, then the lower index.
    ``metric`` is a key of ``metrics.METRICS``; accuracy, log_loss and f1_macro are
    vectorised (accuracy and f1_macro hold one sample-major copy of ``P``). ``P`` may
    be float16, float32 or float64; float16 is summed in float32 (see the module docstring).

    Fitted attributes: ``weights_`` (n_candidates,) summing to 1; ``indices_`` the
    kept picks in order; ``all_indices_`` every pick before trimming;
    ``trajectory_`` the objective after each pick (metric units, untrimmed);
    ``best_step_`` the index of its best entry (earliest on ties). With ``bags``,
    ``bag_indices_`` holds each bag's kept picks, ``weights_`` is the mean of the
    bags' weights, ``indices_``/``all_indices_`` concatenate the bags, and
    ``trajectory_``/``best_step_`` are the per-step mean over bags and its best.
    """

    def __init__(self, ensemble_size: int = 50, metric: str = "accuracy", n_init: int = 1,
                 max_members: int | None = None, bags: int = 0, bag_fraction: float = 0.5,
                 random_state: int | None = 0, vectorised: bool = True):
        self.ensemble_size = ensemble_size
        self.metric = metric
        self.n_init = n_init
        self.max_members = max_members
        self.bags = bags
        self.bag_fraction = bag_fraction
        self.random_state = random_state
        self.vectorised = vectorised

    def fit(self, P: np.ndarray, y: np.ndarray) -> EnsembleSelection:
        """Select from P (n_candidates, n_samples, n_classes) against labels y (n_samples,)."""
        P, y = np.asarray(P), np.asarray(y)
        if P.dtype not in (np.float16, np.float32, np.float64):
            P = P.astype(np.float64)
        if P.ndim != 3 or y.shape != (P.shape[1],):
            raise ValueError("need P of shape (candidates, samples, classes) and y of shape (samples,)")
        if y.min() < 0 or y.max() >= P.shape[2]:
            raise ValueError("labels must lie in [0, n_classes)")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {sorted(METRICS)}")
        if self.max_members is not None and self.max_members < max(self.n_init, 1):
            raise ValueError("max_members must be at least max(n_init, 1)")
        if not 0 <= self.n_init <= self.ensemble_size or self.ensemble_size < 1:
            raise ValueError("need ensemble_size >= 1 and 0 <= n_init <= ensemble_size")
        y = y.astype(np.intp)
        self._sign = 1.0 if METRICS[self.metric][1] else -1.0
        scorer = (_VectorScorer if self.vectorised else _LoopScorer)(P, y, self.metric)
        m = P.shape[0]
        if self.bags:
            rng = np.random.default_rng(self.random_state)
            size = min(m, max(1, round(self.bag_fraction * m), self.n_init))
            pools = [np.sort(rng.choice(m, size, replace=False)) for _ in range(self.bags)]
        else:
            pools = [np.arange(m)]
        runs = [self._greedy(scorer, pool) for pool in pools]
        self.bag_indices_ = [picks[:best + 1] for picks, _, best in runs]
        self.weights_ = np.mean([np.bincount(b, minlength=m) / len(b) for b in self.bag_indices_], axis=0)
        self.indices_ = [int(c) for b in self.bag_indices_ for c in b]
        self.all_indices_ = [int(c) for picks, _, _ in runs for c in picks]
        # With bagging: mean per-step objective over bags, and its best step.
        self.trajectory_ = [float(s) for s in np.mean([t for _, t, _ in runs], axis=0)]
        self.best_step_ = runs[0][2] if len(runs) == 1 else self._best_step(self.trajectory_)
        return self

    def _best_step(self, trajectory) -> int:
        return int(np.argmax(self._sign * np.asarray(trajectory)))  # earliest on ties

    def _pick(self, scorer: _LoopScorer, cands: np.ndarray, k: int) -> tuple[int, float]:
        """Best candidate of one step: best score, then lower log loss, then lowest index."""
        scores = scorer.scores(cands, k)
        tied = np.flatnonzero(self._sign * scores == np.max(self._sign * scores))
        if len(tied) > 1 and self.metric != "log_loss":
            losses = scorer.log_losses(cands[tied], k)
            tied = tied[losses == losses.min()]
        return int(cands[tied[0]]), float(scores[tied[0]])

    def _greedy(self, scorer: _LoopScorer, pool: np.ndarray) -> tuple[list[int], list[float], int]:
        scorer.reset()
        init = []
        if self.n_init > 1:  # sorted initialisation; n_init == 1 is the first greedy step
            scores, losses = scorer.scores(pool, 0), scorer.log_losses(pool, 0)
            init = pool[np.lexsort((pool, losses, -self._sign * scores))[:self.n_init]]
        picks: list[int] = []
        trajectory: list[float] = []
        for k in range(self.ensemble_size):
            if k < len(init):
                cands = init[k:k + 1]
            elif self.max_members is not None and len(set(picks)) >= self.max_members:
                cands = np.unique(picks)
            else:
                cands = pool
            c, score = self._pick(scorer, cands, k)
            picks.append(c)
            trajectory.append(score)
            scorer.add(c)
        return picks, trajectory, self._best_step(trajectory)

    def predict_proba(self, P: np.ndarray) -> np.ndarray:
        """Weighted blend of the candidates' probabilities, shape (n_samples, n_classes)."""
        members = np.flatnonzero(self.weights_)
        return np.tensordot(self.weights_[members], np.asarray(P)[members], axes=1)
