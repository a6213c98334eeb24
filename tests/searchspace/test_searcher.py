"""searchspace.searcher.TruthfulOptunaSearch: what Tune snapshots of it stays small as trials finish.

Tune pickles the searcher (``save``) into every experiment snapshot, and
restores it (``restore``) on ``Tuner.restore``. The searcher here is the real
one on a real Optuna journal file, the storage the search uses, driven with
Tune's calls in Tune's order.
"""
from __future__ import annotations

import optuna
import pytest

from core.experiment import open_journal
from searchspace.searcher import TruthfulOptunaSearch


def _space(trial):
    trial.suggest_float("x", 0.0, 1.0)
    trial.suggest_categorical("c", ["a", "b", "c"])


def _searcher(journal) -> TruthfulOptunaSearch:
    return TruthfulOptunaSearch(space=_space, metric="accuracy", mode="max", max_t=3, study_name="s",
                                sampler=optuna.samplers.RandomSampler(seed=0), storage=open_journal(str(journal)))


def _finish(searcher: TruthfulOptunaSearch, tid: str, how: str) -> None:
    searcher.suggest(tid)
    searcher.on_trial_result(tid, {"accuracy": 0.5, "training_iteration": 1})
    if how == "complete":
        for step in (2, 3):
            searcher.on_trial_result(tid, {"accuracy": 0.6, "training_iteration": step})
        searcher.on_trial_complete(tid, {"accuracy": 0.6, "training_iteration": 3})
    elif how == "stopped":  # the result ASHA stops on reaches on_trial_complete only (Tune's order)
        searcher.on_trial_complete(tid, {"accuracy": 0.4, "training_iteration": 2})
    else:
        searcher.on_trial_complete(tid, error=True)


def _saved_bytes(searcher: TruthfulOptunaSearch, path) -> int:
    searcher.save(str(path))
    return path.stat().st_size


def test_the_snapshot_does_not_grow_with_finished_trials(tmp_path):
    """Finished trials live in the study's journal, not in the pickled searcher. A told trial's
    Optuna handle (its params and distributions) used to stay: ~260 bytes a trial with this
    two-parameter space (~1.7 kB with a task's space); now ~40 (its id among the completed)."""
    searcher = _searcher(tmp_path / "study.log")
    ways = ("complete", "stopped", "failed")
    for i in range(10):
        _finish(searcher, f"t{i}", ways[i % 3])
    small = _saved_bytes(searcher, tmp_path / "a.pkl")
    for i in range(10, 70):
        _finish(searcher, f"t{i}", ways[i % 3])
    large = _saved_bytes(searcher, tmp_path / "b.pkl")
    assert (large - small) / 60 < 100, (small, large)
    states = [t.state for t in searcher._ot_study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 24  # 70 trials: 24 complete, 23 pruned, 23 failed
    assert states.count(optuna.trial.TrialState.PRUNED) == 23
    assert states.count(optuna.trial.TrialState.FAIL) == 23


@pytest.mark.parametrize("how", ["complete", "stopped"])
def test_a_running_trial_survives_save_and_restore(tmp_path, how):
    """Tuner.restore: the running trial's handle is in the snapshot, and telling it after the
    restore records it in the study as Tune ended it."""
    journal = tmp_path / "study.log"
    searcher = _searcher(journal)
    _finish(searcher, "done", "complete")
    config = searcher.suggest("running")
    searcher.on_trial_result("running", {"accuracy": 0.3, "training_iteration": 1})
    searcher.save(str(tmp_path / "searcher.pkl"))

    restored = _searcher(tmp_path / "other.log")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("running") == config  # the same Optuna trial, not a new one
    if how == "complete":
        for step in (2, 3):
            restored.on_trial_result("running", {"accuracy": 0.7, "training_iteration": step})
        restored.on_trial_complete("running", {"accuracy": 0.7, "training_iteration": 3})
    else:
        restored.on_trial_complete("running", {"accuracy": 0.35, "training_iteration": 2})
    study = optuna.load_study(study_name="s", storage=open_journal(str(journal)))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 2
    if how == "complete":
        assert trials[1].state == optuna.trial.TrialState.COMPLETE and trials[1].value == 0.7
    else:
        assert trials[1].state == optuna.trial.TrialState.PRUNED and trials[1].intermediate_values == {1: 0.3, 2: 0.35}


def test_late_calls_for_a_finished_trial_change_nothing(tmp_path):
    """A second completion or a late result for a told trial is ignored (as Ray's OptunaSearch
    does), though its handle is gone."""
    searcher = _searcher(tmp_path / "study.log")
    _finish(searcher, "t", "complete")
    searcher.on_trial_result("t", {"accuracy": 0.9, "training_iteration": 4})
    searcher.on_trial_complete("t", {"accuracy": 0.9, "training_iteration": 4})
    searcher.on_trial_complete("t", {"accuracy": 0.1, "training_iteration": 1})
    (trial,) = searcher._ot_study.get_trials(deepcopy=False)
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.6


def test_a_cut_tune_snapshot_is_put_back_whole_from_its_spare(tmp_path):
    """Tune writes a snapshot in its staging folder, then copies it to the storage with plain writes; a kill
    during the copy cuts a file, and Tune's restore would start the search again. The generator keeps the
    snapshot whole beside it (saved after Tune's own files, before the copy); restore_spare puts back what
    differs and leaves a whole copy alone."""
    from ray.tune.search import ConcurrencyLimiter

    from core.experiment import Experiment
    from searchspace.searcher import SparedSearchGenerator, restore_spare, snapshot_names

    experiment, staging = Experiment(str(tmp_path / "exp")), tmp_path / "staging"
    staging.mkdir()
    generator = SparedSearchGenerator(ConcurrencyLimiter(_searcher(tmp_path / "study.log"), max_concurrent=2),
                                      experiment.tune_spare_file)
    generator.searcher.suggest("t0")
    names = snapshot_names("S1")
    (staging / names[0]).write_text('{"trial_data": []}')   # Tune writes the trials first, then the search
    generator.save_to_dir(str(staging), "S1")
    (tmp_path / "exp").mkdir(exist_ok=True)
    for name in names:   # Tune's copy to the storage
        (tmp_path / "exp" / name).write_bytes((staging / name).read_bytes())
    assert restore_spare(experiment) == []
    (tmp_path / "exp" / names[1]).write_bytes(b"")   # cut during the copy
    (tmp_path / "exp" / names[2]).unlink()           # not copied yet
    assert restore_spare(experiment) == names[1:]
    for name in names:
        assert (tmp_path / "exp" / name).read_bytes() == (staging / name).read_bytes(), name
    restored = SparedSearchGenerator(ConcurrencyLimiter(_searcher(tmp_path / "study.log"), max_concurrent=2), None)
    restored.restore_from_dir(str(tmp_path / "exp"))
    assert restored.searcher.live_trials == {"t0"}
