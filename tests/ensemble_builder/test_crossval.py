"""Cross-validated ensemble selection: honest scores, the settings and fallback they choose, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from core.experiment import probs_table
from core.metrics import METRICS, accuracy, log_loss
from ensemble_builder.__main__ import main
from ensemble_builder.crossval import SelectionCV, prefix_weights, random_folds, rank_candidates
from ensemble_builder.greedy import EnsembleSelection


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def independent(m=6, n=400, C=4, quality=1.0, seed=0):
    """Candidates of equal quality whose errors are independent: averaging them helps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    return softmax(quality * np.eye(C)[y] + rng.normal(size=(m, n, C))), y


def one_strong(m=15, n=120, C=3, seed=0):
    """Candidate 3 picks the true class with chance 0.8 (0.45 on its pick); the others are random probabilities."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    pick = np.where(rng.random(n) < 0.8, y, (y + 1) % C)
    strong = np.full((n, C), 0.275)
    strong[np.arange(n), pick] = 0.45
    noise = rng.dirichlet(np.ones(C), size=(m - 1, n))
    return np.concatenate([noise[:3], strong[None], noise[3:]]).astype(np.float32), y


# --- the pieces ----------------------------------------------------------------

@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_prefix_weights_equal_a_fit_with_fewer_steps(metric):
    P, y = independent(m=12, n=200, quality=0.6)
    for n_init, max_members in ((1, None), (3, 4), (0, None)):
        long = EnsembleSelection(40, metric, n_init=n_init, max_members=max_members).fit(P, y)
        for steps in sorted({max(n_init, 1), 3, 7, 20, 40}):
            short = EnsembleSelection(steps, metric, n_init=n_init, max_members=max_members).fit(P, y)
            assert np.array_equal(prefix_weights(long, steps), short.weights_), (n_init, max_members, steps)


def test_rank_is_the_selectors_order():
    P, y = independent(m=10, n=150)
    P[7] = P[2]   # an exact tie: the lower index first
    for metric in ("accuracy", "log_loss", "f1_macro"):
        rank = rank_candidates(P, y, metric)
        assert rank[0] == EnsembleSelection(1, metric).fit(P, y).indices_[0]
        m = METRICS[metric]
        fn, greater = m.fn, m.greater_is_better
        scores = [fn(y, P[i]) for i in rank]
        assert scores == sorted(scores, reverse=greater)
        assert list(rank).index(2) < list(rank).index(7)


def test_random_folds_are_stratified_and_cover_every_sample():
    y = np.repeat([0, 1, 2], [50, 30, 7])
    folds = random_folds(y, 5, seed=1)
    assert sorted(np.unique(folds)) == [0, 1, 2, 3, 4]
    for c in range(3):
        counts = np.bincount(folds[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert len(np.unique(random_folds(np.array([0, 1, 2]), 5))) == 3   # one image per class: still splits


def test_held_out_scores_are_pooled_over_folds():
    P, y = independent(m=8, n=300, seed=3)
    folds = np.arange(300) % 3
    cv = SelectionCV("accuracy", top=3).fit(P, y, folds)
    # best single, by hand: chosen on the other folds, scored on the held-out one
    pooled = np.empty((300, 4), np.float32)
    for f in range(3):
        held = folds == f
        pooled[held] = P[rank_candidates(P[:, ~held], y[~held], "accuracy")[0], held]
    single = cv.estimate_["best_single"]
    assert single["scores"]["accuracy"] == accuracy(y, pooled)
    assert single["scores"]["log_loss"] == pytest.approx(log_loss(y, pooled))
    assert single["folds"] == [accuracy(y[folds == f], pooled[folds == f]) for f in range(3)]
    assert single["mean"] == pytest.approx(single["scores"]["accuracy"])   # equal folds: the mean is the pool
    assert single["std"] == pytest.approx(np.std(single["folds"], ddof=1))
    # the best-single setting of the grid is the same predictor
    assert cv.settings_[0]["name"] == "best single" and cv.settings_[0]["folds"] == single["folds"]
    assert set(cv.estimate_) == {"ensemble", "best_single", "uniform_top3"}


# --- what the estimate says --------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_overfitting_selection_gains_less_under_cross_validation(seed):
    # 40 barely informative candidates, 40 images: greedy selection fits the noise in-sample.
    rng = np.random.default_rng(seed)
    y = np.arange(40) % 2
    P = softmax(0.4 * np.eye(2)[y] + rng.normal(size=(40, 40, 2)))
    cv = SelectionCV("accuracy", steps=(50,), fallback=False, uniform=False, stacking=()).fit(P, y, np.arange(40) % 4)
    in_sample = accuracy(y, cv.selector_.predict_proba(P))
    in_sample_gain = in_sample - max(accuracy(y, p) for p in P)
    assert in_sample_gain >= 0.15
    assert cv.gain_ < in_sample_gain - 0.05
    assert cv.estimate_["ensemble"]["scores"]["accuracy"] < in_sample - 0.15


def test_nested_estimate_blends_each_fold_with_the_setting_chosen_without_it():
    P, y = independent(m=10, n=240, quality=0.6, seed=5)
    folds = np.arange(240) % 4
    cv = SelectionCV("accuracy", top=3).fit(P, y, folds)
    pooled = np.empty((240, 4))
    for f in range(4):
        rest, held = folds != f, folds == f
        inner = SelectionCV("accuracy", top=3).fit(P[:, rest], y[rest], folds[rest])   # the whole procedure
        chosen = inner.settings_[inner.chosen_]
        assert cv.nested_choices_[f] == chosen["name"]
        if chosen["name"] == "best single":
            w = np.eye(len(P))[rank_candidates(P[:, rest], y[rest], "accuracy")[0]]
        else:
            w = EnsembleSelection(chosen["steps"], "accuracy").fit(P[:, rest], y[rest]).weights_
        pooled[held] = np.tensordot(w, P[:, held], axes=1)
    ens = cv.estimate_["ensemble"]
    assert ens["scores"]["accuracy"] == pytest.approx(accuracy(y, pooled))
    assert ens["folds"] == pytest.approx([accuracy(y[folds == f], pooled[folds == f]) for f in range(4)])
    single = cv.estimate_["best_single"]["scores"]["accuracy"]
    assert cv.gain_ == pytest.approx(accuracy(y, pooled) - single)


def test_nested_estimate_takes_out_the_optimism_of_choosing_the_setting():
    # 30 weak candidates, 60 images: the best of five settings' CV scores is luckier than the procedure.
    plain, nested = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        y = np.arange(60) % 2
        P = softmax(0.4 * np.eye(2)[y] + rng.normal(size=(30, 60, 2)))
        cv = SelectionCV("accuracy").fit(P, y, np.arange(60) % 5)
        single = cv.estimate_["best_single"]["scores"]["accuracy"]
        plain.append(cv.settings_[cv.chosen_]["scores"]["accuracy"] - single)
        nested.append(cv.gain_)
        assert len(set(cv.nested_choices_.values())) >= 1 and set(cv.nested_choices_) == set(range(5))
    assert np.mean(nested) < np.mean(plain) - 0.01


def test_two_folds_are_not_nested():
    P, y = independent(m=6, n=200)
    cv = SelectionCV("accuracy").fit(P, y, np.arange(200) % 2)
    assert cv.nested_choices_ == {}
    assert cv.estimate_["ensemble"]["scores"]["accuracy"] == cv.settings_[cv.chosen_]["scores"]["accuracy"]


@pytest.mark.parametrize("seed", range(3))
def test_falls_back_to_the_single_model_when_no_blend_helps(seed):
    P, y = one_strong(seed=seed)
    cv = SelectionCV("accuracy", max_members=5).fit(P, y, np.arange(len(y)) % 5)
    assert cv.fallback_ and cv.settings_[cv.chosen_]["name"] == "best single"
    assert np.array_equal(cv.selector_.weights_, np.eye(len(P))[3])
    assert cv.estimate_["ensemble"] == cv.estimate_["best_single"] and cv.gain_ == 0
    blends = [s["scores"]["accuracy"] for s in cv.settings_[1:]]
    assert max(blends) <= cv.settings_[0]["scores"]["accuracy"]


def test_complementary_candidates_gain_under_cross_validation():
    P, y = independent()
    cv = SelectionCV("accuracy", max_members=5).fit(P, y, np.arange(len(y)) % 5)
    assert not cv.fallback_ and cv.settings_[cv.chosen_]["kind"] in ("greedy", "uniform", "stacking")
    assert cv.gain_ > 0.15 and min(cv.gain_folds_) > 0
    assert len(np.flatnonzero(cv.selector_.weights_)) > 1
    chosen = cv.settings_[cv.chosen_]["scores"]["accuracy"]
    assert all(s["scores"]["accuracy"] <= chosen for s in cv.settings_)


def test_ties_go_to_the_simpler_setting():
    P, y = independent(m=1)
    cv = SelectionCV("accuracy").fit(np.repeat(P, 4, axis=0), y, np.arange(len(y)) % 5)  # copies: all blends equal
    assert cv.chosen_ == 0 and cv.fallback_
    cv = SelectionCV("accuracy", fallback=False).fit(np.repeat(P, 4, axis=0), y, np.arange(len(y)) % 5)
    assert cv.settings_[cv.chosen_]["kind"] == "uniform" and not cv.fallback_   # the simplest blend
    cv = SelectionCV("accuracy", fallback=False, uniform=False, stacking=()).fit(np.repeat(P, 4, axis=0), y,
                                                                                 np.arange(len(y)) % 5)
    assert cv.settings_[cv.chosen_]["steps"] == 5 and not cv.fallback_


def test_bagged_settings_are_fitted_as_given():
    P, y = independent(m=8, n=200)
    folds = np.arange(200) % 4
    cv = SelectionCV("log_loss", steps=(5, 20), bags=3, random_state=1, uniform=False, stacking=()).fit(P, y, folds)
    assert [s["name"] for s in cv.settings_] == ["best single", "5 steps", "20 steps", "5 steps, 3 bags",
                                                 "20 steps, 3 bags"]    # bagging on or off: the estimate picks
    best = max(cv.settings_, key=lambda s: (-s["scores"]["log_loss"]))
    assert cv.settings_[cv.chosen_] is best
    chosen = cv.settings_[cv.chosen_]
    expect = EnsembleSelection(chosen["steps"], "log_loss", bags=chosen["bags"], random_state=1).fit(P, y)
    assert np.array_equal(cv.selector_.weights_, expect.weights_)
    given = SelectionCV("log_loss", steps=(20,), bags=3, fallback=False, uniform=False,
                        stacking=()).fit(P, y, folds)   # --no-auto: as given
    assert [s["name"] for s in given.settings_] == ["20 steps, 3 bags"]


# --- stacking and the shipping rule ---------------------------------------------------

def permuted(n=300, C=4, seed=0):
    """Candidate 0 is confidently right only after a relabelling (it says y+1 for y); candidates 1 and 2 are
    honest but noisy. No convex blend can undo a relabelling; a logistic regression on log-probabilities can."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    shifted = softmax(4.0 * np.eye(C)[(y + 1) % C] + 0.3 * rng.normal(size=(n, C)))
    noisy = softmax(0.8 * np.eye(C)[y] + rng.normal(size=(2, n, C)))
    return np.concatenate([shifted[None], noisy]), y


