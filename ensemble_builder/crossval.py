"""Cross-validated ensemble selection: an honest score for the blend, and the settings chosen by it.

The greedy selector picks its weights on the same out-of-fold predictions it is
then scored on, so its score is optimistic: with many candidates and few
samples it fits their noise. Here each fold is held out in turn: the selection
runs on the other folds' samples and its weights blend the held-out fold. The
held-out blends, pooled over the folds, are scored once over every sample; the
per-fold scores give the spread. The best single candidate and the uniform
mean of the top K, both chosen on the other folds as well, are scored the same
way, so the three are compared on equal terms.

The same estimate picks the selection's greedy step count from a handful of
values, and falls back to the best single candidate when no blend beats it.
The best of a few settings' scores keeps a small optimism of its own, so the
ensemble's headline score is nested: for each fold, the whole procedure, the
choice of setting included, runs on the other folds alone (the choice by a
cross-validation over those), and only the setting it chose blends the
held-out fold. The selection trained without folds j and k serves the inner
validation of both outer folds, so nesting costs K(K-1)/2 selections on top
of the K of the plain estimate. With two folds there is nothing to nest, and
the chosen setting's score stands.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from core.metrics import METRICS, mean_nll
from ensemble_builder.greedy import EnsembleSelection, prepare
from ensemble_builder.stacking import Stacker, Weighted

STEPS_GRID = (5, 10, 25, 50)   # greedy step counts tried when the user gives none
RANDOM_SPLITS = 5              # folds drawn when the candidates cover the holdout fold only
_RANK_BLOCK = 64               # candidates per block when ranking them


def metric_scores(y: np.ndarray, P: np.ndarray, names=tuple(METRICS)) -> dict:
    """The named metrics of one blend; ROC AUC only when y holds two classes or more."""
    P = np.asarray(P, np.promote_types(P.dtype, np.float32))   # a float16 candidate in float32
    return {name: float(METRICS[name].fn(y, P)) for name in names
            if name != "roc_auc" or len(np.unique(y)) > 1}


def ranker(P: np.ndarray, y: np.ndarray, metric: str) -> Callable[[np.ndarray], np.ndarray]:
    """``rank(samples)``: candidate indices, best first on those samples (see ``rank_candidates``).

    The per-sample columns (true-class probabilities, argmax hits) are computed
    once, so ranking on each fold's training samples costs a column mean. Both
    go over blocks of candidates: no float64 or int64 temporary of all candidates x samples.
    """
    m = METRICS[metric]
    fn, greater = m.fn, m.greater_is_better
    m, n, C = P.shape
    p_true = np.take(P.reshape(m, -1), np.arange(n) * C + y, axis=1)   # (m, n), as the selector scores
    blocks = [slice(a, a + _RANK_BLOCK) for a in range(0, m, _RANK_BLOCK)]
    hits = np.concatenate([P[b].argmax(axis=2) == y for b in blocks]) if metric == "accuracy" else None

    def rank(samples: np.ndarray) -> np.ndarray:
        loss = np.concatenate([mean_nll(p_true[b][:, samples]) for b in blocks])
        if metric == "log_loss":
            score = loss
        elif metric == "accuracy":
            score = hits[:, samples].mean(axis=1)
        else:
            score = np.array([fn(y[samples], p[samples]) for p in P])
        return np.lexsort((np.arange(m), loss, -score if greater else score))
    return rank


def rank_candidates(P: np.ndarray, y: np.ndarray, metric: str) -> np.ndarray:
    """Candidate indices, best first: by ``metric``, then lower log loss, then lower index.

    The selector's own order, so the best single candidate here is its first pick.
    """
    return ranker(P, y, metric)(np.arange(len(y)))


def random_folds(y: np.ndarray, splits: int = RANDOM_SPLITS, seed: int = 0) -> np.ndarray:
    """A fold per sample from shuffled stratified splits (plain shuffled ones if no class has two samples)."""
    k = min(splits, int(np.bincount(y).max()))
    splitter = (StratifiedKFold(k, shuffle=True, random_state=seed) if k >= 2
                else KFold(min(splits, len(y)), shuffle=True, random_state=seed))
    folds = np.empty(len(y), np.int64)
    with warnings.catch_warnings():  # classes smaller than k just miss some folds
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, held) in enumerate(splitter.split(np.zeros(len(y)), y)):
            folds[held] = f
    return folds


def prefix_weights(selector: EnsembleSelection, steps: int) -> np.ndarray:
    """The weights ``selector`` would have with ``ensemble_size=steps`` (unbagged, ``steps >= n_init``).

    A greedy pick never depends on later steps, so the shorter run's picks are
    a prefix of the longer one's; it is cut back to its own best step.
    """
    picks, trajectory = selector.all_indices_[:steps], selector.trajectory_[:steps]
    best = selector._best_step(trajectory)
    return np.bincount(picks[:best + 1], minlength=len(selector.weights_)) / (best + 1)


def blend(P: np.ndarray, weights: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Weighted mean of the candidates' probabilities on some samples, (len(samples), C)."""
    out = np.zeros((len(samples), P.shape[2]))
    for i in np.flatnonzero(weights):   # a few members: cheaper than tensordot's float64 copy of them all
        out += weights[i] * P[i, samples]
    return out


