"""Tests for greedy ensemble selection (Caruana et al., 2004) and its metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from core.metrics import METRICS, accuracy, f1_macro, log_loss, roc_auc
from ensemble_builder import greedy
from ensemble_builder.greedy import EnsembleSelection, prepare

BOTH = pytest.mark.parametrize("vectorised", [True, False], ids=["vectorised", "naive"])


def binary(p_true, y) -> np.ndarray:
    """(n, 2) probabilities giving the true class of each sample probability ``p_true``."""
    p1 = np.where(y == 1, p_true, 1 - np.asarray(p_true, float))
    return np.stack([1 - p1, p1], axis=1)


def random_candidates(m=30, n=300, C=4, seed=0, dtype=np.float64, duplicates=True):
    """Softmax of noisy logits with per-candidate quality; a few exact duplicate candidates."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    quality = rng.uniform(0.0, 2.5, m)
    z = quality[:, None, None] * np.eye(C)[y] + rng.normal(size=(m, n, C))
    P = np.exp(z - z.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    if duplicates:
        P[m - 3:] = P[:3]  # exact ties between candidates: tie-break must pick the lower index
    return P.astype(dtype), y


# --- metrics -----------------------------------------------------------------

def test_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    for C in (2, 5):
        y = rng.integers(0, C, 400)
        P = rng.dirichlet(np.ones(C), 400)
        assert accuracy(y, P) == skm.accuracy_score(y, P.argmax(1))
        assert log_loss(y, P) == pytest.approx(skm.log_loss(y, P, labels=range(C)), rel=1e-12)
        assert f1_macro(y, P) == pytest.approx(skm.f1_score(y, P.argmax(1), average="macro"), rel=1e-12)
        expected = skm.roc_auc_score(y, P[:, 1]) if C == 2 else skm.roc_auc_score(y, P, multi_class="ovr")
        assert roc_auc(y, P) == pytest.approx(expected, rel=1e-12)
    assert {k: m.greater_is_better for k, m in METRICS.items()} == {
        "accuracy": True, "log_loss": False, "f1_macro": True, "roc_auc": True}


def test_log_loss_clips_zero_probability():
    y = np.array([0, 1])
    P = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert log_loss(y, P) == pytest.approx(-math.log(1e-15) / 2)


def test_accuracy_ties_go_to_first_class():
    P = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert accuracy(np.array([0, 1]), P) == 0.5


# --- selection -----------------------------------------------------------------

@BOTH
def test_complementary_weaker_models_beat_redundant_stronger_one(vectorised):
    # 10 binary samples; numbers are each model's probability of the true class.
    y = np.array([0, 1] * 5)
    A = binary([.6] * 8 + [.4] * 2, y)                                    # right on 0-7: acc 0.8
    B = binary([.6] * 5 + [.45] * 3 + [.9, .45], y)                       # right on 0-4, 8: acc 0.6
    C = binary([.6, .6, .45, .45, .45, .6, .6, .6, .45, .9], y)           # right on 0,1,5-7,9: acc 0.6
    D = binary([.6] * 7 + [.35] * 3, y)                                   # A's errors and one more: acc 0.7
    P = np.stack([A, B, C, D])
    # A first; A+B and A+C reach 0.9 (A+D 0.7); A+B+C gets all 10 right (e.g. sample 9:
    # (.4 + .45 + .9) / 3 = .583), while D only repeats A's mistakes and is never useful.
    sel = EnsembleSelection(ensemble_size=6, metric="accuracy", vectorised=vectorised).fit(P, y)
    assert sel.indices_[0] == 0 and set(sel.indices_) == {0, 1, 2}
    assert sel.trajectory_[:3] == [0.8, 0.9, 1.0] and sel.best_step_ == 2
    assert accuracy(y, sel.predict_proba(P)) == 1.0 > max(accuracy(y, p) for p in P)
    assert accuracy(y, D) > accuracy(y, B) == accuracy(y, C)  # D is stronger than B and C alone


@BOTH
def test_complementary_pair_replaces_overconfident_best_single(vectorised):
    # A is the most accurate (0.8) but almost certain when wrong, so by log loss it is the
    # worst single; B and C (0.6 each) err on different samples and together get all right.
    y = np.array([0, 1] * 5)
    A = binary([.6] * 8 + [1e-4] * 2, y)
    B = binary([.4] * 4 + [.8] * 6, y)
    C = binary([.8] * 6 + [.4] * 4, y)
    P = np.stack([A, B, C])
    sel = EnsembleSelection(ensemble_size=6, metric="log_loss", vectorised=vectorised).fit(P, y)
    # B and C tie alone (0.500) -> lower index B; B+C = 0.453 beats B+A = 0.603 and B+B.
    assert sel.indices_ == [1, 2]
    assert sel.trajectory_[1] < min(log_loss(y, p) for p in P)
    assert accuracy(y, sel.predict_proba(P)) == 1.0 > accuracy(y, A)
    np.testing.assert_allclose(sel.weights_, [0, 0.5, 0.5])


@BOTH
def test_exact_trajectory_hand_computed(vectorised):
    # y = [0, 0, 1, 1]; columns below are P(class 1). All values are dyadic, so sums are exact.
    y = np.array([0, 0, 1, 1])
    p1 = np.array([
        [0.25, 0.625, 0.75, 0.375],     # c0: predicts 0,1,1,0 -> acc 0.5
        [0.375, 0.25, 0.4375, 0.875],   # c1: predicts 0,0,0,1 -> acc 0.75
        [0.875, 0.125, 0.8125, 0.625],  # c2: predicts 1,0,1,1 -> acc 0.75
    ])
    P = np.stack([1 - p1, p1], axis=2)
    sel = EnsembleSelection(ensemble_size=3, metric="accuracy", vectorised=vectorised).fit(P, y)
    # Step 1: c1 and c2 tie at 0.75; log loss c1 = -mean(ln[.625,.75,.4375,.875]) = 0.430
    #         < c2 = -mean(ln[.125,.875,.8125,.625]) = 0.723 -> c1.
    # Step 2: (c1+c0)/2 = [.3125,.4375,.59375,.625] -> all right, 1.0; c1+c1 and c1+c2: 0.75 -> c0.
    # Step 3: S = c1+c0, P(1) sums [.625,.875,1.1875,1.25]. Adding c0, c1 or c2 all score 1.0
    #         (c0 and c2 through exact 1.5/1.5 ties, which argmax gives to class 0 = truth);
    #         log losses: +c0 -mean(ln[2.125,1.5,1.9375,1.625]/3) = 0.522,
    #         +c1 -mean(ln[2,1.875,1.625,2.125]/3) = 0.458, +c2 -mean(ln[1.5,2,2,1.875]/3) = 0.494 -> c1.
    assert sel.all_indices_ == [1, 0, 1]
    assert sel.trajectory_ == [0.75, 1.0, 1.0]
    assert sel.best_step_ == 1 and sel.indices_ == [1, 0]  # ties -> earliest best step
    np.testing.assert_array_equal(sel.weights_, [0.5, 0.5, 0.0])
    assert log_loss(y, P[1]) == pytest.approx(-np.mean(np.log([.625, .75, .4375, .875])))
    assert -np.mean(np.log(np.array([2, 1.875, 1.625, 2.125]) / 3)) == pytest.approx(0.4583, abs=1e-4)


@BOTH
@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_sorted_init_starts_with_the_best(vectorised, metric):
    P, y = random_candidates(seed=1, duplicates=False)
    m = METRICS[metric]
    fn, greater = m.fn, m.greater_is_better
    single = np.array([fn(y, p) for p in P])
    losses = np.array([log_loss(y, p) for p in P])
    best_two = list(np.lexsort((np.arange(len(P)), losses, -single if greater else single))[:2])
    sel = EnsembleSelection(ensemble_size=10, metric=metric, n_init=2, vectorised=vectorised).fit(P, y)
    assert sel.all_indices_[:2] == best_two
    assert sel.trajectory_[0] == single[best_two[0]]
    assert sel.trajectory_[1] == pytest.approx(fn(y, (P[best_two[0]] + P[best_two[1]]) / 2))
    plain = EnsembleSelection(ensemble_size=10, metric=metric, vectorised=vectorised).fit(P, y)
    assert plain.all_indices_[0] == best_two[0]


@BOTH
def test_max_members_caps_distinct_members(vectorised):
    P, y = random_candidates(seed=2)
    free = EnsembleSelection(ensemble_size=25, metric="log_loss", vectorised=vectorised).fit(P, y)
    assert len(set(free.all_indices_)) > 3
    capped = EnsembleSelection(ensemble_size=25, metric="log_loss", max_members=3,
                               vectorised=vectorised).fit(P, y)
    assert len(set(capped.all_indices_)) == 3
    # identical until the free run takes a 4th distinct member; then only the first 3 are re-picked
    cut = next(i for i in range(25) if len(set(free.all_indices_[:i + 1])) == 4)
    assert capped.all_indices_[:cut] == free.all_indices_[:cut]
    assert set(capped.all_indices_) == set(free.all_indices_[:cut])
    assert np.count_nonzero(capped.weights_) <= 3


def test_trims_to_best_step():
    # c0 is perfect; n_init=2 forces c1 (second best, confidently wrong on half) in as well.
    # Re-adding c0 afterwards improves the log loss but never back to c0 alone.
    y = np.array([0, 1, 0, 1])
    c0 = binary([.9, .9, .9, .9], y)
    c1 = binary([.8, .8, .2, .2], y)
    c2 = binary([.6, .6, .1, .1], y)
    P = np.stack([c0, c1, c2])
    sel = EnsembleSelection(ensemble_size=6, metric="log_loss", n_init=2).fit(P, y)
    assert sel.all_indices_ == [0, 1, 0, 0, 0, 0]
    assert len(sel.trajectory_) == 6 and sel.trajectory_[1] > sel.trajectory_[0]
    assert sel.best_step_ == 0 and sel.indices_ == [0]
    np.testing.assert_array_equal(sel.weights_, [1, 0, 0])


@pytest.mark.parametrize("metric", ["accuracy", "log_loss", "f1_macro", "roc_auc"])
def test_fitted_attributes_and_predict_proba(metric):
    P, y = random_candidates(seed=4, m=12, n=150)
    sel = EnsembleSelection(ensemble_size=15, metric=metric).fit(P, y)
    greater = METRICS[metric].greater_is_better
    traj = np.array(sel.trajectory_)
    assert len(traj) == 15
    assert sel.best_step_ == int(np.argmax(traj if greater else -traj))
    assert sel.indices_ == sel.all_indices_[:sel.best_step_ + 1]
    assert sel.weights_.shape == (12,) and sel.weights_.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(sel.weights_, np.bincount(sel.indices_, minlength=12) / len(sel.indices_))
    blend = sel.predict_proba(P)
    assert blend.shape == (150, 4)
    np.testing.assert_allclose(blend.sum(1), 1.0)
    np.testing.assert_allclose(blend, np.mean(P[sel.indices_], axis=0))
    assert METRICS[metric].fn(y, blend) == pytest.approx(traj[sel.best_step_])


@BOTH
def test_bagging_is_deterministic(vectorised):
    P, y = random_candidates(seed=5, m=20)
    kw = dict(ensemble_size=10, metric="accuracy", bags=4, vectorised=vectorised)
    a = EnsembleSelection(random_state=7, **kw).fit(P, y)
    b = EnsembleSelection(random_state=7, **kw).fit(P, y)
    c = EnsembleSelection(random_state=8, **kw).fit(P, y)
    np.testing.assert_array_equal(a.weights_, b.weights_)
    assert a.indices_ == b.indices_ and a.trajectory_ == b.trajectory_
    assert not np.array_equal(a.weights_, c.weights_)
    assert len(a.bag_indices_) == 4 and a.weights_.sum() == pytest.approx(1.0)
    # each bag draws from half of the candidates, so no bag uses more than 10 of them
    assert all(len(set(bag)) <= 10 for bag in a.bag_indices_)
    np.testing.assert_allclose(a.weights_, np.mean(
        [np.bincount(bag, minlength=20) / len(bag) for bag in a.bag_indices_], axis=0))
    assert a.predict_proba(P).shape == (300, 4)


@pytest.mark.parametrize("metric", ["accuracy", "log_loss", "f1_macro"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_vectorised_matches_naive(metric, seed):
    dtype = np.float32 if seed % 2 else np.float64
    P, y = random_candidates(m=40, n=257, C=3 + seed, seed=seed, dtype=dtype)
    for kw in ({}, {"n_init": 3}, {"max_members": 4}, {"bags": 2, "random_state": seed}):
        fast = EnsembleSelection(ensemble_size=20, metric=metric, vectorised=True, **kw).fit(P, y)
        slow = EnsembleSelection(ensemble_size=20, metric=metric, vectorised=False, **kw).fit(P, y)
        assert fast.all_indices_ == slow.all_indices_, kw
        assert fast.trajectory_ == slow.trajectory_, kw  # bit-identical scores
        np.testing.assert_array_equal(fast.weights_, slow.weights_)


@pytest.mark.parametrize("metric", ["accuracy", "log_loss", "f1_macro"])
def test_a_subset_of_prepared_candidates_selects_as_a_fresh_fit_on_its_samples(metric, monkeypatch):
    """What the cross-validation does: one ``prepare``, then selections on ``subset``s gathered from it.

    Tiny working blocks (a few rows each) so that every blocked path runs; sorted and shuffled
    subsets; the members-only view (max_members) and a bag's pool, which gathers per block.
    """
    monkeypatch.setattr(greedy, "_BLOCK_BYTES", 4096)
    P, y = random_candidates(m=30, n=300, C=4, seed=5, dtype=np.float32)
    scorer = prepare(P, y, metric)
    rng = np.random.default_rng(0)
    for samples in (np.flatnonzero(np.arange(300) % 3 != 0), rng.permutation(300)[:170]):
        sub = scorer.subset(samples)
        for kw in ({}, {"max_members": 3}, {"bags": 2}, {"n_init": 2}):
            a = EnsembleSelection(15, metric, **kw).fit_prepared(sub)
            b = EnsembleSelection(15, metric, vectorised=False, **kw).fit(P[:, samples], y[samples])
            assert a.all_indices_ == b.all_indices_ and a.trajectory_ == b.trajectory_, kw
    with pytest.raises(ValueError, match="prepared for"):
        EnsembleSelection(5, "accuracy" if metric != "accuracy" else "log_loss").fit_prepared(scorer)


def test_vectorised_matches_naive_with_many_ties():
    # Few samples and coarse probabilities: many exact score ties at every step.
    rng = np.random.default_rng(9)
    y = rng.integers(0, 3, 12)
    P = rng.integers(0, 4, size=(25, 12, 3)).astype(np.float64) + 1
    P /= P.sum(-1, keepdims=True)
    for metric in ("accuracy", "f1_macro"):
        fast = EnsembleSelection(ensemble_size=15, metric=metric).fit(P, y)
        slow = EnsembleSelection(ensemble_size=15, metric=metric, vectorised=False).fit(P, y)
        assert fast.all_indices_ == slow.all_indices_ and fast.trajectory_ == slow.trajectory_


def test_duplicate_candidates_tie_to_lowest_index():
    P, y = random_candidates(seed=6, m=10)
    P[9] = P[4]
    sel = EnsembleSelection(ensemble_size=20, metric="log_loss").fit(P, y)
    assert 9 not in sel.all_indices_


def test_invalid_arguments():
    P, y = random_candidates(m=5, n=20)
    with pytest.raises(ValueError):
        EnsembleSelection(metric="nope").fit(P, y)
    with pytest.raises(ValueError):
        EnsembleSelection(n_init=3, max_members=2).fit(P, y)
    with pytest.raises(ValueError):
        EnsembleSelection().fit(P, y[:-1])
    with pytest.raises(ValueError):
        EnsembleSelection().fit(P, y + 10)
