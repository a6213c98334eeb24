"""Greedy forward ensemble selection with replacement (Caruana et al., 2004).

Each step adds the candidate whose blend ``(S + P[c]) / (k + 1)`` with the
running sum ``S`` of the ``k`` members so far scores best. The vectorised
scorer evaluates every candidate of a step in a few large numpy operations and
gives exactly the scores of the per-candidate loop (``vectorised=False``).

``prepare`` readies the candidates once (for accuracy and F1, a sample-major
copy sorted by label); ``.subset(samples)`` of it gathers what a selection on
some samples needs instead of building it again, which is what the
cross-validation's K + K(K-1)/2 selections use.

``P`` may be float16, half the memory at scale (1,000 candidates x 100,000
samples x 10 classes: 2 GB). The running sums and blends are then float32, so
it selects exactly as ``P.astype(np.float32)`` would, without that copy.
"""
from __future__ import annotations

import numpy as np

from core.metrics import METRICS, f1_from_counts, log_loss, mean_nll

_BLOCK_BYTES = 1 << 22  # ~4 MiB working blocks stay in cache between numpy calls
_FEW = 8                # up to this many candidates, accuracy counts hits by one argmax per block


def _hits(B: np.ndarray, labels: np.ndarray, d: int) -> np.ndarray:
    """Per candidate, how many rows of ``B / d`` have their label as argmax (see ``_hit_rows``)."""
    return np.count_nonzero(_hit_rows(B, labels, d), axis=0)


def _hit_rows(B: np.ndarray, labels: np.ndarray, d: int) -> np.ndarray:
    """(rows, candidates): is the argmax of ``B / d`` (rows, C, candidates; rows sorted by
    ``labels``) the label (first max wins)? Each label's rows compare whole (rows, candidates) slabs."""
    C = B.shape[1]
    out = np.empty((B.shape[0], B.shape[2]), bool)
    bounds = np.searchsorted(labels, np.arange(C + 1))
    for c in np.unique(labels):
        r = slice(bounds[c], bounds[c + 1])
        # x -> fl(x / d) is monotone, so max and division commute and
        # only the reduced slabs need dividing.
        t = _divided(B[r, c], d)
        ok = out[r]
        if c < C - 1:
            np.less_equal(_divided(B[r, c + 1:].max(axis=1), d), t, out=ok)
        else:
            ok[...] = True
        if c > 0:
            ok &= _divided(B[r, :c].max(axis=1), d) < t
    return out


def _divided(x: np.ndarray, d: int) -> np.ndarray:
    return x / d if d > 1 else x