def test_stacking_learns_what_no_weighted_blend_can():
    P, y = permuted()
    cv = SelectionCV("accuracy", max_members=5).fit(P, y, np.arange(len(y)) % 5)
    shipped = cv.settings_[cv.chosen_]
    assert shipped["kind"] == "stacking" and not cv.fallback_ and not cv.shipped_single_
    # nested: every outer fold was blended by a stacker chosen and fitted without it
    assert all(name.startswith("stacking") for name in cv.nested_choices_.values())
    weighted = [s["scores"]["accuracy"] for s in cv.settings_ if s["kind"] != "stacking"]
    assert cv.estimate_["ensemble"]["scores"]["accuracy"] > 0.95 > max(weighted) + 0.2
    assert cv.gain_ > 0.2 and min(cv.gain_folds_) > 0
    # the shipped stacker carries over to new samples from the same candidates
    P_new, y_new = permuted(seed=1)
    assert accuracy(y_new, cv.selector_.predict_proba(P_new)) > 0.95


def test_stacking_on_noise_is_not_shipped():
    """One honest candidate and pure-noise others on few samples: a stacker can only fit the noise, so the
    nested estimate keeps it out (the single candidate or a weighted blend ships, with a positive gain or none)."""
    for seed in range(3):
        P, y = one_strong(m=8, n=90, seed=seed)
        cv = SelectionCV("accuracy", max_members=5).fit(P, y, np.arange(len(y)) % 5)
        assert cv.settings_[cv.chosen_]["kind"] != "stacking", seed
        assert cv.fallback_ or cv.gain_ > 0, seed