def spread(y: np.ndarray, pooled: np.ndarray, folds: np.ndarray, metric: str, names) -> dict:
    """Pooled scores (the named metrics) and the task metric per fold, with their mean and std over folds."""
    fn = METRICS[metric].fn
    scores = metric_scores(y, pooled, names)
    per_fold = [float(fn(y[folds == f], pooled[folds == f])) for f in np.unique(folds)]
    return dict(scores=scores, folds=per_fold, mean=float(np.mean(per_fold)),
                std=float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0)


STACKING_C = (0.1, 1.0)   # the stacker's regularisation strengths tried as settings
# The simpler setting wins a tie, in this order.
SIMPLICITY = {"single": 0, "uniform": 1, "greedy": 2, "bagged": 3, "stacking": 4}


def apply(P: np.ndarray, blender, samples: np.ndarray) -> np.ndarray:
    """A fitted blender's probabilities on some samples."""
    if isinstance(blender, Weighted):
        return blend(P, blender.weights_, samples)
    return blender.predict_proba(P[:, samples])


class SelectionCV:
    """Cross-validated ensemble selection, scikit-learn style: the blend and its setting chosen by a
    cross-validation, and an honest (nested) estimate of what that procedure gives.

    The settings tried, simplest first: with ``fallback``, the best single
    candidate; with ``uniform``, the uniform mean of the top ``top`` (ranked on
    the training samples); greedy selection at each of ``steps``, each also
    with ``bags`` when given (unbagged ones all come from one run per fold, see
    ``prefix_weights``); and, for each C of ``stacking``, a logistic regression
    on the top candidates' log-probabilities (``stacking.Stacker``). The
    setting with the best pooled cross-validated ``metric`` wins; ties go to
    the lower pooled log loss, then to the simpler setting (``SIMPLICITY``,
    then fewer steps). ``n_init``, ``max_members`` and ``random_state`` go to
    every ``EnsembleSelection`` as given.

    The ensemble ships only if the nested estimate beats the best single
    candidate: when its gain is not positive (and ``fallback``), the best
    single candidate is refitted and shipped instead (``shipped_single_``:
    the rule overrode the setting the cross-validation chose).

    Fitted: ``settings_`` (dicts: kind, steps, bags, C, name, pooled
    ``scores``, per-fold ``folds``, their ``mean`` and ``std``), ``chosen_``
    (the setting shipped: its index there), ``fallback_`` (the single
    candidate is shipped), ``estimate_`` (predictor -> the same dict for
    ``ensemble`` (what ships: the whole procedure, nested, each fold blended
    by the setting chosen without it; or the best single when that ships),
    ``best_single`` and ``uniform_top{K}``; and ``nested_blend``, the
    procedure's nested estimate, when the single candidate ships but some
    outer folds chose a blend), ``nested_choices_`` (fold -> the
    setting chosen without it; empty when not nested), ``gain_`` and
    ``gain_folds_`` (ensemble over best single in ``metric``, positive when
    better; of the procedure, also when it did not ship), and ``selector_``:
    the shipped setting refitted on every sample.
    """

    def __init__(self, metric: str = "accuracy", steps=STEPS_GRID, bags: int = 0, n_init: int = 1,
                 max_members: int | None = None, top: int = 5, fallback: bool = True,
                 random_state: int | None = 0, uniform: bool = True, stacking=STACKING_C):
        self.metric = metric
        self.steps = steps
        self.bags = bags
        self.n_init = n_init
        self.max_members = max_members
        self.top = top
        self.fallback = fallback
        self.random_state = random_state
        self.uniform = uniform
        self.stacking = stacking

    def _selector(self, steps: int, bags: int) -> EnsembleSelection:
        return EnsembleSelection(ensemble_size=steps, metric=self.metric, n_init=min(self.n_init, steps),
                                 max_members=self.max_members, bags=bags, random_state=self.random_state)

    def _settings(self, m: int) -> list[dict]:
        """The settings tried, simplest first; one greedy step unbagged is the best single candidate.

        With ``bags``, each step count is tried bagged and (when choosing, with
        ``fallback``) unbagged too, so the estimate turns bagging on or off.
        Uniform and stacking need two candidates or more.
        """
        steps = sorted(set(self.steps))
        plain = [(s, 0) for s in steps] if self.fallback or not self.bags else []
        pairs = ([(1, 0)] if self.fallback else []) + plain + [(s, self.bags) for s in steps if self.bags]
        out = [dict(kind="single" if (s, b) == (1, 0) else "bagged" if b else "greedy", steps=s, bags=b, C=None,
                    name="best single" if (s, b) == (1, 0) else
                    f"{s} step{'s' * (s > 1)}" + (f", {b} bags" if b else ""))
               for s, b in dict.fromkeys(pairs)]
        if m > 1 and self.uniform:
            out.insert(1 if self.fallback else 0, dict(kind="uniform", steps=None, bags=0, C=None,
                                                       name=f"uniform top {min(self.top, m)}"))
        if m > 1:
            out += [dict(kind="stacking", steps=None, bags=0, C=c, name=f"stacking C={c:g}") for c in self.stacking]
        return out

    def _blenders(self, P: np.ndarray, y: np.ndarray, scorer, samples: np.ndarray, settings: list[dict],
                  order: np.ndarray, top: int) -> list:
        """Each setting fitted on ``samples`` alone (``scorer``: ``selection.prepare`` of them; ``order``:
        the candidates ranked on them)."""
        greedy = [s["steps"] for s in settings if s["kind"] in ("single", "greedy")]
        run = self._selector(max(greedy), 0).fit_prepared(scorer) if greedy else None
        out = []
        for s in settings:
            if s["kind"] in ("single", "greedy"):
                out.append(Weighted(prefix_weights(run, s["steps"])))
            elif s["kind"] == "bagged":   # a bag cuts back to its own best step, which the long run does not record
                out.append(Weighted(self._selector(s["steps"], s["bags"]).fit_prepared(scorer).weights_))
            elif s["kind"] == "uniform":
                out.append(Weighted(np.isin(np.arange(len(P)), order[:top]) / top))
            else:
                out.append(Stacker(s["C"], random_state=self.random_state or 0).fit(P[:, samples], y[samples], order))
        return out

    def _fold(self, P, y, scorer, train: np.ndarray, settings: list[dict], rank: Callable, top: int) -> list:
        """Every predictor, chosen on the training samples only: the settings, best single, top K."""
        order = rank(train)
        m = len(order)
        reports = [Weighted(np.eye(m)[order[0]]), Weighted(np.isin(np.arange(m), order[:top]) / top)]
        return self._blenders(P, y, scorer.subset(train), train, settings, order, top) + reports

    def _choose(self, settings: list[dict], scores: list[dict]) -> int:
        """The best setting by ``metric``; ties go to the lower log loss, then the simpler setting."""
        sign = METRICS[self.metric].sign
        return min(range(len(settings)), key=lambda i: (-sign * scores[i][self.metric], scores[i]["log_loss"],
                                                         SIMPLICITY[settings[i]["kind"]], settings[i]["steps"] or 0))

    def _inner(self, P: np.ndarray, y: np.ndarray, folds: np.ndarray, settings: list[dict], scorer, rank, top):
        """(fold f, each setting's blends of every other fold, selected without f and that fold), per f.

        The selection without folds j and k blends j for outer fold k and k
        for outer fold j: one selection per pair of folds.
        """
        uniq = np.unique(folds)
        inner = {f: np.zeros((len(settings),) + y.shape + P.shape[2:], np.float32) for f in uniq}
        for a, j in enumerate(uniq):
            for k in uniq[a + 1:]:
                train = np.flatnonzero((folds != j) & (folds != k))
                blenders = self._blenders(P, y, scorer.subset(train), train, settings, rank(train), top)
                for f, other in ((k, j), (j, k)):
                    held = np.flatnonzero(folds == other)
                    for i, b in enumerate(blenders):
                        inner[f][i, held] = apply(P, b, held)
        return inner.items()

    def fit(self, P: np.ndarray, y: np.ndarray, folds: np.ndarray) -> SelectionCV:
        """Cross-validate on P (candidates, samples, classes), labels y and a fold per sample, then refit."""
        P, y, folds = np.asarray(P), np.asarray(y), np.asarray(folds)
        if folds.shape != y.shape or len(np.unique(folds)) < 2:
            raise ValueError("need one fold per sample and at least two folds")
        settings = self._settings(len(P))
        if not settings:
            raise ValueError("no setting to try: give steps, or fallback=True")
        top = min(self.top, len(P))
        pooled = np.zeros((len(settings) + 2,) + y.shape + P.shape[2:])  # settings, best single, top K
        rank = ranker(P, y, self.metric)
        scorer = prepare(P, y, self.metric)   # the selections on subsets gather from its set-up
        for f in np.unique(folds):
            held = np.flatnonzero(folds == f)
            for i, b in enumerate(self._fold(P, y, scorer, np.flatnonzero(folds != f), settings, rank, top)):
                pooled[i, held] = apply(P, b, held)

        pair = (self.metric, "log_loss")
        for i, s in enumerate(settings):
            s.update(spread(y, pooled[i], folds, self.metric, dict.fromkeys(pair)))
        self.chosen_ = self._choose(settings, [s["scores"] for s in settings])
        self.settings_ = settings

        # The ensemble's estimate: each fold blended by the setting chosen without it (nested).
        ensemble = pooled[self.chosen_]
        self.nested_choices_ = {}
        if len(settings) > 1 and len(np.unique(folds)) > 2:
            ensemble = np.empty_like(ensemble)
            for f, inner in self._inner(P, y, folds, settings, scorer, rank, top):
                rest, held = folds != f, folds == f
                c = self._choose(settings, [metric_scores(y[rest], b[rest], pair) for b in inner])
                ensemble[held] = pooled[c, held]
                self.nested_choices_[int(f)] = settings[c]["name"]
        # ROC AUC (one sklearn call per class) only when it is the objective: it costs more than a selection
        names = [n for n in METRICS if n != "roc_auc" or n == self.metric]
        self.estimate_ = {name: spread(y, blends, folds, self.metric, names) for name, blends in
                          (("ensemble", ensemble), ("best_single", pooled[-2]), (f"uniform_top{top}", pooled[-1]))}
        sign = METRICS[self.metric].sign
        ens, single = self.estimate_["ensemble"], self.estimate_["best_single"]
        self.gain_ = sign * (ens["scores"][self.metric] - single["scores"][self.metric])
        self.gain_folds_ = [sign * (a - b) for a, b in zip(ens["folds"], single["folds"], strict=True)]
        # Ship a blend only if the procedure's honest estimate beats the best single candidate. When the
        # single ships, its own estimate is the ensemble's; the procedure's stays beside it when it differs
        # (some outer folds chose a blend).
        single_ships = self.fallback and settings[0]["kind"] == "single" and (
            settings[self.chosen_]["kind"] == "single" or self.gain_ <= 0)
        self.shipped_single_ = single_ships and settings[self.chosen_]["kind"] != "single"
        if single_ships:
            if self.estimate_["ensemble"] != self.estimate_["best_single"]:
                self.estimate_["nested_blend"] = self.estimate_["ensemble"]
            self.estimate_["ensemble"] = self.estimate_["best_single"]
            self.chosen_ = 0
        self.fallback_ = self.fallback and settings[self.chosen_]["kind"] == "single" and len(settings) > 1
        self.folds_ = folds
        shipped, every = settings[self.chosen_], np.arange(len(y))
        if shipped["kind"] in ("single", "greedy", "bagged"):   # the selector itself: its trajectory is reported
            self.selector_ = self._selector(shipped["steps"], shipped["bags"]).fit_prepared(scorer)
        else:
            self.selector_ = self._blenders(P, y, scorer, every, [shipped], rank(every), top)[0]
        return self