class _LoopScorer:
    """Reference scorer: one metric call per candidate blend."""

    def __init__(self, P: np.ndarray, y: np.ndarray, metric: str):
        self.P, self.y, self.metric = P, y, metric
        self.fn = METRICS[metric].fn
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

    def subset(self, samples: np.ndarray) -> _LoopScorer:
        """A scorer of the same candidates on some of the samples (``take``: C-contiguous, as the scorer wants)."""
        return type(self)(self.P.take(samples, axis=1), self.y[samples], self.metric)


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
        self._sort_by_label()
        self.Pc = np.empty((n, C, m), P.dtype)
        for a in range(0, n, 64):  # blocks of contiguous source samples, rows scattered
            self.Pc[self.rank[a:a + 64]] = P[:, a:a + 64].transpose(1, 2, 0)
        self.rows = max(1, _BLOCK_BYTES // (C * m * self.dtype.itemsize))
        self.full_view = (self.Pc, *self._bounds(self.Pc))
        self.view: tuple[bytes, tuple] = (b"", self.full_view)   # that of the last subset of candidates asked
        self._hits0 = None

    def subset(self, samples: np.ndarray) -> _VectorScorer:
        """The same candidates on some samples: the sample-major copy and its bounds are
        gathered from this scorer's, not built again (the cross-validation's many selections)."""
        if self.metric not in ("accuracy", "f1_macro", "log_loss"):
            return super().subset(samples)   # the loop's metrics blend whole rows of P: a copy
        sub = object.__new__(_VectorScorer)
        # P stays this scorer's: a step reads one candidate's rows of it (add), no copy of every candidate's
        sub.P, sub.samples, sub.y, sub.metric, sub.fn, sub.dtype = (
            self.P, samples, self.y[samples], self.metric, self.fn, self.dtype)
        sub.Py = self.Py.take(samples, axis=1)
        if self.metric == "log_loss":   # the true-class columns are all it reads
            sub.reset()
            return sub
        sub._sort_by_label()
        rows = self.rank[samples[sub.order]]   # sorted by (label, sample) here as there
        sub.Pc, sub.rows = self.Pc.take(rows, axis=0), self.rows
        _, rise, fall, pabs, highest, lowest = self.full_view   # this pabs bounds the subset's: a tol no tighter
        sub.full_view = (sub.Pc, rise[rows], fall[rows], pabs, highest.take(rows, axis=0), lowest.take(rows, axis=0))
        sub.view = (b"", sub.full_view)
        sub._hits0 = self.hits0().take(rows, axis=0) if self.metric == "accuracy" else None
        sub.reset()
        return sub

    def _sort_by_label(self) -> None:
        """Pc's row order: samples sorted by label (stable), so a label's rows are one slab."""
        n = len(self.y)
        self.order = np.argsort(self.y, kind="stable")
        self.ys = self.y[self.order]
        self.rank = np.empty(n, np.intp)   # each sample's row in Pc
        self.rank[self.order] = np.arange(n)
        self.true_at = self.ys * n + np.arange(n)   # the true classes in a class-major (C, n) copy

    def hits0(self) -> np.ndarray:
        """(samples, candidates), rows as in Pc: is each candidate alone right on each sample? Kept for subsets."""
        if self._hits0 is None:
            self._hits0 = np.concatenate([_hit_rows(blk, self.ys[rows], 1) for rows, blk in self._slabs(self.Pc, None)])
        return self._hits0

    def _slabs(self, src: np.ndarray, cands: np.ndarray | None):
        """(rows, src[rows][:, :, cands]) over blocks of rows (all of src's candidates for None)."""
        for a in range(0, len(src), self.rows):
            rows = slice(a, a + self.rows)
            yield rows, src[rows] if cands is None else src[rows][:, :, cands]

    def _bounds(self, src: np.ndarray, cands: np.ndarray | None = None) -> tuple:
        """Per sample, the most any candidate can raise another class over the true one
        (rise) or the true class over another (fall), the largest |p|, and per sample
        and class the highest and lowest probability of any candidate; see scores()."""
        rise, fall, pabs = np.empty(len(src)), np.empty(len(src)), 0.0
        highest, lowest = np.empty(src.shape[:2], src.dtype), np.empty(src.shape[:2], src.dtype)
        for rows, blk in self._slabs(src, cands):
            np.max(blk, axis=2, out=highest[rows])
            np.min(blk, axis=2, out=lowest[rows])
            # class-major (C, rows): reductions over classes run along rows (see scores())
            hi, lo = highest[rows].T.copy(), lowest[rows].T.copy()
            at = (self.ys[rows], np.arange(hi.shape[1]))
            hi_y, lo_y = hi[at].astype(np.float64), lo[at].astype(np.float64)
            pabs = max(pabs, float(np.abs(hi).max()), float(np.abs(lo).max()))
            hi[at], lo[at] = -np.inf, np.inf
            rise[rows] = hi.max(axis=0) - lo_y
            fall[rows] = hi_y - lo.min(axis=0)
        return rise, fall, pabs, highest, lowest

    def _view(self, cands: np.ndarray) -> tuple:
        """(``Pc`` of just ``cands`` or None where that copy would be large, and ``_bounds`` over them).

        A subset is the fixed members once ``max_members`` is reached, or a bag's
        pool: its bounds are tighter than all candidates', so fewer samples are left to blend.
        """
        if len(cands) == self.Pc.shape[2]:
            return self.full_view
        key = cands.tobytes()
        if self.view[0] != key:
            compact = self.Pc[:, :, cands] if 4 * len(cands) <= self.Pc.shape[2] else None
            bounds = self._bounds(self.Pc, cands) if compact is None else self._bounds(compact)
            self.view = key, (compact, *bounds)
        return self.view[1]

    samples = None   # the samples of P that a subset() scores, None for all

    def reset(self) -> None:
        self.S = np.zeros((len(self.y), self.P.shape[2]), self.dtype)
        self.sy = np.zeros(len(self.y), self.dtype)  # == S[arange(n), y]

    def add(self, c: int) -> None:
        self.S += self.P[c] if self.samples is None else self.P[c].take(self.samples, axis=0)
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
        if k == 0 and self.metric == "accuracy":   # S is zero: each candidate alone, no blend to add
            hits = self.hits0()
            return np.count_nonzero(hits if len(cands) == hits.shape[1] else hits[:, cands], axis=0) / len(self.y)
        view = self._view(cands)
        Ss = np.take(self.S, self.order, axis=0)   # take: far faster than fancy indexing here
        # Class-major copy: numpy reduces over rows of n far faster than over a last axis of C.
        St = Ss.T.copy()
        np.put(St, self.true_at, -np.inf)   # put and take: far faster than fancy indexing
        sy = np.take(self.sy, self.order)   # S's true-class column, in Pc's row order
        margin = sy.astype(np.float64) - St.max(axis=0)
        compact, rise, fall, pabs, highest, lowest = view
        tol = 16 * np.finfo(Ss.dtype).eps * (np.abs(Ss).max() + pabs + 1)
        right = margin > rise + tol
        if self.metric == "accuracy":
            todo = np.flatnonzero(~right & ~(-margin > fall + tol))
            src = self.Pc if compact is None else compact
            if len(cands) > _FEW and src.shape[2] == len(cands):
                correct = self._contenders(Ss, sy, src, highest, lowest, tol, k, todo)
            else:
                correct = self._correct(Ss, cands, compact, k, todo)
            return (np.count_nonzero(right) + correct) / len(self.y)
        return self._f1(Ss, cands, compact, k, right)

    def _blocks(self, Ss: np.ndarray, cands: np.ndarray, compact: np.ndarray | None, todo: np.ndarray):
        """Yield (labels, unnormalised blends (rows, C, len(cands))) over blocks of ``todo`` rows.

        ``compact`` is ``Pc`` of just ``cands`` (``_view``), or None to gather them per block.
        """
        src = self.Pc if compact is None else compact
        gather = src.shape[2] != len(cands)
        buf = np.empty((min(self.rows, len(todo)), Ss.shape[1], len(cands)), Ss.dtype)
        for a in range(0, len(todo), self.rows):
            idx = todo[a:a + self.rows]
            if gather:
                blk = src[np.ix_(idx, np.arange(src.shape[1]), cands)]
            elif idx[-1] - idx[0] == len(idx) - 1:
                blk = src[idx[0]:idx[-1] + 1]
            else:
                blk = src[idx]
            yield self.ys[idx], np.add(blk, Ss[idx][:, :, None], out=buf[:len(idx)])

    def _contenders(self, Ss: np.ndarray, sy: np.ndarray, src: np.ndarray, highest: np.ndarray, lowest: np.ndarray,
                    tol: float, k: int, todo: np.ndarray) -> np.ndarray:
        """As ``_correct`` over all of ``src``'s candidates, comparing each row's label only with
        the classes that could beat it for some candidate (usually one to three of C).

        Class j is out when even its highest probability over the candidates, added
        to S, stays below the label's lowest added to S, by more than ``tol`` (as in
        scores()): then no blend, rounded, puts j at or above the label.
        """
        d, (_, C, m) = k + 1, src.shape
        counts = np.zeros(m, np.int64)
        for a in range(0, len(todo), self.rows * C):   # (rows, m) arrays: the working-block budget
            idx = todo[a:a + self.rows * C]
            labels, at = self.ys[idx], np.arange(len(idx))
            Sb = Ss[idx]
            floor = sy[idx].astype(np.float64) + lowest[idx, labels] - tol
            contends = Sb.astype(np.float64) + highest[idx] >= floor[:, None]
            contends[at, labels] = False
            vy = _divided(src[idx, labels] + Sb[at, labels][:, None], d)   # (rows, m) as the blends round
            fail = np.zeros((len(idx), m), bool)
            for j in np.flatnonzero(contends.any(axis=0)):
                sel = np.flatnonzero(contends[:, j])
                vj, vs = _divided(src[idx[sel], j] + Sb[sel, j][:, None], d), vy[sel]
                # first max wins: class j before the label takes a tie
                fail[sel] |= np.where((labels[sel] > j)[:, None], vj >= vs, vj > vs)
            counts += len(idx) - np.count_nonzero(fail, axis=0)
        return counts

    def _correct(self, Ss: np.ndarray, cands: np.ndarray, compact: np.ndarray | None, k: int,
                 todo: np.ndarray) -> np.ndarray:
        """Per candidate, how many ``todo`` samples have argmax == label (first max wins)."""
        counts = np.zeros(len(cands), np.int64)
        for labels, B in self._blocks(Ss, cands, compact, todo):
            if len(cands) <= _FEW:   # few candidates (fixed members): one argmax beats C slabs' calls
                B /= k + 1
                counts += np.count_nonzero(B.argmax(axis=1) == labels[:, None], axis=0)
            else:
                counts += _hits(B, labels, k + 1)
        return counts

    def _f1(self, Ss: np.ndarray, cands: np.ndarray, compact: np.ndarray | None, k: int,
            right: np.ndarray) -> np.ndarray:
        m, C = len(cands), Ss.shape[1]
        sure = np.bincount(self.ys[right], minlength=C)[:, None]  # predicted == label
        tp, n_pred = np.repeat(sure, m, 1), np.repeat(sure, m, 1)
        for labels, B in self._blocks(Ss, cands, compact, np.flatnonzero(~right)):
            B /= k + 1
            flat = B.argmax(axis=1) * m + np.arange(m)
            n_pred += np.bincount(flat.ravel(), minlength=C * m).reshape(C, m)
            hit = flat // m == labels[:, None]
            tp += np.bincount(flat[hit], minlength=C * m).reshape(C, m)
        # contiguous rows so the class sums round exactly as in metrics.f1_macro
        return f1_from_counts(tp.T.copy(), n_pred.T.copy(), np.bincount(self.y, minlength=C))


def prepare(P: np.ndarray, y: np.ndarray, metric: str, vectorised: bool = True) -> _LoopScorer:
    """Candidates' probabilities P (candidates, samples, classes) and labels y made ready
    for ``EnsembleSelection.fit_prepared``; ``.subset(samples)`` readies some samples at less cost."""
    P, y = np.asarray(P), np.asarray(y)
    if P.dtype not in (np.float16, np.float32, np.float64):
        P = P.astype(np.float64)
    if P.ndim != 3 or y.shape != (P.shape[1],):
        raise ValueError("need P of shape (candidates, samples, classes) and y of shape (samples,)")
    if y.min() < 0 or y.max() >= P.shape[2]:
        raise ValueError("labels must lie in [0, n_classes)")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}")
    return (_VectorScorer if vectorised else _LoopScorer)(P, y.astype(np.intp), metric)


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
        return self.fit_prepared(prepare(P, y, self.metric, self.vectorised))

    def fit_prepared(self, scorer: _LoopScorer) -> EnsembleSelection:
        """Select from candidates made ready by ``prepare`` (or a ``subset`` of them)."""
        if scorer.metric != self.metric:
            raise ValueError(f"candidates prepared for {scorer.metric!r}, not {self.metric!r}")
        if self.max_members is not None and self.max_members < max(self.n_init, 1):
            raise ValueError("max_members must be at least max(n_init, 1)")
        if not 0 <= self.n_init <= self.ensemble_size or self.ensemble_size < 1:
            raise ValueError("need ensemble_size >= 1 and 0 <= n_init <= ensemble_size")
        self._sign = METRICS[self.metric].sign
        m = scorer.P.shape[0]
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
