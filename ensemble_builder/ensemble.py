"""The ensemble an experiment ships: the selection fitted on its candidates, and the files it writes.

```python
import ensemble_builder
sel = ensemble_builder.select(exp.location, top=5)     # fits, writes ensemble.json (+ submission.csv)
sel.cv_gain, sel.estimate["ensemble"]["scores"]          # the honest, cross-validated figures
```

Numpy only (``ensemble_builder.prediction`` runs the members on images).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core import storage
from core.errors import BadInput
from core.experiment import DEFAULT_RUNS, Experiment, aligned, probs_table
from ensemble_builder import candidates as cands
from ensemble_builder.crossval import STACKING_C, STEPS_GRID, SelectionCV, metric_scores, random_folds, rank_candidates
from ensemble_builder.stacking import Stacker, stacked_proba

DEFAULT_STEPS = 50   # with auto=False and no steps
# The selection's objective unless the user names one, whatever the task's metric: log loss is a proper
# scoring rule whose small differences are real, where accuracy moves in whole images and ties. On the
# time-budget benchmark's runs it gave the same or better test accuracy and a far lower test log loss
# (BENCHMARKS.md, "The selection's objective"). The task's metric is reported beside it.
OBJECTIVE = "log_loss"


@dataclass
class Selection:
    """A fitted selection: the members and weights, the in-sample scores and the cross-validated estimate."""

    experiment: str
    metric: str
    candidates: cands.Candidates
    top: int
    cv: SelectionCV
    how: str                            # which splits the estimate used, in words
    splits: str                         # "experiment folds" | "random stratified"
    folds: np.ndarray
    cv_seconds: float
    best: int                           # index of the best single candidate (by OOF score)
    scores: dict                        # in-sample: ensemble, best_single, uniform_topK -> metric -> value
    members: list[tuple[str, float]] = field(default_factory=list)
    test: tuple[list[str], np.ndarray] | None = None

    @property
    def selector(self):
        return self.cv.selector_

    @property
    def chosen(self) -> dict:
        return self.cv.settings_[self.cv.chosen_]

    @property
    def estimate(self) -> dict:
        return self.cv.estimate_

    @property
    def cv_gain(self) -> float:
        return self.cv.gain_

    @property
    def best_single(self) -> str:
        return self.candidates.ids[self.best]

    def blend(self) -> np.ndarray:
        """The ensemble's in-sample out-of-fold probabilities."""
        return self.selector.predict_proba(self.candidates.P)

    @property
    def stacking(self) -> dict | None:
        """The stacker as ensemble.json keeps it, when stacking ships."""
        return self.selector.record(self.candidates.ids) if isinstance(self.selector, Stacker) else None

    def test_probs(self) -> tuple[list[str], np.ndarray] | None:
        """(test ids, the ensemble's test probabilities), when every member has test predictions."""
        if self.test is None:
            return None
        test_ids, T = self.test
        if self.stacking is not None:
            by_id = {cid: T[i] for i, (cid, _) in enumerate(self.members)}
            return test_ids, stacked_proba(self.stacking, by_id)
        weights = np.array([w for _, w in self.members], np.float32)
        return test_ids, np.tensordot(weights, T, axes=1)

    def submission(self) -> pd.DataFrame | None:
        probs = self.test_probs()
        if probs is None:
            return None
        meta, names = self.candidates.meta, self.candidates.meta["class_names"]
        test_ids, P = probs
        return pd.DataFrame({meta.get("id_column", "image_id"): test_ids,
                             meta.get("label_column", "label"): [names[i] for i in P.argmax(1)]})

    def record(self, auto: bool) -> dict:
        """ensemble.json."""
        c, chosen, sel = self.candidates, self.chosen, self.selector
        return dict(experiment=self.experiment, metric=self.metric, full_coverage=c.full_coverage,
                    members=[dict(candidate=cid, weight=w) for cid, w in self.members],
                    scores=self.scores, trajectory=sel.trajectory_, best_step=sel.best_step_,
                    picks=[c.ids[i] for i in sel.indices_], candidates=c.ids, top=self.top, steps=chosen["steps"],
                    bags=chosen["bags"], best_single=self.best_single, stacking=self.stacking,
                    kinds={cid: c.configs[cid].get("kind", "network") for cid in c.ids},
                    cv=dict(splits=self.splits, fold_sizes=np.unique(self.folds, return_counts=True)[1].tolist(),
                            estimate=self.estimate, gain=self.cv_gain, gain_folds=self.cv.gain_folds_,
                            chosen={k: chosen[k] for k in ("name", "kind", "steps", "bags", "C")},
                            settings=self.cv.settings_, shipped_single=self.cv.shipped_single_,
                            nested_choices={str(f): name for f, name in self.cv.nested_choices_.items()},
                            fallback=self.cv.fallback_, auto=auto, seconds=self.cv_seconds))


def check_numbers(top: int, steps: int | None, init: int, bags: int, seed: int) -> None:
    """Out-of-range numbers are bad input, caught before anything is read."""
    for flag, value, low, meaning in (("--top", top, 1, "the most distinct members to keep"),
                                      ("--steps", steps, 1, "greedy picks"),
                                      ("--init", init, 0, "how many best candidates start the ensemble"),
                                      ("--bags", bags, 0, "random halves to bag over; 0 is off"),
                                      ("--seed", seed, 0, "a random seed")):
        if value is not None and value < low:
            raise BadInput(f"{flag} {value}: must be at least {low} ({meaning})")