@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_a_shipped_blend_always_has_a_positive_nested_gain(metric):
    """Over pools where blending helps, hurts and ties, a blend ships only with a positive nested CV gain;
    otherwise the best single candidate ships (and its estimate is the single's)."""
    shipped_single = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        quality = rng.uniform(0.0, 1.2, size=(6, 1, 1))   # some pools barely better than chance
        y = rng.integers(0, 3, 60)
        P = softmax(quality * np.eye(3)[y] + rng.normal(size=(6, 60, 3)))
        cv = SelectionCV(metric, max_members=5).fit(P, y, np.arange(60) % 4)
        if cv.fallback_:
            best = rank_candidates(P, y, metric)[0]
            assert np.array_equal(cv.selector_.weights_, np.eye(6)[best]), seed
            assert cv.estimate_["ensemble"] == cv.estimate_["best_single"], seed
            shipped_single += cv.shipped_single_
            if cv.shipped_single_:   # the blend that lost is still reported, beside what shipped
                assert cv.estimate_["nested_blend"]["scores"] != cv.estimate_["best_single"]["scores"]
        else:
            assert cv.gain_ > 0, seed
    assert shipped_single >= 1   # the rule did act on some pool, not only the CV's own choice


# --- the CLI -------------------------------------------------------------------------

