"""Selection at scale: float16 candidates and the blocked paths give the float32 results."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.errors import BadInput
from core.experiment import Experiment, probs_table
from core.metrics import METRICS
from ensemble_builder import candidates as cands
from ensemble_builder import crossval, ensemble, greedy
from ensemble_builder.crossval import SelectionCV, rank_candidates
from ensemble_builder.greedy import EnsembleSelection

SCORED = ["accuracy", "log_loss", "f1_macro"]


def candidates(m=70, n=500, C=5, seed=0):
    """float32 softmax of noisy logits, skill varying (70 candidates: more than the 32- and 64-candidate blocks)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    z = rng.uniform(0.2, 2.5, m)[:, None, None] * np.eye(C)[y] + rng.normal(size=(n, C)) + rng.normal(size=(m, n, C))
    P = np.exp(z - z.max(-1, keepdims=True))
    return (P / P.sum(-1, keepdims=True)).astype(np.float32), y


def same_fit(a: EnsembleSelection, b: EnsembleSelection) -> None:
    assert a.all_indices_ == b.all_indices_ and a.trajectory_ == b.trajectory_
    assert np.array_equal(a.weights_, b.weights_)


@pytest.mark.parametrize("metric", SCORED)
@pytest.mark.parametrize("vectorised", [True, False], ids=["vectorised", "naive"])
def test_float16_selects_exactly_as_its_float32_copy(metric, vectorised):
    # Sums and blends of a float16 P are float32: the same numbers as the float32 copy, no copy made.
    P16 = candidates()[0].astype(np.float16)
    y = candidates()[1]
    for kw in ({}, {"n_init": 3}, {"max_members": 4}, {"bags": 2}):
        same_fit(EnsembleSelection(30, metric, vectorised=vectorised, **kw).fit(P16, y),
                 EnsembleSelection(30, metric, vectorised=vectorised, **kw).fit(P16.astype(np.float32), y))


@pytest.mark.parametrize("metric", SCORED)
def test_float16_is_float32_within_rounding(metric):
    P, y = candidates(seed=1)
    a = EnsembleSelection(30, metric).fit(P, y)
    b = EnsembleSelection(30, metric).fit(P.astype(np.float16), y)
    assert b.all_indices_[0] == a.all_indices_[0]   # the best single candidate
    # float32's picks blended from float16 probabilities: about 1e-5 of log loss, and an argmax
    # flips only where two classes were within float16 rounding (a sample or two of 500)
    fn, tol = METRICS[metric].fn, 1e-4 if metric == "log_loss" else 2 / len(y)
    S32, S16 = np.zeros(P.shape[1:], np.float32), np.zeros(P.shape[1:], np.float32)
    for k, c in enumerate(a.all_indices_):
        S32 += P[c]
        S16 += P[c].astype(np.float16)
        assert abs(fn(y, S16 / (k + 1)) - fn(y, S32 / (k + 1))) <= tol


def test_cross_validation_on_float16_equals_float32_copy():
    P, y = candidates(m=40, n=400)
    P16, folds = P.astype(np.float16), np.arange(len(y)) % 4
    for metric in ("accuracy", "log_loss"):
        a = SelectionCV(metric, max_members=5).fit(P16, y, folds)
        b = SelectionCV(metric, max_members=5).fit(P16.astype(np.float32), y, folds)
        assert a.settings_ == b.settings_ and a.estimate_ == b.estimate_ and a.gain_ == b.gain_
        assert np.array_equal(a.selector_.weights_, b.selector_.weights_)


@pytest.mark.parametrize("metric", SCORED)
def test_blocks_smaller_than_the_candidates_change_nothing(metric, monkeypatch):
    P, y = candidates(m=70, n=300)
    whole_rank = rank_candidates(P, y, metric)
    whole = EnsembleSelection(30, metric, max_members=6).fit(P, y)
    monkeypatch.setattr(crossval, "_RANK_BLOCK", 3)             # ranking: 3 candidates at a time
    monkeypatch.setattr(greedy, "_BLOCK_BYTES", 70 * 5 * 4)  # accuracy/F1 scorer: one sample per block
    assert np.array_equal(rank_candidates(P, y, metric), whole_rank)
    same_fit(EnsembleSelection(30, metric, max_members=6).fit(P, y), whole)


# --- loading -------------------------------------------------------------------------

def write_experiment(root, P: np.ndarray, y: np.ndarray, shuffle: bool = False):
    """Through core.experiment, as the cross-fit writes it; ``shuffle``: each file's rows in its own order."""
    rng = np.random.default_rng(0)
    exp = Experiment(str(root))
    ids = [f"img{i:04d}.png" for i in range(len(y))]
    exp.write_meta(dict(task="handmade", metric="accuracy", class_names=[f"class{c}" for c in range(P.shape[2])]))
    exp.write_folds(pd.DataFrame(dict(sample_id=ids, path=ids, label=y, fold=np.arange(len(y)) % 5)))
    for i, p in enumerate(P):
        rows = rng.permutation(len(y)) if shuffle else np.arange(len(y))
        exp.candidate(f"c{i:02d}").write([], probs_table([ids[r] for r in rows], p[rows]), {})
    return exp


@pytest.mark.parametrize("shuffle", [False, True], ids=["index order", "own orders"])
def test_load_as_float16(tmp_path, shuffle):
    P, y = candidates(m=12, n=200)
    exp = write_experiment(tmp_path / "exp", P, y, shuffle)
    c32, c16 = cands.load(exp.location), cands.load(exp.location, dtype=np.float16)
    assert c32.P.dtype == np.float32 and np.array_equal(c32.P, P)   # aligned by sample_id, not row order
    assert c16.P.dtype == np.float16 and np.array_equal(c16.P, P.astype(np.float16))
    assert c16.ids == c32.ids and np.array_equal(c16.y, y) and np.array_equal(c16.folds, c32.folds)


def test_large_experiments_select_on_float16_end_to_end(tmp_path, monkeypatch, capsys):
    from ensemble_builder.__main__ import main

    P, y = candidates(m=12, n=300)
    exp = write_experiment(tmp_path / "exp", P, y)
    monkeypatch.setattr(cands, "FLOAT16_ABOVE", P.nbytes - 1)   # this experiment counts as large
    sel = ensemble.select(exp.location)
    assert sel.candidates.P.dtype == np.float16
    expect = SelectionCV("log_loss", max_members=5, top=5).fit(P.astype(np.float16).astype(np.float32), y,
                                                              np.arange(len(y)) % 5)
    assert np.array_equal(sel.selector.weights_, expect.selector_.weights_) and sel.cv_gain == expect.gain_
    report = json.loads(open(exp.ensemble_file()).read())
    assert sum(m["weight"] for m in report["members"]) == pytest.approx(1.0)
    assert main(["select", "--experiment", exp.location]) == 0   # the CLI's report on float16 too
    assert "per-class report" in capsys.readouterr().out


def test_a_sample_twice_in_one_candidate_is_bad_input(tmp_path):
    P, y = candidates(m=3, n=50)
    exp = write_experiment(tmp_path / "exp", P, y)
    ids = [f"img{i:04d}.png" for i in range(len(y))]
    exp.candidate("c01").write([], probs_table(ids[:-1] + ids[:1], P[1]), {})
    with pytest.raises(BadInput, match="appears twice"):
        cands.load(exp.location)