def fit(experiment: str | None = None, top: int = 5, metric: str | None = None, steps: int | None = None,
        init: int = 1, bags: int = 0, seed: int = 0, auto: bool = True, runs: str = DEFAULT_RUNS,
        uniform: bool = True, stacking: bool = True, candidates: list[str] | None = None) -> Selection:
    """Select an ensemble (cross-validated settings unless ``auto=False``); writes nothing.

    ``uniform`` and ``stacking``: whether those settings are among the ones tried (with ``auto``);
    ``candidates``: select among these candidate ids only (default: all of the experiment's).
    """
    check_numbers(top, steps, init, bags, seed)
    experiment = storage.absolute(experiment) if experiment else cands.newest_experiment(storage.absolute(runs))
    c = cands.load(experiment, only=candidates)
    metric = metric or OBJECTIVE
    top = min(top, len(c.ids))
    n_init = min(init, top)
    # The greedy step count is chosen by cross-validation unless given (or auto=False).
    grid = [steps or DEFAULT_STEPS] if steps or not auto else [s for s in STEPS_GRID if s >= n_init]
    if not grid or n_init > max(grid):
        raise BadInput(f"--init {init}: more than the {max(grid or STEPS_GRID)} greedy steps; "
                       "lower --init or raise --steps")

    # Each fold's samples are held out in turn; candidates that cover the holdout
    # fold only have one fold, so random stratified splits of it stand in.
    if len(np.unique(c.folds)) > 1:
        folds, splits, how = c.folds, "experiment folds", f"the experiment's {len(np.unique(c.folds))} folds"
    elif len(c.y) > 1:
        folds, splits = random_folds(c.y, seed=seed), "random stratified"
        how = (f"{len(np.unique(folds))} random stratified splits of these {len(c.y)} images "
               "(the candidates cover one fold only)")
    else:
        raise BadInput(f"{experiment}: predictions for only one training image; nothing to select on")
    t0 = time.perf_counter()
    cv = SelectionCV(metric, steps=grid, bags=bags, n_init=n_init, max_members=top, top=top,
                     fallback=auto, random_state=seed, uniform=auto and uniform,
                     stacking=STACKING_C if auto and stacking else ()).fit(c.P, c.y, folds)
    cv_seconds = time.perf_counter() - t0

    ranked = rank_candidates(c.P, c.y, metric)
    best = int(ranked[0])
    selector = cv.selector_
    top_mean = c.P[ranked[:top]].mean(axis=0, dtype=np.promote_types(c.P.dtype, np.float32))  # float16: in float32
    scores = {"ensemble": metric_scores(c.y, selector.predict_proba(c.P)),
              "best_single": metric_scores(c.y, c.P[best]),
              f"uniform_top{top}": metric_scores(c.y, top_mean)}
    members = [(c.ids[i], float(selector.weights_[i])) for i in np.argsort(-selector.weights_)
               if selector.weights_[i] > 0]
    return Selection(experiment, metric, c, top, cv, how, splits, folds, cv_seconds, best, scores, members,
                     cands.test_matrix(c, [cid for cid, _ in members]))


def write(sel: Selection, auto: bool = True) -> tuple[str, str | None]:
    """ensemble/ensemble.json and, when every member has test predictions, ensemble/submission.csv and the
    ensemble's test probabilities (ensemble/test.parquet)."""
    exp = Experiment(sel.experiment)
    record = sel.record(auto)
    sub = sel.submission()
    if sub is not None:
        exp.write_ensemble_test(probs_table(*sel.test_probs()))
        record["submission"] = exp.submission_file
        storage.write_bytes(record["submission"], sub.to_csv(index=False).encode())
    storage.write_json(exp.ensemble_file(), record)
    return exp.ensemble_file(), record.get("submission")


def shipped_oof(experiment: str) -> tuple[list[str], np.ndarray]:
    """(every training image's sample_id, the shipped ensemble's out-of-fold probabilities on it): its members'
    out-of-fold predictions blended as ensemble.json says, by weight or by the stacker. What a student distils.
    BadInput when there is no ensemble or a member covers only the holdout fold."""
    exp = Experiment(experiment)
    if not exp.has_ensemble():
        raise BadInput(f"{experiment}: no ensemble/ensemble.json; run `python -m ensemble_builder select` first")
    record, order = exp.ensemble(), exp.folds()["sample_id"].tolist()
    probs = {}
    for m in record["members"]:
        table = exp.candidate(m["candidate"]).oof()
        if table.num_rows != len(order):
            raise BadInput(f"{exp.candidate(m['candidate']).oof_file}: out-of-fold predictions of {table.num_rows} "
                           f"of the {len(order)} training images; a student needs the ensemble on every image: "
                           "cross-fit first (python -m searchspace.run ... --crossfit-only), then select")
        probs[m["candidate"]] = aligned(table, order)
    if record.get("stacking"):
        return order, stacked_proba(record["stacking"], probs).astype(np.float32)
    return order, sum(float(m["weight"]) * probs[m["candidate"]] for m in record["members"]).astype(np.float32)


def select(experiment: str | None = None, top: int = 5, **options) -> Selection:
    """Fit the selection and write ensemble.json (and submission.csv); returns the fitted selection.

    Options as ``fit``'s: ``metric``, ``steps``, ``init``, ``bags``, ``seed``, ``auto``, ``runs``.
    """
    sel = fit(experiment, top, **options)
    write(sel, options.get("auto", True))
    return sel
