"""ensemble_builder.gain: a trial's gain to the greedy ensemble of the finished trials, and the pool.

The gain is checked against a direct computation: with two greedy steps,
Caruana's ensemble is the best single candidate, or that candidate blended
with the best partner (with replacement), whichever scores better.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.experiment import Experiment, probs_table
from core.metrics import METRICS
from ensemble_builder.gain import Pool, ensemble_gain, prior_score


def direct_two_step(P: np.ndarray, y: np.ndarray, metric: str) -> float:
    m = METRICS[metric]
    fn, greater = m.fn, m.greater_is_better
    pick = max if greater else min
    singles = [fn(y, p) for p in P]
    first = int(np.argmax(singles) if greater else np.argmin(singles))
    pairs = [fn(y, (P[first] + p) / 2) for p in P]
    return pick(singles[first], pick(pairs))


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    n, C = 60, 3
    y = rng.integers(0, C, n)
    def model(skill):
        logits = rng.normal(0, 1, (n, C))
        logits[np.arange(n), y] += skill
        e = np.exp(logits)
        return (e / e.sum(1, keepdims=True)).astype(np.float32)
    return y, np.stack([model(1.0), model(1.2)]), model(1.1)


@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_the_gain_is_the_rise_of_the_greedy_ensemble(data, metric):
    y, pool, new = data
    sign = METRICS[metric].sign
    expected = sign * (direct_two_step(np.concatenate([pool, new[None]]), y, metric) - direct_two_step(pool, y, metric))
    assert ensemble_gain(pool, new, y, metric, steps=2) == pytest.approx(expected, abs=1e-9)


def test_a_copy_of_a_pool_member_adds_nothing(data):
    y, pool, _ = data
    assert ensemble_gain(pool, pool[1], y, "accuracy", steps=5) == pytest.approx(0.0, abs=1e-12)


def test_against_an_empty_pool_the_gain_is_the_score_over_the_class_prior(data):
    y, _, new = data
    empty = np.zeros((0,) + new.shape, np.float32)
    prior = np.bincount(y, minlength=3) / len(y)
    assert prior_score(y, 3, "accuracy") == pytest.approx(np.mean(np.argmax(prior) == y))
    assert ensemble_gain(empty, new, y, "accuracy") == pytest.approx(
        METRICS["accuracy"].fn(y, new) - prior_score(y, 3, "accuracy"))


def test_the_pool_reads_only_new_entries_and_leaves_the_trial_itself_out(tmp_path, data):
    y, pool, new = data
    ids = [f"s{i}" for i in range(len(y))]
    exp = Experiment(str(tmp_path / "exp"))
    exp.write_folds(pd.DataFrame({"sample_id": ids, "path": "", "label": y, "fold": 0}))
    reader = Pool(exp.location, ids[::-1], y[::-1], "accuracy")   # any sample order: aligned by id
    assert reader.refresh().shape[0] == 0
    exp.write_pool("t1", probs_table(ids, pool[0]))
    assert np.allclose(reader.refresh()[0], pool[0][::-1])
    first = reader.members["t1"]
    exp.write_pool("t2", probs_table(ids, pool[1]))
    assert reader.refresh().shape[0] == 2 and reader.members["t1"] is first   # t1 was not read again
    assert reader.refresh(exclude="t2").shape[0] == 1
    gain, size, seconds = reader.gain(new[::-1], exclude="t2")
    assert size == 1 and seconds >= 0
    assert gain == pytest.approx(ensemble_gain(pool[:1, ::-1], new[::-1], y[::-1], "accuracy"))