def write_experiment(root, P: np.ndarray, y: np.ndarray, folds: np.ndarray, covered=None, metric="accuracy"):
    """An experiment folder as the search writes it: experiment.json, folds.parquet, candidates/*/oof.parquet."""
    root.mkdir(parents=True)
    ids = [f"img{i:04d}.png" for i in range(len(y))]
    names = [f"class{c}" for c in range(P.shape[2])]
    (root / "experiment.json").write_text(json.dumps({"task": "handmade", "metric": metric, "class_names": names}))
    pd.DataFrame({"sample_id": ids, "path": ids, "label": y, "fold": folds}).to_parquet(root / "folds.parquet")
    rows = np.arange(len(y)) if covered is None else np.flatnonzero(covered)
    for i, p in enumerate(P):
        (root / "candidates" / f"c{i}").mkdir(parents=True)
        pq.write_table(probs_table([ids[r] for r in rows], p[rows]), root / "candidates" / f"c{i}" / "oof.parquet")
    return root


def test_select_prints_the_estimate_first_and_writes_both(tmp_path, capsys):
    P, y = independent(m=6, n=300)
    exp = write_experiment(tmp_path / "exp", P, y, np.arange(300) % 5)
    assert main(["select", "--experiment", str(exp), "--metric", "accuracy"]) == 0
    out = capsys.readouterr().out
    head = out.index("cross-validated accuracy (the experiment's 5 folds")
    assert head < out.index("members:") < out.index("in-sample out-of-fold scores, optimistic")
    assert "CV gain over the best single candidate: +" in out and "chose " in out
    assert "in-sample gain over the best single candidate" in out
    assert "without each fold, the selection chose: fold 0: " in out

    report = json.loads((exp / "ensemble" / "ensemble.json").read_text())
    assert set(report["scores"]) == {"ensemble", "best_single", "uniform_top5"}   # in-sample, as before
    cv = report["cv"]
    assert set(cv["estimate"]) == set(report["scores"]) and cv["splits"] == "experiment folds"
    assert cv["fold_sizes"] == [60] * 5 and cv["fallback"] is False and cv["auto"] is True
    assert [s["name"] for s in cv["settings"]] == ["best single", "uniform top 5", "5 steps", "10 steps", "25 steps",
                                                   "50 steps", "stacking C=0.1", "stacking C=1"]
    assert report["steps"] == cv["chosen"]["steps"] and report["bags"] == 0
    assert len(cv["estimate"]["ensemble"]["folds"]) == 5 and cv["gain"] > 0
    assert sum(m["weight"] for m in report["members"]) == pytest.approx(1.0)


def test_select_falls_back_and_says_so(tmp_path, capsys):
    P, y = one_strong()
    exp = write_experiment(tmp_path / "exp", P, y, np.arange(len(y)) % 5)
    assert main(["select", "--experiment", str(exp), "--metric", "accuracy"]) == 0
    out = capsys.readouterr().out
    assert "ensemble (= best single)" in out
    assert "fell back to the best single candidate (c3): no blend beat it under cross-validation" in out
    report = json.loads((exp / "ensemble" / "ensemble.json").read_text())
    assert report["cv"]["fallback"] is True and report["members"] == [{"candidate": "c3", "weight": 1.0}]

    # --no-auto: the flags as given, no fallback; the estimate is still the headline
    assert main(["select", "--experiment", str(exp), "--metric", "accuracy", "--no-auto", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "settings as given (--no-auto): 20 steps" in out and "cross-validated accuracy" in out
    report = json.loads((exp / "ensemble" / "ensemble.json").read_text())
    assert report["cv"]["fallback"] is False and report["steps"] == 20
    assert [s["name"] for s in report["cv"]["settings"]] == ["20 steps"]


def test_select_given_steps_are_kept(tmp_path, capsys):
    P, y = independent(m=5, n=200)
    exp = write_experiment(tmp_path / "exp", P, y, np.arange(200) % 4)
    assert main(["select", "--experiment", str(exp), "--steps", "7", "--bags", "2", "--metric", "log_loss"]) == 0
    out = capsys.readouterr().out
    report = json.loads((exp / "ensemble" / "ensemble.json").read_text())
    assert f"chose {report['cv']['chosen']['name']} (--steps)" in out and "(a reduction: lower is better)" in out
    settings = report["cv"]["settings"]
    assert [s["name"] for s in settings] == ["best single", "uniform top 5", "7 steps", "7 steps, 2 bags",
                                             "stacking C=0.1", "stacking C=1"]   # bagging on or off
    best = min(settings, key=lambda s: s["scores"]["log_loss"])
    assert report["cv"]["chosen"]["name"] == best["name"] and report["metric"] == "log_loss"
    assert (report["steps"], report["bags"]) in ((7, 0), (7, 2), (None, 0))


def test_holdout_only_candidates_use_random_stratified_splits(tmp_path, capsys):
    P, y = independent(m=5, n=250)
    folds = np.arange(250) % 5
    exp = write_experiment(tmp_path / "exp", P, y, folds, covered=folds == 0)
    assert main(["select", "--experiment", str(exp), "--metric", "accuracy", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "holdout fold only" in out
    assert "5 random stratified splits of these 50 images (the candidates cover one fold only)" in out
    cv = json.loads((exp / "ensemble" / "ensemble.json").read_text())["cv"]
    assert cv["splits"] == "random stratified" and sum(cv["fold_sizes"]) == 50


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--bags", "-1"], "--bags -1: must be at least 0"),
    (["--init", "-1"], "--init -1: must be at least 0"),
    (["--seed", "-3"], "--seed -3: must be at least 0"),
    (["--top", "0"], "--top 0: must be at least 1"),
    (["--init", "4", "--steps", "3"], "--init 4: more than the 3 greedy steps"),
])
def test_out_of_range_numbers_are_one_line_and_exit_2(tmp_path, capsys, flags, words):
    P, y = independent(m=5, n=100)
    exp = write_experiment(tmp_path / "exp", P, y, np.arange(100) % 5)
    assert main(["select", "--experiment", str(exp)] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {words}") and len(err.strip().splitlines()) == 1
    assert not (exp / "ensemble").exists()


def test_the_default_objective_is_log_loss_and_the_task_metric_is_reported(tmp_path, capsys):
    P, y = independent(m=6, n=300)
    exp = write_experiment(tmp_path / "exp", P, y, np.arange(300) % 5)   # a task whose metric is accuracy
    assert main(["select", "--experiment", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "cross-validated log_loss (the experiment's 5 folds" in out and "(a reduction: lower is better)" in out
    report = json.loads((exp / "ensemble" / "ensemble.json").read_text())
    assert report["metric"] == "log_loss"
    assert {"accuracy", "log_loss"} <= set(report["cv"]["estimate"]["ensemble"]["scores"])
    chosen = min(report["cv"]["settings"], key=lambda s: s["scores"]["log_loss"])   # chosen on log loss
    assert report["cv"]["chosen"]["name"] == chosen["name"]


def test_report_shows_the_estimate_as_the_headline(tmp_path, capsys):
    from searchspace.report import cv_score, cv_section, fig_trajectory

    P, y = independent(m=6, n=300)
    exp = write_experiment(tmp_path / "exp", P, y, np.arange(300) % 5)
    assert main(["select", "--experiment", str(exp), "--metric", "accuracy"]) == 0
    ens = json.loads((exp / "ensemble" / "ensemble.json").read_text())
    est = ens["cv"]["estimate"]["ensemble"]
    assert cv_score(ens, "ensemble") == (est["scores"]["accuracy"], est["std"])
    html = cv_section(ens)
    assert html.startswith("<h3>Cross-validated scores</h3>") and "the experiment's 5 folds" in html
    assert f"Chosen: {ens['cv']['chosen']['name']}." in html and html.count("class='best'") == 1
    assert len(ens["cv"]["nested_choices"]) == 5
    assert "Without each fold, the selection chose: fold 0: " in html
    if ens["cv"]["chosen"]["kind"] in ("single", "greedy", "bagged"):
        assert fig_trajectory(ens).startswith(b"\x89PNG")
    else:   # uniform or stacking: no greedy trajectory to draw
        assert ens["trajectory"] == [] and fig_trajectory(ens) is None
    del ens["cv"]   # an ensemble.json from before: no estimate, nothing claimed
    ens["trajectory"] = ens["trajectory"] or [0.5, 0.6]
    assert cv_score(ens, "ensemble") is None and fig_trajectory(ens).startswith(b"\x89PNG")
